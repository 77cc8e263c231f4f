"""Wan 2.1 / 2.2 LoRA files -> `LoraDelta`s on `WanDiT`'s module names (the official Wan names).

Each key is read by its name (never guessed from shapes); these layouts are known:

- diffusers / peft: `[transformer.]<diffusers module>.lora_A.weight` / `.lora_B.weight` (or `.lora_A.default.weight`
  as in a peft model's raw state dict), optional `<module>.alpha`, e.g. `transformer.blocks.0.attn1.to_q`. A file
  saved by diffusers carries peft's `r`, `lora_alpha`, `alpha_pattern`, `rank_pattern` and `use_rslora` as JSON in
  its `lora_adapter_metadata`.
- official / ComfyUI / musubi-tuner (ComfyUI format): `[diffusion_model.]<Wan module>.lora_down.weight` /
  `.lora_up.weight` / `.alpha`, or `.lora_A.weight` / `.lora_B.weight`, e.g. `diffusion_model.blocks.0.self_attn.q`
  (also under `model.diffusion_model.`).
- kohya / musubi-tuner: `lora_unet_<Wan module, dots as "_">.lora_down.weight` / `.lora_up.weight` / `.alpha`,
  e.g. `lora_unet_blocks_0_self_attn_q`; and the same on diffusers module names after `lora_unet_` or
  `lora_transformer_` (e.g. `lora_transformer_blocks_0_attn1_to_q`).

Scaling is `alpha / rank` per module, `alpha = rank` (scale 1) when a file has neither `.alpha` keys nor peft
metadata — diffusers' numerics (`WanLoraLoaderMixin.lora_state_dict` folds `alpha / rank` into the weights of
block modules). One difference: diffusers refuses `.alpha` keys on the top-level modules (text / time
embeddings, `time_projection`, `head.head`) of official-layout files; they are applied here as ComfyUI applies
them. Wan has no fused projections, so every delta covers all the rows of its target.

Not taken, with a `LoraLayoutError` that names the keys: LoRAs on `patch_embedding` (a Conv3d, run as a matmul:
not an `nn.Linear`, so no hook or fused update applies), full weight / bias diffs (`.diff`, `.diff_b`, as in some
distillation LoRAs; diffusers loads `diff_b` as peft LoRA biases and drops norm diffs), DoRA, LoKr / LoHa,
text-encoder keys (the text encoder runs in another service), keys of unknown layouts and keys on modules that
are not Linears of the Wan transformer.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import NamedTuple

from torch import Tensor

from services.denoiser.convert.checkpoint import name_keys
from services.denoiser.convert.lora_keys import (
    PREFIXES,
    common_problems,
    down_up_scale,
    group_keys,
    peft_scaling,
)
from services.denoiser.convert.wan import _BLOCK, _BLOCK_MODULES, _TOP_MODULES
from services.denoiser.lora import LoraDelta, LoraLayoutError

__all__ = ["LoraLayoutError", "wan_lora_deltas"]

FAMILY = "Wan"
_KOHYA_PREFIXES = ("lora_unet_", "lora_transformer_")
_BLOCK_KOHYA = re.compile(r"^blocks_(\d+)_(.+)$")

# Our Linears, by Wan module name (outside and inside `blocks.N.`).
WAN_TOP_LINEARS = (
    "text_embedding.0",
    "text_embedding.2",
    "time_embedding.0",
    "time_embedding.2",
    "time_projection.1",
    "head.head",
    "img_emb.proj.1",
    "img_emb.proj.3",
)
WAN_BLOCK_LINEARS = (
    *(f"self_attn.{p}" for p in ("q", "k", "v", "o")),
    *(f"cross_attn.{p}" for p in ("q", "k", "v", "o", "k_img", "v_img")),
    "ffn.0",
    "ffn.2",
)
# Modules that are in a Wan LoRA's reach but take none here: name -> why.
REFUSED = {"patch_embedding": "a Conv3d run as a matmul, not a Linear: LoRAs on it are not supported"}


def _spellings(pairs: Mapping[str, str], sep: str) -> dict[str, tuple[str, str]]:
    """{diffusers name: Wan name} -> {each name, dots written as `sep`: (Wan name, diffusers name)}."""
    out = {}
    for diffusers, wan in pairs.items():
        for name in (wan, diffusers):
            out[name.replace(".", sep)] = (wan, diffusers)
    return out


_TOP_PAIRS = {d: w for d, w in _TOP_MODULES.items() if w in WAN_TOP_LINEARS or w in REFUSED}
_BLOCK_PAIRS = {d: w for d, w in _BLOCK_MODULES.items() if w in WAN_BLOCK_LINEARS}
_NAMES = {sep: (_spellings(_TOP_PAIRS, sep), _spellings(_BLOCK_PAIRS, sep)) for sep in (".", "_")}


class _Target(NamedTuple):
    module: str  # Wan module name: the target in WanDiT
    diffusers_name: str  # for peft's alpha / rank patterns


def _lookup(name: str, sep: str) -> _Target | None:
    """A module name (Wan's or diffusers', dots or kohya's "_") -> target, None if it is not a Wan Linear."""
    top, block_names = _NAMES[sep]
    block = (_BLOCK if sep == "." else _BLOCK_KOHYA).match(name)
    if block is None:
        found = top.get(name)
        return None if found is None else _Target(*found)
    index, inner = block.groups()
    found = block_names.get(inner)
    if found is None:
        return None
    wan, diffusers = found
    return _Target(f"blocks.{index}.{wan}", f"blocks.{index}.{diffusers}")


def _resolve(module: str) -> _Target | None:
    """A file's module path (prefix and all) -> target."""
    for prefix in _KOHYA_PREFIXES:
        if module.startswith(prefix):
            return _lookup(module.removeprefix(prefix), "_")
    for prefix in PREFIXES:
        if module.startswith(prefix):
            module = module.removeprefix(prefix)
            break
    return _lookup(module, ".")


def wan_lora_deltas(
    state_dict: Mapping[str, Tensor], source: str = "<state dict>", metadata: Mapping[str, str] | None = None
) -> list[LoraDelta]:
    """A Wan LoRA (any known layout) -> deltas on `WanDiT`'s module names; `LoraLayoutError` names bad keys."""
    grouped = group_keys(state_dict, _resolve)
    if not (grouped.targets or grouped.text_keys):
        raise LoraLayoutError(
            f"{source}: not a {FAMILY} LoRA in a known layout ({len(state_dict)} keys, e.g. "
            f"{name_keys(state_dict, 5)}); known: diffusers/peft 'transformer.<module>.lora_A.weight', official / "
            "ComfyUI 'diffusion_model.<module>.lora_down.weight', kohya / musubi 'lora_unet_<module>.lora_down.weight'"
        )
    problems = common_problems(grouped, FAMILY)
    refused: dict[str, list[str]] = {}  # our module -> the file's module paths on it
    spellings: dict[str, list[str]] = {}
    for module, target in grouped.targets.items():
        (refused if target.module in REFUSED else spellings).setdefault(target.module, []).append(module)
    for module, paths in refused.items():
        keys = [key for path in paths for key in grouped.keys[path]]
        problems.append(f"keys on {module}, {REFUSED[module]} {name_keys(keys)}")
    twice = [
        f"{target} as {' and '.join(sorted(names))}" for target, names in spellings.items() if len(names) > 1
    ]
    if twice:
        problems.append(f"modules given twice under different names {name_keys(twice)}")
    if grouped.text_keys:
        problems.append(
            f"{len(grouped.text_keys)} text-encoder LoRA keys {name_keys(grouped.text_keys, 3)}: text-encoder "
            "LoRAs are not supported (only the transformer's)"
        )
    if problems:
        raise LoraLayoutError(f"{source}: {FAMILY} LoRA: " + "; ".join(problems))

    scaling = peft_scaling(metadata, source) if any(grouped.peft.values()) else None
    deltas = []
    for module in sorted(grouped.targets):
        target = grouped.targets[module]
        peft_scale = scaling.scale(target.diffusers_name) if grouped.peft[module] and scaling else None
        down, up, alpha_scale = down_up_scale(source, FAMILY, module, grouped.roles[module], peft_scale)
        try:
            deltas.append(LoraDelta(target.module, down, up, alpha_scale))
        except LoraLayoutError as exc:
            raise LoraLayoutError(f"{source}: {FAMILY} {exc} (keys {module}.*)") from None
    return deltas
