"""The one sampling loop: noise from the seed, the schedule, img2img, guidance, LoRA, progress, cancellation.

A family supplies an `Adapter` (latent geometry, packing, conditioning, its model call and schedule); the loop
is the same for every flow-matching family:

    noise = randn(seed)                          # DESIGN §4: CPU generator, float32, then cast
    sigmas = adapter.sigmas(inputs)              # (steps + 1,) from the model's scheduler config
    x = pack(noise)  or  pack(scale_noise(init, noise, sigmas[start]))   # t2i / img2img (SDEdit)
    x = solve(v, x, sigmas)  with  v = cfg(v(x | positive), v(x | negative), cfg_scale at sigma)
    return unpack(x)

`solve` is flow-matching Euler or UniPC (`sampler.solver`; empty: the class of the model's scheduler config).
Optional adapter hooks (FLUX has none; Wan 2.2 A14B needs both):
- `cfg_scale_at(sigma, cond, inputs) -> float`: the CFG scale of the step at `sigma` (a second expert's
  `cfg_scale_2`); default `inputs.cfg_scale`. Whether CFG runs at all is decided once, from `inputs.cfg_scale`,
  as diffusers decides it from `guidance_scale`.
- `img2img_start(sigmas, strength) -> int`: the first sigma of img2img / v2v; default `img2img_start`
  (FluxImg2ImgPipeline's rounding; Wan's video-to-video pipeline rounds differently).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, Protocol

import torch
from torch import Tensor

from protos import common_pb2
from services.common.errors import Cancelled, InvalidArgument
from services.denoiser.inputs import DenoiseInputs
from services.denoiser.sampling.guidance import cfg
from services.denoiser.sampling.scheduler_config import UNIPC, WAN21_UNIPC_SCHEDULER, SchedulerConfig
from services.denoiser.sampling.schedules import img2img_start, scale_noise
from services.denoiser.sampling.solvers import SamplingCancelled, sample_euler
from services.denoiser.sampling.unipc import sample_unipc, unipc_options

OnStep = Callable[[int, int], None]
SOLVERS = ("", "euler", "flow_euler", "unipc")  # "" = the model's scheduler class; flow_euler = euler


class Adapter(Protocol):
    """What a family tells the loop. Tensors: `noise_shape` is the unpacked latent (B, C, h, w)."""

    device: torch.device
    dtype: torch.dtype
    lora: Any  # a LoraManager: `.apply(loras, mode)` context manager
    residency: Any  # a services.common.memory.Residency: `.active()` while the loop runs (memory modes)
    batched_cfg: bool  # true CFG as `guided_velocity` (one forward of 2B) instead of two `velocity` calls
    scheduler: SchedulerConfig  # the model's scheduler config: its class is the default solver

    def check(self, inputs: DenoiseInputs) -> None: ...
    def noise_shape(self, inputs: DenoiseInputs, batch: int) -> tuple[int, ...]: ...
    def sigmas(self, inputs: DenoiseInputs) -> Tensor: ...
    def pack(self, latents: Tensor) -> Tensor: ...
    def unpack(self, x: Tensor, inputs: DenoiseInputs) -> Tensor: ...
    def conditioning(
        self, embeds: Mapping[str, Tensor], inputs: DenoiseInputs, batch: int
    ) -> dict[str, Any]: ...
    def velocity(self, x: Tensor, sigma: Tensor, cond: Mapping[str, Any]) -> Tensor: ...
    def guided_velocity(
        self, x: Tensor, sigma: Tensor, positive: Mapping[str, Any], negative: Mapping[str, Any], scale: float
    ) -> Tensor: ...


def prompt_batch(positive: Mapping[str, Tensor]) -> int:
    """The number of prompts: the leading dimension every positive embedding shares."""
    sizes = {k: int(t.shape[0]) for k, t in positive.items() if t.ndim >= 1}
    if len(set(sizes.values())) != 1:
        raise InvalidArgument(f"positive embeddings disagree on the batch size: {sizes}")
    return next(iter(sizes.values()))


def solver_name(requested: str, scheduler: SchedulerConfig) -> str:
    """The solver to run ("euler" or "unipc"): the request's `sampler.solver`, or when it is empty the class of
    the model's scheduler config (UniPCMultistepScheduler: "unipc")."""
    if requested not in SOLVERS:
        raise InvalidArgument(f"sampler.solver {requested!r} is not available; use one of {SOLVERS[1:]}")
    if requested == "":
        return "unipc" if scheduler.class_name == UNIPC else "euler"
    return "euler" if requested == "flow_euler" else requested


def _solve(
    solver: str,
    scheduler: SchedulerConfig,
    model: Callable[[Tensor, Tensor], Tensor],
    x: Tensor,
    sigmas: Tensor,
    callback: Callable[[dict], None],
    is_cancelled: Callable[[], bool],
) -> Tensor:
    if solver == "euler":
        return sample_euler(model, x, sigmas, callback=callback, is_cancelled=is_cancelled)
    steps = sigmas[:-1]
    if not (bool((steps > 0).all()) and bool((steps < 1).all())):
        raise InvalidArgument(
            f"sampler.solver 'unipc' needs sigmas inside (0, 1) (a UniPC flow schedule); this model's schedule "
            f"runs {steps.tolist()}: use 'euler'"
        )
    # the options of the model's UniPC config, else diffusers' defaults (order 2, bh2, lower order at the end)
    options = unipc_options(scheduler if scheduler.class_name == UNIPC else WAN21_UNIPC_SCHEDULER)
    return sample_unipc(model, x, sigmas, callback=callback, is_cancelled=is_cancelled, **options)


def initial_noise(shape: tuple[int, ...], seed: int, device: torch.device, dtype: torch.dtype) -> Tensor:
    """DESIGN §4: `torch.Generator("cpu").manual_seed(seed)`, randn float32 in the latent shape, then cast."""
    generator = torch.Generator("cpu").manual_seed(seed)
    return torch.randn(shape, generator=generator, dtype=torch.float32).to(device=device, dtype=dtype)


def _lora_mode(mode: int) -> str:
    return "fused" if mode == common_pb2.LORA_MODE_FUSED else "hot"


def denoise(
    adapter: Adapter, inputs: DenoiseInputs, on_step: OnStep, is_cancelled: Callable[[], bool]
) -> dict:
    """Run the whole loop; returns {"latents": (B, C, h, w) normalised latents, "steps_run": n}."""
    solver = solver_name(inputs.solver, adapter.scheduler)
    adapter.check(inputs)
    batch = prompt_batch(inputs.positive) * inputs.batch_size
    sigmas = adapter.sigmas(inputs)
    noise = initial_noise(adapter.noise_shape(inputs, batch), inputs.seed, adapter.device, adapter.dtype)
    if inputs.init_latents is not None:
        init = inputs.init_latents.to(adapter.device, adapter.dtype)
        if init.shape[1:] != noise.shape[1:] or init.shape[0] not in (1, batch):
            raise InvalidArgument(
                f"init_latents: shape {list(init.shape)} does not fit the request's latents {list(noise.shape)}"
            )
        init = init.expand_as(noise)
        start_at = getattr(adapter, "img2img_start", img2img_start)
        start = start_at(sigmas, 1.0 if inputs.strength is None else inputs.strength)
        sigmas = sigmas[start:]
        latents = scale_noise(init, noise, sigmas[0])
    else:
        latents = noise
    x = adapter.pack(latents)
    del noise, latents

    positive = adapter.conditioning(inputs.positive, inputs, batch)
    guided = inputs.cfg_scale is not None and inputs.cfg_scale > 1.0 and bool(inputs.negative)
    negative = adapter.conditioning(inputs.negative, inputs, batch) if guided else None

    cfg_scale_at = getattr(adapter, "cfg_scale_at", None)

    def model(x: Tensor, sigma: Tensor) -> Tensor:
        if negative is None:
            return adapter.velocity(x, sigma, positive)
        scale = inputs.cfg_scale if cfg_scale_at is None else cfg_scale_at(sigma, positive, inputs)
        if adapter.batched_cfg:
            return adapter.guided_velocity(x, sigma, positive, negative, scale)
        v = adapter.velocity(x, sigma, positive)
        return cfg(v, adapter.velocity(x, sigma, negative), scale)  # two calls, as diffusers

    total = sigmas.numel() - 1

    def callback(state: dict) -> None:
        on_step(state["i"] + 1, total)

    loras = [(Path(spec), scale) for spec, scale in inputs.loras]
    try:
        with (
            torch.inference_mode(),
            adapter.residency.active(),
            adapter.lora.apply(loras, mode=_lora_mode(inputs.lora_mode)),
        ):
            x = _solve(solver, adapter.scheduler, model, x, sigmas, callback, is_cancelled)
    except SamplingCancelled as e:
        raise Cancelled(f"denoise cancelled at step {e.step} of {e.total}") from None
    return {"latents": adapter.unpack(x, inputs).float(), "steps_run": total}
