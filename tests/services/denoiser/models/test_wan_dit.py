"""Our Wan DiT vs diffusers' WanTransformer3DModel (the oracle): tiny real geometries, CPU, both key layouts."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest
import torch
from diffusers import WanTransformer3DModel
from diffusers.loaders.single_file_utils import convert_wan_transformer_to_diffusers
from diffusers.models.transformers.transformer_wan import WanRotaryPosEmbed
from safetensors import safe_open
from safetensors.torch import save_file
from tiny_wan import (
    GEOMETRIES,
    HEADS,
    diffusers_config,
    ours_inputs,
    randomize_,
    tiny_wan,
    tiny_wan_config,
    tiny_wan_inputs,
    tiny_wan_params,
)

from services.denoiser.convert.wan import diffusers_to_wan, load_wan_state_dict
from services.denoiser.models.wan import (
    PRESETS,
    WAN21_FLF2V_14B,
    WAN21_I2V_14B,
    WAN21_T2V_1_3B,
    WAN21_T2V_14B,
    WAN22_I2V_A14B,
    WAN22_T2V_A14B,
    WAN22_TI2V_5B,
    WanDiT,
    WanParams,
    keeps_float32,
    preset,
)
from services.denoiser.models.wan_layers import grid_rope

TOL = 1e-4


def load_ours(params: WanParams, sd: dict[str, torch.Tensor]) -> WanDiT:
    with torch.device("meta"):
        model = WanDiT(params)
    model.load_state_dict(sd, strict=True, assign=True)
    return model.eval()


@torch.no_grad()
def run_diffusers(model: WanTransformer3DModel, x: dict) -> torch.Tensor:
    return model(**x, return_dict=False)[0]


@torch.no_grad()
def run_ours(model: WanDiT, x: dict) -> torch.Tensor:
    return model(**ours_inputs(x))


def first(x: dict, n: int = 1) -> dict:
    """The first n samples of diffusers' inputs (FLF2V: two image rows per sample)."""
    out = {k: v[:n] for k, v in x.items()}
    if "encoder_hidden_states_image" in x and x["encoder_hidden_states_image"].shape[0] == 2 * len(
        x["timestep"]
    ):
        out["encoder_hidden_states_image"] = x["encoder_hidden_states_image"][: 2 * n]
    return out


def wan_single_file_to_diffusers(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """diffusers' own converter of official / ComfyUI Wan files. It has no rule for FLF2V's `img_emb.emb_pos`
    (its scripts/convert_wan_to_diffusers.py has): that one key is renamed here."""
    out = convert_wan_transformer_to_diffusers(dict(sd))
    if "img_emb.emb_pos" in out:
        out["condition_embedder.image_embedder.pos_embed"] = out.pop("img_emb.emb_pos")
    return out


@pytest.mark.parametrize("geometry", list(GEOMETRIES))
def test_matches_diffusers_from_diffusers_layout(geometry: str) -> None:
    reference = tiny_wan(geometry)
    params, sd = load_wan_state_dict(reference.state_dict(), num_heads=HEADS)
    assert params == tiny_wan_params(geometry)
    ours = load_ours(params, sd)
    x = tiny_wan_inputs(reference)
    expected = run_diffusers(reference, x)
    got = run_ours(ours, x)
    diff = (got - expected).abs().max().item()
    print(f"{geometry}, diffusers layout: max abs diff {diff:.2e}")
    assert got.shape == expected.shape == (2, params.out_dim, 3, 4, 6)
    assert expected.abs().mean() > 0.3
    assert diff <= TOL
    one = first(x)  # batch 1: the per-sample LayerNorm-affine modulation path
    assert (run_ours(ours, one) - run_diffusers(reference, one)).abs().max().item() <= TOL


@pytest.mark.parametrize("geometry", list(GEOMETRIES))
def test_matches_diffusers_from_wan_single_file(geometry: str, tmp_path: Path) -> None:
    """An official-layout checkpoint as ComfyUI ships it (`model.diffusion_model.` prefix, other components
    beside it), loaded by us; diffusers loads the same file through its own single-file converter."""
    params = tiny_wan_params(geometry)
    original = randomize_(WanDiT(params), seed=2)
    path = tmp_path / "wan-tiny.safetensors"
    tensors = {f"model.diffusion_model.{k}": v.contiguous() for k, v in original.state_dict().items()}
    tensors["first_stage_model.decoder.conv_in.weight"] = torch.zeros(2, 2)  # another component: ignored
    save_file(tensors, path)
    with safe_open(path, framework="pt") as f:
        single_file = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118  (safe_open has no __iter__)

    loaded_params, wan_sd = load_wan_state_dict(single_file, num_heads=HEADS, source=str(path))
    assert loaded_params == params
    ours = load_ours(params, wan_sd)
    reference = WanTransformer3DModel(**tiny_wan_config(geometry)).eval()
    reference.load_state_dict(wan_single_file_to_diffusers(wan_sd), strict=True)

    x = tiny_wan_inputs(reference)
    got = run_ours(ours, x)
    diff = (got - run_diffusers(reference, x)).abs().max().item()
    print(f"{geometry}, Wan layout via single file: max abs diff {diff:.2e}")
    assert diff <= TOL
    assert torch.equal(got, run_ours(original, x))


def ti2v_timesteps(grid: tuple[int, int, int], ts: tuple[float, ...]) -> torch.Tensor:
    """Per-token timesteps as WanPipeline builds them with `expand_timesteps` for an image-conditioned TI2V run:
    0 on the first (clean) latent frame's tokens, t elsewhere; `(B, F' H' W')`."""
    mask = torch.ones(grid)
    mask[0] = 0
    return torch.stack([(mask * t).flatten() for t in ts])


def test_ti2v_per_token_timesteps_match_diffusers() -> None:
    reference = tiny_wan("ti2v")
    params, sd = load_wan_state_dict(reference.state_dict(), num_heads=HEADS)
    ours = load_ours(params, sd)
    x = tiny_wan_inputs(reference)  # latent (3, 4, 6): token grid (3, 2, 3)
    per_token = dict(x, timestep=ti2v_timesteps((3, 2, 3), (999.0, 437.5)))
    expected = run_diffusers(reference, per_token)
    got = run_ours(ours, per_token)
    diff = (got - expected).abs().max().item()
    print(f"ti2v, per-token timesteps: max abs diff {diff:.2e}")
    assert diff <= TOL
    assert (got - run_ours(ours, x)).abs().max() > 0.1  # the clean first frame changes the output
    # constant rows take the per-sample path: the same as (B,) timesteps, and as diffusers' per-token path
    constant = dict(x, timestep=x["timestep"][:, None].expand(-1, 18))
    assert torch.equal(run_ours(ours, constant), run_ours(ours, x))
    assert (run_ours(ours, constant) - run_diffusers(reference, constant)).abs().max().item() <= TOL
    one = first(per_token)
    assert (run_ours(ours, one) - run_diffusers(reference, one)).abs().max().item() <= TOL


@pytest.mark.parametrize("geometry", ["t2v", "flf2v"])
def test_bf16_close_to_diffusers_bf16(geometry: str) -> None:
    reference = tiny_wan(geometry)
    params, sd = load_wan_state_dict(reference.state_dict(), num_heads=HEADS)
    ours = load_ours(params, sd)
    exact = run_ours(ours, tiny_wan_inputs(reference))
    x16 = tiny_wan_inputs(reference, dtype=torch.bfloat16)
    ours16 = run_ours(ours.to(torch.bfloat16), x16)
    theirs16 = run_diffusers(reference.to(torch.bfloat16), x16).float()
    assert ours16.dtype == torch.bfloat16
    ours16 = ours16.float()
    rel = ((ours16 - theirs16).norm() / theirs16.norm()).item()
    rel_exact = ((ours16 - exact).norm() / exact.norm()).item()
    print(f"{geometry} bf16: rel error vs diffusers bf16 {rel:.2e}, vs fp32 {rel_exact:.2e}")
    assert rel < 2e-2
    assert rel_exact < 2e-2


def test_cast_keeps_diffusers_float32_params_and_matches_diffusers_bf16_load(tmp_path: Path) -> None:
    """`cast_(bf16)` keeps in float32 exactly what diffusers' `from_pretrained(torch_dtype=bf16)` keeps (its
    `_keep_in_fp32_modules`), and then computes as that model does."""
    reference = tiny_wan("i2v")
    reference.save_pretrained(tmp_path)
    theirs = WanTransformer3DModel.from_pretrained(tmp_path, torch_dtype=torch.bfloat16).eval()
    params, sd = load_wan_state_dict(reference.state_dict(), num_heads=HEADS)
    ours = load_ours(params, sd).cast_(torch.bfloat16)
    kept = {k for k, v in ours.state_dict().items() if v.dtype == torch.float32}
    theirs_kept = {k for k, v in diffusers_to_wan(theirs.state_dict()).items() if v.dtype == torch.float32}
    assert kept == theirs_kept == {k for k in sd if keeps_float32(k)}
    assert {
        "time_embedding.0.weight",
        "blocks.1.modulation",
        "blocks.0.norm3.bias",
        "head.modulation",
    } <= kept

    exact = run_ours(load_ours(params, sd), tiny_wan_inputs(reference))
    x16 = tiny_wan_inputs(reference, dtype=torch.bfloat16)
    ours16 = run_ours(ours, x16)
    assert ours16.dtype == torch.bfloat16
    theirs16 = run_diffusers(theirs, x16).float()
    rel = ((ours16.float() - theirs16).norm() / theirs16.norm()).item()
    rel_exact = ((ours16.float() - exact).norm() / exact.norm()).item()
    print(f"i2v bf16 with float32 modulation: rel error vs diffusers {rel:.2e}, vs fp32 {rel_exact:.2e}")
    assert rel < 1e-2 and rel_exact < 2e-2


def test_rope_matches_diffusers_at_head_dim_128_and_is_cached() -> None:
    """The (t, h, w) split of a 128-channel head is (44, 42, 42) channels, as diffusers / Wan."""
    theirs = WanRotaryPosEmbed(128, (1, 2, 2), max_seq_len=1024)
    cos, sin = theirs(torch.zeros(1, 16, 5, 16, 24))  # (1, L, 1, 128) each, pairs repeated
    pe = grid_rope((5, 8, 12), 128)
    assert pe.dtype == torch.complex64 and pe.shape == (1, 5 * 8 * 12, 1, 64)
    torch.testing.assert_close(pe.real, cos[..., 0::2], rtol=0, atol=1e-6)
    torch.testing.assert_close(pe.imag, sin[..., 1::2], rtol=0, atol=1e-6)

    model = WanDiT(tiny_wan_params("t2v"))
    cpu = torch.device("cpu")
    assert model.position_embedding((3, 2, 3), cpu) is model.position_embedding((3, 2, 3), cpu)
    assert model.position_embedding((3, 2, 4), cpu).shape == (1, 24, 1, 8)


def test_bad_inputs_raise_with_values() -> None:
    model = WanDiT(tiny_wan_params("t2v"))
    x = ours_inputs(tiny_wan_inputs(tiny_wan("t2v")))
    with pytest.raises(ValueError, match=r"x must be \(B, 16, F, H, W\), got \(2, 15, 3, 4, 6\)"):
        model(**dict(x, x=x["x"][:, :15]))
    with pytest.raises(ValueError, match=r"\(3, 4, 5\) must be non-zero multiples of the patch size"):
        model(**dict(x, x=x["x"][..., :5]))
    with pytest.raises(ValueError, match=r"timestep must be \(2,\) or \(2, 18\).*got \(2, 17\)"):
        model(**dict(x, timestep=torch.zeros(2, 17)))
    with pytest.raises(ValueError, match=r"context must be \(2, Lt, 24\), got \(2, 7, 23\)"):
        model(**dict(x, context=x["context"][..., :23]))
    with pytest.raises(ValueError, match=r"no image embedding"):
        model(**dict(x, image_context=torch.zeros(2, 5, 20)))
    flf2v = WanDiT(tiny_wan_params("flf2v"))
    y = ours_inputs(tiny_wan_inputs(tiny_wan("flf2v")))
    with pytest.raises(ValueError, match=r"image_context must be \(2, 10, 20\), got None"):
        flf2v(**dict(y, image_context=None))
    with pytest.raises(ValueError, match=r"image_context must be \(2, 10, 20\), got \(2, 5, 20\)"):
        flf2v(**dict(y, image_context=y["image_context"][:, :5]))
    with pytest.raises(ValueError, match=r"dim 32 must be num_heads 3"):
        WanDiT(replace(tiny_wan_params("t2v"), num_heads=3))
    with pytest.raises(ValueError, match=r"image_pos_len \(FLF2V\) needs image_dim"):
        WanDiT(replace(tiny_wan_params("t2v"), image_pos_len=10))


def test_presets() -> None:
    assert preset("wan2.1-t2v-1.3b") is WAN21_T2V_1_3B
    assert (
        WAN21_T2V_1_3B.dim,
        WAN21_T2V_1_3B.ffn_dim,
        WAN21_T2V_1_3B.num_heads,
        WAN21_T2V_1_3B.num_layers,
    ) == (
        1536,
        8960,
        12,
        30,
    )
    assert (WAN21_T2V_14B.dim, WAN21_T2V_14B.ffn_dim, WAN21_T2V_14B.num_heads, WAN21_T2V_14B.num_layers) == (
        5120,
        13824,
        40,
        40,
    )
    assert (WAN21_I2V_14B.in_dim, WAN21_I2V_14B.image_dim, WAN21_I2V_14B.image_pos_len) == (36, 1280, None)
    assert WAN21_FLF2V_14B.image_pos_len == 514
    assert (WAN22_TI2V_5B.dim, WAN22_TI2V_5B.ffn_dim, WAN22_TI2V_5B.num_heads, WAN22_TI2V_5B.num_layers) == (
        3072,
        14336,
        24,
        30,
    )
    assert (WAN22_TI2V_5B.in_dim, WAN22_TI2V_5B.out_dim) == (48, 48)
    assert WAN22_T2V_A14B == WAN21_T2V_14B
    assert (WAN22_I2V_A14B.in_dim, WAN22_I2V_A14B.out_dim, WAN22_I2V_A14B.image_dim) == (36, 16, None)
    for p in PRESETS.values():
        assert p.patch_size == (1, 2, 2) and p.text_dim == 4096 and p.freq_dim == 256 and p.eps == 1e-6
        assert p.dim // p.num_heads == 128
    with pytest.raises(KeyError, match=r"wan2.1-flf2v-14b.*wan2.2-ti2v-5b"):
        preset("wan2.5-t2v")


# billions of parameters of each released model (its DiT)
SIZES = {
    "wan2.1-t2v-1.3b": 1.4,
    "wan2.1-t2v-14b": 14.3,
    "wan2.1-i2v-14b": 16.4,
    "wan2.1-flf2v-14b": 16.4,
    "wan2.2-ti2v-5b": 5.0,
    "wan2.2-t2v-a14b": 14.3,
    "wan2.2-i2v-a14b": 14.3,
}


@pytest.mark.parametrize("name", list(PRESETS))
def test_full_size_geometry_matches_diffusers_on_meta(name: str) -> None:
    """Each preset as a diffusers model on the meta device, converted: same params (head dim 128 inferred),
    keys, shapes and parameter count."""
    with torch.device("meta"):
        reference = WanTransformer3DModel(**diffusers_config(PRESETS[name]))
        ours = WanDiT(PRESETS[name])
    params, sd = load_wan_state_dict(reference.state_dict())
    assert params == PRESETS[name]
    assert {k: v.shape for k, v in sd.items()} == {k: v.shape for k, v in ours.state_dict().items()}
    n_params = sum(p.numel() for p in ours.parameters())
    assert n_params == sum(p.numel() for p in reference.parameters())
    assert abs(n_params / 1e9 - SIZES[name]) < 0.1 * SIZES[name]
    ours.load_state_dict(sd, assign=True)


def test_gradients_reach_every_parameter() -> None:
    """With autograd on (the trainer), per-token timesteps and the image branch included."""
    model = randomize_(WanDiT(tiny_wan_params("flf2v")), seed=3).train()
    x = ours_inputs(tiny_wan_inputs(tiny_wan("flf2v"), batch=1, text_tokens=4))
    x["timestep"] = ti2v_timesteps((3, 2, 3), (500.0,))
    model(**x).square().mean().backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert not missing
