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

import json
import logging
import math
import re
from collections.abc import Mapping
from typing import Literal, NamedTuple

import torch
from torch import Tensor

from services.denoiser.convert.flux import _DOUBLE, _SINGLE, _TOP, FINAL_ADALN
from services.denoiser.lora import LoraDelta, LoraLayoutError

__all__ = ["LoraLayoutError", "flux_lora_deltas"]

log = logging.getLogger(__name__)

FAMILY = "FLUX.1"
METADATA_KEY = "lora_adapter_metadata"  # diffusers' peft LoraConfig, JSON, keys prefixed by "transformer."

# suffix -> role; the longest suffixes first.
_SUFFIXES = (
    (".lora_A.default.weight", "down"),
    (".lora_B.default.weight", "up"),
    (".lora_A.weight", "down"),
    (".lora_B.weight", "up"),
    (".lora_down.weight", "down"),
    (".lora_up.weight", "up"),
    (".alpha", "alpha"),
)
_PEFT_SUFFIXES = (".lora_A.default.weight", ".lora_B.default.weight", ".lora_A.weight", ".lora_B.weight")
_PREFIXES = ("transformer.", "model.diffusion_model.", "diffusion_model.", "base_model.model.")
_TEXT_ENCODER = (
    "lora_te_",
    "lora_te1_",
    "lora_te2_",
    "lora_te3_",
    "text_encoder.",
    "text_encoder_2.",
    "text_encoders.",
)
# Keys of LoRA variants we do not implement: (substring, or suffix when it starts with "$") -> what they are.
_UNSUPPORTED = (
    ("dora_scale", "DoRA"),
    ("lora_magnitude_vector", "DoRA"),
    ("lokr_", "LoKr"),
    ("hada_", "LoHa"),
    ("$.lora_B.bias", "LoRA biases"),
    ("$.lora_up.bias", "LoRA biases"),
    ("$.diff_b", "bias diffs"),
    ("$.diff", "weight diffs"),
    ("$_norm.scale", "FLUX Control LoRA norm weights"),
    (".processor.", "XLabs processor LoRAs"),
)


def _unsupported(key: str) -> list[str]:
    return sorted(
        {what for part, what in _UNSUPPORTED if (key.endswith(part[1:]) if part[0] == "$" else part in key)}
    )


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


def _resolve(module: str) -> tuple[_Target | None, str]:
    """A file's module path -> (target, the diffusers module name for peft patterns or "")."""
    if module.startswith("lora_unet_"):  # BFL names; some tools write diffusers names after the same prefix
        name = module.removeprefix("lora_unet_")
        return _bfl_target(name, "_") or _diffusers_target(name, "_"), ""
    if module.startswith("lora_transformer_"):
        return _diffusers_target(module.removeprefix("lora_transformer_"), "_"), ""
    for prefix in _PREFIXES:
        if module.startswith(prefix):
            module = module.removeprefix(prefix)
            break
    target = _bfl_target(module, ".")
    if target is not None:
        return target, ""
    return _diffusers_target(module, "."), module


def _split(key: str) -> tuple[str, str, bool] | None:
    """key -> (module path, role, peft-style suffix) or None for a key of no known LoRA suffix."""
    for suffix, role in _SUFFIXES:
        if key.endswith(suffix):
            return key.removesuffix(suffix), role, suffix in _PEFT_SUFFIXES
    return None


def _keys(keys, limit: int = 8) -> str:
    keys = sorted(keys)
    more = f" ... (+{len(keys) - limit} more)" if len(keys) > limit else ""
    return "[" + ", ".join(keys[:limit]) + more + "]"


class _PeftScaling:
    """peft's scaling from a diffusers file's metadata: `lora_alpha / r` (or `/ sqrt(r)` with rsLoRA), with
    `alpha_pattern` / `rank_pattern` overrides. Patterns are matched as module-name suffixes (peft matches them
    as regexes anchored the same way; the names diffusers writes are plain module names)."""

    def __init__(self, config: Mapping, source: str):
        try:
            self.r = int(config["r"])
            self.alpha = float(config.get("lora_alpha", self.r))
            self.alpha_pattern = {str(k): float(v) for k, v in (config.get("alpha_pattern") or {}).items()}
            self.rank_pattern = {str(k): int(v) for k, v in (config.get("rank_pattern") or {}).items()}
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise LoraLayoutError(f"{source}: bad {METADATA_KEY} (peft LoraConfig): {exc!r}") from None
        self.rslora = bool(config.get("use_rslora", False))
        if config.get("use_dora"):
            raise LoraLayoutError(f"{source}: DoRA LoRAs (use_dora in {METADATA_KEY}) are not supported")
        if self.r <= 0:
            raise LoraLayoutError(f"{source}: {METADATA_KEY} has rank r={self.r}")

    @staticmethod
    def _match(patterns: Mapping[str, float], module: str) -> float | None:
        for pattern, value in patterns.items():
            if module == pattern or module.endswith("." + pattern):
                return value
        return None

    def scale(self, module: str) -> float:
        alpha = self._match(self.alpha_pattern, module)
        rank = self._match(self.rank_pattern, module)
        alpha = self.alpha if alpha is None else alpha
        rank = self.r if rank is None else rank
        return alpha / (math.sqrt(rank) if self.rslora else rank)


def _peft_scaling(metadata: Mapping[str, str] | None, source: str) -> _PeftScaling | None:
    raw = (metadata or {}).get(METADATA_KEY)
    if not raw:
        return None
    try:
        config = json.loads(raw)
    except ValueError as exc:
        raise LoraLayoutError(f"{source}: {METADATA_KEY} is not JSON: {exc}") from None
    if not isinstance(config, dict):
        raise LoraLayoutError(f"{source}: {METADATA_KEY} is not a JSON object")
    transformer = {
        k.removeprefix("transformer."): v for k, v in config.items() if k.startswith("transformer.")
    }
    if not transformer and "r" not in config:
        return None  # metadata of other components only
    return _PeftScaling(transformer or config, source)


class _Entry(NamedTuple):
    module: str
    target: _Target
    diffusers_name: str
    peft: bool


def flux_lora_deltas(
    state_dict: Mapping[str, Tensor],
    source: str = "<state dict>",
    metadata: Mapping[str, str] | None = None,
    *,
    text_encoder: Literal["error", "skip"] = "error",
) -> list[LoraDelta]:
    """A FLUX.1 LoRA (any known layout) -> deltas on `Flux`'s module names; `LoraLayoutError` names bad keys."""
    tensors: dict[str, dict[str, Tensor]] = {}
    entries: dict[str, _Entry] = {}
    text_keys, unsupported, untargeted, unknown, duplicate = [], [], [], [], []
    for key, tensor in state_dict.items():
        if key.startswith(_TEXT_ENCODER):
            text_keys.append(key)
            continue
        kinds = _unsupported(key)
        if kinds:
            unsupported.append(f"{key} ({', '.join(kinds)})")
            continue
        split = _split(key)
        if split is None:
            unknown.append(key)
            continue
        module, role, peft = split
        entry = entries.get(module)
        if entry is None:
            target, diffusers_name = _resolve(module)
            if target is None:
                untargeted.append(key)
                continue
            entry = entries[module] = _Entry(module, target, diffusers_name, peft)
        roles = tensors.setdefault(module, {})
        if role in roles:
            duplicate.append(key)
        roles[role] = tensor

    if not entries and not text_keys:
        raise LoraLayoutError(
            f"{source}: not a {FAMILY} LoRA in a known layout ({len(state_dict)} keys, e.g. "
            f"{_keys(state_dict, 5)}); known: diffusers/peft '<module>.lora_A.weight', kohya "
            "'lora_unet_<module>.lora_down.weight', BFL 'diffusion_model.<module>.lora_A.weight'"
        )
    problems = []
    if unsupported:
        problems.append(f"unsupported LoRA variants {_keys(unsupported)}")
    if untargeted:
        problems.append(f"keys that target no {FAMILY} transformer Linear {_keys(untargeted)}")
    if unknown:
        problems.append(f"keys of no known LoRA layout {_keys(unknown)}")
    if duplicate:
        problems.append(f"keys given twice (with and without '.default'?) {_keys(duplicate)}")
    if text_keys and text_encoder == "error":
        problems.append(
            f"{len(text_keys)} text-encoder LoRA keys {_keys(text_keys, 3)}: text-encoder LoRAs are not "
            "supported yet (only the transformer's)"
        )
    if problems:
        raise LoraLayoutError(f"{source}: {FAMILY} LoRA: " + "; ".join(problems))
    if text_keys:
        log.warning("%s: skipped %d text-encoder LoRA keys (not supported yet)", source, len(text_keys))

    peft_scaling = _peft_scaling(metadata, source) if any(e.peft for e in entries.values()) else None
    deltas = []
    for module in sorted(entries):
        entry, roles = entries[module], tensors[module]
        missing = [role for role in ("down", "up") if role not in roles]
        if missing:
            raise LoraLayoutError(
                f"{source}: {FAMILY} LoRA on {module}: no {' and no '.join(missing)} weight"
            )
        down, up = roles["down"], roles["up"]
        rank = down.shape[0] if down.ndim == 2 else 0
        if "alpha" in roles:
            alpha = roles["alpha"]
            if alpha.numel() != 1 or rank == 0:
                raise LoraLayoutError(
                    f"{source}: {module}.alpha must be one number, got {tuple(alpha.shape)}"
                )
            alpha_scale = float(alpha.item()) / rank
        elif entry.peft and entry.diffusers_name and peft_scaling is not None:
            alpha_scale = peft_scaling.scale(entry.diffusers_name)
        else:
            alpha_scale = 1.0
        target = entry.target
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
