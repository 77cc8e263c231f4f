"""The flow-matching objective: the interpolation and velocity target, and FLUX's training sigmas (logit-normal,
shifted by image size as the sampler's schedule is)."""

from __future__ import annotations

import torch

from services.denoiser.sampling.scheduler_config import FLUX_DEV_SCHEDULER, FLUX_SCHNELL_SCHEDULER
from trainer.objective import flow_matching_loss, interpolate, logit_normal, sample_sigmas


def test_interpolation_and_target():
    x0, noise = torch.randn(2, 5, 3), torch.randn(2, 5, 3)
    sigma = torch.tensor([0.0, 1.0])
    x_t, v = interpolate(x0, noise, sigma)
    assert torch.equal(x_t[0], x0[0]) and torch.equal(x_t[1], noise[1])
    torch.testing.assert_close(v, noise - x0)
    # the velocity moves x_t along the straight path: x_{s+ds} = x_s + ds * v
    a, _ = interpolate(x0, noise, torch.tensor([0.3, 0.3]))
    b, _ = interpolate(x0, noise, torch.tensor([0.5, 0.5]))
    torch.testing.assert_close(b, a + 0.2 * v)
    assert flow_matching_loss(v, v) == 0


def test_sigmas_are_seeded_and_shifted_by_resolution():
    u = logit_normal(20_000, torch.Generator().manual_seed(0))
    assert u.min() > 0 and u.max() < 1 and abs(u.median() - 0.5) < 0.02
    small = sample_sigmas(20_000, 256, FLUX_DEV_SCHEDULER, torch.Generator().manual_seed(0))
    large = sample_sigmas(20_000, 4096, FLUX_DEV_SCHEDULER, torch.Generator().manual_seed(0))
    # mu = 0.5 at 256 tokens, 1.15 at 4096: the median moves to e^mu / (1 + e^mu)
    assert abs(small.median() - torch.sigmoid(torch.tensor(0.5))) < 0.02
    assert abs(large.median() - torch.sigmoid(torch.tensor(1.15))) < 0.02
    schnell = sample_sigmas(20_000, 4096, FLUX_SCHNELL_SCHEDULER, torch.Generator().manual_seed(0))
    torch.testing.assert_close(schnell, u)  # shift 1: unshifted
    again = sample_sigmas(20_000, 4096, FLUX_DEV_SCHEDULER, torch.Generator().manual_seed(0))
    assert torch.equal(large, again)
