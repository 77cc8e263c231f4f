"""Checkpoint key layouts of the Wan video VAEs (2.1 and 2.2), and the architecture read from tensor shapes.

Two layouts, recognised by the explicit presence of named keys:

- "official": Wan-Video's names (`Wan2.1_VAE.pth`, ComfyUI `wan_2.1_vae.safetensors` / `wan2.2_vae.safetensors`):
  `encoder.conv1`, `encoder.downsamples.K.residual.{0,2,3,6}` / `.shortcut` / `.resample.1` / `.time_conv`
  (2.1: one flat list; 2.2: `encoder.downsamples.I.downsamples.J`), `encoder.middle.{0,1,2}`, `encoder.head.{0,2}`,
  top-level `conv1` / `conv2`, and the decoder likewise (`decoder.upsamples...`). Our `WanVAE` uses these names.
- "diffusers": `AutoencoderKLWan` names: `conv_in`, `down_blocks.K` (2.1 flat, same K) or `down_blocks.I.resnets.J`
  + `.downsampler` (2.2), `mid_block.resnets.{0,1}` / `.attentions.0`, `norm_out`, `conv_out`, `quant_conv`,
  `post_quant_conv`, `up_blocks.I.resnets.J` + `.upsamplers.0` (2.1) / `.upsampler` (2.2); residual blocks
  `norm1 / conv1 / norm2 / conv2 / conv_shortcut`.

2.1 vs 2.2 is read from the keys (per-level `downsamples.I.downsamples.J` blocks) and the channel counts (12 input
channels: 3 pixel channels after a 2x2 patchify; 48 latent channels), never guessed.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Mapping
from typing import Any, Literal

import torch
from torch import Tensor

from services.vae.models.wan import WAN21_VAE, WAN22_VAE, WanVAE, WanVAEParams

Layout = Literal["official", "diffusers"]
PREFIXES = ("vae.", "first_stage_model.")  # what single-file bundles put in front of the VAE's keys

OFFICIAL_REQUIRED = (
    "encoder.conv1.weight",
    "encoder.middle.0.residual.0.gamma",
    "encoder.middle.1.to_qkv.weight",
    "encoder.head.2.weight",
    "conv1.weight",
    "conv2.weight",
    "decoder.conv1.weight",
    "decoder.middle.0.residual.0.gamma",
    "decoder.head.2.weight",
)
DIFFUSERS_REQUIRED = (
    "encoder.conv_in.weight",
    "encoder.mid_block.resnets.0.norm1.gamma",
    "encoder.mid_block.attentions.0.to_qkv.weight",
    "encoder.conv_out.weight",
    "quant_conv.weight",
    "post_quant_conv.weight",
    "decoder.conv_in.weight",
    "decoder.mid_block.resnets.0.norm1.gamma",
    "decoder.conv_out.weight",
)
# Released VAEs by latent width: their normalisation constants, when nothing else gives them.
RELEASES: dict[int, WanVAEParams] = {WAN21_VAE.z_dim: WAN21_VAE, WAN22_VAE.z_dim: WAN22_VAE}

_RES = {
    "residual.0.gamma": "norm1.gamma",
    "residual.2.weight": "conv1.weight",
    "residual.2.bias": "conv1.bias",
    "residual.3.gamma": "norm2.gamma",
    "residual.6.weight": "conv2.weight",
    "residual.6.bias": "conv2.bias",
    "shortcut.weight": "conv_shortcut.weight",
    "shortcut.bias": "conv_shortcut.bias",
}
_RES_INV = {v: k for k, v in _RES.items()}
_SAME = {  # resampler and attention parameters carry the same names in both layouts
    "resample.1.weight",
    "resample.1.bias",
    "time_conv.weight",
    "time_conv.bias",
    "norm.gamma",
    "to_qkv.weight",
    "to_qkv.bias",
    "proj.weight",
    "proj.bias",
}
_RESAMPLE = {"resample.1.weight", "resample.1.bias", "time_conv.weight", "time_conv.bias"}


class WanLayoutError(ValueError):
    """A state dict matches no Wan VAE layout, or holds keys the converter cannot place."""


def strip_prefix(state_dict: Mapping[str, Tensor]) -> dict[str, Tensor]:
    out = {}
    for key, value in state_dict.items():
        for prefix in PREFIXES:
            key = key.removeprefix(prefix)
        out[key] = value
    return out


def detect_wan_layout(keys: Iterable[str]) -> Layout:
    """ "official" or "diffusers" from the presence of named keys; raise naming the missing ones."""
    present = set(keys)
    missing_off = [k for k in OFFICIAL_REQUIRED if k not in present]
    missing_diff = [k for k in DIFFUSERS_REQUIRED if k not in present]
    if not missing_off and not missing_diff:
        raise WanLayoutError("Wan VAE state dict holds both official and diffusers keys; refusing to guess")
    if not missing_off:
        return "official"
    if not missing_diff:
        return "diffusers"
    raise WanLayoutError(
        f"not a Wan VAE ({len(present)} keys, e.g. {sorted(present)[:5]}); official layout is missing "
        f"{missing_off}; diffusers layout is missing {missing_diff}"
    )


def is_wan_vae(keys: Iterable[str]) -> bool:
    """True when the keys (prefixes such as `vae.` ignored) are a Wan VAE in either layout."""
    present = {k for key in keys for k in [key, *(key.removeprefix(p) for p in PREFIXES)]}
    return all(k in present for k in OFFICIAL_REQUIRED) or all(k in present for k in DIFFUSERS_REQUIRED)


def _indices(keys: Iterable[str], pattern: str) -> list[int]:
    ids = sorted({int(m.group(1)) for k in keys if (m := re.match(pattern, k))})
    if not ids or ids != list(range(len(ids))):
        raise WanLayoutError(f"indices for {pattern!r} must be 0..n-1, got {ids}")
    return ids


def _structure(keys: list[str], layout: Layout) -> tuple[bool, int]:
    """(residual: Wan 2.2 levels, num_res_blocks) read from the encoder's keys."""
    enc = "encoder.downsamples" if layout == "official" else "encoder.down_blocks"
    residual = any(
        k.startswith(f"{enc}.0.downsamples." if layout == "official" else f"{enc}.0.resnets.") for k in keys
    )
    if residual:
        inner = r"\.0\.downsamples\.(\d+)\.residual\." if layout == "official" else r"\.0\.resnets\.(\d+)\."
        return True, len(_indices(keys, "^" + re.escape(enc) + inner))
    flat = _indices(keys, "^" + re.escape(enc) + r"\.(\d+)\.")
    resamplers = [k for k in flat if f"{enc}.{k}.resample.1.weight" in keys]
    return False, resamplers[0] if resamplers else len(flat)


def _block_key(sub: str, table: Mapping[str, str]) -> str | None:
    return table.get(sub) or (sub if sub in _SAME else None)


def _official_to_diffusers_key(key: str, residual: bool, nrb: int) -> str | None:
    if m := re.match(r"^conv([12])\.(weight|bias)$", key):
        return f"{'quant_conv' if m.group(1) == '1' else 'post_quant_conv'}.{m.group(2)}"
    m = re.match(r"^(encoder|decoder)\.(.+)$", key)
    if not m:
        return None
    part, rest = m.groups()
    simple = {
        "head.0.gamma": "norm_out.gamma",
        "head.2.weight": "conv_out.weight",
        "head.2.bias": "conv_out.bias",
    }
    simple |= {"conv1.weight": "conv_in.weight", "conv1.bias": "conv_in.bias"}
    if rest in simple:
        return f"{part}.{simple[rest]}"
    if m := re.match(r"^middle\.([012])\.(.+)$", rest):
        i, sub = m.groups()
        block = {"0": "resnets.0", "1": "attentions.0", "2": "resnets.1"}[i]
        new = _block_key(sub, {} if i == "1" else _RES)
        return f"{part}.mid_block.{block}.{new}" if new else None
    if (
        part == "encoder"
        and residual
        and (m := re.match(r"^downsamples\.(\d+)\.downsamples\.(\d+)\.(.+)$", rest))
    ):
        i, j, sub = int(m.group(1)), int(m.group(2)), m.group(3)
        if j < nrb and sub in _RES:
            return f"encoder.down_blocks.{i}.resnets.{j}.{_RES[sub]}"
        return f"encoder.down_blocks.{i}.downsampler.{sub}" if j == nrb and sub in _RESAMPLE else None
    if part == "encoder" and not residual and (m := re.match(r"^downsamples\.(\d+)\.(.+)$", rest)):
        new = _RES.get(m.group(2)) or (m.group(2) if m.group(2) in _RESAMPLE else None)
        return f"encoder.down_blocks.{m.group(1)}.{new}" if new else None
    if (
        part == "decoder"
        and residual
        and (m := re.match(r"^upsamples\.(\d+)\.upsamples\.(\d+)\.(.+)$", rest))
    ):
        i, j, sub = int(m.group(1)), int(m.group(2)), m.group(3)
        if j <= nrb and sub in _RES:
            return f"decoder.up_blocks.{i}.resnets.{j}.{_RES[sub]}"
        return f"decoder.up_blocks.{i}.upsampler.{sub}" if j == nrb + 1 and sub in _RESAMPLE else None
    if part == "decoder" and not residual and (m := re.match(r"^upsamples\.(\d+)\.(.+)$", rest)):
        i, j = divmod(int(m.group(1)), nrb + 2)  # per level: nrb + 1 residual blocks, then the upsampler
        sub = m.group(2)
        if j <= nrb and sub in _RES:
            return f"decoder.up_blocks.{i}.resnets.{j}.{_RES[sub]}"
        return f"decoder.up_blocks.{i}.upsamplers.0.{sub}" if j == nrb + 1 and sub in _RESAMPLE else None
    return None


def _diffusers_to_official_key(key: str, residual: bool, nrb: int) -> str | None:
    if m := re.match(r"^(quant_conv|post_quant_conv)\.(weight|bias)$", key):
        return f"{'conv1' if m.group(1) == 'quant_conv' else 'conv2'}.{m.group(2)}"
    m = re.match(r"^(encoder|decoder)\.(.+)$", key)
    if not m:
        return None
    part, rest = m.groups()
    simple = {
        "norm_out.gamma": "head.0.gamma",
        "conv_out.weight": "head.2.weight",
        "conv_out.bias": "head.2.bias",
    }
    simple |= {"conv_in.weight": "conv1.weight", "conv_in.bias": "conv1.bias"}
    if rest in simple:
        return f"{part}.{simple[rest]}"
    if m := re.match(r"^mid_block\.(resnets\.[01]|attentions\.0)\.(.+)$", rest):
        block, sub = m.groups()
        index = {"resnets.0": 0, "attentions.0": 1, "resnets.1": 2}[block]
        new = _block_key(sub, {} if index == 1 else _RES_INV)
        return f"{part}.middle.{index}.{new}" if new else None
    if part == "encoder" and residual:
        if (m := re.match(r"^down_blocks\.(\d+)\.resnets\.(\d+)\.(.+)$", rest)) and m.group(3) in _RES_INV:
            return f"encoder.downsamples.{m.group(1)}.downsamples.{m.group(2)}.{_RES_INV[m.group(3)]}"
        if (m := re.match(r"^down_blocks\.(\d+)\.downsampler\.(.+)$", rest)) and m.group(2) in _RESAMPLE:
            return f"encoder.downsamples.{m.group(1)}.downsamples.{nrb}.{m.group(2)}"
        return None
    if part == "encoder" and (m := re.match(r"^down_blocks\.(\d+)\.(.+)$", rest)):
        new = _RES_INV.get(m.group(2)) or (m.group(2) if m.group(2) in _RESAMPLE else None)
        return f"encoder.downsamples.{m.group(1)}.{new}" if new else None
    if part == "decoder" and (m := re.match(r"^up_blocks\.(\d+)\.resnets\.(\d+)\.(.+)$", rest)):
        i, j, sub = int(m.group(1)), int(m.group(2)), m.group(3)
        if sub not in _RES_INV:
            return None
        where = f"upsamples.{i}.upsamples.{j}" if residual else f"upsamples.{i * (nrb + 2) + j}"
        return f"decoder.{where}.{_RES_INV[sub]}"
    if part == "decoder" and (m := re.match(r"^up_blocks\.(\d+)\.(upsampler|upsamplers\.0)\.(.+)$", rest)):
        i, kind, sub = int(m.group(1)), m.group(2), m.group(3)
        if sub not in _RESAMPLE or (kind == "upsampler") != residual:
            return None
        where = f"upsamples.{i}.upsamples.{nrb + 1}" if residual else f"upsamples.{i * (nrb + 2) + nrb + 1}"
        return f"decoder.{where}.{sub}"
    return None


def _convert(state_dict: Mapping[str, Tensor], source: Layout) -> dict[str, Tensor]:
    keys = list(state_dict)
    residual, nrb = _structure(keys, source)
    mapper = _official_to_diffusers_key if source == "official" else _diffusers_to_official_key
    out: dict[str, Tensor] = {}
    unknown: list[str] = []
    for key, value in state_dict.items():
        new = mapper(key, residual, nrb)
        if new is None:
            unknown.append(key)
            continue
        if new in out:
            raise WanLayoutError(f"{key} maps to {new}, which another key already filled")
        out[new] = value
    if unknown:
        target = "diffusers" if source == "official" else "official"
        raise WanLayoutError(f"{source} Wan VAE keys with no {target} counterpart: {sorted(unknown)}")
    return out


def diffusers_to_official(state_dict: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """diffusers `AutoencoderKLWan` keys -> official / our keys (2.1 and 2.2). Raises listing unplaceable keys."""
    return _convert(state_dict, "diffusers")


def official_to_diffusers(state_dict: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Official / our keys -> diffusers `AutoencoderKLWan` keys, the inverse of `diffusers_to_official`."""
    return _convert(state_dict, "official")


def to_official_layout(state_dict: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Detect the layout and return the state dict under the official / our names."""
    if detect_wan_layout(state_dict.keys()) == "official":
        return dict(state_dict)
    return diffusers_to_official(state_dict)


def _check_config(config: Mapping[str, Any], params: WanVAEParams) -> None:
    """Every architecture field a diffusers config states must agree with the weights."""
    want = {
        "base_dim": params.dim,
        "decoder_base_dim": params.dec_dim,
        "z_dim": params.z_dim,
        "dim_mult": list(params.dim_mult),
        "num_res_blocks": params.num_res_blocks,
        "temperal_downsample": list(params.temporal_downsample),
        "is_residual": params.residual,
        "in_channels": params.in_channels * params.patch_size**2,
        "out_channels": params.out_channels * params.patch_size**2,
        "patch_size": params.patch_size,
        "scale_factor_spatial": params.spatial_factor,
        "scale_factor_temporal": params.temporal_factor,
    }
    got = dict(config)
    if got.get("decoder_base_dim") is None and "base_dim" in got:
        got["decoder_base_dim"] = got["base_dim"]  # diffusers: None means the encoder's width
    if "patch_size" in got and got["patch_size"] is None:
        got["patch_size"] = 1
    bad = {k: (got[k], v) for k, v in want.items() if k in got and got[k] != v}
    if bad:
        raise ValueError(f"Wan VAE config disagrees with the weights (config, weights): {bad}")
    if config.get("attn_scales"):
        raise ValueError(
            f"attn_scales={config['attn_scales']} is not supported (every released Wan VAE has [])"
        )


def infer_wan_params(
    state_dict: Mapping[str, Tensor], config: Mapping[str, Any] | None = None
) -> WanVAEParams:
    """The architecture from tensor shapes (either layout); normalisation from the config or the release.

    Shapes give widths, levels, residual blocks, temporal resamplers, z_dim, 2.1 vs 2.2 (per-level blocks) and the
    patch size (input channels = 3 x p^2 for RGB). `latents_mean` / `latents_std` come from the diffusers config;
    without one they are the released VAE's of that z_dim (16: Wan 2.1, 48: Wan 2.2); any other z_dim raises.
    """
    sd = to_official_layout(state_dict)
    keys = list(sd)
    residual, nrb = _structure(keys, "official")
    dim, cin = (int(s) for s in sd["encoder.conv1.weight"].shape[:2])  # (dim, C*p*p, 3, 3, 3)
    z_dim = int(sd["conv2.weight"].shape[0])
    for key, want in (("conv1.weight", 2 * z_dim), ("encoder.head.2.weight", 2 * z_dim)):
        if int(sd[key].shape[0]) != want:
            raise WanLayoutError(f"{key} has {sd[key].shape[0]} output channels, expected 2 * z_dim = {want}")
    if residual:
        n_levels = len(_indices(keys, r"^encoder\.downsamples\.(\d+)\."))
        first = [f"encoder.downsamples.{i}.downsamples.0" for i in range(n_levels)]
        resampler = [f"encoder.downsamples.{i}.downsamples.{nrb}" for i in range(n_levels - 1)]
    else:
        n_blocks = len(_indices(keys, r"^encoder\.downsamples\.(\d+)\."))
        if (n_blocks + 1) % (nrb + 1):
            raise WanLayoutError(
                f"{n_blocks} encoder blocks do not make levels of {nrb} blocks + a resampler"
            )
        n_levels = (n_blocks + 1) // (nrb + 1)
        first = [f"encoder.downsamples.{i * (nrb + 1)}" for i in range(n_levels)]
        resampler = [f"encoder.downsamples.{i * (nrb + 1) + nrb}" for i in range(n_levels - 1)]
    dim_mult = []
    for block in first:
        width = int(sd[f"{block}.residual.2.weight"].shape[0])
        if width % dim:
            raise WanLayoutError(f"{block} width {width} is not a multiple of the base width {dim}")
        dim_mult.append(width // dim)
    temporal = [f"{block}.time_conv.weight" in sd for block in resampler]

    in_channels, patch = 3, math.isqrt(cin // 3)
    if config is not None and config.get("patch_size"):
        patch = int(config["patch_size"])
        in_channels = cin // patch**2
    if in_channels * patch**2 != cin:
        raise WanLayoutError(f"encoder.conv1 takes {cin} channels: not RGB x p^2; pass the diffusers config")
    out_channels = int(sd["decoder.head.2.weight"].shape[0]) // patch**2
    dec_dim = int(sd["decoder.head.0.gamma"].shape[0]) // dim_mult[0]

    if (
        config is not None
        and config.get("latents_mean") is not None
        and config.get("latents_std") is not None
    ):
        mean, std = tuple(config["latents_mean"]), tuple(config["latents_std"])
    elif z_dim in RELEASES:
        mean, std = RELEASES[z_dim].latents_mean, RELEASES[z_dim].latents_std
    else:
        raise ValueError(
            f"z_dim={z_dim} matches no released Wan VAE ({sorted(RELEASES)}); pass a config with "
            "latents_mean and latents_std"
        )
    params = WanVAEParams(
        dim=dim,
        dec_dim=dec_dim,
        z_dim=z_dim,
        latents_mean=mean,
        latents_std=std,
        dim_mult=tuple(dim_mult),
        num_res_blocks=nrb,
        temporal_downsample=tuple(temporal),
        residual=residual,
        patch_size=patch,
        in_channels=in_channels,
        out_channels=out_channels,
    )
    if config is not None:
        _check_config(config, params)
    return params


def load_wan_vae(
    state_dict: Mapping[str, Tensor], params: WanVAEParams, *, dtype: torch.dtype | None = None
) -> WanVAE:
    """Build on the meta device, then assign the (layout-converted) weights; strict about keys and shapes."""
    sd = to_official_layout(state_dict)
    with torch.device("meta"):
        model = WanVAE(params)
    expected = model.state_dict()
    missing, unexpected = sorted(expected.keys() - sd.keys()), sorted(sd.keys() - expected.keys())
    shapes = {
        k: (tuple(sd[k].shape), tuple(v.shape))
        for k, v in expected.items()
        if k in sd and sd[k].shape != v.shape
    }
    if missing or unexpected or shapes:
        raise WanLayoutError(
            f"Wan VAE weights do not fit {params}: missing {missing}, unexpected {unexpected}, "
            f"shapes (file, model) {shapes}"
        )
    if dtype is not None:
        sd = {k: v.to(dtype) for k, v in sd.items()}
    model.load_state_dict(sd, strict=True, assign=True)
    return model.eval()
