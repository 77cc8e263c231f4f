"""Audio models by the class name in their config (e.g. "Wav2Vec2ForCTC" for Wan S2V features, the LTX-2
audio VAE and vocoder). Each loader takes the component and the device and returns an object with
`encode(waveform (B, C, T), sample_rate, *, num_frames, fps) -> dict[str, Tensor]` and
`decode(latents) -> (waveform (B, C, T), sample_rate)`. Families add theirs here.
"""

from __future__ import annotations

from services.common.runtime import Loader

AUDIO_MODELS: dict[str, Loader] = {}
