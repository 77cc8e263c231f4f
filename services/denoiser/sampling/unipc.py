"""UniPC multistep sampling on the flow-matching ODE, as Wan runs it (diffusers' ``UniPCMultistepScheduler``
with ``use_flow_sigmas=True``, ``prediction_type="flow_prediction"``, ``predict_x0=True``).

UniPC (Zhao et al. 2023, "UniPC: A Unified Predictor-Corrector Framework for Fast Sampling of Diffusion
Models", arXiv:2302.04867, sec. 3) integrates the diffusion ODE in the log-SNR ``lambda`` with the data
prediction ``x0``. The flow path ``x = (1 - sigma) x0 + sigma eps`` is such a diffusion with
``alpha = 1 - sigma``, so ``lambda(sigma) = log(1 - sigma) - log(sigma)`` and the model's velocity gives
``x0 = x - sigma v``. With step ``h = lambda_t - lambda_s`` and ``hh = -h``, one update from ``x_s`` is

    x_t = (sigma_t / sigma_s) x_s - alpha_t (e^hh - 1) m_0 - alpha_t B(h) sum_k rho_k D_k,

``m_0`` the newest x0 estimate, ``D_k = (m_k - m_0) / r_k`` the differences to older ones at
``r_k = (lambda_k - lambda_s) / h``, and ``B(h) = hh`` ("bh1") or ``e^hh - 1`` ("bh2"). The weights ``rho``
solve ``R rho = b`` with ``R_ij = r_j^i`` and ``b_k = k! phi_{k+1}(hh) / B(h)`` (``rho = 1/2`` for the
one-difference predictor and the zero-difference corrector, as in the reference code).

Each step ``i`` evaluates the model once at ``x_i``, then
1. UniC: recomputes ``x_i`` from ``x_{i-1}`` with the new estimate included (the previous step's order);
2. UniP: predicts ``x_{i+1}`` from ``x_i`` with order ``min(order, i + 1)`` (and, with
   ``lower_order_final``, at most the number of steps left, so the last step to sigma 0 is first order).
The last prediction is never corrected (that would cost another model call), as in diffusers.

Same signature as :func:`~services.denoiser.sampling.solvers.sample_euler`; the scalar coefficients are
float32 0-dim CPU tensors computed in diffusers' order, so fp32 trajectories agree to a few ulps.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch

from services.denoiser.sampling.scheduler_config import SOLVER_TYPES, UNIPC, SchedulerConfig, SolverType
from services.denoiser.sampling.solvers import (
    Model,
    StepCallback,
    call_model,
    check_cancelled,
    check_inputs,
)


def _lam(sigma: torch.Tensor) -> torch.Tensor:
    """Log-SNR ``log(alpha) - log(sigma)`` of the flow path (``alpha = 1 - sigma``), 0-dim float32."""
    return torch.log(1 - sigma) - torch.log(sigma)


def _coefficients(hh: torch.Tensor, order: int, solver_type: str) -> tuple[torch.Tensor, ...]:
    """``(e^hh - 1, B(h), b)`` with ``b`` (order,): ``b_k = k! phi_{k+1}(hh) / B(h)``, where
    ``phi_1(hh) hh = e^hh - 1`` and ``phi_{k+1} = (phi_k - 1 / k!) / hh``."""
    h_phi_1 = torch.expm1(hh)
    b_h = hh if solver_type == "bh1" else torch.expm1(hh)
    phi = h_phi_1 / hh - 1
    factorial, b = 1, []
    for k in range(1, order + 1):
        b.append(phi * factorial / b_h)
        factorial *= k + 1
        phi = phi / hh - 1 / factorial
    return h_phi_1, b_h, torch.stack(b)


def _differences(
    ms: Sequence[torch.Tensor], sigmas: Sequence[torch.Tensor], lam_s: torch.Tensor, h: torch.Tensor
) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """``(r (len(ms),), [D_1, ...])``: ratios of the older estimates' log-SNR steps (``r`` ends with 1) and
    their scaled differences to the newest, ``ms[0]``."""
    rks, d1s = [], []
    for m, sigma in zip(ms[1:], sigmas[1:], strict=True):
        rk = (_lam(sigma) - lam_s) / h
        rks.append(rk)
        d1s.append((m - ms[0]) / rk)
    rks.append(torch.ones(()))
    return torch.stack(rks), d1s


def _weighted(rhos: torch.Tensor, d1s: Sequence[torch.Tensor]) -> torch.Tensor:
    total = rhos[0] * d1s[0]
    for rho, d in zip(rhos[1:], d1s[1:], strict=True):
        total = total + rho * d
    return total


def unipc_predict(
    x: torch.Tensor,
    ms: Sequence[torch.Tensor],
    sigmas: Sequence[torch.Tensor],
    sigma_next: torch.Tensor,
    solver_type: SolverType = "bh2",
) -> torch.Tensor:
    """UniP of order ``len(ms)``: ``x`` at ``sigmas[0]`` to ``sigma_next``, from the x0 estimates ``ms``
    (newest first) made at ``sigmas`` (0-dim float32). Returns ``x``'s dtype."""
    order = len(ms)
    lam_s = _lam(sigmas[0])
    h = _lam(sigma_next) - lam_s
    rks, d1s = _differences(ms, sigmas, lam_s, h)
    h_phi_1, b_h, b = _coefficients(-h, order, solver_type)
    alpha_t = 1 - sigma_next
    x_next = sigma_next / sigmas[0] * x - alpha_t * h_phi_1 * ms[0]
    if order > 1:
        if order == 2:
            rhos = torch.full((1,), 0.5, dtype=x.dtype)
        else:
            r = torch.stack([torch.pow(rks, k) for k in range(order)])  # (order, order)
            rhos = torch.linalg.solve(r[:-1, :-1], b[:-1]).to(x.dtype)
        x_next = x_next - alpha_t * b_h * _weighted(rhos, d1s)
    return x_next.to(x.dtype)


def unipc_correct(
    x_prev: torch.Tensor,
    m_new: torch.Tensor,
    ms: Sequence[torch.Tensor],
    sigmas: Sequence[torch.Tensor],
    sigma_new: torch.Tensor,
    solver_type: SolverType = "bh2",
) -> torch.Tensor:
    """UniC of order ``len(ms)``: the step from ``x_prev`` (at ``sigmas[0]``) to ``sigma_new`` again, with the
    estimate ``m_new`` made at ``sigma_new`` added to ``ms`` (newest first, made at ``sigmas``)."""
    order = len(ms)
    lam_s = _lam(sigmas[0])
    h = _lam(sigma_new) - lam_s
    rks, d1s = _differences(ms, sigmas, lam_s, h)
    h_phi_1, b_h, b = _coefficients(-h, order, solver_type)
    if order == 1:
        rhos = torch.full((1,), 0.5, dtype=x_prev.dtype)
    else:
        r = torch.stack([torch.pow(rks, k) for k in range(order)])  # (order, order)
        rhos = torch.linalg.solve(r, b).to(x_prev.dtype)
    alpha_t = 1 - sigma_new
    x_new = sigma_new / sigmas[0] * x_prev - alpha_t * h_phi_1 * ms[0]
    new_term = rhos[-1] * (m_new - ms[0])
    residual = _weighted(rhos[:-1], d1s) + new_term if d1s else new_term
    return (x_new - alpha_t * b_h * residual).to(x_prev.dtype)


def _check_unipc_args(
    sigmas: torch.Tensor, order: int, solver_type: str, lower_order_final: bool, disable: Sequence[int]
) -> None:
    if isinstance(order, bool) or not isinstance(order, int) or order < 1:
        raise ValueError(f"order must be an int >= 1, got {order!r}")
    if solver_type not in SOLVER_TYPES:
        raise ValueError(f"solver_type must be one of {SOLVER_TYPES}, got {solver_type!r}")
    if not all(isinstance(i, int) and not isinstance(i, bool) for i in disable):
        raise ValueError(f"disable_corrector must hold step indices, got {disable!r}")
    steps, last = sigmas[:-1], sigmas[-1]
    if not (bool((steps > 0).all()) and bool((steps < 1).all()) and last >= 0):
        raise ValueError(
            "UniPC needs sigmas in (0, 1) with a terminal in [0, 1) (log(1 - sigma) and log(sigma) are "
            f"taken); got {sigmas.tolist()} (build them with sigmas_from_config of a UniPC config)"
        )
    if not bool((sigmas[1:] < sigmas[:-1]).all()):
        raise ValueError(f"sigmas must be strictly decreasing, got {sigmas.tolist()}")
    if last == 0 and not lower_order_final and min(order, steps.numel()) > 1:
        raise ValueError(
            "lower_order_final=False with a terminal sigma 0: a multistep last step would divide by an "
            "infinite log-SNR step (diffusers returns NaN); keep lower_order_final=True"
        )


def sample_unipc(
    model: Model,
    x: torch.Tensor,
    sigmas: torch.Tensor,
    *,
    extra_args: Mapping[str, Any] | None = None,
    callback: StepCallback | None = None,
    is_cancelled: Callable[[], bool] | None = None,
    order: int = 2,
    solver_type: SolverType = "bh2",
    lower_order_final: bool = True,
    disable_corrector: Sequence[int] = (),
) -> torch.Tensor:
    """Multistep UniPC on ``dx/dsigma = v(x, sigma)`` from ``sigmas[0]`` to ``sigmas[-1]`` (module docstring),
    step for step ``UniPCMultistepScheduler.step`` with ``solver_order=order``.

    ``model``, ``sigmas``, ``callback`` and ``is_cancelled`` as in ``sample_euler``; ``sigmas`` must lie in
    (0, 1) apart from the terminal (:func:`~services.denoiser.sampling.schedules.unipc_flow_schedule`
    lowers a first sigma of 1 by 1e-6). The callback's ``x`` is the predictor's ``x_{i+1}`` (diffusers'
    ``prev_sample``, corrected at the next step) and ``denoised`` the model's ``x0`` estimate at ``sigma_i``.
    ``disable_corrector`` lists steps ``j`` whose prediction is not corrected (at step ``j + 1``).
    """
    sigmas = check_inputs(x, sigmas)
    disable = frozenset(disable_corrector)
    _check_unipc_args(sigmas, order, solver_type, lower_order_final, list(disable))
    extra = dict(extra_args or {})
    total = sigmas.numel() - 1
    ms: list[torch.Tensor] = []  # x0 estimates, newest first, at most `order`
    ms_sigmas: list[torch.Tensor] = []  # the sigmas they were made at
    x_prev: torch.Tensor | None = None  # the sample the last prediction started from
    prev_order = 0
    for i in range(total):
        check_cancelled(is_cancelled, i, total)
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        v = call_model(model, x, sigma, extra)
        m = x - sigma * v  # x0 = x - sigma v
        if x_prev is not None and i - 1 not in disable:
            x = unipc_correct(x_prev, m, ms[:prev_order], ms_sigmas[:prev_order], sigma, solver_type)
        ms, ms_sigmas = [m, *ms][:order], [sigma, *ms_sigmas][:order]
        step_order = min(order, total - i) if lower_order_final else order
        step_order = min(step_order, i + 1)  # warm-up: only i + 1 estimates exist
        x_prev = x
        x = unipc_predict(x, ms[:step_order], ms_sigmas[:step_order], sigma_next, solver_type)
        prev_order = step_order
        if callback is not None:
            callback(
                {
                    "i": i,
                    "total": total,
                    "sigma": float(sigma),
                    "sigma_next": float(sigma_next),
                    "x": x,
                    "denoised": m.to(x.dtype),
                }
            )
    return x


def unipc_options(config: SchedulerConfig) -> dict[str, Any]:
    """The :func:`sample_unipc` keyword arguments a UniPC ``SchedulerConfig`` sets."""
    if config.class_name != UNIPC:
        raise ValueError(f"unipc_options needs a {UNIPC} config, got {config.class_name}")
    return {
        "order": config.solver_order,
        "solver_type": config.solver_type,
        "lower_order_final": config.lower_order_final,
        "disable_corrector": config.disable_corrector,
    }
