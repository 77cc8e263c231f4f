"""Text encoders by the class name in their config (`architectures[0]` / `_class_name`).

Each loader takes the component and the device and returns an encoder with
- `outputs: tuple[str, ...]`, the names it produces (the names the denoiser reads, e.g. "prompt_embeds"
  (B, L, D), "pooled_prompt_embeds" (B, D));
- `max_length(max_sequence_length: int | None) -> int`, the padded length it will use (InvalidArgument
  naming the value and the limit when the request's is too long for it);
- `encode(prompts: list[str], *, max_sequence_length: int | None) -> Encoded` (outputs, token counts before
  truncation, truncated flags).
"single-file" is one weight file given as the model spec: a umT5 (Wan's, in its own or transformers' key
names) is told from its safetensors header and encoded as Wan does; otherwise CLIP or T5 is told from its
key names. A `UMT5EncoderModel` folder is Wan's encoder inside a Wan pipeline (`model_index.json`).
Families add their encoders here.

`IMAGE_ENCODERS` are the image encoders (`encode_images(images) -> (N, L, D)`, output "image_embeds"),
by the class name of their `image_encoder/` folder.
"""

from __future__ import annotations

from typing import Any

import torch

from services.common.models import Component
from services.common.runtime import Loader
from services.text_encoder.encoders.clip import load_clip
from services.text_encoder.encoders.clip_vision import load_clip_vision
from services.text_encoder.encoders.single_file import load_single_file
from services.text_encoder.encoders.t5 import load_t5
from services.text_encoder.encoders.umt5 import is_wan_t5_file, load_umt5, load_wan_t5_file


def load_file(component: Component, device: torch.device) -> Any:
    """One weight file: Wan's umT5 (a safetensors header with umT5 keys) or, else, CLIP / T5."""
    if is_wan_t5_file(component.path):
        return load_wan_t5_file(component.path, device)
    return load_single_file(component, device)


ENCODERS: dict[str, Loader] = {
    "CLIPTextModel": load_clip,
    "T5EncoderModel": load_t5,
    "UMT5EncoderModel": load_umt5,
    "single-file": load_file,
}
IMAGE_ENCODERS: dict[str, Loader] = {
    "CLIPVisionModel": load_clip_vision,
}
