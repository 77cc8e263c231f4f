"""sample_unipc and Wan's schedules against diffusers' UniPCMultistepScheduler / FlowMatchEulerDiscreteScheduler
step loops, run as WanPipeline runs them (set_timesteps(steps), integer or float timesteps to the model)."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler, UniPCMultistepScheduler

from services.denoiser.sampling import (
    FLUX_DEV_SCHEDULER,
    WAN21_UNIPC_720P_SCHEDULER,
    WAN21_UNIPC_SCHEDULER,
    WAN22_I2V_EULER_SCHEDULER,
    WAN22_T2V_EULER_SCHEDULER,
    WAN22_T2V_UNIPC_SCHEDULER,
    SamplingCancelled,
    SchedulerConfig,
    sample_euler,
    sample_unipc,
    scheduler_preset,
    sigmas_from_config,
    timesteps_from_config,
    unipc_options,
)

# Wan-AI/Wan2.1-T2V-1.3B-Diffusers scheduler/scheduler_config.json, as published.
WAN21_JSON = {
    "_class_name": "UniPCMultistepScheduler",
    "_diffusers_version": "0.33.0.dev0",
    "beta_end": 0.02,
    "beta_schedule": "linear",
    "beta_start": 0.0001,
    "disable_corrector": [],
    "dynamic_thresholding_ratio": 0.995,
    "final_sigmas_type": "zero",
    "flow_shift": 3.0,
    "lower_order_final": True,
    "num_train_timesteps": 1000,
    "predict_x0": True,
    "prediction_type": "flow_prediction",
    "rescale_betas_zero_snr": False,
    "sample_max_value": 1.0,
    "solver_order": 2,
    "solver_p": None,
    "solver_type": "bh2",
    "steps_offset": 0,
    "thresholding": False,
    "timestep_spacing": "linspace",
    "trained_betas": None,
    "use_beta_sigmas": False,
    "use_exponential_sigmas": False,
    "use_flow_sigmas": True,
    "use_karras_sigmas": False,
}
SHAPE = (2, 8, 3, 4, 4)  # a tiny Wan latent (B, C, F, H, W)
TOL = 1e-5


class ToyWan:
    """A deterministic stand-in for the Wan transformer: a fixed random channel mix of x, a tanh, and a
    timestep-dependent bias. It takes the transformer's own `timestep` input (int64 for UniPC, float for
    FlowMatchEuler), so both loops must feed it exactly diffusers' timesteps."""

    def __init__(self) -> None:
        gen = torch.Generator("cpu").manual_seed(1)
        self.w = torch.randn(SHAPE[1], SHAPE[1], generator=gen) / SHAPE[1] ** 0.5
        self.b = torch.randn(SHAPE[1], generator=gen)
        self.calls = 0

    def __call__(self, x: torch.Tensor, timestep: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        t = timestep.to(x.dtype)[:, None, None, None, None] / 1000
        return (
            torch.einsum("bcfhw,cd->bdfhw", x, self.w) + 0.5 * torch.tanh(x) + t * self.b[:, None, None, None]
        )


def wan_adapter(transformer: ToyWan, config: SchedulerConfig, steps: int):
    """Our `model(x, sigma)` over the Wan input convention: the timestep of each sigma, from the schedule."""
    sigmas = sigmas_from_config(config, steps, grid="scheduler")
    timesteps = timesteps_from_config(config, steps, grid="scheduler")  # int64 (UniPC) or float32
    index = {s: i for i, s in enumerate(sigmas[:-1].tolist())}

    def model(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        return transformer(x, timesteps[index[float(sigma)]].expand(x.shape[0]))

    return model, sigmas


def diffusers_loop(scheduler, transformer: ToyWan, x: torch.Tensor, steps: int) -> list[torch.Tensor]:
    """WanPipeline's denoising loop minus CFG: every `prev_sample`."""
    scheduler.set_timesteps(steps)
    out = []
    for t in scheduler.timesteps:
        noise_pred = transformer(x, t.expand(x.shape[0]))
        x = scheduler.step(noise_pred, t, x, return_dict=False)[0]
        out.append(x)
    return out


def ours(config: SchedulerConfig, x: torch.Tensor, steps: int, **overrides) -> list[torch.Tensor]:
    model, sigmas = wan_adapter(ToyWan(), config, steps)
    seen: list[torch.Tensor] = []
    sampler = sample_unipc if config.class_name == "UniPCMultistepScheduler" else sample_euler
    options = unipc_options(config) if sampler is sample_unipc else {}
    final = sampler(
        model, x, sigmas, callback=lambda info: seen.append(info["x"]), **{**options, **overrides}
    )
    assert seen[-1] is final and len(seen) == steps
    return seen


def noise() -> torch.Tensor:
    return torch.randn(SHAPE, generator=torch.Generator("cpu").manual_seed(0))


def max_diff(a: list[torch.Tensor], b: list[torch.Tensor]) -> float:
    assert len(a) == len(b)
    return max((x.double() - y.double()).abs().max().item() for x, y in zip(a, b, strict=True))


def unipc_config(flow_shift: float, **kw) -> SchedulerConfig:
    return replace(WAN21_UNIPC_SCHEDULER, flow_shift=flow_shift, **kw)


# --- schedules ------------------------------------------------------------------------------------


@pytest.mark.parametrize("steps", [1, 2, 3, 5, 10, 30, 50])
@pytest.mark.parametrize("flow_shift", [1.0, 3.0, 5.0, 12.0])
def test_unipc_sigmas_and_timesteps_equal_diffusers(steps: int, flow_shift: float) -> None:
    sched = UniPCMultistepScheduler.from_config({**WAN21_JSON, "flow_shift": flow_shift})
    sched.set_timesteps(steps)
    config = unipc_config(flow_shift)
    sigmas, timesteps = sigmas_from_config(config, steps), timesteps_from_config(config, steps)
    assert sigmas.dtype == torch.float32 and timesteps.dtype == torch.int64
    assert torch.equal(sigmas, sched.sigmas)
    assert torch.equal(timesteps, sched.timesteps)


@pytest.mark.parametrize("steps", [1, 2, 5, 10, 30, 50])
@pytest.mark.parametrize("shift", [1.0, 3.0, 5.0, 12.0])
def test_flow_match_scheduler_grid_equals_diffusers(steps: int, shift: float) -> None:
    """WanPipeline with FlowMatchEulerDiscreteScheduler(shift=...) calls set_timesteps(steps) alone."""
    sched = FlowMatchEulerDiscreteScheduler(shift=shift)
    sched.set_timesteps(steps)
    config = SchedulerConfig(shift=shift)
    assert torch.equal(sigmas_from_config(config, steps, grid="scheduler"), sched.sigmas)
    assert torch.equal(timesteps_from_config(config, steps, grid="scheduler"), sched.timesteps)
    # the FLUX grid (the FlowMatchEuler default) is a different schedule
    if steps > 2 and shift > 1:
        assert not torch.equal(sigmas_from_config(config, steps), sched.sigmas)


def test_wan_config_parses_and_round_trips() -> None:
    config = SchedulerConfig.from_dict(WAN21_JSON)
    assert config == WAN21_UNIPC_SCHEDULER == scheduler_preset("wan2.1-unipc")
    assert {"beta_start", "timestep_spacing", "steps_offset", "solver_p", "_diffusers_version"} <= set(
        config.ignored_keys
    )
    sched = UniPCMultistepScheduler.from_config(config.to_dict())
    assert SchedulerConfig.from_dict({"_class_name": "UniPCMultistepScheduler", **sched.config}) == config
    assert scheduler_preset("wan2.1-unipc-720p") == WAN21_UNIPC_720P_SCHEDULER
    assert WAN21_UNIPC_720P_SCHEDULER.flow_shift == 5.0 and WAN22_T2V_UNIPC_SCHEDULER.flow_shift == 12.0
    euler = FlowMatchEulerDiscreteScheduler(shift=12.0).config
    assert SchedulerConfig.from_dict({"_class_name": "FlowMatchEulerDiscreteScheduler", **euler}) == (
        scheduler_preset("wan2.2-t2v-euler")
    )


# --- the sampling loop ----------------------------------------------------------------------------


@pytest.mark.parametrize("steps", [2, 5, 10, 30])
@pytest.mark.parametrize("flow_shift", [3.0, 5.0, 12.0])
def test_unipc_matches_diffusers_wan_loop(steps: int, flow_shift: float) -> None:
    config = unipc_config(flow_shift)
    ref = diffusers_loop(UniPCMultistepScheduler.from_config(config.to_dict()), ToyWan(), noise(), steps)
    got = ours(config, noise(), steps)
    assert max_diff(got, ref) <= TOL  # every intermediate sample and the final one


@pytest.mark.parametrize(
    "overrides",
    [{"solver_order": 1}, {"solver_order": 3}, {"disable_corrector": (0, 2)}, {"solver_type": "bh1"}],
    ids=["order1", "order3", "no-corrector-0-2", "bh1"],
)
def test_unipc_variants_match_diffusers(overrides: dict) -> None:
    steps = 10
    config = unipc_config(5.0, **overrides)
    ref = diffusers_loop(UniPCMultistepScheduler.from_config(config.to_dict()), ToyWan(), noise(), steps)
    got = ours(config, noise(), steps)
    if config.solver_type == "bh1":
        # diffusers' bh1 last step to sigma 0 multiplies B(h) = -inf by a zero difference term and returns NaN;
        # ours drops the empty term and lands on the x0 estimate, as bh2 does
        assert torch.isnan(ref[-1]).all() and torch.isfinite(got[-1]).all()
        ref, got = ref[:-1], got[:-1]
    assert max_diff(got, ref) <= TOL


def test_history_matters() -> None:
    """The toy model makes multistep terms count: orders 1, 2 and 3 and Euler all end apart."""
    steps = 10
    ends = [ours(unipc_config(3.0, solver_order=k), noise(), steps)[-1] for k in (1, 2, 3)]
    model, sigmas = wan_adapter(ToyWan(), unipc_config(3.0), steps)
    ends.append(sample_euler(model, noise(), sigmas))
    for i in range(len(ends)):
        for j in range(i):
            assert (ends[i] - ends[j]).abs().max().item() > 1e-3


@pytest.mark.parametrize("steps", [2, 5, 10, 30])
@pytest.mark.parametrize("config", [WAN22_I2V_EULER_SCHEDULER, WAN22_T2V_EULER_SCHEDULER], ids=["5", "12"])
def test_euler_matches_diffusers_wan_flow_match_loop(steps: int, config: SchedulerConfig) -> None:
    sched = FlowMatchEulerDiscreteScheduler.from_config(config.to_dict())
    ref = diffusers_loop(sched, ToyWan(), noise(), steps)
    got = ours(config, noise(), steps)
    assert max_diff(got, ref) <= TOL


def test_callback_extra_args_and_cancellation() -> None:
    config, steps = WAN21_UNIPC_SCHEDULER, 6
    sigmas = sigmas_from_config(config, steps)
    seen: list[dict] = []

    def model(x: torch.Tensor, sigma: torch.Tensor, *, scale: float) -> torch.Tensor:
        assert sigma.ndim == 0 and sigma.dtype == torch.float32 and scale == 2.0
        return scale * x

    x = noise()
    out = sample_unipc(model, x, sigmas, extra_args={"scale": 2.0}, callback=seen.append)
    assert [s["i"] for s in seen] == list(range(steps)) and all(s["total"] == steps for s in seen)
    assert [s["sigma"] for s in seen] == sigmas[:-1].tolist()
    assert [s["sigma_next"] for s in seen] == sigmas[1:].tolist()
    assert seen[-1]["x"] is out
    # the last step is first order to sigma 0: it lands on the x0 estimate x - sigma v
    assert torch.equal(out, seen[-1]["denoised"])

    transformer = ToyWan()
    wan_model, _ = wan_adapter(transformer, config, steps)
    seen.clear()
    with pytest.raises(SamplingCancelled) as info:
        sample_unipc(wan_model, x, sigmas, callback=seen.append, is_cancelled=lambda: len(seen) >= 3)
    assert (info.value.step, info.value.total) == (3, steps) and transformer.calls == 3


def test_input_errors() -> None:
    x = torch.zeros(1, 4)

    def model(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        return x

    with pytest.raises(ValueError, match=r"sigmas in \(0, 1\)"):
        sample_unipc(model, x, torch.tensor([1.0, 0.5, 0.0]))  # log(1 - 1)
    with pytest.raises(ValueError, match="strictly decreasing"):
        sample_unipc(model, x, torch.tensor([0.9, 0.9, 0.0]))
    with pytest.raises(ValueError, match="lower_order_final"):
        sample_unipc(model, x, torch.tensor([0.9, 0.5, 0.0]), lower_order_final=False)
    with pytest.raises(ValueError, match="order must be"):
        sample_unipc(model, x, torch.tensor([0.9, 0.0]), order=0)
    with pytest.raises(ValueError, match="solver_type"):
        sample_unipc(model, x, torch.tensor([0.9, 0.0]), solver_type="bh3")
    with pytest.raises(ValueError, match="needs a UniPCMultistepScheduler config"):
        unipc_options(FLUX_DEV_SCHEDULER)


@pytest.mark.parametrize(
    ("changes", "words"),
    [
        ({"use_flow_sigmas": False}, ["use_flow_sigmas=False", "FlowMatchEulerDiscreteScheduler"]),
        ({"prediction_type": "epsilon"}, ["prediction_type='epsilon'"]),
        ({"thresholding": True, "predict_x0": False}, ["thresholding=True", "predict_x0=False"]),
        ({"final_sigmas_type": "sigma_min"}, ["final_sigmas_type='sigma_min'"]),
        ({"lower_order_final": False}, ["lower_order_final=False"]),
        ({"solver_p": "DDIMScheduler"}, ["solver_p"]),
        ({"use_karras_sigmas": True}, ["use_karras_sigmas"]),
        ({"disable_corrector": 3}, ["disable_corrector"]),
    ],
)
def test_unipc_config_errors(changes: dict, words: list[str]) -> None:
    with pytest.raises(ValueError) as info:
        SchedulerConfig.from_dict({**WAN21_JSON, **changes})
    assert all(w in str(info.value) for w in words), str(info.value)


def test_config_class_mixups() -> None:
    with pytest.raises(ValueError, match=r"has no option flow_shift=5\.0"):
        SchedulerConfig(shift=3.0, flow_shift=5.0)
    with pytest.raises(ValueError, match=r"has no option shift=3\.0"):
        replace(WAN21_UNIPC_SCHEDULER, shift=3.0)
    with pytest.raises(ValueError, match="grid='scheduler'"):
        sigmas_from_config(WAN21_UNIPC_SCHEDULER, 4, grid="linspace")
    with pytest.raises(ValueError, match="static shift only"):
        sigmas_from_config(FLUX_DEV_SCHEDULER, 4, grid="scheduler")
    with pytest.raises(ValueError, match="grid must be one of"):
        sigmas_from_config(WAN21_UNIPC_SCHEDULER, 4, grid="karras")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="no dynamic shifting"):
        sigmas_from_config(WAN21_UNIPC_SCHEDULER, 4, mu=1.0)
    # a FlowMatchEuler dict keeps ignoring UniPC keys, as diffusers does
    assert SchedulerConfig.from_dict(
        {"_class_name": "FlowMatchEulerDiscreteScheduler", "shift": 5.0, "flow_shift": 3.0}
    ) == replace(WAN22_I2V_EULER_SCHEDULER)
    with pytest.raises(KeyError, match=r"wan2\.1-unipc"):
        scheduler_preset("wan3-unipc")
