"""The one sampling loop: noise from the seed, the schedule, img2img, guidance, LoRA, progress, cancellation.

A family supplies an `Adapter` (latent geometry, packing, conditioning, its model call and schedule); the loop
is the same for every flow-matching family:

    noise = randn(seed)                          # DESIGN §4: CPU generator, float32, then cast
    sigmas = adapter.sigmas(inputs)              # (steps + 1,) from the model's scheduler config
    x = pack(noise)  or  pack(scale_noise(init, noise, sigmas[start]))   # t2i / img2img (SDEdit)
    x = euler(v, x, sigmas)  with  v = cfg(v(x | positive), v(x | negative), cfg_scale)
    return unpack(x)
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
from services.denoiser.sampling.schedules import img2img_start, scale_noise
from services.denoiser.sampling.solvers import SamplingCancelled, sample_euler

OnStep = Callable[[int, int], None]
SOLVERS = ("", "euler", "flow_euler")


class Adapter(Protocol):
    """What a family tells the loop. Tensors: `noise_shape` is the unpacked latent (B, C, h, w)."""

    device: torch.device
    dtype: torch.dtype
    lora: Any  # a LoraManager: `.apply(loras, mode)` context manager
    residency: Any  # a services.common.memory.Residency: `.active()` while the loop runs (memory modes)
    batched_cfg: bool  # true CFG as `guided_velocity` (one forward of 2B) instead of two `velocity` calls

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
    if inputs.solver not in SOLVERS:
        raise InvalidArgument(f"sampler.solver {inputs.solver!r} is not available; use one of {SOLVERS[1:]}")
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
        start = img2img_start(sigmas, 1.0 if inputs.strength is None else inputs.strength)
        sigmas = sigmas[start:]
        latents = scale_noise(init, noise, sigmas[0])
    else:
        latents = noise
    x = adapter.pack(latents)
    del noise, latents

    positive = adapter.conditioning(inputs.positive, inputs, batch)
    guided = inputs.cfg_scale is not None and inputs.cfg_scale > 1.0 and bool(inputs.negative)
    negative = adapter.conditioning(inputs.negative, inputs, batch) if guided else None

    def model(x: Tensor, sigma: Tensor) -> Tensor:
        if negative is not None and adapter.batched_cfg:
            return adapter.guided_velocity(x, sigma, positive, negative, inputs.cfg_scale)
        v = adapter.velocity(x, sigma, positive)
        if negative is None:
            return v
        return cfg(v, adapter.velocity(x, sigma, negative), inputs.cfg_scale)  # two calls, as diffusers

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
            x = sample_euler(model, x, sigmas, callback=callback, is_cancelled=is_cancelled)
    except SamplingCancelled as e:
        raise Cancelled(f"denoise cancelled at step {e.step} of {e.total}") from None
    return {"latents": adapter.unpack(x, inputs).float(), "steps_run": total}
