"""CLIP text encoder (FLUX.1's CLIP-L): the pooled vector and the last hidden states, computed as diffusers'
`FluxPipeline._get_clip_prompt_embeds` does (padded to the tokenizer's 77 tokens, pooler output)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch

from services.common.models import Component
from services.text_encoder.encoders.base import (
    Encoded,
    Tokens,
    from_pretrained,
    length_limit,
    sibling_tokenizer,
)

if TYPE_CHECKING:  # transformers is imported when a model loads, not with the service
    from transformers import CLIPTextModel

CLIP_MAX_LENGTH = 77


class ClipTextEncoder:
    """`encode(prompts)` -> "pooled_prompt_embeds" (B, D) and "clip_prompt_embeds" (B, 77, D)."""

    kind = "clip"
    outputs = ("pooled_prompt_embeds", "clip_prompt_embeds")

    def __init__(self, model: CLIPTextModel, tokenizer: Any, device: torch.device) -> None:
        self.model = model
        self.tokens = Tokens(tokenizer)
        self.device = device
        self.length = length_limit(tokenizer, CLIP_MAX_LENGTH)

    def max_length(self, max_sequence_length: int | None = None) -> int:
        """Always the tokenizer's length: `max_sequence_length` is the T5 encoder's."""
        return self.length

    def encode(self, prompts: list[str], *, max_sequence_length: int | None = None, **_: Any) -> Encoded:
        ids, counts, truncated = self.tokens(prompts, self.length)  # (B, 77)
        with torch.inference_mode():
            out = self.model(ids.to(self.device), output_hidden_states=False)
        return Encoded(
            {"pooled_prompt_embeds": out.pooler_output, "clip_prompt_embeds": out.last_hidden_state},
            counts,
            truncated,
        )


def load_tokenizer(folder: Any) -> Any:
    from transformers import CLIPTokenizer

    return CLIPTokenizer.from_pretrained(str(folder), local_files_only=True)


def load_clip(component: Component, device: torch.device) -> ClipTextEncoder:
    """`text_encoder/` (config.json + safetensors) with its tokenizer in the sibling `tokenizer/`."""
    from transformers import CLIPTextModel

    tokenizer = load_tokenizer(sibling_tokenizer(component.path))
    return ClipTextEncoder(from_pretrained(CLIPTextModel, component.path, device), tokenizer, device)
