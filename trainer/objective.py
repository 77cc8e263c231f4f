"""The flow-matching (rectified flow) training objective, as pure functions.

Rectified flow (Liu et al. 2023; Lipman et al. 2023) interpolates data and noise linearly,
``x_sigma = (1 - sigma) * x0 + sigma * eps``, and regresses the velocity ``v = eps - x0`` with an MSE.
Training sigmas follow Esser et al. 2024 ("Scaling Rectified Flow Transformers for High-Resolution Image
Synthesis", SD3), sec. 3.1 eq. 19: logit-normal ``sigma = sigmoid(n)``, ``n ~ N(m, s^2)``, then the
resolution-dependent shift of sec. 5.3.2 eq. 23 that FLUX applies with ``mu = calculate_shift(image_seq_len)``
(the same shift the sampler uses; a static ``shift`` for models without dynamic shifting).
"""

from __future__ import annotations

import torch
from torch import Tensor

from services.denoiser.sampling.scheduler_config import SchedulerConfig
from services.denoiser.sampling.schedules import calculate_shift, shift_sigmas, time_shift

SIGMA_EPS = 1e-5  # keep sigma inside (0, 1): the shift divides by it


def logit_normal(batch: int, generator: torch.Generator, mean: float = 0.0, std: float = 1.0) -> Tensor:
    """``(batch,)`` float32 ``sigmoid(N(mean, std^2))`` on the CPU (SD3 eq. 19)."""
    n = torch.randn(batch, generator=generator, dtype=torch.float32) * std + mean
    return torch.sigmoid(n).clamp(SIGMA_EPS, 1.0 - SIGMA_EPS)


def shifted(u: Tensor, config: SchedulerConfig, image_seq_len: int) -> Tensor:
    """Shift unit sigmas toward 1 as the model's scheduler does at this token count (SD3 eq. 23)."""
    if config.use_dynamic_shifting:
        mu = calculate_shift(
            image_seq_len,
            config.base_image_seq_len,
            config.max_image_seq_len,
            config.base_shift,
            config.max_shift,
        )
        return time_shift(mu, 1.0, u, kind=config.time_shift_type)
    return shift_sigmas(u, config.shift)


def sample_sigmas(
    batch: int, image_seq_len: int, config: SchedulerConfig, generator: torch.Generator
) -> Tensor:
    """``(batch,)`` training sigmas in (0, 1): logit-normal, then the model's shift."""
    return shifted(logit_normal(batch, generator), config, image_seq_len)


def interpolate(x0: Tensor, noise: Tensor, sigma: Tensor) -> tuple[Tensor, Tensor]:
    """``(x_sigma, v)``: ``x_sigma = (1 - sigma) x0 + sigma * noise``, target ``v = noise - x0``.

    ``sigma`` is ``(B,)``, broadcast over the other axes of ``x0 (B, ...)``.
    """
    s = sigma.to(x0.dtype).view(-1, *([1] * (x0.ndim - 1)))
    return (1.0 - s) * x0 + s * noise, noise - x0


def flow_matching_loss(pred: Tensor, target: Tensor) -> Tensor:
    """Mean squared error in float32 (uniform weighting, as FLUX LoRA trainers use)."""
    return torch.mean((pred.float() - target.float()) ** 2)
