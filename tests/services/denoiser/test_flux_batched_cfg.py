"""FLUX.1 adapter speed switches: true CFG batched into one forward (DIFFMESH_BATCHED_CFG) gives the two-call
result, RoPE is computed once per request, and the "0" / "1" switches are checked."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from diffusers import FluxTransformer2DModel
from tiny_flux import TRANSFORMER

from services.common.models import find_component
from services.denoiser.adapters.flux import FluxAdapter, env_flag
from services.denoiser.inputs import DenoiseInputs
from services.denoiser.registry import DENOISERS

CPU = torch.device("cpu")
MIN_PSNR = 40.0


def embeds(seed: int, length: int = 5, prompts: int = 1) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {
        "prompt_embeds": torch.randn(prompts, length, 32, generator=g),
        "pooled_prompt_embeds": torch.randn(prompts, 32, generator=g),
    }


def inputs(**kw) -> DenoiseInputs:
    base = dict(
        seed=7,
        steps=3,
        width=64,
        height=48,
        num_frames=0,
        batch_size=2,
        guidance=3.5,
        cfg_scale=4.0,
        positive=embeds(1),
        negative=embeds(2),
    )
    base.update(kw)
    return DenoiseInputs(**base)


@pytest.fixture(scope="module")
def transformer_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("flux_cfg") / "transformer"
    FluxTransformer2DModel(**TRANSFORMER, guidance_embeds=True).save_pretrained(path)
    return path


def load(path: Path) -> FluxAdapter:
    component = find_component(path, ["transformer"])
    return DENOISERS[component.class_name](component, CPU)


def latents(adapter: FluxAdapter, **kw) -> torch.Tensor:
    return adapter.denoise(inputs(**kw), lambda s, t: None, lambda: False)["latents"]


def psnr(got: torch.Tensor, ref: torch.Tensor) -> float:
    """PSNR in dB over the reference's range (inf when equal)."""
    mse = (got.double() - ref.double()).square().mean().item()
    peak = (ref.max() - ref.min()).item()
    return math.inf if mse == 0 else 10 * math.log10(peak**2 / mse)


def test_batched_cfg_matches_two_calls(transformer_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    two_calls = load(transformer_dir)
    assert not two_calls.batched_cfg  # off by default: two calls are bit for bit FluxPipeline's
    monkeypatch.setenv("DIFFMESH_BATCHED_CFG", "1")
    batched = load(transformer_dir)
    assert batched.batched_cfg
    calls: list[int] = []
    batched.model.register_forward_pre_hook(
        lambda m, args, kw: calls.append(kw["img"].shape[0]), with_kwargs=True
    )
    ref, got = latents(two_calls), latents(batched)
    assert calls == [4, 4, 4]  # batch 2 x (cond, uncond) as one forward per step
    print(
        f"batched CFG vs two calls: max abs diff {(got - ref).abs().max().item():.2e}, PSNR {psnr(got, ref):.1f}"
    )
    assert psnr(got, ref) >= MIN_PSNR
    torch.testing.assert_close(got, ref, rtol=0, atol=1e-5)
    without_cfg = latents(batched, cfg_scale=None)
    assert calls[3:] == [2, 2, 2] and torch.equal(without_cfg, latents(two_calls, cfg_scale=None))


def test_batched_cfg_in_bf16(transformer_dir: Path, tmp_path: Path) -> None:
    FluxTransformer2DModel.from_pretrained(transformer_dir, torch_dtype=torch.bfloat16).save_pretrained(
        tmp_path / "transformer"
    )
    adapter = load(tmp_path / "transformer")
    ref = latents(adapter)
    adapter.batched_cfg = True
    got = latents(adapter)
    print(f"bf16 batched CFG vs two calls: PSNR {psnr(got, ref):.1f}")
    assert psnr(got, ref) >= MIN_PSNR


def test_prompts_of_different_lengths_fall_back_to_two_calls(transformer_dir: Path) -> None:
    adapter = load(transformer_dir)
    kw = dict(negative=embeds(2, length=9))
    ref = latents(adapter, **kw)
    adapter.batched_cfg = True
    assert torch.equal(latents(adapter, **kw), ref)


def test_rope_is_computed_once_per_request(transformer_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    adapter = load(transformer_dir)
    ref = latents(adapter)
    calls: list[int] = []
    embed = adapter.model.pe_embedder
    monkeypatch.setattr(embed, "forward", lambda ids, f=embed.forward: calls.append(1) or f(ids))
    assert torch.equal(latents(adapter), ref)
    assert len(calls) == 2  # positive and negative conditioning, not once per step and call


def test_env_flags() -> None:
    assert env_flag("X", {}) is False
    assert env_flag("X", {"X": "0"}) is False and env_flag("X", {"X": "1"}) is True
    with pytest.raises(ValueError, match=r"X='yes': expected 0 or 1"):
        env_flag("X", {"X": "yes"})
