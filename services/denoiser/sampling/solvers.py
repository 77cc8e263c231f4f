"""ODE solvers for flow-matching sampling, one signature for all (k-diffusion style).

Every solver is ``sample_x(model, x, sigmas, *, extra_args=None, callback=None, is_cancelled=None)``:

- ``model(x, sigma, **extra_args) -> v``: the velocity ``v = eps - x0`` (Lipman et al. 2023, eq. 23),
  same shape as ``x``. ``sigma`` is a 0-dim float32 CPU tensor taken from ``sigmas``; the model adapter
  turns it into what the network wants (FLUX: ``timestep = (sigma * 1000).to(x.dtype) / 1000`` per batch
  item, exactly what diffusers feeds the transformer).
- ``sigmas``: ``(steps + 1,)`` descending, terminal included (see ``schedules``); keep it on the CPU.
- ``callback(info)`` after each step, ``info = {"i", "total", "sigma", "sigma_next", "x", "denoised"}``
  (``x`` after the step, ``denoised`` the model's ``x0`` estimate at ``sigma``, for previews).
- ``is_cancelled()`` is polled before each step; when true the solver raises :class:`SamplingCancelled`.

A solver holds no state between calls; only the denoise loop does.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch

Model = Callable[..., torch.Tensor]
StepCallback = Callable[[dict[str, Any]], None]


class SamplingCancelled(Exception):
    """Raised by a solver at a step boundary when ``is_cancelled()`` returned true.

    ``step`` is the index of the step that was not run (``step`` steps completed), ``total`` the count.
    """

    def __init__(self, step: int, total: int) -> None:
        super().__init__(f"sampling cancelled before step {step} of {total} ({step} completed)")
        self.step = step
        self.total = total


def check_inputs(x: torch.Tensor, sigmas: torch.Tensor) -> torch.Tensor:
    """Validate ``x`` and ``sigmas``; return sigmas as float32 on the CPU."""
    if not isinstance(x, torch.Tensor) or not x.is_floating_point():
        raise ValueError(f"x must be a floating point tensor, got {getattr(x, 'dtype', type(x).__name__)}")
    if not isinstance(sigmas, torch.Tensor) or sigmas.ndim != 1 or sigmas.numel() < 2:
        got = tuple(sigmas.shape) if isinstance(sigmas, torch.Tensor) else type(sigmas).__name__
        raise ValueError(f"sigmas must be a 1-D tensor of >= 2 values (steps + terminal), got {got}")
    if not sigmas.is_floating_point():
        raise ValueError(f"sigmas must be floating point, got {sigmas.dtype}")
    return sigmas.detach().to(device="cpu", dtype=torch.float32)


def check_cancelled(is_cancelled: Callable[[], bool] | None, step: int, total: int) -> None:
    if is_cancelled is not None and is_cancelled():
        raise SamplingCancelled(step, total)


def call_model(model: Model, x: torch.Tensor, sigma: torch.Tensor, extra: Mapping[str, Any]) -> torch.Tensor:
    v = model(x, sigma, **extra)
    if not isinstance(v, torch.Tensor) or v.shape != x.shape:
        got = tuple(v.shape) if isinstance(v, torch.Tensor) else type(v).__name__
        raise ValueError(f"model output must have the shape of x {tuple(x.shape)}, got {got}")
    return v


def sample_euler(
    model: Model,
    x: torch.Tensor,
    sigmas: torch.Tensor,
    *,
    extra_args: Mapping[str, Any] | None = None,
    callback: StepCallback | None = None,
    is_cancelled: Callable[[], bool] | None = None,
) -> torch.Tensor:
    """Euler's method on the flow ODE ``dx/dsigma = v(x, sigma)`` (Lipman et al. 2023, eq. 1 and 23;
    Esser et al. 2024, sec. 2): ``x_{i+1} = x_i + (sigma_{i+1} - sigma_i) * v(x_i, sigma_i)``.

    The update mirrors ``FlowMatchEulerDiscreteScheduler.step`` bit for bit: ``dt`` is a float32 scalar,
    ``dt * v`` runs in ``v``'s dtype, the sum in float32, then the result is cast back to ``x``'s dtype
    (diffusers casts to ``v``'s dtype; the two agree whenever the model returns ``x``'s dtype).
    """
    sigmas = check_inputs(x, sigmas)
    extra = dict(extra_args or {})
    total = sigmas.numel() - 1
    for i in range(total):
        check_cancelled(is_cancelled, i, total)
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        v = call_model(model, x, sigma, extra)
        x_prev = x
        x = (x.to(torch.float32) + (sigma_next - sigma) * v).to(x.dtype)
        if callback is not None:
            denoised = (x_prev.to(torch.float32) - sigma * v.to(torch.float32)).to(
                x.dtype
            )  # x0 = x - sigma v
            callback(
                {
                    "i": i,
                    "total": total,
                    "sigma": float(sigma),
                    "sigma_next": float(sigma_next),
                    "x": x,
                    "denoised": denoised,
                }
            )
    return x
