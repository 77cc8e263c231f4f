"""Text encoders by the class name in their config (`architectures[0]` / `_class_name`).

Each loader takes the component and the device and returns an object with
`encode(prompts: list[str], *, max_sequence_length: int | None, **options) -> dict[str, Tensor]`, whose
keys are the output names the denoiser reads (e.g. "prompt_embeds", "pooled_prompt_embeds").
Families add their encoders here.
"""

from __future__ import annotations

from services.common.runtime import Loader

ENCODERS: dict[str, Loader] = {}
