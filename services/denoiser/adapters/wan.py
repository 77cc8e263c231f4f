"""Wan 2.1 / 2.2 in the sampling loop: loading, latent geometry, conditioning, the expert switch and the model call.

Matches the denoising loops of diffusers' WanPipeline (T2V, and TI2V-5B text-to-video), WanImageToVideoPipeline
(I2V, FLF2V, TI2V-5B image-to-video) and WanVideoToVideoPipeline (v2v) step for step:
- latents (B, z, (F - 1) // 4 + 1, H / s, W / s), float32 (diffusers keeps them float32; the model runs in its
  own dtype): z 16 and s 8 for the 2.1 VAE, z 48 and s 16 for the 2.2 VAE (TI2V-5B, told by out_dim 48);
- timesteps are the scheduler's (int64 for UniPC, float32 for flow-match Euler), `(B,)`, or `(B, L)` per token
  with `expand_timesteps` (TI2V-5B): 0 on the first latent frame's tokens when it is the given image;
- two experts (Wan 2.2 A14B): `transformer` while `t >= boundary_ratio * num_train_timesteps`, then
  `transformer_2`, with `cfg_scale` and `cfg_scale_2` (default `cfg_scale`); CFG is two calls, as diffusers.

What a request sends (normalised latents are `(z - mean) / std` per channel, as the VAE service returns them):
- every task: positive (and, with `cfg_scale > 1`, negative) "prompt_embeds" (P, L, text_dim): umT5 states,
  zero-padded to 512 tokens as Wan's pipelines pad them;
- i2v / flf2v (in_dim 36 models): `reference_latents[0]`, the VAE latents (1 or B, z, F', H/s, W/s) of the
  condition video, which is the first image followed by F - 1 black (zero) frames, or for flf2v the first image,
  F - 2 zero frames and the last image, all in [-1, 1]. `mask` (F,) says which pixel frames the condition
  video holds, 1 = generate, 0 = given; unset = only the first frame is given (i2v); flf2v sends
  [0, 1, ..., 1, 0]. Wan 2.1 I2V / FLF2V models (image_dim) also need `image_embeds["image_embeds"]`: CLIP's
  penultimate states (1 or B, 257, image_dim), for flf2v the first and the last image's (2 or 2B, 257, D) as the
  image encoder returns them, or (B, 514, D);
- ti2v image-to-video: `reference_latents[0]`, the VAE latents of the first image (1 or B, 48, 1, H/16, W/16),
  or 4-D (an image); without it TI2V-5B makes video from text;
- v2v: `init_latents` (B, z, F', H/s, W/s), the VAE latents of the input video, and `strength`.

LoRAs (`services.denoiser.convert.wan_lora` layouts), hot or fused, apply to every expert (`ExpertLoras`).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from services.common.errors import InvalidArgument
from services.common.memory import RESIDENT, Residency, is_float8
from services.denoiser import loop
from services.denoiser.convert.wan_lora import wan_lora_deltas
from services.denoiser.inputs import DenoiseInputs
from services.denoiser.loop import OnStep
from services.denoiser.lora import LoraManager, LoraMode
from services.denoiser.models.wan import WanDiT, WanParams
from services.denoiser.sampling.guidance import cfg
from services.denoiser.sampling.scheduler_config import (
    UNIPC,
    WAN21_UNIPC_SCHEDULER,
    SchedulerConfig,
    sigmas_from_config,
    timesteps_from_config,
)

TEMPORAL = 4  # both Wan VAEs: 4 frames per latent frame after the first
SPATIAL = {16: 8, 48: 16}  # latent channels -> the VAE's spatial factor (2.1 VAE, 2.2 VAE)
MASK_CHANNELS = TEMPORAL  # the I2V mask: one channel per pixel frame of a latent frame


def frame_mask(given: Tensor, latent_frames: int) -> Tensor:
    """(F,) pixel frames, 1 = given -> (4, F') the I2V mask channels: the first frame counted four times, then
    latent frame f's channel c is pixel frame 4 (f - 1) + 1 + c (WanImageToVideoPipeline.prepare_latents)."""
    frames = torch.cat([given[:1].repeat(TEMPORAL), given[1:]])  # (4 F',)
    return frames.view(latent_frames, TEMPORAL).T  # (4, F')


def _per_sample(t: Tensor, batch: int, name: str) -> Tensor:
    """(n, ...) -> (batch, ...), each of the n repeated batch / n times in a row (as prompts are)."""
    if t.shape[0] == 0 or batch % t.shape[0]:
        raise InvalidArgument(f"{name}: {t.shape[0]} samples do not divide the batch of {batch}")
    return t.repeat_interleave(batch // t.shape[0], dim=0)


class ExpertLoras:
    """A request's LoRAs on every expert: one `LoraManager` per expert model, entered in expert order (so two
    requests never wait on each other's locks crosswise) and left in reverse.

    Wan 2.2 A14B: the same files apply to the high-noise and the low-noise expert alike (the experts share one
    architecture and module names). diffusers' `WanPipeline.load_lora_weights` loads into `transformer` only,
    and into `transformer_2` when called again with `load_into_transformer_2=True`; a request here is both calls.
    """

    def __init__(self, managers: Sequence[LoraManager]) -> None:
        self.managers = list(managers)

    @contextlib.contextmanager
    def apply(
        self, loras: Sequence[tuple[Path, float]], mode: LoraMode = "hot", *, timeout: float | None = None
    ) -> Iterator[None]:
        with contextlib.ExitStack() as stack:
            for manager in self.managers:
                stack.enter_context(manager.apply(loras, mode, timeout=timeout))
            yield


class WanAdapter:
    def __init__(
        self,
        models: Sequence[WanDiT],
        scheduler: SchedulerConfig,
        device: torch.device,
        source: str,
        residency: Residency | None = None,
        *,
        boundary_ratio: float | None = None,
        expand_timesteps: bool = False,
    ) -> None:
        """`models`: one, or the high-noise and the low-noise expert (then `boundary_ratio` is required)."""
        if len(models) not in (1, 2) or (len(models) == 2) != (boundary_ratio is not None):
            raise ValueError(f"{source}: {len(models)} experts with boundary_ratio={boundary_ratio}")
        self.models = [m.eval() for m in models]
        self.model = self.models[0]
        self.params: WanParams = self.model.params
        if self.params.out_dim not in SPATIAL:
            raise InvalidArgument(
                f"{source}: {self.params.out_dim} latent channels; Wan's VAEs have {list(SPATIAL)}"
            )
        self.scheduler = scheduler
        self.device = device
        # the latents' dtype (diffusers keeps them float32); the model computes in its own `compute_dtype`
        self.dtype = torch.float32
        self.compute_dtype = self.model.patch_embedding.weight.dtype
        self.source = source
        self.residency = residency or Residency(nn.ModuleList(self.models), device, RESIDENT)
        self.boundary = None if boundary_ratio is None else boundary_ratio * scheduler.num_train_timesteps
        self.expand_timesteps = expand_timesteps
        self.batched_cfg = False  # diffusers' Wan pipelines make two calls
        self.lora = ExpertLoras([self._lora_manager(m) for m in self.models])
        self.spatial = SPATIAL[self.params.out_dim]
        self.multiple = self.spatial * self.params.patch_size[1]
        self.i2v = self.params.in_dim == 2 * self.params.out_dim + MASK_CHANNELS  # the 36-channel models

    def _lora_manager(self, model: WanDiT) -> LoraManager:
        """Hot deltas are kept on the device in the compute dtype (cast to float32 on the way for the modules kept
        in float32, see `keeps_float32`); fused mode needs the weights resident and not in float8."""
        plan = self.residency.plan
        fused_refusal = None
        if plan.mode == "sequential":
            fused_refusal = "memory mode sequential streams the weights: use lora_mode hot"
        elif plan.weight_dtype is not None and is_float8(plan.weight_dtype):
            fused_refusal = "float8 weights cannot take a LoRA in place: use lora_mode hot"
        return LoraManager(
            model,
            convert=wan_lora_deltas,
            compute_dtype=self.compute_dtype,
            device=self.device,
            fused_refusal=fused_refusal,
        )

    # -- geometry and schedule -----------------------------------------------------------------------
    def check(self, inputs: DenoiseInputs) -> None:
        frames = max(inputs.num_frames, 1)  # 0 = an image: one frame
        if (frames - 1) % TEMPORAL:
            raise InvalidArgument(f"num_frames={inputs.num_frames}: Wan needs 4k + 1 frames (1, 5, ..., 81)")
        for name in ("width", "height"):
            value = getattr(inputs, name)
            if value % self.multiple:
                raise InvalidArgument(f"{name}={value}: this Wan model needs a multiple of {self.multiple}")
        if inputs.guidance is not None:
            raise InvalidArgument(f"guidance={inputs.guidance}: Wan has no embedded guidance; use cfg_scale")
        if inputs.cfg_scale_2 is not None and self.boundary is None:
            raise InvalidArgument(
                f"cfg_scale_2={inputs.cfg_scale_2}: only two-expert models (Wan 2.2 A14B) take it; {self.source} "
                "has one"
            )
        if inputs.cfg_scale is not None and inputs.cfg_scale > 1 and not inputs.negative:
            raise InvalidArgument(f"cfg_scale={inputs.cfg_scale} needs the negative prompt's embeddings")
        if inputs.sigmas:
            raise InvalidArgument("sampler.sigmas is not supported for Wan: use steps and sampler.shift")

    def latent_size(self, inputs: DenoiseInputs) -> tuple[int, int, int]:
        frames = max(inputs.num_frames, 1)
        return (frames - 1) // TEMPORAL + 1, inputs.height // self.spatial, inputs.width // self.spatial

    def noise_shape(self, inputs: DenoiseInputs, batch: int) -> tuple[int, ...]:
        return (batch, self.params.out_dim, *self.latent_size(inputs))

    def pack(self, latents: Tensor) -> Tensor:
        return latents

    def unpack(self, x: Tensor, inputs: DenoiseInputs) -> Tensor:
        """TI2V image-to-video: the first latent frame is the given image's, as the pipeline sets it at the end."""
        first = self._first_frame(inputs, x.shape[0])
        return x if first is None else torch.cat([first.to(x.dtype), x[:, :, 1:]], dim=2)

    def sampling_config(self, inputs: DenoiseInputs) -> SchedulerConfig:
        """The model's scheduler config as the request's solver class, with the request's shift if it has one
        (UniPC's `flow_shift` and Euler's `shift` are the same shift)."""
        config = self.scheduler
        own = config.flow_shift if config.class_name == UNIPC else config.shift
        shift = own if inputs.shift is None else inputs.shift
        if shift <= 0:
            raise InvalidArgument(f"sampler.shift={shift}: must be > 0")
        solver = loop.solver_name(inputs.solver, config)
        steps = config.num_train_timesteps
        if solver == "unipc":
            base = config if config.class_name == UNIPC else WAN21_UNIPC_SCHEDULER
            return replace(base, flow_shift=shift, num_train_timesteps=steps)
        if config.class_name == UNIPC:
            return SchedulerConfig(shift=shift, num_train_timesteps=steps)
        return replace(config, shift=shift)

    def sigmas(self, inputs: DenoiseInputs) -> Tensor:
        """(steps + 1,) sigmas of `scheduler.set_timesteps(steps)`, as Wan's pipelines call it."""
        return sigmas_from_config(self.sampling_config(inputs), inputs.steps, grid="scheduler")

    def img2img_start(self, sigmas: Tensor, strength: float) -> int:
        """WanVideoToVideoPipeline.get_timesteps: `steps - min(int(steps * strength), steps)`."""
        steps = sigmas.numel() - 1
        start = steps - min(int(steps * strength), steps)
        if start >= steps:
            raise InvalidArgument(f"strength={strength} with {steps} steps leaves no step to run")
        return start

    # -- conditioning --------------------------------------------------------------------------------
    def _steps(self, inputs: DenoiseInputs) -> dict[float, tuple[Tensor, int]]:
        """sigma -> (the scheduler's timestep at it on the device, the expert that runs it)."""
        config = self.sampling_config(inputs)
        sigmas = sigmas_from_config(config, inputs.steps, grid="scheduler")
        timesteps = timesteps_from_config(config, inputs.steps, grid="scheduler")
        return {
            float(s): (t.to(self.device), 0 if self.boundary is None or bool(t >= self.boundary) else 1)
            for s, t in zip(sigmas[:-1], timesteps, strict=True)
        }

    def _reference(self, inputs: DenoiseInputs, what: str) -> Tensor:
        count = len(inputs.reference_latents)
        if count != 1:
            raise InvalidArgument(f"{self.source}: {what} takes one reference_latents tensor, got {count}")
        return inputs.reference_latents[0]

    def _first_frame(self, inputs: DenoiseInputs, batch: int) -> Tensor | None:
        """TI2V image-to-video: the first image's latents (B, 48, 1, h, w), or None (text-to-video)."""
        if not (self.expand_timesteps and inputs.reference_latents):
            return None
        ref = self._reference(inputs, "TI2V image-to-video")
        ref = ref.unsqueeze(2) if ref.ndim == 4 else ref
        want = (self.params.out_dim, 1, *self.latent_size(inputs)[1:])
        if ref.ndim != 5 or tuple(ref.shape[1:]) != want:
            raise InvalidArgument(
                f"reference_latents[0]: expected the first image's latents (1 or {batch}, "
                f"{', '.join(map(str, want))}), got {list(ref.shape)}"
            )
        return _per_sample(ref, batch, "reference_latents[0]").to(self.device, torch.float32)

    def _condition(self, inputs: DenoiseInputs, batch: int) -> Tensor | None:
        """I2V models: `y` = (mask (4 ch), condition video latents (z ch)) (B, 4 + z, F', h, w), float32."""
        if not self.i2v:
            if inputs.mask is not None:
                raise InvalidArgument(
                    f"mask: {self.source} takes no frame mask (not an image-to-video model)"
                )
            if inputs.reference_latents and not self.expand_timesteps:
                raise InvalidArgument(
                    f"reference_latents: {self.source} is a text-to-video model; it takes none"
                )
            return None
        ref = self._reference(inputs, "image-to-video")
        f, h, w = self.latent_size(inputs)
        want = (self.params.out_dim, f, h, w)
        if ref.ndim != 5 or tuple(ref.shape[1:]) != want:
            raise InvalidArgument(
                f"reference_latents[0]: expected the condition video's latents (1 or {batch}, "
                f"{', '.join(map(str, want))}), got {list(ref.shape)}"
            )
        frames = max(inputs.num_frames, 1)
        if inputs.mask is None:
            given = torch.zeros(frames)
            given[0] = 1
        else:
            m = inputs.mask.float().cpu()
            if m.shape != (frames,) or not bool(((m == 0) | (m == 1)).all()):
                raise InvalidArgument(
                    f"mask: expected ({frames},) of 0 (given frame) and 1 (generated), got {list(m.shape)}"
                )
            given = 1 - m
        mask = frame_mask(given, f)[None, :, :, None, None].expand(batch, MASK_CHANNELS, f, h, w)
        latents = _per_sample(ref.float(), batch, "reference_latents[0]")
        return torch.cat([mask.to(self.device), latents.to(self.device)], dim=1)  # float32, as diffusers

    def _image_context(self, inputs: DenoiseInputs, batch: int) -> Tensor | None:
        p = self.params
        embeds = inputs.image_embeds.get("image_embeds")  # an optional entry of the request's map
        if p.image_dim is None:
            if embeds is not None:
                raise InvalidArgument(
                    f"image_embeds: {self.source} has no image branch (only Wan 2.1 I2V does)"
                )
            return None
        if embeds is None:
            raise InvalidArgument(f"{self.source} needs image_embeds['image_embeds'] (CLIP image states)")
        if embeds.ndim != 3 or embeds.shape[2] != p.image_dim:
            raise InvalidArgument(f"image_embeds: expected (B, L, {p.image_dim}), got {list(embeds.shape)}")
        n, tokens, dim = embeds.shape
        if p.image_pos_len is not None and tokens != p.image_pos_len:
            if tokens * 2 != p.image_pos_len or n % 2:
                raise InvalidArgument(
                    f"image_embeds: FLF2V takes the first and last image's states, (2B, {p.image_pos_len // 2}, "
                    f"{dim}) or (B, {p.image_pos_len}, {dim}); got {list(embeds.shape)}"
                )
            embeds = embeds.reshape(n // 2, p.image_pos_len, dim)  # (first, last) of each sample side by side
        return _per_sample(embeds, batch, "image_embeds").to(self.device, self.compute_dtype)

    def conditioning(self, embeds: Mapping[str, Tensor], inputs: DenoiseInputs, batch: int) -> dict[str, Any]:
        p = self.params
        if "prompt_embeds" not in embeds:
            raise InvalidArgument(f"Wan needs the text embedding 'prompt_embeds'; got {sorted(embeds)}")
        txt = embeds["prompt_embeds"]
        if txt.ndim != 3 or txt.shape[2] != p.text_dim:
            raise InvalidArgument(
                f"prompt_embeds: expected (B, L, {p.text_dim}) for {self.source}, got {list(txt.shape)}"
            )
        first = self._first_frame(inputs, batch)
        token_mask = None
        if self.expand_timesteps:
            f, h, w = self.latent_size(inputs)
            pt, ph, pw = p.patch_size
            token_mask = torch.ones(f // pt, h // ph, w // pw, device=self.device)  # (F', h/2, w/2) float32
            if first is not None:
                token_mask[0] = 0  # the given first frame is clean: timestep 0
        return {
            "context": _per_sample(txt, batch, "prompt_embeds").to(self.device, self.compute_dtype),
            "image_context": self._image_context(inputs, batch),
            "y": self._condition(inputs, batch),
            "first_frame": first,
            "token_mask": token_mask,
            "steps": self._steps(inputs),
        }

    # -- the model call ------------------------------------------------------------------------------
    def cfg_scale_at(self, sigma: Tensor, cond: Mapping[str, Any], inputs: DenoiseInputs) -> float:
        """`cfg_scale` for the high-noise expert, `cfg_scale_2` (default `cfg_scale`) for the low-noise one."""
        expert = cond["steps"][float(sigma)][1]
        if expert == 1 and inputs.cfg_scale_2 is not None:
            return inputs.cfg_scale_2
        return inputs.cfg_scale  # type: ignore[return-value]  # the loop asks only when CFG runs

    def velocity(self, x: Tensor, sigma: Tensor, cond: Mapping[str, Any]) -> Tensor:
        t, expert = cond["steps"][float(sigma)]
        b = x.shape[0]
        if cond["first_frame"] is not None:
            x = torch.cat([cond["first_frame"], x[:, :, 1:]], dim=2)
        if cond["token_mask"] is not None:
            timestep = (cond["token_mask"] * t).flatten().expand(b, -1)  # (B, L), as the pipelines build it
        else:
            timestep = t.expand(b)
        if cond["y"] is not None:
            x = torch.cat([x, cond["y"]], dim=1)  # (B, z + 4 + z, F', h, w)
        return self.models[expert](x, timestep, cond["context"], cond["image_context"])

    def guided_velocity(
        self, x: Tensor, sigma: Tensor, positive: Mapping[str, Any], negative: Mapping[str, Any], scale: float
    ) -> Tensor:
        return cfg(self.velocity(x, sigma, positive), self.velocity(x, sigma, negative), scale)

    def denoise(self, inputs: DenoiseInputs, on_step: OnStep, is_cancelled: Callable[[], bool]) -> dict:
        return loop.denoise(self, inputs, on_step, is_cancelled)
