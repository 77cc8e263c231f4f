"""Checkpoint key layouts of the SD-style AutoencoderKL (FLUX.1 `ae.safetensors`, diffusers `vae/`).

Two layouts are recognised by the explicit presence of named keys, never by hashing:

- "bfl": black-forest-labs / LDM names (`encoder.down.0.block.0.conv1.weight`, `encoder.mid.attn_1.q.weight`
  as a 4-D 1x1 conv, `decoder.up.N` indexed by resolution level). Our `AutoEncoder` uses these names.
- "diffusers": `AutoencoderKL` names (`encoder.down_blocks.0.resnets.0.conv1.weight`, mid-block attention
  as Linear `to_q/to_k/to_v/to_out.0` with 2-D weights, `decoder.up_blocks.i` = BFL `up.{n-1-i}`,
  `downsamplers.0.conv`, `upsamplers.0.conv`, `conv_shortcut`, `conv_norm_out`). Older diffusers files
  name the attention `query/key/value/proj_attn`; those are accepted too.

Single-file SD checkpoints prefix the VAE with `first_stage_model.`; strip it before calling these.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from typing import Any, Literal

import torch
from torch import Tensor

from services.vae.models.flux import AutoEncoder, AutoEncoderParams

Layout = Literal["bfl", "diffusers"]

BFL_REQUIRED = (
    "encoder.conv_in.weight",
    "encoder.down.0.block.0.conv1.weight",
    "encoder.mid.block_1.conv1.weight",
    "encoder.mid.attn_1.q.weight",
    "encoder.norm_out.weight",
    "decoder.conv_in.weight",
    "decoder.up.0.block.0.conv1.weight",
    "decoder.conv_out.weight",
)
DIFFUSERS_REQUIRED = (
    "encoder.conv_in.weight",
    "encoder.down_blocks.0.resnets.0.conv1.weight",
    "encoder.mid_block.resnets.0.conv1.weight",
    "encoder.conv_norm_out.weight",
    "decoder.conv_in.weight",
    "decoder.up_blocks.0.resnets.0.conv1.weight",
    "decoder.conv_out.weight",
)


class CheckpointLayoutError(ValueError):
    """A VAE state dict matches no known layout, or holds keys the converter cannot place."""


def detect_vae_layout(keys: Iterable[str]) -> Layout:
    """Return "bfl" or "diffusers" from the presence of named keys; raise naming the missing ones."""
    present = set(keys)
    missing_bfl = [k for k in BFL_REQUIRED if k not in present]
    missing_diff = [k for k in DIFFUSERS_REQUIRED if k not in present]
    if not missing_bfl and not missing_diff:
        raise CheckpointLayoutError("VAE state dict holds both bfl and diffusers keys; refusing to guess")
    if not missing_bfl:
        return "bfl"
    if not missing_diff:
        return "diffusers"
    sample = sorted(present)[:5]
    raise CheckpointLayoutError(
        f"not a known VAE layout ({len(present)} keys, e.g. {sample}); "
        f"bfl layout is missing {missing_bfl}; diffusers layout is missing {missing_diff}"
    )


_ATTN_NAMES = {
    "group_norm": "norm",
    "to_q": "q",
    "to_k": "k",
    "to_v": "v",
    "to_out.0": "proj_out",
    "query": "q",
    "key": "k",
    "value": "v",
    "proj_attn": "proj_out",
}
_RESNET_NAMES = {
    "norm1": "norm1",
    "conv1": "conv1",
    "norm2": "norm2",
    "conv2": "conv2",
    "conv_shortcut": "nin_shortcut",
}
_TOP_LEVEL = {"conv_in": "conv_in", "conv_out": "conv_out", "conv_norm_out": "norm_out"}

_RE_DOWN_RES = re.compile(r"^encoder\.down_blocks\.(\d+)\.resnets\.(\d+)\.(\w+)\.(weight|bias)$")
_RE_DOWN_SAMPLE = re.compile(r"^encoder\.down_blocks\.(\d+)\.downsamplers\.0\.conv\.(weight|bias)$")
_RE_UP_RES = re.compile(r"^decoder\.up_blocks\.(\d+)\.resnets\.(\d+)\.(\w+)\.(weight|bias)$")
_RE_UP_SAMPLE = re.compile(r"^decoder\.up_blocks\.(\d+)\.upsamplers\.0\.conv\.(weight|bias)$")
_RE_MID_RES = re.compile(r"^(encoder|decoder)\.mid_block\.resnets\.([01])\.(\w+)\.(weight|bias)$")
_RE_MID_ATTN = re.compile(
    r"^(encoder|decoder)\.mid_block\.attentions\.0\.(group_norm|to_q|to_k|to_v|to_out\.0|query|key|value|proj_attn)"
    r"\.(weight|bias)$"
)
_RE_TOP = re.compile(r"^(encoder|decoder)\.(conv_in|conv_out|conv_norm_out)\.(weight|bias)$")
_RE_QUANT = re.compile(r"^(quant_conv|post_quant_conv)\.(weight|bias)$")


def _num_up_blocks(keys: Iterable[str]) -> int:
    ids = {int(m.group(1)) for k in keys if (m := re.match(r"^decoder\.up_blocks\.(\d+)\.", k))}
    if not ids or ids != set(range(max(ids) + 1)):
        raise CheckpointLayoutError(f"decoder.up_blocks indices must be 0..n-1, got {sorted(ids)}")
    return max(ids) + 1


def _map_diffusers_key(key: str, n_up: int) -> str | None:
    if m := _RE_DOWN_RES.match(key):
        i, j, name, wb = m.groups()
        return f"encoder.down.{i}.block.{j}.{_RESNET_NAMES[name]}.{wb}" if name in _RESNET_NAMES else None
    if m := _RE_DOWN_SAMPLE.match(key):
        return f"encoder.down.{m.group(1)}.downsample.conv.{m.group(2)}"
    if m := _RE_UP_RES.match(key):
        i, j, name, wb = m.groups()
        level = n_up - 1 - int(i)
        return f"decoder.up.{level}.block.{j}.{_RESNET_NAMES[name]}.{wb}" if name in _RESNET_NAMES else None
    if m := _RE_UP_SAMPLE.match(key):
        return f"decoder.up.{n_up - 1 - int(m.group(1))}.upsample.conv.{m.group(2)}"
    if m := _RE_MID_RES.match(key):
        part, i, name, wb = m.groups()
        return f"{part}.mid.block_{int(i) + 1}.{_RESNET_NAMES[name]}.{wb}" if name in _RESNET_NAMES else None
    if m := _RE_MID_ATTN.match(key):
        part, name, wb = m.groups()
        return f"{part}.mid.attn_1.{_ATTN_NAMES[name]}.{wb}"
    if m := _RE_TOP.match(key):
        return f"{m.group(1)}.{_TOP_LEVEL[m.group(2)]}.{m.group(3)}"
    if _RE_QUANT.match(key):
        return key
    return None


def diffusers_to_bfl(state_dict: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """diffusers AutoencoderKL keys -> BFL / our keys. Linear attention weights become 1x1 convs.

    Raises CheckpointLayoutError listing every key it cannot place (nothing is dropped silently).
    """
    n_up = _num_up_blocks(state_dict.keys())
    out: dict[str, Tensor] = {}
    unknown: list[str] = []
    for key, value in state_dict.items():
        new = _map_diffusers_key(key, n_up)
        if new is None:
            unknown.append(key)
            continue
        if ".mid.attn_1." in new and new.endswith(".weight") and not new.endswith("norm.weight"):
            if value.ndim == 2:  # Linear (C_out, C_in) -> 1x1 conv (C_out, C_in, 1, 1)
                value = value[:, :, None, None]
            elif value.ndim != 4:
                raise CheckpointLayoutError(f"{key}: expected a 2-D or 4-D weight, got {tuple(value.shape)}")
        if new in out:
            raise CheckpointLayoutError(f"{key} maps to {new}, which another key already filled")
        out[new] = value
    if unknown:
        raise CheckpointLayoutError(f"diffusers VAE keys with no BFL counterpart: {sorted(unknown)}")
    return out


def to_bfl_layout(state_dict: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Detect the layout and return the state dict under BFL / our names."""
    if detect_vae_layout(state_dict.keys()) == "bfl":
        return dict(state_dict)
    return diffusers_to_bfl(state_dict)


def _count(keys: Iterable[str], pattern: str) -> int:
    ids = {int(m.group(1)) for k in keys if (m := re.match(pattern, k))}
    if not ids or ids != set(range(max(ids) + 1)):
        raise CheckpointLayoutError(f"indices for {pattern!r} must be 0..n-1, got {sorted(ids)}")
    return max(ids) + 1


def infer_vae_params(
    state_dict: Mapping[str, Tensor],
    config: Mapping[str, Any] | None = None,
    *,
    scale_factor: float | None = None,
    shift_factor: float | None = None,
    norm_groups: int | None = None,
) -> AutoEncoderParams:
    """Read the architecture from tensor shapes (either layout); normalisation constants from elsewhere.

    Shapes give in/out channels, `ch`, `ch_mult`, `num_res_blocks`, `z_channels` and the quant-conv flags.
    They cannot give the GroupNorm group count nor scale/shift; those come from the diffusers
    `vae/config.json` (`norm_num_groups`, default 32 as in diffusers; `scaling_factor`, required;
    `shift_factor`, null/absent meaning 0 as in diffusers) or from the keyword arguments, which win
    (`norm_groups` defaults to 32, the value of every released SD / FLUX VAE).
    With neither config nor `scale_factor`/`shift_factor` this raises: a BFL file alone does not say whether
    it is FLUX.1 or SD3 (same shapes) — pass `preset("FLUX_AE").scale_factor` etc. explicitly.
    """
    sd = to_bfl_layout(state_dict)
    keys = list(sd.keys())
    conv_in = sd["encoder.conv_in.weight"]  # (ch, in_channels, 3, 3)
    ch, in_channels = int(conv_in.shape[0]), int(conv_in.shape[1])
    n_levels = _count(keys, r"^encoder\.down\.(\d+)\.")
    num_res_blocks = _count(keys, r"^encoder\.down\.0\.block\.(\d+)\.")
    ch_mult = []
    for i in range(n_levels):
        width = int(sd[f"encoder.down.{i}.block.0.conv1.weight"].shape[0])
        if width % ch:
            raise CheckpointLayoutError(f"encoder.down.{i} width {width} is not a multiple of ch={ch}")
        ch_mult.append(width // ch)
    z_channels = int(sd["decoder.conv_in.weight"].shape[1])
    if int(sd["encoder.conv_out.weight"].shape[0]) != 2 * z_channels:
        raise CheckpointLayoutError(
            f"encoder.conv_out has {sd['encoder.conv_out.weight'].shape[0]} channels, "
            f"expected 2 * z_channels = {2 * z_channels}"
        )
    out_ch = int(sd["decoder.conv_out.weight"].shape[0])

    groups = 32 if norm_groups is None else norm_groups
    resolution = 256
    scale, shift = scale_factor, shift_factor
    if config is not None:
        if "latent_channels" in config and int(config["latent_channels"]) != z_channels:
            raise ValueError(
                f"config latent_channels={config['latent_channels']} but weights have {z_channels}"
            )
        if "block_out_channels" in config:
            widths = [ch * m for m in ch_mult]
            if [int(c) for c in config["block_out_channels"]] != widths:
                raise ValueError(
                    f"config block_out_channels={config['block_out_channels']} but weights {widths}"
                )
        if norm_groups is None:
            groups = int(config.get("norm_num_groups", 32))  # diffusers' documented default
        if config.get("sample_size") is not None:
            size = config["sample_size"]
            resolution = int(size[0] if isinstance(size, list | tuple) else size)
        if scale is None:
            if config.get("scaling_factor") is None:
                raise ValueError("VAE config has no scaling_factor; pass scale_factor explicitly")
            scale = float(config["scaling_factor"])
        if shift is None:
            shift = float(config.get("shift_factor") or 0.0)  # diffusers: None means no shift
    if scale is None or shift is None:
        raise ValueError(
            f"cannot tell scale/shift from weights alone (scale_factor={scale}, shift_factor={shift}); "
            "pass the diffusers vae config or scale_factor= and shift_factor="
        )
    return AutoEncoderParams(
        resolution=resolution,
        in_channels=in_channels,
        ch=ch,
        out_ch=out_ch,
        ch_mult=tuple(ch_mult),
        num_res_blocks=num_res_blocks,
        z_channels=z_channels,
        scale_factor=scale,
        shift_factor=shift,
        norm_groups=groups,
        use_quant_conv="quant_conv.weight" in sd,
        use_post_quant_conv="post_quant_conv.weight" in sd,
    )


def load_autoencoder(
    state_dict: Mapping[str, Tensor], params: AutoEncoderParams, *, dtype: torch.dtype | None = None
) -> AutoEncoder:
    """Build on the meta device, then assign the (layout-converted) weights; strict about keys."""
    sd = to_bfl_layout(state_dict)
    with torch.device("meta"):
        model = AutoEncoder(params)
    expected = set(model.state_dict().keys())
    missing, unexpected = sorted(expected - sd.keys()), sorted(sd.keys() - expected)
    if missing or unexpected:
        raise CheckpointLayoutError(
            f"VAE weights do not fit {params}: missing {missing}, unexpected {unexpected}"
        )
    if dtype is not None:
        sd = {k: v.to(dtype) for k, v in sd.items()}
    model.load_state_dict(sd, strict=True, assign=True)
    return model.eval()


_RESNET_NAMES_INV = {v: k for k, v in _RESNET_NAMES.items()}
_ATTN_NAMES_INV = {"norm": "group_norm", "q": "to_q", "k": "to_k", "v": "to_v", "proj_out": "to_out.0"}
_TOP_LEVEL_INV = {v: k for k, v in _TOP_LEVEL.items()}
_RE_BFL_DOWN_RES = re.compile(r"^encoder\.down\.(\d+)\.block\.(\d+)\.(\w+)\.(weight|bias)$")
_RE_BFL_DOWN_SAMPLE = re.compile(r"^encoder\.down\.(\d+)\.downsample\.conv\.(weight|bias)$")
_RE_BFL_UP_RES = re.compile(r"^decoder\.up\.(\d+)\.block\.(\d+)\.(\w+)\.(weight|bias)$")
_RE_BFL_UP_SAMPLE = re.compile(r"^decoder\.up\.(\d+)\.upsample\.conv\.(weight|bias)$")
_RE_BFL_MID_RES = re.compile(r"^(encoder|decoder)\.mid\.block_([12])\.(\w+)\.(weight|bias)$")
_RE_BFL_MID_ATTN = re.compile(r"^(encoder|decoder)\.mid\.attn_1\.(norm|q|k|v|proj_out)\.(weight|bias)$")
_RE_BFL_TOP = re.compile(r"^(encoder|decoder)\.(conv_in|conv_out|norm_out)\.(weight|bias)$")


def _map_bfl_key(key: str, n_up: int) -> str | None:
    if m := _RE_BFL_DOWN_RES.match(key):
        i, j, name, wb = m.groups()
        new = _RESNET_NAMES_INV.get(name)
        return f"encoder.down_blocks.{i}.resnets.{j}.{new}.{wb}" if new else None
    if m := _RE_BFL_DOWN_SAMPLE.match(key):
        return f"encoder.down_blocks.{m.group(1)}.downsamplers.0.conv.{m.group(2)}"
    if m := _RE_BFL_UP_RES.match(key):
        level, j, name, wb = m.groups()
        new = _RESNET_NAMES_INV.get(name)
        return f"decoder.up_blocks.{n_up - 1 - int(level)}.resnets.{j}.{new}.{wb}" if new else None
    if m := _RE_BFL_UP_SAMPLE.match(key):
        return f"decoder.up_blocks.{n_up - 1 - int(m.group(1))}.upsamplers.0.conv.{m.group(2)}"
    if m := _RE_BFL_MID_RES.match(key):
        part, i, name, wb = m.groups()
        new = _RESNET_NAMES_INV.get(name)
        return f"{part}.mid_block.resnets.{int(i) - 1}.{new}.{wb}" if new else None
    if m := _RE_BFL_MID_ATTN.match(key):
        part, name, wb = m.groups()
        return f"{part}.mid_block.attentions.0.{_ATTN_NAMES_INV[name]}.{wb}"
    if m := _RE_BFL_TOP.match(key):
        return f"{m.group(1)}.{_TOP_LEVEL_INV[m.group(2)]}.{m.group(3)}"
    if _RE_QUANT.match(key):
        return key
    return None


def bfl_to_diffusers(state_dict: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """BFL / our keys -> diffusers AutoencoderKL keys (the inverse of `diffusers_to_bfl`): `decoder.up.N` becomes
    `decoder.up_blocks.{n-1-N}`, the mid-block attention's 1x1 convs become Linear (2-D) weights.

    Raises CheckpointLayoutError listing every key it cannot place (nothing is dropped silently).
    """
    n_up = _count(state_dict.keys(), r"^decoder\.up\.(\d+)\.")
    out: dict[str, Tensor] = {}
    unknown: list[str] = []
    for key, value in state_dict.items():
        new = _map_bfl_key(key, n_up)
        if new is None:
            unknown.append(key)
            continue
        if ".mid.attn_1." in key and key.endswith(".weight") and ".norm." not in key:
            if value.ndim == 4:  # 1x1 conv (C_out, C_in, 1, 1) -> Linear (C_out, C_in)
                value = value[:, :, 0, 0]
            elif value.ndim != 2:
                raise CheckpointLayoutError(f"{key}: expected a 2-D or 4-D weight, got {tuple(value.shape)}")
        if new in out:
            raise CheckpointLayoutError(f"{key} maps to {new}, which another key already filled")
        out[new] = value
    if unknown:
        raise CheckpointLayoutError(f"BFL VAE keys with no diffusers counterpart: {sorted(unknown)}")
    return out
