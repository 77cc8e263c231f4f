"""FLUX.1 checkpoint layouts: detection, diffusers -> BFL keys, params from weights, and the errors."""

from __future__ import annotations

import pytest
import torch
from diffusers import FluxTransformer2DModel

from services.denoiser.convert.flux import (
    CheckpointLayoutError,
    detect_flux_layout,
    diffusers_to_bfl,
    infer_flux_params,
    load_flux_state_dict,
    strip_prefix,
)
from services.denoiser.models.flux import Flux, FluxParams

AXES = (4, 4, 8)


def tiny_params(guidance_embed: bool, depth: int = 1, depth_single_blocks: int = 1) -> FluxParams:
    return FluxParams(
        in_channels=64,
        out_channels=64,
        vec_in_dim=24,
        context_in_dim=40,
        hidden_size=32,
        mlp_ratio=4.0,
        num_heads=2,
        depth=depth,
        depth_single_blocks=depth_single_blocks,
        axes_dim=AXES,
        theta=10_000,
        qkv_bias=True,
        guidance_embed=guidance_embed,
    )


def diffusers_sd(
    guidance_embed: bool, depth: int = 1, depth_single_blocks: int = 1
) -> dict[str, torch.Tensor]:
    model = FluxTransformer2DModel(
        patch_size=1,
        in_channels=64,
        num_layers=depth,
        num_single_layers=depth_single_blocks,
        attention_head_dim=16,
        num_attention_heads=2,
        joint_attention_dim=40,
        pooled_projection_dim=24,
        axes_dims_rope=list(AXES),
        guidance_embeds=guidance_embed,
    )
    return model.state_dict()


def bfl_sd(params: FluxParams) -> dict[str, torch.Tensor]:
    return Flux(params).state_dict()


@pytest.mark.parametrize("guidance_embed", [True, False])
def test_infer_params_from_both_layouts(guidance_embed: bool) -> None:
    expected = tiny_params(guidance_embed, depth=2, depth_single_blocks=3)
    sd = diffusers_sd(guidance_embed, depth=2, depth_single_blocks=3)
    assert detect_flux_layout(sd.keys()) == "diffusers"
    converted = diffusers_to_bfl(sd)
    assert detect_flux_layout(converted.keys()) == "bfl"
    assert infer_flux_params(converted, axes_dim=AXES) == expected
    assert converted.keys() == bfl_sd(expected).keys()
    params, loaded = load_flux_state_dict(sd, axes_dim=AXES)
    assert params == expected and loaded.keys() == converted.keys()
    assert load_flux_state_dict(bfl_sd(expected), axes_dim=AXES)[0] == expected


def test_conversion_fuses_and_swaps() -> None:
    sd = diffusers_sd(True)
    out = diffusers_to_bfl(sd)
    qkv = torch.cat([sd[f"transformer_blocks.0.attn.to_{n}.weight"] for n in "qkv"])
    assert torch.equal(out["double_blocks.0.img_attn.qkv.weight"], qkv)
    linear1 = torch.cat([sd[f"single_transformer_blocks.0.attn.to_{n}.bias"] for n in "qkv"])
    linear1 = torch.cat([linear1, sd["single_transformer_blocks.0.proj_mlp.bias"]])
    assert torch.equal(out["single_blocks.0.linear1.bias"], linear1)
    scale, shift = sd["norm_out.linear.weight"].chunk(2)
    assert torch.equal(out["final_layer.adaLN_modulation.1.weight"], torch.cat([shift, scale]))
    assert torch.equal(
        out["double_blocks.0.txt_attn.norm.key_norm.scale"],
        sd["transformer_blocks.0.attn.norm_added_k.weight"],
    )
    assert "norm_out.linear.weight" in sd  # input untouched


def test_prefixed_official_single_file() -> None:
    sd = bfl_sd(tiny_params(True))
    bundled = {f"model.diffusion_model.{k}": v for k, v in sd.items()}
    bundled["first_stage_model.decoder.conv_in.weight"] = torch.zeros(1)
    assert strip_prefix(bundled).keys() == sd.keys()
    assert load_flux_state_dict(bundled, axes_dim=AXES)[0] == tiny_params(True)


def test_unknown_layout_names_missing_keys() -> None:
    sd = bfl_sd(tiny_params(True))
    del sd["txt_in.weight"]
    with pytest.raises(CheckpointLayoutError, match=r"x\.safetensors.*FLUX\.1.*txt_in\.weight") as info:
        detect_flux_layout(sd.keys(), source="x.safetensors")
    assert "context_embedder.weight" in str(info.value)
    assert isinstance(info.value, ValueError)


def test_incomplete_bfl_names_missing_keys() -> None:
    sd = bfl_sd(tiny_params(True, depth=2))
    del sd["double_blocks.1.img_mlp.2.bias"]
    with pytest.raises(CheckpointLayoutError, match=r"missing keys \[double_blocks\.1\.img_mlp\.2\.bias\]"):
        load_flux_state_dict(sd, axes_dim=AXES, source="f.safetensors")
    sd = bfl_sd(tiny_params(True, depth=3))
    for k in [k for k in sd if k.startswith("double_blocks.1.")]:
        del sd[k]
    with pytest.raises(CheckpointLayoutError, match=r"missing double_blocks \[1\] of 0\.\.2"):
        infer_flux_params(sd, axes_dim=AXES)


def test_wrong_shape_is_named() -> None:
    sd = bfl_sd(tiny_params(True))
    sd["single_blocks.0.linear2.weight"] = torch.zeros(32, 100)
    with pytest.raises(
        CheckpointLayoutError, match=r"single_blocks\.0\.linear2\.weight \(32, 100\) != \(32, 160\)"
    ):
        load_flux_state_dict(sd, axes_dim=AXES)


def test_diffusers_unknown_or_partial_keys() -> None:
    sd = diffusers_sd(False)
    sd["transformer_blocks.0.attn.to_qkv.weight"] = torch.zeros(1)
    with pytest.raises(
        CheckpointLayoutError, match=r"unknown keys \[transformer_blocks\.0\.attn\.to_qkv\.weight\]"
    ):
        diffusers_to_bfl(sd)
    sd = diffusers_sd(False)
    del sd["single_transformer_blocks.0.proj_mlp.weight"]
    with pytest.raises(CheckpointLayoutError, match=r"single_blocks\.0\.linear1\.weight \(parts \[3\]\)"):
        diffusers_to_bfl(sd)


def test_axes_dim_needed_off_flux1_head_dim() -> None:
    with pytest.raises(CheckpointLayoutError, match=r"head dim 16 .* pass axes_dim"):
        infer_flux_params(bfl_sd(tiny_params(True)))
    with pytest.raises(CheckpointLayoutError, match="expected the BFL layout"):
        infer_flux_params(diffusers_sd(True), axes_dim=AXES)
