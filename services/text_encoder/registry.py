"""Text encoders by the class name in their config (`architectures[0]` / `_class_name`).

Each loader takes the component and the device and returns an encoder with
- `outputs: tuple[str, ...]`, the names it produces (the names the denoiser reads, e.g. "prompt_embeds"
  (B, L, D), "pooled_prompt_embeds" (B, D));
- `max_length(max_sequence_length: int | None) -> int`, the padded length it will use (InvalidArgument
  naming the value and the limit when the request's is too long for it);
- `encode(prompts: list[str], *, max_sequence_length: int | None) -> Encoded` (outputs, token counts before
  truncation, truncated flags).
"single-file" is one weight file given as the model spec: CLIP or T5 is told from its key names.
Families add their encoders here.
"""

from __future__ import annotations

from services.common.runtime import Loader
from services.text_encoder.encoders.clip import load_clip
from services.text_encoder.encoders.single_file import load_single_file
from services.text_encoder.encoders.t5 import load_t5, load_umt5

ENCODERS: dict[str, Loader] = {
    "CLIPTextModel": load_clip,
    "T5EncoderModel": load_t5,
    "UMT5EncoderModel": load_umt5,
    "single-file": load_single_file,
}
