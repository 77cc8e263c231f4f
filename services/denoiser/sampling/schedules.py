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
from collections.abc import Mapping
from dataclasses import dataclass, field, fields, replace
from types import MappingProxyType
from typing import Any, Literal

import torch

TimeShiftType = Literal["exponential", "linear"]
TIME_SHIFT_TYPES: tuple[str, ...] = ("exponential", "linear")

FLOW_MATCH_EULER = "FlowMatchEulerDiscreteScheduler"
UNIPC = "UniPCMultistepScheduler"
#: diffusers scheduler classes whose ``scheduler_config.json`` :meth:`SchedulerConfig.from_dict` accepts.
SUPPORTED_SCHEDULER_CLASSES: tuple[str, ...] = (FLOW_MATCH_EULER, UNIPC)
_SUPPORTED = (
    f"supported: {FLOW_MATCH_EULER}, or {UNIPC} with use_flow_sigmas=true and "
    "prediction_type='flow_prediction' (Wan's)"
)
SigmaGrid = Literal["linspace", "scheduler"]
SIGMA_GRIDS: tuple[str, ...] = ("linspace", "scheduler")
SolverType = Literal["bh1", "bh2"]
SOLVER_TYPES: tuple[str, ...] = ("bh1", "bh2")
FinalSigmasType = Literal["zero"]


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


# --- scheduler configs ------------------------------------------------------------------------------

_DIFFUSERS_ONLY_FALSE = ("use_karras_sigmas", "use_exponential_sigmas", "use_beta_sigmas")
_SHARED_KEYS = ("num_train_timesteps", "use_dynamic_shifting", "shift_terminal", "time_shift_type")
#: The ``scheduler_config.json`` keys each class reads. The rest go to ``ignored_keys``: for UniPC on flow
#: sigmas that includes its VP-diffusion keys (betas, ``timestep_spacing``, ``steps_offset``, ...), which
#: ``set_timesteps`` computes and then overwrites.
_CLASS_KEYS: Mapping[str, tuple[str, ...]] = MappingProxyType(
    {
        FLOW_MATCH_EULER: (
            *_SHARED_KEYS,
            "shift",
            "base_shift",
            "max_shift",
            "base_image_seq_len",
            "max_image_seq_len",
            "invert_sigmas",
            "stochastic_sampling",
        ),
        UNIPC: (
            *_SHARED_KEYS,
            "flow_shift",
            "use_flow_sigmas",
            "prediction_type",
            "solver_order",
            "solver_type",
            "predict_x0",
            "lower_order_final",
            "final_sigmas_type",
            "disable_corrector",
            "thresholding",
        ),
    }
)
_BOOLS = (
    "use_dynamic_shifting",
    "invert_sigmas",
    "stochastic_sampling",
    "use_flow_sigmas",
    "predict_x0",
    "lower_order_final",
    "thresholding",
)


@dataclass(frozen=True)
class SchedulerConfig:
    """A diffusers ``scheduler/scheduler_config.json`` of a supported class; defaults are diffusers'.

    Each class reads its own keys (``shift`` and the dynamic-shift keys for FlowMatchEuler; ``flow_shift``
    and the solver keys for UniPC); the other class's fields must stay at their defaults.
    ``ignored_keys`` lists keys of the source dict that were not used (never compared).
    """

    class_name: str = FLOW_MATCH_EULER
    num_train_timesteps: int = 1000
    # FlowMatchEulerDiscreteScheduler
    shift: float = 1.0
    use_dynamic_shifting: bool = False
    base_shift: float = 0.5
    max_shift: float = 1.15
    base_image_seq_len: int = 256
    max_image_seq_len: int = 4096
    shift_terminal: float | None = None
    invert_sigmas: bool = False
    time_shift_type: TimeShiftType = "exponential"
    stochastic_sampling: bool = False
    # UniPCMultistepScheduler (Wan): flow sigmas shifted by flow_shift, the solver's order and B(h)
    flow_shift: float = 1.0
    use_flow_sigmas: bool = False
    prediction_type: str = "epsilon"
    solver_order: int = 2
    solver_type: SolverType = "bh2"
    predict_x0: bool = True
    lower_order_final: bool = True
    final_sigmas_type: FinalSigmasType = "zero"
    disable_corrector: tuple[int, ...] = ()
    thresholding: bool = False
    ignored_keys: tuple[str, ...] = field(default=(), compare=False)

    def __post_init__(self) -> None:
        if self.class_name not in SUPPORTED_SCHEDULER_CLASSES:
            raise ValueError(f"unsupported scheduler _class_name {self.class_name!r}; {_SUPPORTED}")
        for name in _BOOLS:
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be a bool, got {getattr(self, name)!r}")
        for name in ("num_train_timesteps", "base_image_seq_len", "max_image_seq_len", "solver_order"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be an int >= 1, got {value!r}")
        for name in ("shift", "base_shift", "max_shift", "flow_shift"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
                raise ValueError(f"{name} must be a finite number, got {value!r}")
        for name in ("shift", "flow_shift"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)}")
        if self.base_image_seq_len == self.max_image_seq_len:
            raise ValueError(
                f"base_image_seq_len and max_image_seq_len must differ, both {self.max_image_seq_len}"
            )
        if self.shift_terminal is not None and not 0.0 < self.shift_terminal < 1.0:
            raise ValueError(f"shift_terminal must be None or in (0, 1), got {self.shift_terminal!r}")
        if self.time_shift_type not in TIME_SHIFT_TYPES:
            raise ValueError(
                f"time_shift_type must be one of {TIME_SHIFT_TYPES}, got {self.time_shift_type!r}"
            )
        if not isinstance(self.disable_corrector, tuple) or not all(
            isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in self.disable_corrector
        ):
            raise ValueError(
                f"disable_corrector must be a tuple of step indices, got {self.disable_corrector!r}"
            )
        own = _CLASS_KEYS[self.class_name]
        foreign = [
            f"{f.name}={getattr(self, f.name)!r}"
            for f in fields(self)
            if f.name not in (*own, "class_name", "ignored_keys") and getattr(self, f.name) != f.default
        ]
        if foreign:
            raise ValueError(f"{self.class_name} has no option {', '.join(foreign)}; its keys are {own}")
        if self.class_name == UNIPC:
            self._check_unipc()
        elif self.stochastic_sampling:
            raise ValueError(
                "stochastic_sampling=True is not supported (deterministic flow-matching Euler only)"
            )
        elif self.invert_sigmas:
            raise ValueError("invert_sigmas=True (Mochi) is not supported")

    def _check_unipc(self) -> None:
        """UniPC only as Wan runs it: on flow sigmas, predicting flow, in the data-prediction form."""
        unsupported = []
        if not self.use_flow_sigmas:
            unsupported.append("use_flow_sigmas=False (a VP-diffusion schedule)")
        if self.prediction_type != "flow_prediction":
            unsupported.append(f"prediction_type={self.prediction_type!r}")
        if not self.predict_x0:
            unsupported.append("predict_x0=False")
        if self.thresholding:
            unsupported.append("thresholding=True")
        if self.use_dynamic_shifting:
            unsupported.append("use_dynamic_shifting=True")
        if self.shift_terminal is not None:
            unsupported.append(f"shift_terminal={self.shift_terminal}")
        if self.solver_type not in SOLVER_TYPES:
            unsupported.append(f"solver_type={self.solver_type!r} (one of {SOLVER_TYPES})")
        if self.final_sigmas_type != "zero":
            unsupported.append(
                f"final_sigmas_type={self.final_sigmas_type!r} (on flow sigmas it repeats the last sigma: a "
                "zero-length last step)"
            )
        if not self.lower_order_final and self.solver_order > 1:
            unsupported.append(
                "lower_order_final=False with solver_order > 1 (a multistep last step to sigma 0 divides by "
                "an infinite log-SNR step: diffusers returns NaN)"
            )
        if unsupported:
            raise ValueError(f"{UNIPC} with {'; '.join(unsupported)} is not supported; {_SUPPORTED}")

    @classmethod
    def from_dict(cls, config: Mapping[str, Any]) -> SchedulerConfig:
        """Parse a diffusers scheduler config dict; keys its class does not read go to ``ignored_keys``.

        ``_class_name`` is required and must be one of :data:`SUPPORTED_SCHEDULER_CLASSES`; the Karras /
        exponential / beta sigma options are accepted only when false, UniPC's ``solver_p`` only when null.
        """
        class_name = config.get("_class_name")
        if class_name not in SUPPORTED_SCHEDULER_CLASSES:
            raise ValueError(f"unsupported scheduler _class_name {class_name!r}; {_SUPPORTED}")
        for name in _DIFFUSERS_ONLY_FALSE:
            if config.get(name, False):
                raise ValueError(f"{name}=true is not supported in {class_name} configs")
        if config.get("solver_p") is not None:
            raise ValueError(
                f"solver_p={config['solver_p']!r} (another scheduler as predictor) is not supported"
            )
        own = _CLASS_KEYS[class_name]
        kwargs = {k: v for k, v in config.items() if k in own}
        if not kwargs.get("shift_terminal"):  # diffusers treats 0 / null as "off"
            kwargs["shift_terminal"] = None
        if "disable_corrector" in kwargs:
            steps = kwargs["disable_corrector"]
            if not isinstance(steps, list | tuple):
                raise ValueError(f"disable_corrector must be a list of step indices, got {steps!r}")
            kwargs["disable_corrector"] = tuple(steps)
        ignored = sorted(
            k for k in config if k not in own and k != "_class_name" and k not in _DIFFUSERS_ONLY_FALSE
        )
        return cls(class_name=class_name, ignored_keys=tuple(ignored), **kwargs)

    def to_dict(self) -> dict[str, Any]:
        """The diffusers config dict (``_class_name`` and the class's keys), e.g. for ``from_config``."""
        out: dict[str, Any] = {"_class_name": self.class_name}
        out.update({name: getattr(self, name) for name in _CLASS_KEYS[self.class_name]})
        if "disable_corrector" in out:
            out["disable_corrector"] = list(out["disable_corrector"])
        return out


def _schedule(
    config: SchedulerConfig,
    steps: int,
    image_seq_len: int | None,
    mu: float | None,
    grid: SigmaGrid | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(sigmas, timesteps) of :func:`sigmas_from_config` / :func:`timesteps_from_config`."""
    if grid is not None and grid not in SIGMA_GRIDS:
        raise ValueError(f"grid must be one of {SIGMA_GRIDS} or None, got {grid!r}")
    if config.class_name == UNIPC:
        if grid == "linspace":
            raise ValueError(f"{UNIPC} configs build their own grid: use grid='scheduler' (or None)")
        if mu is not None:
            raise ValueError(f"mu={mu} given but {UNIPC} configs have no dynamic shifting")
        return unipc_flow_schedule(steps, config.flow_shift, num_train_timesteps=config.num_train_timesteps)
    if grid == "scheduler":
        if config.use_dynamic_shifting or config.shift_terminal:
            raise ValueError(
                "grid='scheduler' is supported for a static shift only (use_dynamic_shifting=False, no "
                "shift_terminal); FLUX-style pipelines use grid='linspace'"
            )
        if mu is not None:
            raise ValueError(f"mu={mu} given but the config has use_dynamic_shifting=False")
        sigmas = scheduler_flow_sigmas(steps, config.shift, num_train_timesteps=config.num_train_timesteps)
        return sigmas, timesteps_from_sigmas(sigmas, config.num_train_timesteps)
    if config.use_dynamic_shifting:
        if (image_seq_len is None) == (mu is None):
            raise ValueError(
                f"dynamic shifting needs exactly one of image_seq_len / mu, got {image_seq_len=}, {mu=}"
            )
        if mu is None:
            mu = calculate_shift(
                image_seq_len,  # type: ignore[arg-type]
                config.base_image_seq_len,
                config.max_image_seq_len,
                config.base_shift,
                config.max_shift,
            )
    elif mu is not None:
        raise ValueError(f"mu={mu} given but the config has use_dynamic_shifting=False")
    sigmas = flow_sigmas(
        steps,
        config.shift,
        use_dynamic_shifting=config.use_dynamic_shifting,
        mu=mu,
        time_shift_type=config.time_shift_type,
        shift_terminal=config.shift_terminal,
    )
    return sigmas, timesteps_from_sigmas(sigmas, config.num_train_timesteps)


def sigmas_from_config(
    config: SchedulerConfig,
    steps: int,
    *,
    image_seq_len: int | None = None,
    mu: float | None = None,
    grid: SigmaGrid | None = None,
) -> torch.Tensor:
    """``(steps + 1,)`` float32 sigmas as a pipeline builds them from ``config``.

    ``grid="linspace"`` (the default for FlowMatchEuler): the FLUX-style pipelines' ``set_timesteps(sigmas=
    np.linspace(1, 1 / steps, steps), mu=...)``. With ``use_dynamic_shifting``, ``mu`` is
    :func:`calculate_shift` of ``image_seq_len`` with the config's base / max values, unless ``mu`` is given
    (e.g. FLUX.2's empirical mu); exactly one of the two. Without it, ``image_seq_len`` is ignored.
    ``grid="scheduler"`` (the only grid of UniPC, and its default): ``set_timesteps(steps)`` alone, as Wan's
    pipelines call it (:func:`scheduler_flow_sigmas`, :func:`unipc_flow_schedule`).
    """
    return _schedule(config, steps, image_seq_len, mu, grid)[0]


def timesteps_from_config(
    config: SchedulerConfig,
    steps: int,
    *,
    image_seq_len: int | None = None,
    mu: float | None = None,
    grid: SigmaGrid | None = None,
) -> torch.Tensor:
    """``(steps,)`` diffusers' ``scheduler.timesteps`` for the same arguments as :func:`sigmas_from_config`:
    float32 ``T * sigma`` for FlowMatchEuler, int64 (truncated from float64 sigmas) for UniPC. A model
    adapter that feeds the network timesteps should take them from here, index by index."""
    return _schedule(config, steps, image_seq_len, mu, grid)[1]


#: black-forest-labs/FLUX.1-dev ``scheduler/scheduler_config.json``.
FLUX_DEV_SCHEDULER = SchedulerConfig(
    shift=3.0,
    use_dynamic_shifting=True,
    base_shift=0.5,
    max_shift=1.15,
    base_image_seq_len=256,
    max_image_seq_len=4096,
)
#: black-forest-labs/FLUX.1-schnell ``scheduler/scheduler_config.json`` (no shift at all).
FLUX_SCHNELL_SCHEDULER = SchedulerConfig(
    shift=1.0,
    use_dynamic_shifting=False,
    base_shift=0.5,
    max_shift=1.15,
    base_image_seq_len=256,
    max_image_seq_len=4096,
)
#: Qwen/Qwen-Image ``scheduler/scheduler_config.json``.
QWEN_IMAGE_SCHEDULER = SchedulerConfig(
    shift=1.0,
    use_dynamic_shifting=True,
    base_shift=0.5,
    max_shift=0.9,
    base_image_seq_len=256,
    max_image_seq_len=8192,
    shift_terminal=0.02,
)
#: Wan-AI/Wan2.1-T2V-1.3B-Diffusers (and -14B) ``scheduler/scheduler_config.json``: UniPC (bh2, order 2)
#: on flow sigmas, ``flow_shift=3.0``, which diffusers' Wan docs give for 480p.
WAN21_UNIPC_SCHEDULER = SchedulerConfig(
    class_name=UNIPC,
    flow_shift=3.0,
    use_flow_sigmas=True,
    prediction_type="flow_prediction",
    solver_order=2,
    solver_type="bh2",
)
#: The same at ``flow_shift=5.0``: diffusers' Wan docs for 720p (and Wan2.1 I2V-720P's ``sample_shift``).
WAN21_UNIPC_720P_SCHEDULER = replace(WAN21_UNIPC_SCHEDULER, flow_shift=5.0)
#: The official Wan2.2 T2V-A14B ``sample_shift=12.0`` (its -Diffusers scheduler_config.json says 3.0).
WAN22_T2V_UNIPC_SCHEDULER = replace(WAN21_UNIPC_SCHEDULER, flow_shift=12.0)
#: The official Wan2.2 I2V-A14B and TI2V-5B ``sample_shift=5.0``.
WAN22_I2V_UNIPC_SCHEDULER = replace(WAN21_UNIPC_SCHEDULER, flow_shift=5.0)
#: FlowMatchEuler with a fixed shift as Wan runs it (``set_timesteps(steps)``: use ``grid="scheduler"``);
#: 3.0 is the shift diffusers' Wan docs give as Wan's default.
WAN_EULER_SCHEDULER = SchedulerConfig(shift=3.0)
WAN22_T2V_EULER_SCHEDULER = replace(WAN_EULER_SCHEDULER, shift=12.0)
WAN22_I2V_EULER_SCHEDULER = replace(WAN_EULER_SCHEDULER, shift=5.0)

SCHEDULER_PRESETS: Mapping[str, SchedulerConfig] = MappingProxyType(
    {
        "flux-dev": FLUX_DEV_SCHEDULER,
        "flux-schnell": FLUX_SCHNELL_SCHEDULER,
        "qwen-image": QWEN_IMAGE_SCHEDULER,
        "wan2.1-unipc": WAN21_UNIPC_SCHEDULER,
        "wan2.1-unipc-720p": WAN21_UNIPC_720P_SCHEDULER,
        "wan2.2-t2v-unipc": WAN22_T2V_UNIPC_SCHEDULER,
        "wan2.2-i2v-unipc": WAN22_I2V_UNIPC_SCHEDULER,
        "wan-euler": WAN_EULER_SCHEDULER,
        "wan2.2-t2v-euler": WAN22_T2V_EULER_SCHEDULER,
        "wan2.2-i2v-euler": WAN22_I2V_EULER_SCHEDULER,
    }
)


def scheduler_preset(name: str) -> SchedulerConfig:
    """The named preset; ``KeyError`` listing the known names otherwise."""
    try:
        return SCHEDULER_PRESETS[name]
    except KeyError:
        raise KeyError(f"unknown scheduler preset {name!r}; known: {sorted(SCHEDULER_PRESETS)}") from None
