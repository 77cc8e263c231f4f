"""Wan transformer checkpoint layouts: detection, diffusers <-> Wan keys, params from weights, errors."""

from __future__ import annotations

import pytest
import torch
from diffusers import WanTransformer3DModel
from diffusers.loaders.single_file_utils import convert_wan_transformer_to_diffusers
from tiny_wan import GEOMETRIES, HEADS, tiny_wan, tiny_wan_config, tiny_wan_params

from services.denoiser.convert.wan import (
    CheckpointLayoutError,
    block_sources,
    check_wan_state_dict,
    detect_wan_layout,
    diffusers_to_wan,
    infer_wan_params,
    load_wan_state_dict,
    num_heads_from_config,
    strip_prefix,
    to_wan,
    wan_to_diffusers,
)
from services.denoiser.models.wan import WanDiT


def diffusers_sd(geometry: str, **overrides) -> dict[str, torch.Tensor]:
    return tiny_wan(geometry, **overrides).state_dict()


def wan_sd(geometry: str) -> dict[str, torch.Tensor]:
    return WanDiT(tiny_wan_params(geometry)).state_dict()


@pytest.mark.parametrize("geometry", list(GEOMETRIES))
def test_diffusers_to_wan_is_the_inverse_of_diffusers_single_file_converter(geometry: str) -> None:
    """diffusers' converter of official Wan files (the oracle) maps our Wan keys back onto diffusers' keys,
    tensor for tensor; and our own inverse does too."""
    sd = diffusers_sd(geometry)
    wan = diffusers_to_wan(sd)
    assert wan.keys() == wan_sd(geometry).keys()  # exactly our module's names
    theirs = convert_wan_transformer_to_diffusers({f"model.diffusion_model.{k}": v for k, v in wan.items()})
    if "img_emb.emb_pos" in theirs:  # diffusers' single-file converter has no rule for FLF2V's emb_pos
        theirs["condition_embedder.image_embedder.pos_embed"] = theirs.pop("img_emb.emb_pos")
    assert theirs.keys() == sd.keys()
    assert all(theirs[k] is sd[k] for k in sd)  # renamed only: the same tensors
    back = wan_to_diffusers(wan)
    assert back.keys() == sd.keys() and all(back[k] is sd[k] for k in sd)


def test_norms_swap_names() -> None:
    """diffusers' affine cross-attention norm `norm2` is Wan's `norm3` (Wan's MLP norm `norm2` has no weights)."""
    sd = diffusers_sd("t2v")
    wan = diffusers_to_wan(sd)
    assert wan["blocks.1.norm3.weight"] is sd["blocks.1.norm2.weight"]
    assert wan["blocks.1.norm3.bias"] is sd["blocks.1.norm2.bias"]
    assert not any(".norm2." in k for k in wan)
    assert wan["head.modulation"] is sd["scale_shift_table"]
    assert wan["blocks.0.modulation"] is sd["blocks.0.scale_shift_table"]


def test_detect_layout_and_errors_name_missing_keys() -> None:
    assert detect_wan_layout(diffusers_sd("t2v")) == "diffusers"
    assert detect_wan_layout(wan_sd("i2v")) == "wan"
    with pytest.raises(
        CheckpointLayoutError, match=r"model.st: not a Wan transformer.*missing Wan keys \[.*head"
    ):
        detect_wan_layout(["img_in.weight", "txt_in.weight"], source="model.st")
    with pytest.raises(CheckpointLayoutError, match=r"expected the Wan layout"):
        infer_wan_params(diffusers_sd("t2v"), num_heads=HEADS)


def test_strip_prefix_keeps_only_the_dit() -> None:
    sd = {
        "model.diffusion_model.head.modulation": torch.zeros(1),
        "vae.decoder.conv_in.weight": torch.zeros(1),
    }
    assert strip_prefix(sd).keys() == {"head.modulation"}
    plain = wan_sd("t2v")
    assert strip_prefix(plain).keys() == plain.keys()


def test_unknown_keys_raise_and_unused_norm_added_q_is_dropped() -> None:
    sd = diffusers_sd("i2v")
    sd["blocks.0.attn2.norm_added_q.weight"] = torch.ones(32)  # in older diffusers I2V checkpoints; unused
    assert "blocks.0.cross_attn.norm_q_img.weight" not in diffusers_to_wan(sd)
    assert diffusers_to_wan(sd).keys() == wan_sd("i2v").keys()
    vace = dict(wan_sd("t2v"), **{"vace_blocks.0.after_proj.weight": torch.zeros(2, 2)})
    with pytest.raises(CheckpointLayoutError, match=r"unknown keys \[vace_blocks.0.after_proj.weight\]"):
        wan_to_diffusers(vace)
    with pytest.raises(CheckpointLayoutError, match=r"unexpected keys \[vace_blocks.0.after_proj.weight\]"):
        load_wan_state_dict(vace, num_heads=HEADS)
    with pytest.raises(
        CheckpointLayoutError, match=r"\(diffusers layout\): unknown keys \[blocks.0.attn1.to_qkv"
    ):
        diffusers_to_wan(dict(sd, **{"blocks.0.attn1.to_qkv.weight": torch.zeros(1)}))


@pytest.mark.parametrize("geometry", list(GEOMETRIES))
def test_infer_params_from_both_layouts(geometry: str) -> None:
    params, sd = load_wan_state_dict(diffusers_sd(geometry), num_heads=HEADS)
    assert params == tiny_wan_params(geometry)
    assert load_wan_state_dict(sd, num_heads=HEADS)[0] == params


def test_head_count_from_head_dim_128_or_config() -> None:
    sd = diffusers_sd("t2v")
    with pytest.raises(
        CheckpointLayoutError, match=r"dim 32 is not a multiple of .* head dim 128.*pass num_heads"
    ):
        load_wan_state_dict(sd)
    assert num_heads_from_config(WanTransformer3DModel(**tiny_wan_config("t2v")).config) == HEADS
    wan_config = {"_class_name": "WanModel", "dim": 32, "num_heads": 2}  # Wan's own config.json
    assert num_heads_from_config(wan_config) == 2
    with pytest.raises(CheckpointLayoutError, match=r"cfg.json: no positive integer num_attention_heads"):
        num_heads_from_config({"dim": 32, "num_heads": True}, source="cfg.json")
    with torch.device("meta"):  # two heads of 128 channels: the released models' head dim, no config needed
        wide = WanTransformer3DModel(**tiny_wan_config("t2v", attention_head_dim=128)).state_dict()
    params, _ = load_wan_state_dict(wide)
    assert (params.dim, params.num_heads) == (256, 2)


def test_missing_blocks_and_wrong_shapes_raise() -> None:
    three = WanDiT(tiny_wan_params("t2v", num_layers=3)).state_dict()
    sd = {k: v for k, v in three.items() if not k.startswith("blocks.1.")}
    with pytest.raises(CheckpointLayoutError, match=r"missing blocks \[1\] of 0..2"):
        load_wan_state_dict(sd, num_heads=HEADS)
    sd = wan_sd("t2v")
    sd["blocks.1.ffn.2.weight"] = sd["blocks.1.ffn.2.weight"][:, :60]
    with pytest.raises(
        CheckpointLayoutError, match=r"wrong shapes \[blocks.1.ffn.2.weight \(32, 60\) != \(32, 64\)"
    ):
        load_wan_state_dict(sd, num_heads=HEADS)
    sd = wan_sd("i2v")
    del sd["blocks.1.cross_attn.k_img.weight"]
    with pytest.raises(CheckpointLayoutError, match=r"missing keys \[blocks.1.cross_attn.k_img.weight\]"):
        check_wan_state_dict(sd, tiny_wan_params("i2v"), source="x")


def test_block_sources_and_to_wan_stream_a_block_at_a_time() -> None:
    sd = diffusers_sd("i2v")
    top, blocks = block_sources(sd.keys())
    assert set(blocks) == {"blocks.0", "blocks.1"}
    assert "scale_shift_table" in top and "blocks.0.scale_shift_table" in blocks["blocks.0"]
    one = to_wan({k: sd[k] for k in blocks["blocks.1"]}, "diffusers")
    assert one.keys() == {k for k in wan_sd("i2v") if k.startswith("blocks.1.")}
    wan = wan_sd("t2v")
    assert to_wan(wan, "wan").keys() == wan.keys()
