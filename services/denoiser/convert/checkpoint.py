"""What every checkpoint converter of the denoiser shares: naming keys in an error, and comparing a state
dict with the keys and shapes a model expects."""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import torch
from torch import Tensor


def name_keys(keys: Iterable[str], limit: int = 10) -> str:
    """`[a, b, ... (+n more)]`, sorted, for an error message."""
    keys = sorted(keys)
    more = f" ... (+{len(keys) - limit} more)" if len(keys) > limit else ""
    return "[" + ", ".join(keys[:limit]) + more + "]"


def state_dict_mismatch(state_dict: Mapping[str, Tensor], expected: Mapping[str, torch.Size]) -> str | None:
    """None when `state_dict` has exactly the expected keys and shapes, else what differs."""
    missing = expected.keys() - state_dict.keys()
    unexpected = state_dict.keys() - expected.keys()
    wrong = [
        f"{k} {tuple(state_dict[k].shape)} != {tuple(shape)}"
        for k, shape in expected.items()
        if k in state_dict and state_dict[k].shape != shape
    ]
    if not (missing or unexpected or wrong):
        return None
    return f"missing keys {name_keys(missing)}; unexpected keys {name_keys(unexpected)}; wrong shapes {name_keys(wrong)}"
