"""Flow-matching schedules against diffusers' FlowMatchEulerDiscreteScheduler (the test oracle)."""

from __future__ import annotations

import types

import numpy as np
import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler
from diffusers.pipelines.flux.pipeline_flux import calculate_shift as diffusers_calculate_shift
from diffusers.pipelines.flux.pipeline_flux_img2img import FluxImg2ImgPipeline

from services.denoiser.sampling import (
    FLUX_DEV_SCHEDULER,
    FLUX_SCHNELL_SCHEDULER,
    QWEN_IMAGE_SCHEDULER,
    SUPPORTED_SCHEDULER_CLASSES,
    SchedulerConfig,
    calculate_shift,
    flow_sigmas,
    flow_sigmas_from,
    img2img_start,
    linspace_sigmas,
    scale_noise,
    scheduler_preset,
    sigmas_from_config,
    time_shift,
    timesteps_from_sigmas,
)

# black-forest-labs/FLUX.1-dev scheduler/scheduler_config.json, as published.
FLUX_DEV_JSON = {
    "_class_name": "FlowMatchEulerDiscreteScheduler",
    "_diffusers_version": "0.30.0.dev0",
    "base_image_seq_len": 256,
    "base_shift": 0.5,
    "max_image_seq_len": 4096,
    "max_shift": 1.15,
    "num_train_timesteps": 1000,
    "shift": 3.0,
    "use_dynamic_shifting": True,
}
# Qwen/Qwen-Image scheduler/scheduler_config.json, as published.
QWEN_IMAGE_JSON = {
    "_class_name": "FlowMatchEulerDiscreteScheduler",
    "_diffusers_version": "0.34.0.dev0",
    "base_image_seq_len": 256,
    "base_shift": 0.5,
    "invert_sigmas": False,
    "max_image_seq_len": 8192,
    "max_shift": 0.9,
    "num_train_timesteps": 1000,
    "shift": 1.0,
    "shift_terminal": 0.02,
    "stochastic_sampling": False,
    "time_shift_type": "exponential",
    "use_beta_sigmas": False,
    "use_dynamic_shifting": True,
    "use_exponential_sigmas": False,
    "use_karras_sigmas": False,
}
SEQ_LENS = [256, 1024, 4096, 6400]  # 256x256 .. 1280x1280 FLUX images (6400 extrapolates mu)
STEPS = [1, 4, 28, 50]


def _diffusers_flux(config: dict, steps: int, image_seq_len: int) -> FlowMatchEulerDiscreteScheduler:
    """What FluxPipeline.__call__ does to its scheduler in step 5."""
    sched = FlowMatchEulerDiscreteScheduler.from_config(config)
    mu = diffusers_calculate_shift(
        image_seq_len,
        sched.config.get("base_image_seq_len", 256),
        sched.config.get("max_image_seq_len", 4096),
        sched.config.get("base_shift", 0.5),
        sched.config.get("max_shift", 1.15),
    )
    sched.set_timesteps(sigmas=np.linspace(1.0, 1 / steps, steps), mu=mu)
    return sched


def _max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.double() - b.double()).abs().max().item()


@pytest.mark.parametrize("steps", STEPS)
@pytest.mark.parametrize("image_seq_len", SEQ_LENS)
def test_flux_dev_sigmas_match_diffusers(steps: int, image_seq_len: int) -> None:
    ref = _diffusers_flux(FLUX_DEV_JSON, steps, image_seq_len)
    mu = calculate_shift(image_seq_len, 256, 4096, 0.5, 1.15)
    ours = flow_sigmas(steps, 3.0, use_dynamic_shifting=True, mu=mu)
    assert ours.dtype == torch.float32 and ours.shape == (steps + 1,) and ours[-1] == 0
    assert _max_diff(ours, ref.sigmas) <= 1e-6
    assert _max_diff(timesteps_from_sigmas(ours), ref.timesteps) <= 1e-6
    from_config = sigmas_from_config(FLUX_DEV_SCHEDULER, steps, image_seq_len=image_seq_len)
    assert torch.equal(from_config, ours)


@pytest.mark.parametrize("steps", [4, 28])
def test_schnell_and_qwen_presets_match_diffusers(steps: int) -> None:
    for preset, config in (
        (FLUX_SCHNELL_SCHEDULER, FLUX_SCHNELL_SCHEDULER.to_dict()),
        (QWEN_IMAGE_SCHEDULER, QWEN_IMAGE_JSON),
    ):
        ref = _diffusers_flux(config, steps, 4096)
        ours = sigmas_from_config(preset, steps, image_seq_len=4096)
        assert _max_diff(ours, ref.sigmas) <= 1e-6, preset
        assert _max_diff(timesteps_from_sigmas(ours), ref.timesteps) <= 1e-6, preset


def test_static_shift_linear_time_shift_and_custom_base_match_diffusers() -> None:
    steps = 10
    base = torch.linspace(1.0, 1 / steps, steps)  # Z-Image's grid: torch float32 linspace
    static = FlowMatchEulerDiscreteScheduler(shift=3.0)
    static.set_timesteps(sigmas=base.tolist())
    assert _max_diff(flow_sigmas_from(base, 3.0), static.sigmas) <= 1e-6

    linear = FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True, time_shift_type="linear")
    linear.set_timesteps(sigmas=np.linspace(1.0, 1 / steps, steps), mu=2.5)
    ours = flow_sigmas(steps, use_dynamic_shifting=True, mu=2.5, time_shift_type="linear")
    assert _max_diff(ours, linear.sigmas) <= 1e-6


@pytest.mark.parametrize("image_seq_len", [1, 256, 1000, 4096, 8192])
def test_calculate_shift_equals_diffusers(image_seq_len: int) -> None:
    assert calculate_shift(image_seq_len) == diffusers_calculate_shift(image_seq_len)
    args = (256, 8192, 0.5, 0.9)
    assert calculate_shift(image_seq_len, *args) == diffusers_calculate_shift(image_seq_len, *args)


def test_time_shift_is_sd3_shift_with_exp_mu() -> None:
    t = torch.tensor([1.0, 0.75, 0.5, 0.25, 0.01])
    a = 3.0
    expected = a * t / (1 + (a - 1) * t)
    torch.testing.assert_close(time_shift(float(np.log(a)), 1.0, t), expected, atol=1e-6, rtol=0)


def test_linspace_sigmas_is_numpy_linspace() -> None:
    for steps in (1, 2, 3, 7, 28, 50, 1000):
        expected = torch.from_numpy(np.linspace(1.0, 1 / steps, steps).astype(np.float32))
        assert torch.equal(linspace_sigmas(steps), expected)


def test_schedule_input_errors() -> None:
    with pytest.raises(ValueError, match="mu is required"):
        flow_sigmas(4, use_dynamic_shifting=True)
    with pytest.raises(ValueError, match="would be ignored"):
        flow_sigmas(4, mu=1.0)
    with pytest.raises(ValueError, match="steps must be"):
        flow_sigmas(0)
    with pytest.raises(ValueError, match="exactly one of"):
        sigmas_from_config(FLUX_DEV_SCHEDULER, 4)
    with pytest.raises(ValueError, match="shift_terminal"):
        sigmas_from_config(QWEN_IMAGE_SCHEDULER, 1, image_seq_len=4096)  # diffusers returns NaN here


@pytest.mark.parametrize("steps", [4, 28])
@pytest.mark.parametrize("strength", [0.3, 0.6, 0.95, 1.0])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_img2img_start_and_noised_latents_match_flux_img2img(
    steps: int, strength: float, dtype: torch.dtype
) -> None:
    sched = _diffusers_flux(FLUX_DEV_JSON, steps, 1024)
    fake_pipe = types.SimpleNamespace(scheduler=sched)
    timesteps, remaining = FluxImg2ImgPipeline.get_timesteps(fake_pipe, steps, strength, "cpu")

    sigmas = sigmas_from_config(FLUX_DEV_SCHEDULER, steps, image_seq_len=1024)
    start = img2img_start(sigmas, strength)
    assert steps - start == remaining
    assert torch.equal(timesteps_from_sigmas(sigmas)[start], timesteps[0])

    gen = torch.Generator("cpu").manual_seed(0)
    x0 = torch.randn(2, 16, 8, 8, generator=gen).to(dtype)
    noise = torch.randn(2, 16, 8, 8, generator=gen).to(dtype)
    expected = sched.scale_noise(x0, timesteps[:1].repeat(2), noise)
    assert torch.equal(scale_noise(x0, noise, sigmas[start]), expected)


def test_img2img_start_errors() -> None:
    sigmas = flow_sigmas(4)
    with pytest.raises(ValueError, match="strength must be in"):
        img2img_start(sigmas, 1.5)
    assert img2img_start(sigmas, 0.1) == 3  # int(4 - 0.4): one step is still run, as in diffusers
    with pytest.raises(ValueError, match="leaves 0 steps"):
        img2img_start(sigmas, 0.0)


def test_scheduler_config_from_dict() -> None:
    dev = SchedulerConfig.from_dict(FLUX_DEV_JSON)
    assert dev == FLUX_DEV_SCHEDULER
    assert dev.ignored_keys == ("_diffusers_version",)
    assert SchedulerConfig.from_dict(QWEN_IMAGE_JSON) == QWEN_IMAGE_SCHEDULER
    assert scheduler_preset("flux-dev") is FLUX_DEV_SCHEDULER
    # round trip through diffusers keeps every value
    sched = FlowMatchEulerDiscreteScheduler.from_config(dev.to_dict())
    assert (
        SchedulerConfig.from_dict({"_class_name": "FlowMatchEulerDiscreteScheduler", **sched.config}) == dev
    )


def test_scheduler_config_errors() -> None:
    with pytest.raises(ValueError, match="FlowMatchEulerDiscreteScheduler") as info:
        SchedulerConfig.from_dict({**FLUX_DEV_JSON, "_class_name": "UniPCMultistepScheduler"})
    assert "UniPCMultistepScheduler" in str(info.value)
    assert all(name in str(info.value) for name in SUPPORTED_SCHEDULER_CLASSES)
    with pytest.raises(ValueError, match="_class_name"):
        SchedulerConfig.from_dict({k: v for k, v in FLUX_DEV_JSON.items() if k != "_class_name"})
    with pytest.raises(ValueError, match="stochastic_sampling"):
        SchedulerConfig.from_dict({**FLUX_DEV_JSON, "stochastic_sampling": True})
    with pytest.raises(ValueError, match="use_karras_sigmas"):
        SchedulerConfig.from_dict({**FLUX_DEV_JSON, "use_karras_sigmas": True})
    with pytest.raises(ValueError, match="time_shift_type"):
        SchedulerConfig.from_dict({**FLUX_DEV_JSON, "time_shift_type": "cosine"})
    with pytest.raises(ValueError, match="base_image_seq_len"):
        SchedulerConfig.from_dict({**FLUX_DEV_JSON, "base_image_seq_len": "256"})
    with pytest.raises(KeyError, match="flux-dev"):
        scheduler_preset("flux-pro")
