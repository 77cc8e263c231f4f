"""FLUX.1 LoRA files -> `LoraDelta`s on our (BFL) module names.

Each key is read by its name (never guessed from shapes); these layouts are known:

- diffusers / peft: `[transformer.]<diffusers module>.lora_A.weight` / `.lora_B.weight` (or `.lora_A.default.weight`
  as in a peft model's raw state dict), optional `<module>.alpha`. A file saved by diffusers carries peft's
  `r`, `lora_alpha`, `alpha_pattern`, `rank_pattern` and `use_rslora` as JSON in its `lora_adapter_metadata`.
- kohya / sd-scripts (civitai): `lora_unet_<BFL module, dots as "_">.lora_down.weight` / `.lora_up.weight` /
  `.alpha`, e.g. `lora_unet_double_blocks_0_img_attn_qkv`; and the same on diffusers module names,
  `lora_transformer_<diffusers module, dots as "_">` (e.g. `lora_transformer_transformer_blocks_0_attn_to_q`).
- BFL / ComfyUI: `[diffusion_model.]<BFL module>.lora_A.weight` / `.lora_B.weight` (or `.lora_down` / `.lora_up`),
  optional `.alpha`.

Scaling is `alpha / rank` per module, `alpha = rank` (scale 1) when a file has neither `.alpha` keys nor peft
metadata. A LoRA on one of diffusers' separate projections lands on the matching output rows of our fused one:
`to_q` / `to_k` / `to_v` on rows `[0, D)` / `[D, 2D)` / `[2D, 3D)` of `qkv`, a single block's `proj_mlp` on rows
`[3D, 3D + mlp)` of `linear1`. diffusers' `norm_out.linear` holds `(scale, shift)` where our
`final_layer.adaLN_modulation.1` holds `(shift, scale)`, so the two row halves of its `up` are swapped.

Text-encoder LoRA keys (`lora_te*`, `text_encoder*`) raise a `LoraLayoutError` by default: the text encoder runs
in another service, and dropping part of a LoRA silently would change the image without saying so. Pass
`text_encoder="skip"` to drop them with a warning instead. Keys of unknown layouts, keys that target no FLUX.1
Linear, and LoRA variants we do not implement (DoRA, LoKr / LoHa, LoRA biases, norm diffs) raise a
`LoraLayoutError` that names them.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Mapping
from typing import Literal, NamedTuple

import torch
from torch import Tensor

from services.denoiser.convert.checkpoint import name_keys
from services.denoiser.convert.flux import _DOUBLE, _SINGLE, _TOP, FINAL_ADALN
from services.denoiser.convert.lora_keys import (
    PREFIXES,
    common_problems,
    down_up_scale,
    group_keys,
    peft_scaling,
)
from services.denoiser.lora import LoraDelta, LoraLayoutError

__all__ = ["LoraLayoutError", "flux_lora_deltas"]

log = logging.getLogger(__name__)

FAMILY = "FLUX.1"
# Our Linears, by BFL module name.
_BFL_TOP = (
    "img_in",
    "txt_in",
    "time_in.in_layer",
    "time_in.out_layer",
    "vector_in.in_layer",
    "vector_in.out_layer",
    "guidance_in.in_layer",
    "guidance_in.out_layer",
    "final_layer.linear",
    FINAL_ADALN,
)
_BFL_DOUBLE = tuple(
    f"{stream}_{name}"
    for stream in ("img", "txt")
    for name in ("mod.lin", "attn.qkv", "attn.proj", "mlp.0", "mlp.2")
)
_BFL_SINGLE = ("linear1", "linear2", "modulation.lin")
_BFL_BLOCK = re.compile(r"^(double_blocks|single_blocks)\.(\d+)\.(.+)$")
_BFL_BLOCK_KOHYA = re.compile(r"^(double_blocks|single_blocks)_(\d+)_(.+)$")
_DIFFUSERS_BLOCK = re.compile(r"^(transformer_blocks|single_transformer_blocks)\.(\d+)\.(.+)$")
_DIFFUSERS_BLOCK_KOHYA = re.compile(r"^(single_transformer_blocks|transformer_blocks)_(\d+)_(.+)$")


def _linears(table: Mapping[str, tuple[str, int, int]]) -> dict[str, tuple[str, int, int]]:
    """The Linear entries of a diffusers -> BFL module table (the QK norms have no LoRAs)."""
    return {k: v for k, v in table.items() if not v[0].endswith("_norm")}


_DIFFUSERS_TOP, _DIFFUSERS_DOUBLE, _DIFFUSERS_SINGLE = _linears(_TOP), _linears(_DOUBLE), _linears(_SINGLE)


def _underscored(names) -> dict[str, str]:
    return {name.replace(".", "_"): name for name in names}


class _Target(NamedTuple):
    module: str  # BFL module name
    part: int  # which of `parts` equal-width input slices of a fused projection (the last may be wider)
    parts: int
    swap_halves: bool  # diffusers' (scale, shift) -> BFL's (shift, scale)


def _bfl_target(name: str, sep: str) -> _Target | None:
    """BFL module name (dots, or "_" as kohya writes them) -> target, None if it is not one of our Linears."""
    block = (_BFL_BLOCK if sep == "." else _BFL_BLOCK_KOHYA).match(name)
    if block is None:
        top = name if sep == "." else _underscored(_BFL_TOP).get(name)
        return _Target(top, 0, 1, False) if top in _BFL_TOP else None
    kind, index, inner = block.groups()
    names = _BFL_DOUBLE if kind == "double_blocks" else _BFL_SINGLE
    inner = inner if sep == "." else _underscored(names).get(inner)
    return _Target(f"{kind}.{index}.{inner}", 0, 1, False) if inner in names else None


def _diffusers_target(name: str, sep: str) -> _Target | None:
    """diffusers module name (dots, or "_" as kohya writes them) -> target on our modules, or None."""
    block = (_DIFFUSERS_BLOCK if sep == "." else _DIFFUSERS_BLOCK_KOHYA).match(name)
    if block is None:
        table, prefix, inner = _DIFFUSERS_TOP, "", name
    else:
        kind, index, inner = block.groups()
        double = kind == "transformer_blocks"
        table = _DIFFUSERS_DOUBLE if double else _DIFFUSERS_SINGLE
        prefix = f"{'double_blocks' if double else 'single_blocks'}.{index}."
    if sep != ".":
        inner = _underscored(table).get(inner)
    if inner not in table:
        return None
    module, part, parts = table[inner]
    return _Target(prefix + module, part, parts, module == FINAL_ADALN)


def _resolve(module: str) -> tuple[_Target, str] | None:
    """A file's module path -> (target, the diffusers module name for peft patterns or ""), None if it names
    none of our Linears."""
    if module.startswith("lora_unet_"):  # BFL names; some tools write diffusers names after the same prefix
        name = module.removeprefix("lora_unet_")
        target = _bfl_target(name, "_") or _diffusers_target(name, "_")
        return None if target is None else (target, "")
    if module.startswith("lora_transformer_"):
        target = _diffusers_target(module.removeprefix("lora_transformer_"), "_")
        return None if target is None else (target, "")
    for prefix in PREFIXES:
        if module.startswith(prefix):
            module = module.removeprefix(prefix)
            break
    target = _bfl_target(module, ".")
    if target is not None:
        return target, ""
    target = _diffusers_target(module, ".")
    return None if target is None else (target, module)


def flux_lora_deltas(
    state_dict: Mapping[str, Tensor],
    source: str = "<state dict>",
    metadata: Mapping[str, str] | None = None,
    *,
    text_encoder: Literal["error", "skip"] = "error",
) -> list[LoraDelta]:
    """A FLUX.1 LoRA (any known layout) -> deltas on `Flux`'s module names; `LoraLayoutError` names bad keys."""
    grouped = group_keys(state_dict, _resolve)
    if not grouped.targets and not grouped.text_keys:
        raise LoraLayoutError(
            f"{source}: not a {FAMILY} LoRA in a known layout ({len(state_dict)} keys, e.g. "
            f"{name_keys(state_dict, 5)}); known: diffusers/peft '<module>.lora_A.weight', kohya "
            "'lora_unet_<module>.lora_down.weight', BFL 'diffusion_model.<module>.lora_A.weight'"
        )
    problems = common_problems(grouped, FAMILY)
    if grouped.text_keys and text_encoder == "error":
        problems.append(
            f"{len(grouped.text_keys)} text-encoder LoRA keys {name_keys(grouped.text_keys, 3)}: text-encoder "
            "LoRAs are not supported yet (only the transformer's)"
        )
    if problems:
        raise LoraLayoutError(f"{source}: {FAMILY} LoRA: " + "; ".join(problems))
    if grouped.text_keys:
        log.warning(
            "%s: skipped %d text-encoder LoRA keys (not supported yet)", source, len(grouped.text_keys)
        )

    scaling = peft_scaling(metadata, source) if any(grouped.peft.values()) else None
    deltas = []
    for module in sorted(grouped.targets):
        target, diffusers_name = grouped.targets[module]
        peft_scale = None
        if grouped.peft[module] and diffusers_name and scaling is not None:
            peft_scale = scaling.scale(diffusers_name)
        down, up, alpha_scale = down_up_scale(source, FAMILY, module, grouped.roles[module], peft_scale)
        if target.swap_halves:
            if up.ndim != 2 or up.shape[0] % 2:
                raise LoraLayoutError(f"{source}: {module}: up {tuple(up.shape)} has no two halves")
            first, second = up.chunk(2, dim=0)
            up = torch.cat((second, first), dim=0)
        rows = None
        if target.parts > 1 and down.ndim == 2 and up.ndim == 2:
            start = target.part * down.shape[1]  # q, k, v are each (D, D): part p starts at p * D
            rows = (start, start + up.shape[0])
        deltas.append(LoraDelta(target.module, down, up, alpha_scale, rows))
    return deltas
