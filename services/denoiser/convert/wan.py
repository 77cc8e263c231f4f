"""Wan 2.1 / 2.2 transformer checkpoints: layout detection, diffusers <-> Wan keys, params from weights.

Our `WanDiT` uses the official Wan names (Wan-Video/Wan2.1 and Wan2.2 `WanModel`), so an official or ComfyUI
checkpoint needs no conversion beyond stripping `model.diffusion_model.`. A diffusers `WanTransformer3DModel`
checkpoint differs only in names (no fusing, no reordering), one trap among them: diffusers' `norm2` (the
affine cross-attention norm) is Wan's `norm3`, and the parameterless norms swap the other way. diffusers' I2V
checkpoints may carry `attn2.norm_added_q`, which no model uses (diffusers ignores it too): it is dropped.

The head count is not stored in the weights (the QK norms span all heads): the real models all have head dim
128, which `infer_wan_params` assumes unless `num_heads` is given (e.g. from a config.json via
`num_heads_from_config`).
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Mapping
from typing import Any, Literal

import torch
from torch import Tensor

from services.denoiser.convert.checkpoint import name_keys, state_dict_mismatch
from services.denoiser.convert.flux import CheckpointLayoutError, strip_prefix
from services.denoiser.models.wan import WanDiT, WanParams

__all__ = [
    "CheckpointLayoutError",
    "block_sources",
    "check_wan_state_dict",
    "detect_wan_layout",
    "diffusers_to_wan",
    "infer_wan_params",
    "load_wan_state_dict",
    "num_heads_from_config",
    "strip_prefix",
    "to_wan",
    "wan_to_diffusers",
]

Layout = Literal["wan", "diffusers"]

FAMILY = "Wan transformer"
HEAD_DIM = 128  # every released Wan 2.1 / 2.2 model
WAN_KEYS = (
    "patch_embedding.weight",
    "text_embedding.0.weight",
    "time_embedding.0.weight",
    "time_projection.1.weight",
    "blocks.0.self_attn.q.weight",
    "blocks.0.cross_attn.q.weight",
    "blocks.0.ffn.0.weight",
    "blocks.0.modulation",
    "head.head.weight",
    "head.modulation",
)
DIFFUSERS_KEYS = (
    "patch_embedding.weight",
    "condition_embedder.text_embedder.linear_1.weight",
    "condition_embedder.time_embedder.linear_1.weight",
    "condition_embedder.time_proj.weight",
    "blocks.0.attn1.to_q.weight",
    "blocks.0.attn2.to_q.weight",
    "blocks.0.ffn.net.0.proj.weight",
    "blocks.0.scale_shift_table",
    "proj_out.weight",
    "scale_shift_table",
)

# diffusers module -> Wan module (their `weight` and `bias`), outside and inside `blocks.N.`
_TOP_MODULES = {
    "patch_embedding": "patch_embedding",
    "condition_embedder.text_embedder.linear_1": "text_embedding.0",
    "condition_embedder.text_embedder.linear_2": "text_embedding.2",
    "condition_embedder.time_embedder.linear_1": "time_embedding.0",
    "condition_embedder.time_embedder.linear_2": "time_embedding.2",
    "condition_embedder.time_proj": "time_projection.1",
    "condition_embedder.image_embedder.norm1": "img_emb.proj.0",
    "condition_embedder.image_embedder.ff.net.0.proj": "img_emb.proj.1",
    "condition_embedder.image_embedder.ff.net.2": "img_emb.proj.3",
    "condition_embedder.image_embedder.norm2": "img_emb.proj.4",
    "proj_out": "head.head",
}
_BLOCK_MODULES = {
    "attn1.to_q": "self_attn.q",
    "attn1.to_k": "self_attn.k",
    "attn1.to_v": "self_attn.v",
    "attn1.to_out.0": "self_attn.o",
    "attn1.norm_q": "self_attn.norm_q",
    "attn1.norm_k": "self_attn.norm_k",
    "attn2.to_q": "cross_attn.q",
    "attn2.to_k": "cross_attn.k",
    "attn2.to_v": "cross_attn.v",
    "attn2.to_out.0": "cross_attn.o",
    "attn2.norm_q": "cross_attn.norm_q",
    "attn2.norm_k": "cross_attn.norm_k",
    "attn2.add_k_proj": "cross_attn.k_img",
    "attn2.add_v_proj": "cross_attn.v_img",
    "attn2.norm_added_k": "cross_attn.norm_k_img",
    "norm2": "norm3",  # the affine cross-attention norm
    "ffn.net.0.proj": "ffn.0",
    "ffn.net.2": "ffn.2",
}
# bare parameters (no module): diffusers name -> Wan name
_TOP_PARAMS = {
    "scale_shift_table": "head.modulation",
    "condition_embedder.image_embedder.pos_embed": "img_emb.emb_pos",
}
_BLOCK_PARAMS = {"scale_shift_table": "modulation"}
_DIFFUSERS_UNUSED = re.compile(r"^blocks\.\d+\.attn2\.norm_added_q\.(weight|bias)$")
_BLOCK = re.compile(r"^blocks\.(\d+)\.(.+)$")

_Tables = tuple[dict[str, str], dict[str, str], dict[str, str], dict[str, str]]
_TO_WAN: _Tables = (_TOP_MODULES, _BLOCK_MODULES, _TOP_PARAMS, _BLOCK_PARAMS)
_TO_DIFFUSERS: _Tables = tuple({v: k for k, v in t.items()} for t in _TO_WAN)  # type: ignore[assignment]


def detect_wan_layout(keys: Iterable[str], *, source: str = "<state dict>") -> Layout:
    """`"wan"` (official) or `"diffusers"` from the presence of named keys (prefix already stripped);
    `CheckpointLayoutError` names what is missing from each."""
    present = set(keys)
    missing_wan = [k for k in WAN_KEYS if k not in present]
    missing_diffusers = [k for k in DIFFUSERS_KEYS if k not in present]
    if not missing_wan:
        return "wan"
    if not missing_diffusers:
        return "diffusers"
    raise CheckpointLayoutError(
        f"{source}: not a {FAMILY} checkpoint in the Wan or diffusers layout "
        f"({len(present)} keys, e.g. {name_keys(present, 5)}); "
        f"missing Wan keys {name_keys(missing_wan)}; missing diffusers keys {name_keys(missing_diffusers)}"
    )


def _rename(key: str, tables: _Tables) -> str | None:
    """One key through the tables, or None when it is not known."""
    top_modules, block_modules, top_params, block_params = tables
    if key in top_params:
        return top_params[key]
    match = _BLOCK.match(key)
    if match is not None:
        index, inner = match.groups()
        if inner in block_params:
            return f"blocks.{index}.{block_params[inner]}"
        module, _, param = inner.rpartition(".")
        target = block_modules.get(module)
        return (
            None if target is None or param not in ("weight", "bias") else f"blocks.{index}.{target}.{param}"
        )
    module, _, param = key.rpartition(".")
    target = top_modules.get(module)
    return None if target is None or param not in ("weight", "bias") else f"{target}.{param}"


def _convert(
    state_dict: Mapping[str, Tensor], tables: _Tables, layout: str, source: str
) -> dict[str, Tensor]:
    out: dict[str, Tensor] = {}
    unknown = []
    for key, tensor in state_dict.items():
        if layout == "diffusers" and _DIFFUSERS_UNUSED.match(key):
            continue
        new = _rename(key, tables)
        if new is None:
            unknown.append(key)
        else:
            out[new] = tensor
    if unknown:
        raise CheckpointLayoutError(
            f"{source}: {FAMILY} ({layout} layout): unknown keys {name_keys(unknown)}"
        )
    return out


def diffusers_to_wan(state_dict: Mapping[str, Tensor], *, source: str = "<state dict>") -> dict[str, Tensor]:
    """diffusers `WanTransformer3DModel` keys -> official Wan keys (renaming only; `norm_added_q` dropped).
    Unknown keys raise `CheckpointLayoutError`; the input is not modified."""
    return _convert(state_dict, _TO_WAN, "diffusers", source)


def wan_to_diffusers(state_dict: Mapping[str, Tensor], *, source: str = "<state dict>") -> dict[str, Tensor]:
    """Official Wan keys -> diffusers `WanTransformer3DModel` keys, the inverse of `diffusers_to_wan`."""
    return _convert(state_dict, _TO_DIFFUSERS, "Wan", source)


def to_wan(
    state_dict: Mapping[str, Tensor], layout: Layout, *, source: str = "<state dict>"
) -> dict[str, Tensor]:
    """Part of a checkpoint (prefix stripped) in `layout` -> Wan keys."""
    return diffusers_to_wan(state_dict, source=source) if layout == "diffusers" else dict(state_dict)


def block_sources(keys: Iterable[str]) -> tuple[list[str], dict[str, list[str]]]:
    """Split checkpoint keys (prefix stripped, either layout: both number `blocks.N`) into the non-block keys
    and, per block (`"blocks.3"`), its keys: what streaming one block at a time needs to read."""
    top: list[str] = []
    blocks: dict[str, list[str]] = {}
    for key in keys:
        match = _BLOCK.match(key)
        if match is None:
            top.append(key)
        else:
            blocks.setdefault(f"blocks.{match.group(1)}", []).append(key)
    return top, blocks


def num_heads_from_config(config: Mapping[str, Any], *, source: str = "<config>") -> int:
    """The head count from a config.json beside the weights: diffusers' (`num_attention_heads`) or Wan's own
    (`num_heads`)."""
    for key in ("num_attention_heads", "num_heads"):
        value = config.get(key)
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            return value
    raise CheckpointLayoutError(
        f"{source}: no positive integer num_attention_heads (diffusers) or num_heads (Wan) in the config; "
        f"keys {name_keys(config.keys())}"
    )


def _block_count(keys: Iterable[str], source: str) -> int:
    indices = {int(m.group(1)) for k in keys if (m := _BLOCK.match(k))}
    count = max(indices) + 1 if indices else 0
    gaps = sorted(set(range(count)) - indices)
    if gaps:
        raise CheckpointLayoutError(
            f"{source}: {FAMILY} (Wan layout): missing blocks {gaps} of 0..{count - 1}"
        )
    return count


def infer_wan_params(
    state_dict: Mapping[str, Tensor], *, num_heads: int | None = None, source: str = "<state dict>"
) -> WanParams:
    """`WanParams` from the key set and tensor shapes of a Wan-layout state dict. `num_heads` is not in the
    weights: without it, dim / 128 (the head dim of every released model)."""
    if detect_wan_layout(state_dict.keys(), source=source) != "wan":
        raise CheckpointLayoutError(
            f"{source}: {FAMILY}: expected the Wan layout, got diffusers keys (convert with diffusers_to_wan)"
        )

    def shape(key: str) -> tuple[int, ...]:
        if key not in state_dict:
            raise CheckpointLayoutError(f"{source}: {FAMILY} (Wan layout): missing key {key}")
        return tuple(state_dict[key].shape)

    patch = shape("patch_embedding.weight")
    if len(patch) != 5:
        raise CheckpointLayoutError(
            f"{source}: {FAMILY}: patch_embedding.weight must be a Conv3d weight (dim, in, t, h, w), "
            f"got {patch}"
        )
    dim, in_dim, *patch_size = patch
    if num_heads is None:
        if dim % HEAD_DIM:
            raise CheckpointLayoutError(
                f"{source}: {FAMILY}: dim {dim} is not a multiple of the released models' head dim {HEAD_DIM}; "
                "the head count is not stored in the weights, pass num_heads (e.g. from config.json)"
            )
        num_heads = dim // HEAD_DIM
    head_out = shape("head.head.weight")[0]
    if head_out % math.prod(patch_size):
        raise CheckpointLayoutError(
            f"{source}: {FAMILY}: head.head has {head_out} outputs, not a multiple of the patch {patch_size}"
        )
    image_dim = shape("img_emb.proj.0.weight")[0] if "img_emb.proj.0.weight" in state_dict else None
    image_pos_len = shape("img_emb.emb_pos")[1] if "img_emb.emb_pos" in state_dict else None
    return WanParams(
        patch_size=tuple(patch_size),  # type: ignore[arg-type]
        in_dim=in_dim,
        out_dim=head_out // math.prod(patch_size),
        dim=dim,
        ffn_dim=shape("blocks.0.ffn.0.weight")[0],
        freq_dim=shape("time_embedding.0.weight")[1],
        text_dim=shape("text_embedding.0.weight")[1],
        num_heads=num_heads,
        num_layers=_block_count(state_dict.keys(), source),
        image_dim=image_dim,
        image_pos_len=image_pos_len,
        cross_attn_norm="blocks.0.norm3.weight" in state_dict,
    )


def check_wan_state_dict(state_dict: Mapping[str, Tensor], params: WanParams, *, source: str) -> None:
    """Raise `CheckpointLayoutError` unless the keys and shapes are exactly those of `WanDiT(params)`."""
    try:
        with torch.device("meta"):
            expected = {k: v.shape for k, v in WanDiT(params).state_dict().items()}
    except ValueError as e:
        raise CheckpointLayoutError(f"{source}: {FAMILY}: inconsistent params {params}: {e}") from None
    mismatch = state_dict_mismatch(state_dict, expected)
    if mismatch:
        raise CheckpointLayoutError(f"{source}: {FAMILY} (Wan layout) does not match {params}: {mismatch}")


def load_wan_state_dict(
    state_dict: Mapping[str, Tensor], *, num_heads: int | None = None, source: str = "<state dict>"
) -> tuple[WanParams, dict[str, Tensor]]:
    """Any supported Wan checkpoint (official, ComfyUI single file, diffusers) -> `(params, Wan-layout state
    dict)`, checked key by key against `WanDiT(params)`."""
    sd = strip_prefix(state_dict)
    if detect_wan_layout(sd.keys(), source=source) == "diffusers":
        sd = diffusers_to_wan(sd, source=source)
    params = infer_wan_params(sd, num_heads=num_heads, source=source)
    check_wan_state_dict(sd, params, source=source)
    return params, sd
