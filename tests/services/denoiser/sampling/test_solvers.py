"""sample_euler against diffusers' FlowMatchEulerDiscreteScheduler.step loop, run as FluxPipeline runs it."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler
from diffusers.pipelines.flux.pipeline_flux import calculate_shift

from services.denoiser.sampling import (
    FLUX_DEV_SCHEDULER,
    SamplingCancelled,
    img2img_start,
    sample_euler,
    scale_noise,
    sigmas_from_config,
)

SEQ, DIM = 64, 16  # a tiny packed FLUX latent: (B, L, C)


class ToyFlux:
    """A deterministic stand-in for the FLUX transformer: v = x @ W + timestep * b, in x's dtype.

    It takes the transformer's own ``timestep`` input (diffusers passes ``t / 1000``), so both loops below
    must derive that input from sigma the way FluxPipeline does.
    """

    def __init__(self, dtype: torch.dtype) -> None:
        gen = torch.Generator("cpu").manual_seed(1)
        self.w = (torch.randn(DIM, DIM, generator=gen) / DIM**0.5).to(dtype)
        self.b = torch.randn(DIM, generator=gen).to(dtype)
        self.calls = 0

    def __call__(self, hidden_states: torch.Tensor, timestep: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        return hidden_states @ self.w + timestep[:, None, None] * self.b


def flux_adapter(transformer: ToyFlux):
    """Our model signature ``model(x, sigma)`` over the FLUX input convention."""

    def model(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        t = (sigma * 1000).expand(x.shape[0]).to(x.dtype)  # diffusers: timesteps[i].expand(B).to(dtype)
        return transformer(x, t / 1000)

    return model


def diffusers_loop(
    transformer: ToyFlux, x: torch.Tensor, steps: int, image_seq_len: int, strength: float | None = None
) -> torch.Tensor:
    """FluxPipeline's (or, with ``strength``, FluxImg2ImgPipeline's) denoising loop, minus the model."""
    sched = FlowMatchEulerDiscreteScheduler.from_config(FLUX_DEV_SCHEDULER.to_dict())
    mu = calculate_shift(image_seq_len, 256, 4096, 0.5, 1.15)
    sched.set_timesteps(sigmas=np.linspace(1.0, 1 / steps, steps), mu=mu)
    timesteps, begin = sched.timesteps, 0
    if strength is not None:
        init = min(steps * strength, steps)
        begin = int(max(steps - init, 0))
        timesteps = timesteps[begin:]
    sched.set_begin_index(begin)
    for t in timesteps:
        timestep = t.expand(x.shape[0]).to(x.dtype)
        noise_pred = transformer(x, timestep / 1000)
        x = sched.step(noise_pred, t, x, return_dict=False)[0]
    return x


@pytest.mark.parametrize("steps", [1, 4, 28])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_euler_matches_diffusers_flux_loop(steps: int, dtype: torch.dtype) -> None:
    x = torch.randn(2, SEQ, DIM, generator=torch.Generator("cpu").manual_seed(0)).to(dtype)
    expected = diffusers_loop(ToyFlux(dtype), x, steps, SEQ)
    sigmas = sigmas_from_config(FLUX_DEV_SCHEDULER, steps, image_seq_len=SEQ)
    ours = sample_euler(flux_adapter(ToyFlux(dtype)), x, sigmas)
    assert ours.dtype == dtype
    assert (ours.double() - expected.double()).abs().max().item() <= 1e-6
    if dtype == torch.bfloat16:
        assert torch.equal(ours, expected)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_img2img_euler_matches_diffusers(dtype: torch.dtype) -> None:
    steps, strength = 10, 0.6
    gen = torch.Generator("cpu").manual_seed(0)
    x0 = torch.randn(1, SEQ, DIM, generator=gen).to(dtype)
    noise = torch.randn(1, SEQ, DIM, generator=gen).to(dtype)
    sigmas = sigmas_from_config(FLUX_DEV_SCHEDULER, steps, image_seq_len=SEQ)
    start = img2img_start(sigmas, strength)
    x = scale_noise(x0, noise, sigmas[start])
    expected = diffusers_loop(ToyFlux(dtype), x, steps, SEQ, strength=strength)
    ours = sample_euler(flux_adapter(ToyFlux(dtype)), x, sigmas[start:])
    assert torch.equal(ours, expected)


def test_callback_reports_every_step() -> None:
    sigmas = sigmas_from_config(FLUX_DEV_SCHEDULER, 5, image_seq_len=SEQ)
    x = torch.randn(1, SEQ, DIM, generator=torch.Generator("cpu").manual_seed(0))
    seen: list[dict] = []
    out = sample_euler(flux_adapter(ToyFlux(torch.float32)), x, sigmas, callback=seen.append)
    assert [info["i"] for info in seen] == [0, 1, 2, 3, 4]
    assert all(info["total"] == 5 for info in seen)
    assert [info["sigma"] for info in seen] == sigmas[:-1].tolist()
    assert [info["sigma_next"] for info in seen] == sigmas[1:].tolist()
    assert seen[-1]["x"] is out
    assert seen[-1]["denoised"].shape == x.shape


def test_extra_args_reach_the_model() -> None:
    got: list[float] = []

    def model(x: torch.Tensor, sigma: torch.Tensor, *, scale: float) -> torch.Tensor:
        got.append(scale)
        return torch.zeros_like(x)

    x = torch.ones(1, 4)
    out = sample_euler(model, x, torch.tensor([1.0, 0.5, 0.0]), extra_args={"scale": 2.0})
    assert got == [2.0, 2.0] and torch.equal(out, x)


@pytest.mark.parametrize("cancel_after", [0, 1, 3])
def test_cancellation_stops_at_the_next_step_boundary(cancel_after: int) -> None:
    sigmas = sigmas_from_config(FLUX_DEV_SCHEDULER, 6, image_seq_len=SEQ)
    transformer = ToyFlux(torch.float32)
    seen: list[dict] = []
    x = torch.randn(1, SEQ, DIM, generator=torch.Generator("cpu").manual_seed(0))
    with pytest.raises(SamplingCancelled) as info:
        sample_euler(
            flux_adapter(transformer),
            x,
            sigmas,
            callback=seen.append,
            is_cancelled=lambda: len(seen) >= cancel_after,
        )
    assert len(seen) == cancel_after and transformer.calls == cancel_after
    assert (info.value.step, info.value.total) == (cancel_after, 6)


def test_input_errors() -> None:
    x = torch.zeros(1, 4)

    def model(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        return x

    with pytest.raises(ValueError, match="sigmas must be a 1-D tensor"):
        sample_euler(model, x, torch.tensor([1.0]))
    with pytest.raises(ValueError, match="x must be a floating point"):
        sample_euler(model, x.long(), torch.tensor([1.0, 0.0]))
    with pytest.raises(ValueError, match="model output must have the shape"):
        sample_euler(lambda x, sigma: x[:, :2], x, torch.tensor([1.0, 0.0]))
