"""Denoiser models by the class name in their config (`_class_name`, e.g. "FluxTransformer2DModel").

Each loader takes the component and the device and returns an object with
`denoise(inputs: DenoiseInputs, on_step: Callable[[int, int], None], is_cancelled: Callable[[], bool])
-> dict[str, Tensor]` ("latents", and "audio_latents" for joint models). Families add theirs here.
"""

from __future__ import annotations

from services.common.runtime import Loader

DENOISERS: dict[str, Loader] = {}
