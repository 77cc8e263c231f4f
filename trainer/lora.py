"""Trainable LoRA on our FLUX DiT (BFL module names), and its export in the diffusers / peft layout.

Training: each targeted `nn.Linear` gets `down (r, in)` and `up (out, r)` parameters and a forward hook that adds
`alpha / r * up @ down @ dropout(x)` to its output (peft's `lora_B(lora_A(dropout(x))) * lora_alpha / r`); `down`
starts Kaiming-uniform as in peft, `up` at zero, and the base weights are frozen. Parameter and state-dict names
of the base model are never changed.

Export (`to_diffusers`): keys `transformer.<diffusers module>.lora_A.weight` / `.lora_B.weight`, without `.default`,
which diffusers' `FluxPipeline.load_lora_weights`, ComfyUI and our `LoraManager` read as they are. A LoRA on a fused
BFL module becomes one per diffusers projection with the same `A` and its row slice of `B` (`qkv` -> `to_q/to_k/to_v`,
`linear1` -> `to_q/to_k/to_v/proj_mlp`), so the delta is exactly the same; the final adaLN's `B` halves are swapped
back to diffusers' (scale, shift). `alpha / r` is folded into `B` and the file declares `lora_alpha = r`: ComfyUI
ignores peft metadata and scales a LoRA without `.alpha` keys by 1, so only a folded file means the same everywhere.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

from services.denoiser.convert.flux import _DOUBLE, _SINGLE, _TOP, FINAL_ADALN
from trainer.spec import SpecError

PEFT_METADATA_KEY = "lora_adapter_metadata"
DIFFMESH_METADATA_KEY = "diffmesh"
# Attention qkv / proj and MLPs of the double blocks, linear1 / linear2 of the single blocks.
DEFAULT_TARGETS = (
    r"double_blocks\.\d+\.(img|txt)_attn\.(qkv|proj)",
    r"double_blocks\.\d+\.(img|txt)_mlp\.[02]",
    r"single_blocks\.\d+\.linear[12]",
)
_BLOCK = re.compile(r"^(double_blocks|single_blocks)\.(\d+)\.(.+)$")


def _inverse(table: Mapping[str, tuple[str, int, int]]) -> dict[str, list[tuple[str, int, int]]]:
    """BFL module -> [(diffusers module, part, parts)] from a diffusers -> BFL table (Linears only)."""
    out: dict[str, list[tuple[str, int, int]]] = {}
    for diffusers, (bfl, part, parts) in table.items():
        if not bfl.endswith("_norm"):
            out.setdefault(bfl, []).append((diffusers, part, parts))
    return {k: sorted(v, key=lambda t: t[1]) for k, v in out.items()}


_TOP_INV, _DOUBLE_INV, _SINGLE_INV = _inverse(_TOP), _inverse(_DOUBLE), _inverse(_SINGLE)


def diffusers_names(bfl: str) -> list[tuple[str, int, int]]:
    """Our (BFL) Linear -> the diffusers modules it holds, with (part, parts) of its output rows."""
    match = _BLOCK.match(bfl)
    if match is None:
        return _TOP_INV.get(bfl, [])
    kind, index, inner = match.groups()
    table, prefix = (
        (_DOUBLE_INV, "transformer_blocks")
        if kind == "double_blocks"
        else (_SINGLE_INV, "single_transformer_blocks")
    )
    return [(f"{prefix}.{index}.{d}", part, parts) for d, part, parts in table.get(inner, [])]


def _matches(pattern: re.Pattern[str], raw: str, name: str) -> bool:
    return bool(pattern.fullmatch(name)) or name == raw or name.endswith("." + raw)


def select_targets(model: nn.Module, patterns: Sequence[str]) -> list[str]:
    """The Linears to train: names (BFL, or diffusers: a diffusers projection selects the fused module that
    holds it) matched in full, or as a dotted suffix, by any pattern; the defaults when `patterns` is empty."""
    linears = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    chosen: set[str] = set()
    for raw in patterns or DEFAULT_TARGETS:
        try:
            pattern = re.compile(raw)
        except re.error as e:
            raise SpecError("lora.targetModules", f"{raw!r} is not a valid regular expression: {e}") from None
        hits = {
            n
            for n in linears
            if _matches(pattern, raw, n) or any(_matches(pattern, raw, d) for d, _, _ in diffusers_names(n))
        }
        if not hits:
            raise SpecError(
                "lora.targetModules",
                f"{raw!r} matches no Linear of the model; e.g. {linears[:3]} ... (BFL names) or "
                "'attn.to_q', 'ff.net.0.proj' (diffusers names)",
            )
        chosen |= hits
    return [n for n in linears if n in chosen]


class TrainableLora(nn.Module):
    """LoRA parameters for `targets` of `model`, applied by forward hooks while attached."""

    def __init__(
        self,
        model: nn.Module,
        targets: Iterable[str],
        rank: int,
        alpha: float,
        dropout: float = 0.0,
        generator: torch.Generator | None = None,
    ) -> None:
        super().__init__()
        modules = dict(model.named_modules())
        self.targets = list(targets)
        self.rank, self.alpha, self.dropout = rank, alpha, dropout
        self.scale = alpha / rank
        self.down = nn.ParameterList()
        self.up = nn.ParameterList()
        self._linears: list[nn.Linear] = []
        for name in self.targets:
            linear = modules[name]
            if not isinstance(linear, nn.Linear):
                raise ValueError(f"{name} is a {type(linear).__name__}, not a Linear")
            down = torch.empty(rank, linear.in_features)
            bound = 1.0 / math.sqrt(linear.in_features)  # kaiming_uniform_(a=sqrt(5)), as peft and nn.Linear
            down.uniform_(-bound, bound, generator=generator)
            self.down.append(nn.Parameter(down))
            self.up.append(nn.Parameter(torch.zeros(linear.out_features, rank)))
            self._linears.append(linear)
        self._hooks: list[RemovableHandle] = []

    def attach(self) -> None:
        """Add the LoRA hooks (idempotent)."""
        if self._hooks:
            return
        for i, linear in enumerate(self._linears):
            self._hooks.append(linear.register_forward_hook(self._hook(i)))

    def detach(self) -> None:
        for h in self._hooks:
            h.remove()
        self._hooks = []

    def _hook(self, i: int):
        def hook(module: nn.Module, args: tuple[Any, ...], output: Tensor) -> Tensor:
            x = F.dropout(args[0], self.dropout, self.training) if self.dropout else args[0]
            down, up = self.down[i], self.up[i]
            if not torch.is_autocast_enabled(x.device.type):
                x = x.to(down.dtype)
            delta = F.linear(F.linear(x, down), up)
            return output + (delta * self.scale).to(output.dtype)

        return hook

    def bfl_state_dict(self) -> dict[str, Tensor]:
        """`<BFL module>.lora_A.weight` / `.lora_B.weight` (+ `.alpha`): the trainable state, and a LoRA file
        our `LoraManager` reads (the BFL / ComfyUI layout)."""
        out: dict[str, Tensor] = {}
        for name, down, up in zip(self.targets, self.down, self.up, strict=True):
            out[f"{name}.lora_A.weight"] = down.detach().clone()
            out[f"{name}.lora_B.weight"] = up.detach().clone()
            out[f"{name}.alpha"] = torch.tensor(float(self.alpha))
        return out

    def load_bfl_state_dict(self, state: Mapping[str, Tensor]) -> None:
        with torch.no_grad():
            for name, down, up in zip(self.targets, self.down, self.up, strict=True):
                down.copy_(state[f"{name}.lora_A.weight"])
                up.copy_(state[f"{name}.lora_B.weight"])


def to_diffusers(lora: TrainableLora, prefix: str = "transformer.") -> dict[str, Tensor]:
    """The diffusers / peft state dict (no `.default`), `alpha / r` folded into `lora_B`."""
    out: dict[str, Tensor] = {}
    for name, down, up in zip(lora.targets, lora.down, lora.up, strict=True):
        a = down.detach().float().contiguous()
        b = up.detach().float() * lora.scale  # (out, r)
        parts = diffusers_names(name)
        if not parts:
            raise ValueError(f"{name} has no diffusers counterpart")
        if name == FINAL_ADALN:
            first, second = b.chunk(2, dim=0)
            b = torch.cat((second, first), dim=0)  # BFL (shift, scale) -> diffusers (scale, shift)
        width = a.shape[1]  # q, k, v each take `in_features` rows of a fused projection
        for diffusers, part, n in parts:
            start = part * width
            stop = b.shape[0] if part == n - 1 else start + width
            out[f"{prefix}{diffusers}.lora_A.weight"] = a.clone()
            out[f"{prefix}{diffusers}.lora_B.weight"] = b[start:stop].contiguous()
    return out


def lora_metadata(
    lora: TrainableLora, state: Mapping[str, Tensor], info: Mapping[str, Any]
) -> dict[str, str]:
    """safetensors metadata: diffusers' `lora_adapter_metadata` (peft LoraConfig, keys prefixed
    `transformer.`) and our own `diffmesh` record (base model, family, rank, alpha, steps, seed...)."""
    modules = sorted({k.removeprefix("transformer.").rsplit(".lora_", 1)[0] for k in state})
    peft = {
        "transformer.r": lora.rank,
        "transformer.lora_alpha": lora.rank,  # alpha / r is folded into lora_B
        "transformer.target_modules": modules,
        "transformer.lora_dropout": lora.dropout,
        "transformer.bias": "none",
        "transformer.use_dora": False,
        "transformer.use_rslora": False,
    }
    ours = {
        "format": "diffmesh-lora/1",
        "rank": lora.rank,
        "alpha": lora.alpha,
        "dropout": lora.dropout,
        "alpha_folded_into_lora_B": True,
        "targets": lora.targets,
        **info,
    }
    return {
        "format": "pt",
        PEFT_METADATA_KEY: json.dumps(peft, indent=2, sort_keys=True),
        DIFFMESH_METADATA_KEY: json.dumps(ours, sort_keys=True),
    }
