"""T5 / UMT5 encoders (FLUX.1's T5-XXL): the last hidden states, computed as diffusers'
`FluxPipeline._get_t5_prompt_embeds` does (padded to `max_sequence_length`, no attention mask)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from services.common.errors import InvalidArgument
from services.common.models import Component
from services.text_encoder.encoders.base import (
    Encoded,
    Tokens,
    from_pretrained,
    length_limit,
    sibling_tokenizer,
)

T5_MAX_LENGTH = 512  # FLUX.1-dev's default and T5's tokenizer limit


class T5TextEncoder:
    """`encode(prompts, max_sequence_length=L)` -> "prompt_embeds" (B, L, D)."""

    kind = "t5"
    outputs = ("prompt_embeds",)

    def __init__(self, model: torch.nn.Module, tokenizer: Any, device: torch.device) -> None:
        self.model = model
        self.tokens = Tokens(tokenizer)
        self.device = device
        self.limit = length_limit(tokenizer, T5_MAX_LENGTH)

    def max_length(self, max_sequence_length: int | None = None) -> int:
        """The padded length: `max_sequence_length`, or 512 (at most the tokenizer's limit) when None."""
        if max_sequence_length is None:
            return min(T5_MAX_LENGTH, self.limit)
        if not 1 <= max_sequence_length <= self.limit:
            raise InvalidArgument(
                f"max_sequence_length={max_sequence_length} is out of range [1, {self.limit}] "
                f"(the {self.kind} tokenizer's limit)"
            )
        return max_sequence_length

    def encode(self, prompts: list[str], *, max_sequence_length: int | None = None, **_: Any) -> Encoded:
        length = self.max_length(max_sequence_length)
        ids, counts, truncated = self.tokens(prompts, length)  # (B, L)
        with torch.inference_mode():
            embeds = self.model(ids.to(self.device), output_hidden_states=False)[0]  # (B, L, D)
        return Encoded({"prompt_embeds": embeds}, counts, truncated)


def load_tokenizer(folder: Any) -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(folder), local_files_only=True)


def _loader(class_name: str) -> Callable[[Component, torch.device], T5TextEncoder]:
    def load(component: Component, device: torch.device) -> T5TextEncoder:
        import transformers  # imported when a model loads, not with the service

        tokenizer = load_tokenizer(sibling_tokenizer(component.path))
        model = from_pretrained(getattr(transformers, class_name), component.path, device)
        return T5TextEncoder(model, tokenizer, device)

    load.__doc__ = f"`text_encoder_2/` ({class_name}) with its tokenizer in the sibling `tokenizer_2/`."
    return load


load_t5 = _loader("T5EncoderModel")
load_umt5 = _loader("UMT5EncoderModel")
