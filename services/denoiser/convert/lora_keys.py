"""What every family's LoRA converter shares: the key suffixes and prefixes of the known layouts, the LoRA
variants we refuse, peft's scaling from a diffusers file's metadata, and grouping a file's keys by module.

A family converter gives `group_keys` a `resolve(module path) -> target | None`, reports `common_problems`
plus its own, then builds its deltas from `down_up_scale` per module.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Generic, TypeVar

from torch import Tensor

from services.denoiser.convert.checkpoint import name_keys
from services.denoiser.lora import LoraLayoutError

T = TypeVar("T")
METADATA_KEY = "lora_adapter_metadata"  # diffusers' peft LoraConfig, JSON, keys prefixed by "transformer."
PREFIXES = ("transformer.", "model.diffusion_model.", "diffusion_model.", "base_model.model.")

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
TEXT_ENCODER_PREFIXES = (
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


def unsupported_kinds(key: str) -> list[str]:
    return sorted(
        {what for part, what in _UNSUPPORTED if (key.endswith(part[1:]) if part[0] == "$" else part in key)}
    )


def split_key(key: str) -> tuple[str, str, bool] | None:
    """key -> (module path, role, peft-style suffix) or None for a key of no known LoRA suffix."""
    for suffix, role in _SUFFIXES:
        if key.endswith(suffix):
            return key.removesuffix(suffix), role, suffix in _PEFT_SUFFIXES
    return None


class PeftScaling:
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


def peft_scaling(metadata: Mapping[str, str] | None, source: str) -> PeftScaling | None:
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
    return PeftScaling(transformer or config, source)


@dataclass
class GroupedKeys(Generic[T]):
    """A LoRA file's keys by module path: each module's tensors by role ("down", "up", "alpha"), its target,
    whether its keys are peft-style; and the keys that could not be placed, by why."""

    roles: dict[str, dict[str, Tensor]] = field(default_factory=dict)
    keys: dict[str, list[str]] = field(default_factory=dict)  # module -> its keys in the file
    targets: dict[str, T] = field(default_factory=dict)
    peft: dict[str, bool] = field(default_factory=dict)
    text_keys: list[str] = field(default_factory=list)
    unsupported: list[str] = field(default_factory=list)
    untargeted: list[str] = field(default_factory=list)
    unknown: list[str] = field(default_factory=list)
    duplicate: list[str] = field(default_factory=list)


def group_keys(state_dict: Mapping[str, Tensor], resolve: Callable[[str], T | None]) -> GroupedKeys[T]:
    grouped: GroupedKeys[T] = GroupedKeys()
    for key, tensor in state_dict.items():
        if key.startswith(TEXT_ENCODER_PREFIXES):
            grouped.text_keys.append(key)
            continue
        kinds = unsupported_kinds(key)
        if kinds:
            grouped.unsupported.append(f"{key} ({', '.join(kinds)})")
            continue
        split = split_key(key)
        if split is None:
            grouped.unknown.append(key)
            continue
        module, role, is_peft = split
        if module not in grouped.targets:
            target = resolve(module)
            if target is None:
                grouped.untargeted.append(key)
                continue
            grouped.targets[module], grouped.peft[module] = target, is_peft
        grouped.keys.setdefault(module, []).append(key)
        roles = grouped.roles.setdefault(module, {})
        if role in roles:
            grouped.duplicate.append(key)
        roles[role] = tensor
    return grouped


def common_problems(grouped: GroupedKeys, family: str) -> list[str]:
    problems = []
    if grouped.unsupported:
        problems.append(f"unsupported LoRA variants {name_keys(grouped.unsupported)}")
    if grouped.untargeted:
        problems.append(f"keys that target no {family} transformer Linear {name_keys(grouped.untargeted)}")
    if grouped.unknown:
        problems.append(f"keys of no known LoRA layout {name_keys(grouped.unknown)}")
    if grouped.duplicate:
        problems.append(f"keys given twice (with and without '.default'?) {name_keys(grouped.duplicate)}")
    return problems


def down_up_scale(
    source: str, family: str, module: str, roles: Mapping[str, Tensor], peft_scale: float | None
) -> tuple[Tensor, Tensor, float]:
    """One module's (down, up, alpha / rank): from its `.alpha` key, else `peft_scale` (peft metadata), else 1."""
    missing = [role for role in ("down", "up") if role not in roles]
    if missing:
        raise LoraLayoutError(f"{source}: {family} LoRA on {module}: no {' and no '.join(missing)} weight")
    down, up = roles["down"], roles["up"]
    if "alpha" not in roles:
        return down, up, 1.0 if peft_scale is None else peft_scale
    alpha = roles["alpha"]
    rank = down.shape[0] if down.ndim == 2 else 0
    if alpha.numel() != 1 or rank == 0:
        raise LoraLayoutError(f"{source}: {module}.alpha must be one number, got {tuple(alpha.shape)}")
    return down, up, float(alpha.item()) / rank
