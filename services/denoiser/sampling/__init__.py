"""Sampling math of the denoiser as pure functions: schedules, solvers, guidance.

Only the denoise loop keeps state; everything here is a function of its arguments.
"""

from services.denoiser.sampling.guidance import batched_cfg_model, cfg
from services.denoiser.sampling.schedules import (
    FLUX_DEV_SCHEDULER,
    FLUX_SCHNELL_SCHEDULER,
    QWEN_IMAGE_SCHEDULER,
    SCHEDULER_PRESETS,
    SUPPORTED_SCHEDULER_CLASSES,
    SchedulerConfig,
    TimeShiftType,
    calculate_shift,
    flow_sigmas,
    flow_sigmas_from,
    img2img_start,
    linspace_sigmas,
    scale_noise,
    scheduler_preset,
    shift_sigmas,
    sigmas_from_config,
    stretch_to_terminal,
    time_shift,
    timesteps_from_sigmas,
)
from services.denoiser.sampling.solvers import Model, SamplingCancelled, StepCallback, sample_euler

__all__ = [
    "FLUX_DEV_SCHEDULER",
    "FLUX_SCHNELL_SCHEDULER",
    "QWEN_IMAGE_SCHEDULER",
    "SCHEDULER_PRESETS",
    "SUPPORTED_SCHEDULER_CLASSES",
    "Model",
    "SamplingCancelled",
    "SchedulerConfig",
    "StepCallback",
    "TimeShiftType",
    "batched_cfg_model",
    "calculate_shift",
    "cfg",
    "flow_sigmas",
    "flow_sigmas_from",
    "img2img_start",
    "linspace_sigmas",
    "sample_euler",
    "scale_noise",
    "scheduler_preset",
    "shift_sigmas",
    "sigmas_from_config",
    "stretch_to_terminal",
    "time_shift",
    "timesteps_from_sigmas",
]
