"""Our FLUX.1 DiT vs diffusers' FluxTransformer2DModel (the oracle): tiny real geometry, CPU, both layouts."""

from __future__ import annotations

import inspect
import re
from pathlib import Path

import pytest
import torch
from diffusers import FluxTransformer2DModel
from diffusers.loaders import single_file_utils
from safetensors import safe_open
from safetensors.torch import save_file

from services.denoiser.convert.flux import diffusers_to_bfl, load_flux_state_dict
from services.denoiser.models.flux import FLUX_DEV, FLUX_SCHNELL, PRESETS, Flux, FluxParams, preset

TOL = 1e-4
HIDDEN = 32
TINY_CONFIG = dict(
    patch_size=1,
    in_channels=64,
    num_layers=1,
    num_single_layers=1,
    attention_head_dim=16,
    num_attention_heads=2,
    joint_attention_dim=32,
    pooled_projection_dim=32,
    axes_dims_rope=[4, 4, 8],
)


def tiny_params(guidance_embed: bool) -> FluxParams:
    return FluxParams(
        in_channels=64,
        out_channels=64,
        vec_in_dim=32,
        context_in_dim=32,
        hidden_size=HIDDEN,
        mlp_ratio=4.0,
        num_heads=2,
        depth=1,
        depth_single_blocks=1,
        axes_dim=(4, 4, 8),
        theta=10_000,
        qkv_bias=True,
        guidance_embed=guidance_embed,
    )


def randomize_(module: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Every parameter random: norm scales around 1, weights ~ 1/sqrt(fan_in), biases small."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            noise = torch.randn(p.shape, generator=g)
            if name.endswith(".scale") or re.search(r"norm_(added_)?[qk]\.weight$", name):
                p.copy_(1 + 0.3 * noise)
            elif p.ndim == 2:
                p.copy_(noise / p.shape[1] ** 0.5)
            else:
                p.copy_(0.1 * noise)
    return module.eval()


def tiny_diffusers(guidance_embed: bool, seed: int = 0) -> FluxTransformer2DModel:
    return randomize_(FluxTransformer2DModel(**TINY_CONFIG, guidance_embeds=guidance_embed), seed)


def bfl_to_diffusers(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """diffusers' own BFL -> diffusers converter; it hard-codes FLUX.1's hidden size 3072 (used only to split
    the single blocks' linear1), so that one constant is set to the tiny model's before running it."""
    src = inspect.getsource(single_file_utils.convert_flux_transformer_checkpoint_to_diffusers)
    if src.count("inner_dim = 3072") != 1:
        pytest.fail("diffusers' FLUX converter changed: 'inner_dim = 3072' not found once")
    namespace = dict(vars(single_file_utils))
    exec(src.replace("inner_dim = 3072", f"inner_dim = {HIDDEN}"), namespace)
    return namespace["convert_flux_transformer_checkpoint_to_diffusers"](dict(sd))


def make_inputs(
    guidance_embed: bool, dtype: torch.dtype = torch.float32, h: int = 3, w: int = 4, lt: int = 5
):
    """Two samples; img_ids as FluxPipeline builds them, plus Kontext-style reference tokens (axis 0 = 1)."""
    g = torch.Generator().manual_seed(1)
    grid = torch.zeros(h, w, 3)
    grid[..., 1] = torch.arange(h)[:, None]
    grid[..., 2] = torch.arange(w)[None, :]
    ref = grid.clone()
    ref[..., 0] = 1.0
    img_ids = torch.cat([grid.reshape(h * w, 3), ref.reshape(h * w, 3)])  # (L, 3)
    n = img_ids.shape[0]
    return dict(
        img=torch.randn(2, n, 64, generator=g).to(dtype),
        img_ids=img_ids,
        txt=torch.randn(2, lt, 32, generator=g).to(dtype),
        txt_ids=torch.zeros(lt, 3),
        timesteps=torch.tensor([0.25, 0.5]),  # 1000 * t exact in bf16 (diffusers rounds it there)
        y=torch.randn(2, 32, generator=g).to(dtype),
        guidance=torch.tensor([2.0, 4.0]) if guidance_embed else None,
    )


@torch.no_grad()
def run_diffusers(model: FluxTransformer2DModel, x: dict) -> torch.Tensor:
    # FluxPipeline passes sigma (= scheduler timestep / 1000) and the raw guidance scale; the model x1000s both.
    guidance = x["guidance"]
    return model(
        hidden_states=x["img"],
        encoder_hidden_states=x["txt"],
        pooled_projections=x["y"],
        timestep=x["timesteps"].to(x["img"].dtype),
        img_ids=x["img_ids"],
        txt_ids=x["txt_ids"],
        guidance=None if guidance is None else guidance.to(x["img"].dtype),
        return_dict=False,
    )[0]


@torch.no_grad()
def run_ours(model: Flux, x: dict) -> torch.Tensor:
    return model(**x)


def load_ours(params: FluxParams, sd: dict[str, torch.Tensor]) -> Flux:
    with torch.device("meta"):
        model = Flux(params)
    model.load_state_dict(sd, strict=True, assign=True)
    return model.eval()


@pytest.mark.parametrize("guidance_embed", [True, False])
def test_matches_diffusers_from_diffusers_layout(guidance_embed: bool) -> None:
    reference = tiny_diffusers(guidance_embed)
    ours = load_ours(tiny_params(guidance_embed), diffusers_to_bfl(reference.state_dict()))
    x = make_inputs(guidance_embed)
    expected = run_diffusers(reference, x)
    got = run_ours(ours, x)
    diff = (got - expected).abs().max().item()
    print(f"diffusers layout, guidance_embed={guidance_embed}: max abs diff {diff:.2e}")
    assert got.shape == (2, 24, 64)
    assert expected.abs().mean() > 0.1
    assert diff <= TOL
    one = {k: v if v is None or k.endswith("_ids") else v[:1] for k, v in x.items()}  # batch 1: other kernels
    assert (run_ours(ours, one) - run_diffusers(reference, one)).abs().max().item() <= TOL


@pytest.mark.parametrize("guidance_embed", [True, False])
def test_matches_diffusers_from_bfl_safetensors(guidance_embed: bool, tmp_path: Path) -> None:
    params = tiny_params(guidance_embed)
    original = randomize_(Flux(params), seed=2)
    path = tmp_path / "flux1-tiny.safetensors"
    save_file({k: v.contiguous() for k, v in original.state_dict().items()}, path)
    with safe_open(path, framework="pt") as f:
        bfl = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118  (safe_open has no __iter__)

    loaded_params, bfl_sd = load_flux_state_dict(bfl, axes_dim=(4, 4, 8), source=str(path))
    assert loaded_params == params
    ours = load_ours(params, bfl_sd)
    reference = FluxTransformer2DModel(**TINY_CONFIG, guidance_embeds=guidance_embed).eval()
    reference.load_state_dict(bfl_to_diffusers(bfl), strict=True)

    x = make_inputs(guidance_embed)
    got = run_ours(ours, x)
    diff = (got - run_diffusers(reference, x)).abs().max().item()
    print(f"BFL layout via safetensors, guidance_embed={guidance_embed}: max abs diff {diff:.2e}")
    assert diff <= TOL
    assert torch.equal(got, run_ours(original, x))


def test_diffusers_to_bfl_inverts_diffusers_converter() -> None:
    sd = tiny_diffusers(True).state_dict()
    back = bfl_to_diffusers(diffusers_to_bfl(sd))
    assert back.keys() == sd.keys()
    assert all(torch.equal(back[k], sd[k]) for k in sd)


def test_bf16_close_to_diffusers_bf16() -> None:
    reference = tiny_diffusers(True)
    ours = load_ours(tiny_params(True), diffusers_to_bfl(reference.state_dict()))
    x32 = make_inputs(True)
    exact = run_ours(ours, x32)
    x16 = make_inputs(True, dtype=torch.bfloat16)
    ours16 = run_ours(ours.to(torch.bfloat16), x16).float()
    theirs16 = run_diffusers(reference.to(torch.bfloat16), x16).float()
    rel = ((ours16 - theirs16).norm() / theirs16.norm()).item()
    rel_exact = ((ours16 - exact).norm() / exact.norm()).item()
    print(f"bf16: rel error vs diffusers bf16 {rel:.2e}, vs fp32 {rel_exact:.2e}")
    assert ours16.dtype == torch.float32 and rel < 2e-2
    assert rel_exact < 2e-2


def test_batched_ids_match_shared_ids_and_precomputed_rope_is_exact() -> None:
    model = randomize_(Flux(tiny_params(True)), seed=3)
    x = make_inputs(True)
    shared = run_ours(model, x)
    batched = dict(x, img_ids=x["img_ids"].expand(2, -1, -1), txt_ids=x["txt_ids"].expand(2, -1, -1))
    torch.testing.assert_close(run_ours(model, batched), shared, rtol=0, atol=1e-6)
    # RoPE computed once per request and passed to every step, as the adapter does: bit for bit the same.
    pe = model.position_embedding(x["img_ids"], x["txt_ids"])
    assert pe.dtype == torch.complex64 and pe.shape == (1, 5 + 24, 1, 8)
    assert torch.equal(run_ours(model, dict(x, pe=pe)), shared)
    assert torch.equal(run_ours(model, dict(x, pe=pe.expand(2, -1, -1, -1))), shared)
    with pytest.raises(
        ValueError, match=r"pe must be complex64 \(1 \| 2, 29, 1, 8\).*got torch.complex64 \(1, 28"
    ):
        run_ours(model, dict(x, pe=pe[:, 1:]))


def test_last_block_skips_text_tokens_exactly() -> None:
    """The last single block computes only the image tokens' outputs: the same values as the full block."""
    model = randomize_(Flux(tiny_params(True)), seed=4)
    block = model.single_blocks[-1]
    g = torch.Generator().manual_seed(5)
    x = torch.randn(2, 29, HIDDEN, generator=g)
    vec = torch.randn(2, HIDDEN, generator=g)
    inputs = make_inputs(True)
    pe = model.position_embedding(inputs["img_ids"], inputs["txt_ids"])
    with torch.no_grad():
        full = block(x, vec, pe)
        part = block(x, vec, pe, start=5)
    assert part.shape == (2, 24, HIDDEN)
    torch.testing.assert_close(part, full[:, 5:], rtol=0, atol=1e-6)


def test_bad_inputs_raise_with_values() -> None:
    model = Flux(tiny_params(True))
    x = make_inputs(True)
    with pytest.raises(ValueError, match=r"img must be \(B, L, 64\), got \(2, 24, 63\)"):
        run_ours(model, dict(x, img=x["img"][..., :63]))
    with pytest.raises(ValueError, match=r"img_ids must be"):
        run_ours(model, dict(x, img_ids=x["img_ids"][:5]))
    with pytest.raises(ValueError, match=r"pass guidance"):
        run_ours(model, dict(x, guidance=None))
    with pytest.raises(ValueError, match=r"timesteps must be \(2,\)"):
        run_ours(model, dict(x, timesteps=torch.tensor(0.5)))
    with pytest.raises(ValueError, match=r"no guidance embedding"):
        run_ours(Flux(tiny_params(False)), x)
    with pytest.raises(ValueError, match=r"axes_dim"):
        Flux(FluxParams(**{**tiny_params(True).__dict__, "axes_dim": (4, 4, 4)}))


def test_presets() -> None:
    assert preset("flux-dev") is FLUX_DEV
    assert (FLUX_DEV.hidden_size, FLUX_DEV.depth, FLUX_DEV.depth_single_blocks, FLUX_DEV.num_heads) == (
        3072,
        19,
        38,
        24,
    )
    assert FLUX_DEV.axes_dim == (16, 56, 56) and FLUX_DEV.theta == 10_000 and FLUX_DEV.mlp_ratio == 4.0
    assert (FLUX_DEV.in_channels, FLUX_DEV.out_channels, FLUX_DEV.context_in_dim, FLUX_DEV.vec_in_dim) == (
        64,
        64,
        4096,
        768,
    )
    assert FLUX_DEV.guidance_embed and FLUX_DEV.qkv_bias and not FLUX_SCHNELL.guidance_embed
    for name in ("flux-krea-dev", "flux-kontext-dev"):
        assert preset(name) == FLUX_DEV
    with pytest.raises(KeyError, match=r"flux-dev.*flux-schnell"):
        preset("flux-pro")
    assert set(PRESETS) >= {"flux-dev", "flux-schnell", "flux-krea-dev", "flux-kontext-dev"}


@pytest.mark.parametrize("guidance_embed", [True, False])
def test_full_size_geometry_matches_diffusers_on_meta(guidance_embed: bool) -> None:
    """The default diffusers FLUX.1 config, converted on the meta device: same keys, shapes and params."""
    with torch.device("meta"):
        reference = FluxTransformer2DModel(guidance_embeds=guidance_embed)
        ours = Flux(FLUX_DEV if guidance_embed else FLUX_SCHNELL)
    params, sd = load_flux_state_dict(reference.state_dict())
    assert params == ours.params
    assert {k: v.shape for k, v in sd.items()} == {k: v.shape for k, v in ours.state_dict().items()}
    n_params = sum(p.numel() for p in ours.parameters())
    assert n_params == sum(p.numel() for p in reference.parameters())
    ours.load_state_dict(sd, assign=True)
