"""Flow-matching sigma schedules as pure functions.

Flow matching / rectified flow (Lipman et al. 2023, "Flow Matching for Generative Modeling", eq. 20-23;
Liu et al. 2023, "Flow Straight and Fast") interpolates data ``x0`` and noise ``eps`` linearly,
``x_sigma = sigma * eps + (1 - sigma) * x0`` with ``sigma`` in [0, 1]; a model predicts the velocity
``v = eps - x0`` and sampling integrates ``dx/dsigma = v`` from ``sigma = 1`` down to ``sigma = 0``.

Every schedule here returns ``(steps + 1,)`` float32 sigmas on the CPU, descending, terminal ``0``
appended, exactly (bit for bit) as diffusers' ``FlowMatchEulerDiscreteScheduler.set_timesteps`` makes
them: the arithmetic is float32 in the same order as its numpy code. Keep sigmas on the CPU: solvers read
them as scalars and a CUDA copy would cost a device sync per step.

The resolution-dependent shift is Esser et al. 2024 ("Scaling Rectified Flow Transformers for
High-Resolution Image Synthesis", SD3), sec. 5.3.2, eq. 23: ``t' = a t / (1 + (a - 1) t)``. FLUX writes
``a = exp(mu)`` with ``mu`` linear in the image token count (:func:`calculate_shift`).

Two grids exist in diffusers and both are here: the FLUX-style pipelines pass ``np.linspace(1, 1 / n, n)``
to ``set_timesteps`` and the shift runs in float32 (:func:`flow_sigmas`); Wan's pipelines call
``set_timesteps(n)`` alone and the scheduler builds its own float64 grid (:func:`scheduler_flow_sigmas`
for ``FlowMatchEulerDiscreteScheduler``, :func:`unipc_flow_schedule` for ``UniPCMultistepScheduler`` with
``use_flow_sigmas``, whose integer timesteps are truncated from the float64 sigmas).
"""

from __future__ import annotations

import math
from typing import Literal

import torch

TimeShiftType = Literal["exponential", "linear"]
TIME_SHIFT_TYPES: tuple[str, ...] = ("exponential", "linear")


def _f32(value: float) -> torch.Tensor:
    """A 0-dim float32 CPU tensor (python floats round to float32 first, as numpy's NEP 50 does)."""
    return torch.tensor(value, dtype=torch.float32)


def _check_steps(steps: int) -> None:
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps must be an int >= 1, got {steps!r}")


def _check_unit_sigmas(sigmas: torch.Tensor, name: str) -> torch.Tensor:
    if not isinstance(sigmas, torch.Tensor) or sigmas.ndim != 1 or sigmas.numel() < 1:
        got = tuple(sigmas.shape) if isinstance(sigmas, torch.Tensor) else type(sigmas).__name__
        raise ValueError(f"{name} must be a non-empty 1-D tensor, got {got}")
    if not sigmas.is_floating_point():
        raise ValueError(f"{name} must be floating point, got {sigmas.dtype}")
    return sigmas.detach().to(device="cpu", dtype=torch.float32)


def linspace_sigmas(steps: int, *, sigma_max: float = 1.0, sigma_min: float | None = None) -> torch.Tensor:
    """``(steps,)`` float32 unshifted sigmas, ``numpy.linspace(sigma_max, sigma_min, steps)`` bit for bit.

    ``sigma_min=None`` means ``1 / steps``: the grid FLUX.1, FLUX.2, Qwen-Image and LTX-2 pipelines pass
    (``np.linspace(1.0, 1 / n, n)``). Computed in float64 like numpy (``start + i * step``, last = stop),
    then rounded to float32 as ``set_timesteps`` does.
    """
    _check_steps(steps)
    sigma_min = 1.0 / steps if sigma_min is None else float(sigma_min)
    if not 0.0 < sigma_min <= sigma_max <= 1.0:
        raise ValueError(
            f"need 0 < sigma_min <= sigma_max <= 1, got sigma_min={sigma_min}, sigma_max={sigma_max}"
        )
    return _linspace64(sigma_max, sigma_min, steps).to(torch.float32)


def _linspace64(start: float, stop: float, num: int) -> torch.Tensor:
    """``numpy.linspace(start, stop, num)`` in float64 bit for bit: ``start + i * step``, last = ``stop``."""
    if num == 1:
        return torch.tensor([start], dtype=torch.float64)
    step = (stop - start) / (num - 1)
    grid = torch.arange(num, dtype=torch.float64) * step + start
    grid[-1] = stop
    return grid


def calculate_shift(
    image_seq_len: int,
    base_seq_len: int = 256,
    max_seq_len: int = 4096,
    base_shift: float = 0.5,
    max_shift: float = 1.15,
) -> float:
    """FLUX's resolution-dependent ``mu``: linear in the image token count, through
    ``(base_seq_len, base_shift)`` and ``(max_seq_len, max_shift)``, extrapolated outside.

    ``mu = log(a)`` of SD3's shift (Esser et al. 2024, eq. 23), where SD3 takes ``a = sqrt(m / n)`` for
    resolutions ``m`` vs ``n``; BFL's ``get_lin_function`` fits ``mu`` linearly instead. For FLUX the token
    count is ``(height // 16) * (width // 16)`` (VAE factor 8, then 2x2 packing).
    """
    if isinstance(image_seq_len, bool) or not isinstance(image_seq_len, int) or image_seq_len < 1:
        raise ValueError(f"image_seq_len must be an int >= 1, got {image_seq_len!r}")
    if max_seq_len == base_seq_len:
        raise ValueError(f"max_seq_len must differ from base_seq_len, both are {base_seq_len}")
    m = (max_shift - base_shift) / (max_seq_len - base_seq_len)
    b = base_shift - m * base_seq_len
    return image_seq_len * m + b


def time_shift(
    mu: float, sigma: float, t: torch.Tensor, *, kind: TimeShiftType = "exponential"
) -> torch.Tensor:
    """Shift sigmas ``t`` in (0, 1] toward 1: ``e^mu / (e^mu + (1/t - 1)^sigma)`` (``kind="exponential"``)
    or ``mu / (mu + (1/t - 1)^sigma)`` (``kind="linear"``), in float32.

    With ``sigma = 1`` the exponential form is Esser et al. 2024, eq. 23 with ``a = e^mu``:
    ``a t / (1 + (a - 1) t)``.
    """
    if kind not in TIME_SHIFT_TYPES:
        raise ValueError(f"kind must be one of {TIME_SHIFT_TYPES}, got {kind!r}")
    if not math.isfinite(mu) or not math.isfinite(sigma):
        raise ValueError(f"mu and sigma must be finite, got mu={mu}, sigma={sigma}")
    if kind == "linear" and mu <= 0:
        raise ValueError(f"linear time shift needs mu > 0, got mu={mu}")
    t = _check_unit_sigmas(t, "t")
    odds = torch.pow(torch.div(_f32(1.0), t) - 1.0, sigma)  # (1/t - 1)^sigma
    a = _f32(math.exp(mu) if kind == "exponential" else mu)
    # torch.div of two tensors: a true float32 division (python `a / t` would multiply by a reciprocal)
    return torch.div(a, a + odds)


def shift_sigmas(sigmas: torch.Tensor, shift: float) -> torch.Tensor:
    """Static shift ``shift * t / (1 + (shift - 1) * t)`` (Esser et al. 2024, eq. 23, ``a = shift``)."""
    if not shift > 0:
        raise ValueError(f"shift must be > 0, got {shift}")
    t = _check_unit_sigmas(sigmas, "sigmas")
    return torch.div(_f32(shift) * t, _f32(shift - 1.0) * t + 1.0)


def stretch_to_terminal(sigmas: torch.Tensor, shift_terminal: float) -> torch.Tensor:
    """Affinely rescale ``1 - sigma`` so the last sigma equals ``shift_terminal`` (LTX-Video ``rf.py``;
    Qwen-Image uses 0.02): ``1 - (1 - t) * (1 - shift_terminal) / (1 - t[-1])``."""
    if not 0.0 < shift_terminal < 1.0:
        raise ValueError(f"shift_terminal must be in (0, 1), got {shift_terminal}")
    t = _check_unit_sigmas(sigmas, "sigmas")
    one_minus = 1.0 - t
    if one_minus[-1] == 0:
        raise ValueError(
            f"cannot stretch sigmas ending at 1.0 to shift_terminal={shift_terminal} (one step?)"
        )
    scale = torch.div(one_minus[-1], _f32(1.0 - shift_terminal))
    return 1.0 - torch.div(one_minus, scale)


def flow_sigmas_from(
    base: torch.Tensor,
    shift: float = 1.0,
    *,
    use_dynamic_shifting: bool = False,
    mu: float | None = None,
    time_shift_type: TimeShiftType = "exponential",
    shift_terminal: float | None = None,
) -> torch.Tensor:
    """Shift unshifted sigmas ``base`` ``(n,)`` and append the terminal 0: ``(n + 1,)`` float32.

    Steps 2, 3 and 6 of ``FlowMatchEulerDiscreteScheduler.set_timesteps(sigmas=base, mu=mu)``: the dynamic
    :func:`time_shift` by ``mu`` when ``use_dynamic_shifting`` (``shift`` then unused, as in diffusers),
    else the static :func:`shift_sigmas` by ``shift``; then :func:`stretch_to_terminal` if
    ``shift_terminal``.
    """
    if use_dynamic_shifting:
        if mu is None:
            raise ValueError("mu is required when use_dynamic_shifting=True (see calculate_shift)")
        shifted = time_shift(mu, 1.0, base, kind=time_shift_type)
    else:
        if mu is not None:
            raise ValueError(f"mu={mu} given but use_dynamic_shifting=False; it would be ignored")
        shifted = shift_sigmas(base, shift)
    if shift_terminal:
        shifted = stretch_to_terminal(shifted, shift_terminal)
    return torch.cat([shifted, torch.zeros(1, dtype=torch.float32)])


def flow_sigmas(
    steps: int,
    shift: float = 1.0,
    *,
    sigma_min: float | None = None,
    use_dynamic_shifting: bool = False,
    mu: float | None = None,
    time_shift_type: TimeShiftType = "exponential",
    shift_terminal: float | None = None,
) -> torch.Tensor:
    """``(steps + 1,)`` float32 flow-matching sigmas from 1 down to 0: :func:`linspace_sigmas` then
    :func:`flow_sigmas_from`.

    With the FLUX.1-dev config this is what ``FluxPipeline`` gets from
    ``set_timesteps(sigmas=np.linspace(1, 1 / steps, steps), mu=calculate_shift(image_seq_len, ...))``.
    """
    base = linspace_sigmas(steps, sigma_min=sigma_min)
    return flow_sigmas_from(
        base,
        shift,
        use_dynamic_shifting=use_dynamic_shifting,
        mu=mu,
        time_shift_type=time_shift_type,
        shift_terminal=shift_terminal,
    )


def timesteps_from_sigmas(sigmas: torch.Tensor, num_train_timesteps: int = 1000) -> torch.Tensor:
    """``(steps,)`` float32 ``sigmas[:-1] * num_train_timesteps``: diffusers' ``scheduler.timesteps``."""
    t = _check_unit_sigmas(sigmas, "sigmas")
    return t[:-1] * _f32(float(num_train_timesteps))


def _static_shift64(sigmas: torch.Tensor, shift: float) -> torch.Tensor:
    """Esser et al. 2024, eq. 23 on a float64 grid, in the order the schedulers' numpy code runs it."""
    return shift * sigmas / (1 + (shift - 1) * sigmas)


def _check_shift(name: str, value: float) -> None:
    if (
        isinstance(value, bool)
        or not isinstance(value, int | float)
        or not math.isfinite(value)
        or value <= 0
    ):
        raise ValueError(f"{name} must be a finite number > 0, got {value!r}")


def scheduler_flow_sigmas(steps: int, shift: float = 1.0, *, num_train_timesteps: int = 1000) -> torch.Tensor:
    """``(steps + 1,)`` float32 sigmas of ``FlowMatchEulerDiscreteScheduler(shift=shift).set_timesteps(steps)``
    with no ``sigmas`` passed (static shift): what ``WanPipeline`` gets from such a scheduler.

    The constructor shifts its float32 training sigmas ``t / T`` (``t = T .. 1``); ``set_timesteps`` spans
    ``linspace(T s_max, T s_min, steps) / T`` between those shifted ends in float64 and shifts that grid
    again, so the last sigma is shifted twice, as diffusers does. Timesteps: :func:`timesteps_from_sigmas`.
    """
    _check_steps(steps)
    _check_shift("shift", shift)
    ends = torch.tensor([float(num_train_timesteps), 1.0], dtype=torch.float32) / num_train_timesteps
    ends = shift * ends / (1 + (shift - 1) * ends)  # float32, as the constructor's torch code
    sigma_max, sigma_min = ends.tolist()
    grid = _linspace64(sigma_max * num_train_timesteps, sigma_min * num_train_timesteps, steps)
    shifted = _static_shift64(grid / num_train_timesteps, shift).to(torch.float32)
    return torch.cat([shifted, torch.zeros(1, dtype=torch.float32)])


def unipc_flow_schedule(
    steps: int, flow_shift: float = 1.0, *, num_train_timesteps: int = 1000
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(sigmas (steps + 1,) float32, timesteps (steps,) int64)`` of
    ``UniPCMultistepScheduler(use_flow_sigmas=True, flow_shift=...).set_timesteps(steps)``, bit for bit.

    ``linspace(1, 1 / T, steps + 1)[:-1]`` shifted in float64; a first sigma within 1e-6 of 1 is lowered by
    1e-6 (UniPC takes ``log(1 - sigma)``); timesteps are ``T * sigma`` truncated toward zero from the float64
    values, so they can differ by one from ``int(T * sigmas[i])`` of the float32 sigmas; terminal 0.
    """
    _check_steps(steps)
    _check_shift("flow_shift", flow_shift)
    shifted = _static_shift64(_linspace64(1.0, 1.0 / num_train_timesteps, steps + 1)[:-1], flow_shift)
    if abs(shifted[0].item() - 1.0) < 1e-6:
        shifted[0] -= 1e-6
    timesteps = (shifted * num_train_timesteps).to(torch.int64)
    sigmas = torch.cat([shifted.to(torch.float32), torch.zeros(1, dtype=torch.float32)])
    return sigmas, timesteps


def img2img_start(sigmas: torch.Tensor, strength: float) -> int:
    """Index of the first sigma to sample from for img2img (SDEdit, Meng et al. 2022) at ``strength``.

    ``FluxImg2ImgPipeline.get_timesteps``: ``init = min(steps * strength, steps)``,
    ``start = int(max(steps - init, 0))``; sample over ``sigmas[start:]`` from
    ``scale_noise(x0, noise, sigmas[start])``. ``sigmas`` has the terminal 0 (``steps + 1`` entries).
    """
    t = _check_unit_sigmas(sigmas, "sigmas")
    steps = t.numel() - 1
    if steps < 1:
        raise ValueError(f"sigmas must hold at least one step plus the terminal, got {t.numel()} values")
    if not 0.0 <= strength <= 1.0:
        raise ValueError(f"strength must be in [0.0, 1.0], got {strength}")
    init = min(steps * strength, steps)
    start = int(max(steps - init, 0))
    if steps - start < 1:
        raise ValueError(f"strength={strength} with {steps} steps leaves {steps - start} steps; need >= 1")
    return start


def scale_noise(x0: torch.Tensor, noise: torch.Tensor, sigma: float | torch.Tensor) -> torch.Tensor:
    """Flow-matching forward process ``x_sigma = sigma * noise + (1 - sigma) * x0`` (Lipman et al. 2023,
    eq. 22 with sigma_min = 0), as ``FlowMatchEulerDiscreteScheduler.scale_noise``: ``sigma`` (a scalar or
    ``(B,)``) is rounded to float32, then to ``x0``'s dtype, and the arithmetic runs in that dtype.
    """
    if x0.shape != noise.shape or x0.dtype != noise.dtype:
        raise ValueError(
            f"x0 and noise must match: x0 {tuple(x0.shape)} {x0.dtype}, noise {tuple(noise.shape)} {noise.dtype}"
        )
    if x0.ndim < 1:
        raise ValueError("x0 must have a batch dimension")
    s = torch.as_tensor(sigma, dtype=torch.float32).to(device=x0.device, dtype=x0.dtype)
    if s.ndim == 0:
        s = s.expand(x0.shape[0])
    if s.shape != (x0.shape[0],):
        raise ValueError(f"sigma must be a scalar or ({x0.shape[0]},), got {tuple(s.shape)}")
    s = s.reshape(-1, *([1] * (x0.ndim - 1)))  # (B, 1, ...)
    return s * noise + (1.0 - s) * x0
