"""What every text encoder shares: the result type, tokenizing with token counts, loading a transformers
model from a component directory, and finding the tokenizer beside it."""

from __future__ import annotations

import threading
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from services.common.errors import InvalidArgument, NotFound

TOKENIZER_FILES = ("tokenizer.json", "vocab.json", "spiece.model", "tokenizer_config.json")


@dataclass(frozen=True)
class Encoded:
    """Named outputs (e.g. "prompt_embeds" (B, L, D)), and per prompt the token count before truncation
    (special tokens included) and whether it was truncated."""

    outputs: dict[str, torch.Tensor]
    token_counts: list[int]
    truncated: list[bool]


class Tokens:
    """A tokenizer padding/truncating to a fixed length. HF tokenizers mutate their truncation state per
    call, so calls are serialised."""

    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer
        self._lock = threading.Lock()

    def __call__(self, prompts: list[str], max_length: int) -> tuple[torch.Tensor, list[int], list[bool]]:
        """(ids (B, max_length) int64, token counts before truncation, truncated flags)."""
        with self._lock:
            full = self.tokenizer(prompts, truncation=False, padding=False, verbose=False).input_ids
            ids = self.tokenizer(
                prompts,
                padding="max_length",
                max_length=max_length,
                truncation=True,
                return_overflowing_tokens=False,
                return_length=False,
                return_tensors="pt",
            ).input_ids
        counts = [len(row) for row in full]
        return ids, counts, [n > max_length for n in counts]


def has_tokenizer(folder: Path) -> bool:
    return folder.is_dir() and any((folder / f).is_file() for f in TOKENIZER_FILES)


def find_tokenizer(candidates: Iterable[Path], owner: Path) -> Path:
    """The first candidate folder holding tokenizer files; NotFound names every path looked at."""
    candidates = list(candidates)
    for folder in candidates:
        if has_tokenizer(folder):
            return folder
    looked = ", ".join(str(c) for c in candidates)
    raise NotFound(f"no tokenizer for {owner}: looked in {looked} (for one of {', '.join(TOKENIZER_FILES)})")


def sibling_tokenizer(component: Path) -> Path:
    """`tokenizer_2/` for `text_encoder_2/` (the hub layout), else tokenizer files in the folder itself."""
    name = component.name.replace("text_encoder", "tokenizer")
    candidates = [component.parent / name] if name != component.name else []
    return find_tokenizer([*candidates, component], component)


def from_pretrained(cls: Any, folder: Path, device: torch.device) -> Any:
    """A transformers model from a component directory, in its checkpoint dtype, in eval mode on `device`."""
    try:
        model = cls.from_pretrained(str(folder), dtype="auto", local_files_only=True)
    except (OSError, ValueError) as e:
        raise InvalidArgument(f"{folder}: cannot load {cls.__name__} ({type(e).__name__}: {e})") from None
    return model.to(device).eval()


def length_limit(tokenizer: Any, default: int) -> int:
    """The tokenizer's `model_max_length`, or `default` where it has none (HF puts a huge number there)."""
    n = int(getattr(tokenizer, "model_max_length", 0) or 0)
    return n if 0 < n < 1_000_000 else default
