"""Diffusers scheduler configs: the parsed ``scheduler/scheduler_config.json`` (:class:`SchedulerConfig`),
the named presets, and the sigmas / timesteps a pipeline builds from a config (:func:`sigmas_from_config`,
:func:`timesteps_from_config`) out of the pure schedules of :mod:`services.denoiser.sampling.schedules`.

Two diffusers classes are supported: ``FlowMatchEulerDiscreteScheduler`` (FLUX, Qwen-Image, Wan with Euler)
and ``UniPCMultistepScheduler`` on flow sigmas (Wan's default). Each class reads its own keys; the rest of a
config goes to ``ignored_keys``, and options this engine does not implement raise ``ValueError``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field, fields, replace
from types import MappingProxyType
from typing import Any, Literal

import torch

from services.denoiser.sampling.schedules import (
    TIME_SHIFT_TYPES,
    TimeShiftType,
    calculate_shift,
    flow_sigmas,
    scheduler_flow_sigmas,
    timesteps_from_sigmas,
    unipc_flow_schedule,
)

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
