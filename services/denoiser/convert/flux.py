"""FLUX.1 transformer checkpoints: layout detection, diffusers -> BFL key conversion, params from weights.

Our `Flux` uses the BFL (official) names, so a BFL checkpoint needs no conversion. A diffusers
`FluxTransformer2DModel` checkpoint differs in three ways besides names: q/k/v (and the single blocks' MLP
input) are separate Linears that BFL fuses into `qkv` / `linear1`; norm weights are `weight` not `scale`;
and the final adaLN projection holds `(scale, shift)` where BFL holds `(shift, scale)`.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from typing import Literal

import torch
from torch import Tensor

from services.denoiser.convert.checkpoint import name_keys, state_dict_mismatch
from services.denoiser.models.flux import Flux, FluxParams

Layout = Literal["bfl", "diffusers"]

FAMILY = "FLUX.1 transformer"
BFL_KEYS = (
    "img_in.weight",
    "txt_in.weight",
    "time_in.in_layer.weight",
    "vector_in.in_layer.weight",
    "double_blocks.0.img_attn.qkv.weight",
    "single_blocks.0.linear1.weight",
    "final_layer.linear.weight",
    "final_layer.adaLN_modulation.1.weight",
)
DIFFUSERS_KEYS = (
    "x_embedder.weight",
    "context_embedder.weight",
    "time_text_embed.timestep_embedder.linear_1.weight",
    "time_text_embed.text_embedder.linear_1.weight",
    "transformer_blocks.0.attn.to_q.weight",
    "single_transformer_blocks.0.attn.to_q.weight",
    "proj_out.weight",
    "norm_out.linear.weight",
)
# Prefixes of official single-file checkpoints (ComfyUI / original repos) in front of the DiT keys.
PREFIXES = ("model.diffusion_model.", "diffusion_model.")
FLUX1_AXES_DIM = (16, 56, 56)  # every FLUX.1 release: head dim 128
FLUX1_THETA = 10_000
FINAL_ADALN = "final_layer.adaLN_modulation.1"

# diffusers module -> (BFL module, part, parts): parts > 1 are concatenated on dim 0 in part order.
_TOP: dict[str, tuple[str, int, int]] = {
    "time_text_embed.timestep_embedder.linear_1": ("time_in.in_layer", 0, 1),
    "time_text_embed.timestep_embedder.linear_2": ("time_in.out_layer", 0, 1),
    "time_text_embed.text_embedder.linear_1": ("vector_in.in_layer", 0, 1),
    "time_text_embed.text_embedder.linear_2": ("vector_in.out_layer", 0, 1),
    "time_text_embed.guidance_embedder.linear_1": ("guidance_in.in_layer", 0, 1),
    "time_text_embed.guidance_embedder.linear_2": ("guidance_in.out_layer", 0, 1),
    "context_embedder": ("txt_in", 0, 1),
    "x_embedder": ("img_in", 0, 1),
    "proj_out": ("final_layer.linear", 0, 1),
    "norm_out.linear": (FINAL_ADALN, 0, 1),
}
_DOUBLE: dict[str, tuple[str, int, int]] = {
    "norm1.linear": ("img_mod.lin", 0, 1),
    "norm1_context.linear": ("txt_mod.lin", 0, 1),
    "attn.to_q": ("img_attn.qkv", 0, 3),
    "attn.to_k": ("img_attn.qkv", 1, 3),
    "attn.to_v": ("img_attn.qkv", 2, 3),
    "attn.add_q_proj": ("txt_attn.qkv", 0, 3),
    "attn.add_k_proj": ("txt_attn.qkv", 1, 3),
    "attn.add_v_proj": ("txt_attn.qkv", 2, 3),
    "attn.norm_q": ("img_attn.norm.query_norm", 0, 1),
    "attn.norm_k": ("img_attn.norm.key_norm", 0, 1),
    "attn.norm_added_q": ("txt_attn.norm.query_norm", 0, 1),
    "attn.norm_added_k": ("txt_attn.norm.key_norm", 0, 1),
    "attn.to_out.0": ("img_attn.proj", 0, 1),
    "attn.to_add_out": ("txt_attn.proj", 0, 1),
    "ff.net.0.proj": ("img_mlp.0", 0, 1),
    "ff.net.2": ("img_mlp.2", 0, 1),
    "ff_context.net.0.proj": ("txt_mlp.0", 0, 1),
    "ff_context.net.2": ("txt_mlp.2", 0, 1),
}
_SINGLE: dict[str, tuple[str, int, int]] = {
    "norm.linear": ("modulation.lin", 0, 1),
    "attn.to_q": ("linear1", 0, 4),
    "attn.to_k": ("linear1", 1, 4),
    "attn.to_v": ("linear1", 2, 4),
    "proj_mlp": ("linear1", 3, 4),
    "attn.norm_q": ("norm.query_norm", 0, 1),
    "attn.norm_k": ("norm.key_norm", 0, 1),
    "proj_out": ("linear2", 0, 1),
}
_BLOCK_KEY = re.compile(r"^(transformer_blocks|single_transformer_blocks)\.(\d+)\.(.+)$")


class CheckpointLayoutError(ValueError):
    """A checkpoint that is not (or not all of) the expected family and layout; names the keys."""


def _swap_halves(t: Tensor) -> Tensor:
    """`[a; b] -> [b; a]` on dim 0: (shift, scale) <-> (scale, shift) of the final adaLN."""
    first, second = t.chunk(2, dim=0)
    return torch.cat((second, first), dim=0)


def strip_prefix(state_dict: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """The DiT keys of an official single file: those under `model.diffusion_model.` (or `diffusion_model.`)
    with the prefix removed; other components in the file (VAE, text encoders) are left out. A state dict
    without such a prefix is returned as it is."""
    for prefix in PREFIXES:
        if any(k.startswith(prefix) for k in state_dict):
            return {k[len(prefix) :]: v for k, v in state_dict.items() if k.startswith(prefix)}
    return dict(state_dict)


def detect_flux_layout(keys: Iterable[str], *, source: str = "<state dict>") -> Layout:
    """`"bfl"` or `"diffusers"` from the presence of named keys; `CheckpointLayoutError` names what is missing."""
    present = set(keys)
    missing_bfl = [k for k in BFL_KEYS if k not in present]
    missing_diffusers = [k for k in DIFFUSERS_KEYS if k not in present]
    if not missing_bfl:
        return "bfl"
    if not missing_diffusers:
        return "diffusers"
    raise CheckpointLayoutError(
        f"{source}: not a {FAMILY} checkpoint in the BFL or diffusers layout "
        f"({len(present)} keys, e.g. {name_keys(present, 5)}); "
        f"missing BFL keys {name_keys(missing_bfl)}; missing diffusers keys {name_keys(missing_diffusers)}"
    )


def _bfl_target(key: str) -> tuple[str, int, int] | None:
    """diffusers key -> (BFL key, part, parts), or None for a key we do not know."""
    module, _, param = key.rpartition(".")
    match = _BLOCK_KEY.match(module)
    if match is None:
        target = _TOP.get(module)
        prefix = ""
    else:
        kind, index, inner = match.groups()
        table, prefix = (
            (_DOUBLE, "double_blocks") if kind == "transformer_blocks" else (_SINGLE, "single_blocks")
        )
        target = table.get(inner)
        prefix = f"{prefix}.{index}."
    if target is None or param not in ("weight", "bias"):
        return None
    bfl_module, part, parts = target
    if bfl_module.endswith("_norm"):
        if param != "weight":
            return None
        param = "scale"
    return f"{prefix}{bfl_module}.{param}", part, parts


def diffusers_to_bfl(state_dict: Mapping[str, Tensor], *, source: str = "<state dict>") -> dict[str, Tensor]:
    """diffusers `FluxTransformer2DModel` keys -> BFL keys (fusing q/k/v and q/k/v/mlp, swapping the final
    adaLN halves). Unknown or incomplete keys raise `CheckpointLayoutError`; the input is not modified."""
    out: dict[str, Tensor] = {}
    parts: dict[str, list[Tensor | None]] = {}
    unknown = []
    for key, tensor in state_dict.items():
        target = _bfl_target(key)
        if target is None:
            unknown.append(key)
            continue
        bfl_key, part, n_parts = target
        if n_parts == 1:
            out[bfl_key] = _swap_halves(tensor) if bfl_key.startswith(FINAL_ADALN) else tensor
        else:
            parts.setdefault(bfl_key, [None] * n_parts)[part] = tensor
    if unknown:
        raise CheckpointLayoutError(
            f"{source}: {FAMILY} (diffusers layout): unknown keys {name_keys(unknown)}"
        )
    incomplete = [
        f"{k} (parts {[i for i, t in enumerate(ts) if t is None]})" for k, ts in parts.items() if None in ts
    ]
    if incomplete:
        raise CheckpointLayoutError(
            f"{source}: {FAMILY} (diffusers layout): fused projections missing parts {name_keys(incomplete)}"
        )
    for bfl_key, tensors in parts.items():
        out[bfl_key] = torch.cat([t for t in tensors if t is not None], dim=0)  # all parts present
    return out


def _block_count(keys: Iterable[str], prefix: str, source: str) -> int:
    indices = {int(m.group(1)) for k in keys if (m := re.match(rf"^{prefix}\.(\d+)\.", k))}
    count = max(indices) + 1 if indices else 0
    gaps = sorted(set(range(count)) - indices)
    if gaps:
        raise CheckpointLayoutError(
            f"{source}: {FAMILY} (BFL layout): missing {prefix} {gaps} of 0..{count - 1}"
        )
    return count


def infer_flux_params(
    state_dict: Mapping[str, Tensor], *, axes_dim: tuple[int, ...] | None = None, source: str = "<state dict>"
) -> FluxParams:
    """`FluxParams` from the key set and tensor shapes of a BFL-layout state dict.

    RoPE axes are not stored in the weights: FLUX.1 (head dim 128) uses (16, 56, 56); other head dims need
    `axes_dim`.
    """
    if detect_flux_layout(state_dict.keys(), source=source) != "bfl":
        raise CheckpointLayoutError(
            f"{source}: {FAMILY}: expected the BFL layout, got diffusers keys (convert with diffusers_to_bfl)"
        )

    def shape(key: str) -> tuple[int, ...]:
        if key not in state_dict:
            raise CheckpointLayoutError(f"{source}: {FAMILY} (BFL layout): missing key {key}")
        return tuple(state_dict[key].shape)

    hidden_size, in_channels = shape("img_in.weight")
    depth = _block_count(state_dict.keys(), "double_blocks", source)
    depth_single = _block_count(state_dict.keys(), "single_blocks", source)
    (head_dim,) = shape("double_blocks.0.img_attn.norm.query_norm.scale")
    if hidden_size % head_dim:
        raise CheckpointLayoutError(
            f"{source}: {FAMILY}: hidden size {hidden_size} not a multiple of head dim {head_dim}"
        )
    if axes_dim is None:
        if head_dim != sum(FLUX1_AXES_DIM):
            raise CheckpointLayoutError(
                f"{source}: {FAMILY}: head dim {head_dim} is not FLUX.1's {sum(FLUX1_AXES_DIM)}; the RoPE axes "
                "are not stored in the weights, pass axes_dim"
            )
        axes_dim = FLUX1_AXES_DIM
    return FluxParams(
        in_channels=in_channels,
        out_channels=shape("final_layer.linear.weight")[0],
        vec_in_dim=shape("vector_in.in_layer.weight")[1],
        context_in_dim=shape("txt_in.weight")[1],
        hidden_size=hidden_size,
        mlp_ratio=shape("double_blocks.0.img_mlp.0.weight")[0] / hidden_size,
        num_heads=hidden_size // head_dim,
        depth=depth,
        depth_single_blocks=depth_single,
        axes_dim=tuple(axes_dim),
        theta=FLUX1_THETA,
        qkv_bias="double_blocks.0.img_attn.qkv.bias" in state_dict,
        guidance_embed="guidance_in.in_layer.weight" in state_dict,
    )


def check_flux_state_dict(state_dict: Mapping[str, Tensor], params: FluxParams, *, source: str) -> None:
    """Raise `CheckpointLayoutError` unless the keys and shapes are exactly those of `Flux(params)`."""
    with torch.device("meta"):
        expected = {k: v.shape for k, v in Flux(params).state_dict().items()}
    mismatch = state_dict_mismatch(state_dict, expected)
    if mismatch:
        raise CheckpointLayoutError(f"{source}: {FAMILY} (BFL layout) does not match {params}: {mismatch}")


def load_flux_state_dict(
    state_dict: Mapping[str, Tensor], *, axes_dim: tuple[int, ...] | None = None, source: str = "<state dict>"
) -> tuple[FluxParams, dict[str, Tensor]]:
    """Any supported FLUX.1 checkpoint -> `(params, BFL state dict)`, checked key by key against `Flux(params)`."""
    sd = strip_prefix(state_dict)
    if detect_flux_layout(sd.keys(), source=source) == "diffusers":
        sd = diffusers_to_bfl(sd, source=source)
    params = infer_flux_params(sd, axes_dim=axes_dim, source=source)
    check_flux_state_dict(sd, params, source=source)
    return params, sd


def _diffusers_sources() -> dict[str, list[tuple[str, str, int, int]]]:
    """BFL module (block-relative for blocks) -> [(scope, diffusers module, part, parts)], from the tables."""
    out: dict[str, list[tuple[str, str, int, int]]] = {}
    for scope, table in (("top", _TOP), ("double", _DOUBLE), ("single", _SINGLE)):
        for diffusers, (bfl, part, parts) in table.items():
            out.setdefault(f"{scope}:{bfl}", []).append((scope, diffusers, part, parts))
    return {k: sorted(v, key=lambda t: t[2]) for k, v in out.items()}


_FROM_BFL = _diffusers_sources()
_BFL_BLOCK = re.compile(r"^(double_blocks|single_blocks)\.(\d+)\.(.+)$")


def bfl_to_diffusers(state_dict: Mapping[str, Tensor], *, source: str = "<state dict>") -> dict[str, Tensor]:
    """BFL keys -> diffusers `FluxTransformer2DModel` keys, the inverse of `diffusers_to_bfl`: fused `qkv` /
    `linear1` are split into q, k, v (and the single blocks' `proj_mlp`, the rest of `linear1`), `scale` of the
    QK norms becomes `weight`, and the final adaLN halves are swapped back to (scale, shift). Unknown keys raise
    `CheckpointLayoutError`; the input is not modified."""
    if "img_in.weight" not in state_dict:
        raise CheckpointLayoutError(f"{source}: {FAMILY} (BFL layout): missing key img_in.weight")
    hidden = state_dict["img_in.weight"].shape[0]  # each of q, k, v is `hidden` rows of a fused projection
    out: dict[str, Tensor] = {}
    unknown = []
    for key, tensor in state_dict.items():
        module, _, param = key.rpartition(".")
        match = _BFL_BLOCK.match(module)
        if match is None:
            scope, prefix, inner = "top", "", module
        else:
            kind, index, inner = match.groups()
            scope = "double" if kind == "double_blocks" else "single"
            prefix = f"{'transformer_blocks' if scope == 'double' else 'single_transformer_blocks'}.{index}."
        targets = _FROM_BFL.get(f"{scope}:{inner}")
        is_norm = inner.endswith("_norm")
        if targets is None or param not in (("scale",) if is_norm else ("weight", "bias")):
            unknown.append(key)
            continue
        if is_norm:
            param = "weight"
        if key.startswith(FINAL_ADALN):
            tensor = _swap_halves(tensor)
        for _, diffusers, part, parts in targets:
            if parts == 1:
                out[f"{prefix}{diffusers}.{param}"] = tensor
                continue
            start = part * hidden
            stop = tensor.shape[0] if part == parts - 1 else start + hidden
            out[f"{prefix}{diffusers}.{param}"] = tensor[start:stop].contiguous()
    if unknown:
        raise CheckpointLayoutError(f"{source}: {FAMILY} (BFL layout): unknown keys {name_keys(unknown)}")
    return out


_SOURCE_BLOCK = re.compile(
    r"^(transformer_blocks|single_transformer_blocks|double_blocks|single_blocks)\.(\d+)\."
)
_NATIVE_BLOCK = {
    "transformer_blocks": "double_blocks",
    "single_transformer_blocks": "single_blocks",
    "double_blocks": "double_blocks",
    "single_blocks": "single_blocks",
}


def block_sources(keys: Iterable[str]) -> tuple[list[str], dict[str, list[str]]]:
    """Split checkpoint keys (prefix already stripped, either layout) into the non-block keys and, per BFL block
    (`"double_blocks.3"`), the keys it is made from: what streaming one block at a time needs to read."""
    top: list[str] = []
    blocks: dict[str, list[str]] = {}
    for key in keys:
        m = _SOURCE_BLOCK.match(key)
        if m is None:
            top.append(key)
        else:
            blocks.setdefault(f"{_NATIVE_BLOCK[m.group(1)]}.{m.group(2)}", []).append(key)
    return top, blocks


def to_bfl(
    state_dict: Mapping[str, Tensor], layout: Layout, *, source: str = "<state dict>"
) -> dict[str, Tensor]:
    """Part of a checkpoint (prefix stripped; whole blocks) in `layout` -> BFL keys."""
    return diffusers_to_bfl(state_dict, source=source) if layout == "diffusers" else dict(state_dict)


def bfl_pieces(keys: Iterable[str], layout: Layout) -> dict[str, list[str]]:
    """BFL key -> the checkpoint keys (prefix stripped) it is the dim-0 concatenation of, in order: one key for
    a BFL checkpoint; q, k, v (and the MLP input) for diffusers' fused projections. For the blocks only (the
    top-level final adaLN is not a plain concatenation); what streaming reads in place needs."""
    if layout == "bfl":
        return {k: [k] for k in keys}
    parts: dict[str, list[tuple[int, str]]] = {}
    for key in keys:
        target = _bfl_target(key)
        if target is None:
            raise CheckpointLayoutError(f"{FAMILY} (diffusers layout): unknown key {key}")
        bfl_key, part, _ = target
        parts.setdefault(bfl_key, []).append((part, key))
    return {k: [key for _, key in sorted(v)] for k, v in parts.items()}
