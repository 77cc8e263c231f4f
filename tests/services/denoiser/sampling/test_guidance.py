"""Classifier-free guidance: the formula diffusers uses, and batched == two calls."""

from __future__ import annotations

import pytest
import torch

from services.denoiser.sampling import batched_cfg_model, cfg, sample_euler


def _pair(seed: int, *shape: int) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator("cpu").manual_seed(seed)
    return torch.randn(*shape, generator=gen), torch.randn(*shape, generator=gen)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cfg_is_the_diffusers_expression(dtype: torch.dtype) -> None:
    cond, uncond = (t.to(dtype) for t in _pair(0, 2, 8, 4))
    scale = 4.0
    # FluxPipeline true CFG: neg_noise_pred + true_cfg_scale * (noise_pred - neg_noise_pred)
    assert torch.equal(cfg(cond, uncond, scale), uncond + scale * (cond - uncond))
    assert torch.equal(cfg(cond, uncond, 1.0), uncond + (cond - uncond))
    with pytest.raises(ValueError, match="one shape"):
        cfg(cond, uncond[:1], scale)


class ToyConditioned:
    """v = x @ W + txt.mean(1) @ U + sigma; one forward per call, counted."""

    def __init__(self) -> None:
        gen = torch.Generator("cpu").manual_seed(3)
        self.w = torch.randn(8, 8, generator=gen)
        self.u = torch.randn(6, 8, generator=gen)
        self.batches: list[int] = []

    def __call__(
        self, x: torch.Tensor, sigma: torch.Tensor, *, txt: torch.Tensor, ids: torch.Tensor
    ) -> torch.Tensor:
        self.batches.append(x.shape[0])
        return x @ self.w + (txt.mean(1) @ self.u)[:, None, :] + sigma + ids.sum()


def test_batched_cfg_equals_two_calls() -> None:
    net = ToyConditioned()
    x = torch.randn(2, 5, 8, generator=torch.Generator("cpu").manual_seed(0))
    txt, neg = _pair(1, 2, 7, 6)
    ids = torch.arange(5.0)
    sigma = torch.tensor(0.7)
    guided = batched_cfg_model(net, 3.5)(x, sigma, cond={"txt": txt}, uncond={"txt": neg}, ids=ids)
    assert net.batches == [4]
    separate = cfg(net(x, sigma, txt=txt, ids=ids), net(x, sigma, txt=neg, ids=ids), 3.5)
    torch.testing.assert_close(guided, separate, atol=1e-6, rtol=0)


def test_batched_cfg_inside_the_solver() -> None:
    net = ToyConditioned()
    model = batched_cfg_model(net, 2.0)
    x = torch.randn(1, 5, 8, generator=torch.Generator("cpu").manual_seed(0))
    txt, neg = _pair(2, 1, 7, 6)
    extra = {"cond": {"txt": txt}, "uncond": {"txt": neg}, "ids": torch.zeros(5)}
    out = sample_euler(model, x, torch.tensor([1.0, 0.5, 0.0]), extra_args=extra)
    assert out.shape == x.shape and net.batches == [2, 2]


def test_batched_cfg_errors() -> None:
    net = ToyConditioned()
    model = batched_cfg_model(net, 2.0)
    x = torch.zeros(1, 5, 8)
    sigma = torch.tensor(1.0)
    txt = torch.zeros(1, 7, 6)
    with pytest.raises(ValueError, match="same keys"):
        model(x, sigma, cond={"txt": txt}, uncond={}, ids=torch.zeros(5))
    with pytest.raises(ValueError, match="cannot be batched"):
        model(x, sigma, cond={"txt": txt}, uncond={"txt": torch.zeros(1, 9, 6)}, ids=torch.zeros(5))
    with pytest.raises(ValueError, match="both as shared"):
        model(x, sigma, cond={"txt": txt, "ids": txt}, uncond={"txt": txt, "ids": txt}, ids=torch.zeros(5))
