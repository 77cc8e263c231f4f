"""FLUX.1 in the sampling loop: loading, latent geometry, 2x2 packing, conditioning and the model call.

Matches diffusers' FluxPipeline / FluxImg2ImgPipeline step for step:
- latents (B, 16, 2*(H//16), 2*(W//16)), packed into (B, (H/16)*(W/16), 64) tokens, channels (c, ph, pw);
- img_ids (L, 3) = (0, row, col) per token, txt_ids zeros; image_seq_len = (H/16)*(W/16) sets the shift;
- timestep `(sigma*1000).expand(B).to(dtype) / 1000`, distilled guidance embedded when the model has it.
Conditioning: positive/negative "prompt_embeds" (P, L, 4096 for T5-XXL) and "pooled_prompt_embeds" (P, 768).

Speed switches, read from the environment when the adapter is built (each "0" or "1", default "0"):
- `DIFFMESH_BATCHED_CFG=1`: true CFG as one forward of batch 2B (uncond first) instead of two calls. Equal to the
  two calls up to float rounding (not bit for bit, so off by default: FluxPipeline makes two calls). On a CPU it
  gains nothing (the GEMMs are already large); it is for GPUs.
- `DIFFMESH_COMPILE=1`: `torch.compile` each double / single block (compiled on the first request, per shape).
  On the CPU it is slower than our eager kernels (inductor picks MKL GEMMs and the flash kernel), and the LoRA
  hooks on every Linear break its graphs: for GPUs. `bench/denoiser_step.py` measures both.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from dataclasses import replace
from functools import lru_cache
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from services.common.errors import InvalidArgument, NotFound
from services.common.memory import (
    RESIDENT,
    MemoryPlan,
    Residency,
    cast_state_dict,
    is_float8,
    memory_aware,
    to_device,
)
from services.common.models import Component, load_state_dict, read_json, weight_files
from services.common.streaming import BlockStreamer, SafetensorsIndex
from services.denoiser import loop
from services.denoiser.convert.flux import (
    CheckpointLayoutError,
    bfl_pieces,
    block_sources,
    detect_flux_layout,
    load_flux_state_dict,
    strip_prefix,
    to_bfl,
)
from services.denoiser.convert.flux_lora import flux_lora_deltas
from services.denoiser.inputs import DenoiseInputs
from services.denoiser.loop import OnStep
from services.denoiser.lora import LoraManager
from services.denoiser.models.flux import Flux, FluxParams
from services.denoiser.sampling.guidance import batched_cfg_model, cfg
from services.denoiser.sampling.scheduler_config import (
    FLUX_DEV_SCHEDULER,
    FLUX_SCHNELL_SCHEDULER,
    SchedulerConfig,
    sigmas_from_config,
)
from services.denoiser.sampling.schedules import calculate_shift, flow_sigmas_from

MULTIPLE = 16  # VAE factor 8 x patch 2
DEFAULT_GUIDANCE = 3.5
PER_SAMPLE = ("txt", "y", "guidance")  # conditioning with a batch dimension; the rest is shared across it


def env_flag(name: str, env: Mapping[str, str] | None = None) -> bool:
    """A "0" / "1" switch from the environment (unset = "0"); anything else is a `ValueError` naming it."""
    value = (os.environ if env is None else env).get(name, "0")
    if value not in ("0", "1"):
        raise ValueError(f"{name}={value!r}: expected 0 or 1")
    return value == "1"


@lru_cache(maxsize=16)
def image_ids(rows: int, cols: int) -> Tensor:
    """(rows*cols, 3) float32 position ids of the packed image tokens: (0, row, col)."""
    ids = torch.zeros(rows, cols, 3)
    ids[..., 1] = torch.arange(rows)[:, None]
    ids[..., 2] = torch.arange(cols)[None, :]
    return ids.reshape(rows * cols, 3)


def pack(latents: Tensor) -> Tensor:
    """(B, C, h, w) -> (B, (h/2)*(w/2), C*4): 2x2 patches, channels ordered (c, ph, pw)."""
    b, c, h, w = latents.shape
    x = latents.view(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5)
    return x.reshape(b, (h // 2) * (w // 2), c * 4)


def unpack(x: Tensor, h: int, w: int) -> Tensor:
    """(B, (h/2)*(w/2), C*4) -> (B, C, h, w), the inverse of `pack`."""
    b, _, d = x.shape
    x = x.view(b, h // 2, w // 2, d // 4, 2, 2).permute(0, 3, 1, 4, 2, 5)
    return x.reshape(b, d // 4, h, w)


class FluxAdapter:
    def __init__(
        self,
        model: Flux,
        scheduler: SchedulerConfig,
        device: torch.device,
        source: str,
        residency: Residency | None = None,
        dtype: torch.dtype | None = None,
        *,
        batched_cfg: bool | None = None,
        compile_blocks: bool | None = None,
    ) -> None:
        """`batched_cfg` / `compile_blocks` None: from `DIFFMESH_BATCHED_CFG` / `DIFFMESH_COMPILE`."""
        self.model = model.eval()
        self.residency = residency or Residency(model, device, RESIDENT)
        self.params: FluxParams = model.params
        self.scheduler = scheduler
        self.device = device
        self.dtype = dtype or model.img_in.weight.dtype  # the compute dtype (bfloat16 for float8 weights)
        self.source = source
        self.batched_cfg = env_flag("DIFFMESH_BATCHED_CFG") if batched_cfg is None else batched_cfg
        if env_flag("DIFFMESH_COMPILE") if compile_blocks is None else compile_blocks:
            for block in (*self.model.double_blocks, *self.model.single_blocks):
                block.compile(dynamic=False)
        plan = self.residency.plan
        fused_refusal = None
        if plan.mode == "sequential":
            fused_refusal = "memory mode sequential streams the weights: use lora_mode hot"
        elif plan.weight_dtype is not None and is_float8(plan.weight_dtype):
            fused_refusal = "float8 weights cannot take a LoRA in place: use lora_mode hot"
        self.lora = LoraManager(
            self.model,
            convert=flux_lora_deltas,
            compute_dtype=self.dtype,
            device=device,
            fused_refusal=fused_refusal,
        )

    # -- geometry ------------------------------------------------------------------------------------
    def check(self, inputs: DenoiseInputs) -> None:
        for name in ("width", "height"):
            value = getattr(inputs, name)
            if value % MULTIPLE:
                raise InvalidArgument(f"{name}={value}: FLUX needs a multiple of {MULTIPLE}")
        if inputs.num_frames > 1:
            raise InvalidArgument(f"num_frames={inputs.num_frames}: FLUX.1 makes images (0 or 1)")

    def latent_size(self, inputs: DenoiseInputs) -> tuple[int, int]:
        return 2 * (inputs.height // MULTIPLE), 2 * (inputs.width // MULTIPLE)

    def noise_shape(self, inputs: DenoiseInputs, batch: int) -> tuple[int, ...]:
        return (batch, self.params.out_channels // 4, *self.latent_size(inputs))

    def pack(self, latents: Tensor) -> Tensor:
        return pack(latents)

    def unpack(self, x: Tensor, inputs: DenoiseInputs) -> Tensor:
        return unpack(x, *self.latent_size(inputs))

    def sigmas(self, inputs: DenoiseInputs) -> Tensor:
        """(steps + 1,) sigmas: the scheduler config's (dynamic shift by image_seq_len for dev), custom
        base sigmas from the request, or a fixed `shift` from the request."""
        h, w = self.latent_size(inputs)
        seq_len = (h // 2) * (w // 2)
        config = self.scheduler
        if inputs.shift is not None:
            config = replace(config, shift=inputs.shift, use_dynamic_shifting=False)
        if not inputs.sigmas:
            return sigmas_from_config(config, inputs.steps, image_seq_len=seq_len)
        if len(inputs.sigmas) != inputs.steps:
            raise InvalidArgument(f"sampler.sigmas has {len(inputs.sigmas)} values for steps={inputs.steps}")
        base = torch.tensor(inputs.sigmas, dtype=torch.float32)
        if base.max() > 1 or base.min() <= 0:
            raise InvalidArgument(f"sampler.sigmas must lie in (0, 1], got {inputs.sigmas}")
        mu = None
        if config.use_dynamic_shifting:
            mu = calculate_shift(
                seq_len,
                config.base_image_seq_len,
                config.max_image_seq_len,
                config.base_shift,
                config.max_shift,
            )
        return flow_sigmas_from(
            base,
            config.shift,
            use_dynamic_shifting=config.use_dynamic_shifting,
            mu=mu,
            time_shift_type=config.time_shift_type,
            shift_terminal=config.shift_terminal,
        )

    # -- conditioning and the model call -------------------------------------------------------------
    def conditioning(self, embeds: Mapping[str, Tensor], inputs: DenoiseInputs, batch: int) -> dict[str, Any]:
        p = self.params
        for name in ("prompt_embeds", "pooled_prompt_embeds"):
            if name not in embeds:
                raise InvalidArgument(f"FLUX needs the text embedding {name!r}; got {sorted(embeds)}")
        txt, vec = embeds["prompt_embeds"], embeds["pooled_prompt_embeds"]
        if txt.ndim != 3 or txt.shape[2] != p.context_in_dim:
            raise InvalidArgument(
                f"prompt_embeds: expected (B, L, {p.context_in_dim}) for {self.source}, got {list(txt.shape)}"
            )
        if vec.ndim != 2 or vec.shape[1] != p.vec_in_dim or vec.shape[0] != txt.shape[0]:
            raise InvalidArgument(
                f"pooled_prompt_embeds: expected ({txt.shape[0]}, {p.vec_in_dim}), got {list(vec.shape)}"
            )
        repeat = batch // txt.shape[0] if batch % txt.shape[0] == 0 else 0
        if repeat < 1:
            raise InvalidArgument(f"{txt.shape[0]} prompt embeddings do not divide the batch of {batch}")
        h, w = self.latent_size(inputs)
        img_ids = image_ids(h // 2, w // 2).to(self.device)
        txt_ids = torch.zeros(txt.shape[1], 3, device=self.device)
        cond: dict[str, Any] = {
            "txt": txt.to(self.device, self.dtype).repeat_interleave(repeat, dim=0),
            "y": vec.to(self.device, self.dtype).repeat_interleave(repeat, dim=0),
            "img_ids": img_ids,
            "txt_ids": txt_ids,
            "pe": self.model.position_embedding(img_ids, txt_ids),  # once per request, not per step
            "guidance": None,
        }
        if p.guidance_embed:
            g = DEFAULT_GUIDANCE if inputs.guidance is None else inputs.guidance
            cond["guidance"] = torch.full((batch,), g, dtype=torch.float32, device=self.device)
        return cond

    def velocity(self, x: Tensor, sigma: Tensor, cond: Mapping[str, Any]) -> Tensor:
        t = (sigma * 1000).expand(x.shape[0]).to(self.device, x.dtype) / 1000  # as FluxPipeline rounds it
        return self.model(
            img=x,
            img_ids=cond["img_ids"],
            txt=cond["txt"],
            txt_ids=cond["txt_ids"],
            timesteps=t,
            y=cond["y"],
            guidance=cond["guidance"],
            pe=cond["pe"],
        )

    def guided_velocity(
        self, x: Tensor, sigma: Tensor, positive: Mapping[str, Any], negative: Mapping[str, Any], scale: float
    ) -> Tensor:
        """True CFG `cfg(v(x | positive), v(x | negative), scale)` as one forward of batch 2B (uncond first).
        Prompts of different token counts cannot share a batch: then two calls, the same result."""
        if positive["txt"].shape != negative["txt"].shape:
            return cfg(self.velocity(x, sigma, positive), self.velocity(x, sigma, negative), scale)
        shared = {k: v for k, v in positive.items() if k not in PER_SAMPLE}
        guided = batched_cfg_model(lambda x, sigma, **c: self.velocity(x, sigma, c), scale)
        return guided(
            x,
            sigma,
            cond={k: positive[k] for k in PER_SAMPLE},
            uncond={k: negative[k] for k in PER_SAMPLE},
            **shared,
        )

    def denoise(self, inputs: DenoiseInputs, on_step: OnStep, is_cancelled: Callable[[], bool]) -> dict:
        return loop.denoise(self, inputs, on_step, is_cancelled)


def _scheduler(model_dir: Path | None, params: FluxParams) -> SchedulerConfig:
    """The model's `scheduler/scheduler_config.json` when present, else FLUX.1-dev's / -schnell's."""
    default = FLUX_DEV_SCHEDULER if params.guidance_embed else FLUX_SCHNELL_SCHEDULER
    if model_dir is None:
        return default
    path = model_dir / "scheduler" / "scheduler_config.json"
    if not path.is_file():
        return default
    try:
        return SchedulerConfig.from_dict(read_json(path))
    except ValueError as e:
        raise InvalidArgument(f"{path}: {e}") from None


def _model(params: FluxParams) -> Flux:
    with torch.device("meta"):
        model = Flux(params)
    return model.requires_grad_(False).eval()


def _checkpoint_dtype(sd: Mapping[str, Tensor]) -> torch.dtype:
    return next(
        t.dtype for k, t in sd.items() if k.endswith("img_in.weight") or k.endswith("x_embedder.weight")
    )


def _build(
    files: Path | list[Path],
    axes_dim: tuple[int, ...] | None,
    source: str,
    device: torch.device,
    plan: MemoryPlan,
) -> tuple[Flux, Residency, torch.dtype]:
    """The model, where its weights live, and the compute dtype. `sequential`: only the non-block weights are
    read now; each block is read from the files when it runs (services.common.streaming)."""
    if plan.mode == "sequential":
        return _build_streamed(files, axes_dim, source, device, plan)
    sd = load_state_dict(files)
    stored = _checkpoint_dtype(sd)
    compute, storage = plan.compute_dtype(stored), plan.storage_dtype(stored)
    try:
        params, bfl = load_flux_state_dict(sd, axes_dim=axes_dim, source=source)
    except CheckpointLayoutError as e:
        raise InvalidArgument(str(e)) from None
    model = _model(params)
    model.load_state_dict(cast_state_dict(bfl, storage, compute), strict=True, assign=True)
    return model, Residency(model, device, plan), compute


def _build_streamed(
    files: Path | list[Path],
    axes_dim: tuple[int, ...] | None,
    source: str,
    device: torch.device,
    plan: MemoryPlan,
) -> tuple[Flux, Residency, torch.dtype]:
    index = SafetensorsIndex(files)
    original = strip_prefix({k: k for k in index})  # stripped key -> key in the file
    meta = index.meta()
    try:
        layout = detect_flux_layout(original, source=source)
        params, native = load_flux_state_dict(meta, axes_dim=axes_dim, source=source)  # shapes only
    except CheckpointLayoutError as e:
        raise InvalidArgument(str(e)) from None
    stored = _checkpoint_dtype({k: meta[v] for k, v in original.items()})
    compute, storage = plan.compute_dtype(stored), plan.storage_dtype(stored)
    top, per_block = block_sources(original)
    model = _model(params)
    top_sd = to_bfl({k: index[original[k]] for k in top}, layout, source=source)
    missing, unexpected = model.load_state_dict(
        cast_state_dict(top_sd, storage, compute), strict=False, assign=True
    )
    blocks = [*model.double_blocks, *model.single_blocks]
    names = [f"double_blocks.{i}" for i in range(params.depth)]
    names += [f"single_blocks.{i}" for i in range(params.depth_single_blocks)]
    not_blocks = [k for k in missing if not k.startswith(("double_blocks.", "single_blocks."))]
    if unexpected or not_blocks or set(per_block) != set(names):
        raise InvalidArgument(
            f"{source}: cannot stream: missing {not_blocks[:4]}, unexpected {unexpected[:4]}"
        )
    layouts = []
    for name in names:
        pieces = bfl_pieces(per_block[name], layout)
        layouts.append(
            {
                bfl_key.removeprefix(name + "."): (tuple(native[bfl_key].shape), [original[k] for k in keys])
                for bfl_key, keys in pieces.items()
            }
        )
    to_device(model, device)  # the non-block weights; blocks stay on the meta device until they run
    streamer = BlockStreamer(blocks, layouts, index, device, storage, compute)
    return model, Residency(model, device, plan, streamer=streamer), compute


@memory_aware
def load_hub(component: Component, device: torch.device, memory: MemoryPlan = RESIDENT) -> FluxAdapter:
    """A diffusers `transformer/` folder (FluxTransformer2DModel): RoPE axes from its config.json."""
    axes = component.config.get("axes_dims_rope")
    if axes is None:
        raise NotFound(f"{component.path}/config.json has no axes_dims_rope")
    source = str(component.path)
    model, residency, dtype = _build(weight_files(component.path), tuple(axes), source, device, memory)
    return FluxAdapter(
        model, _scheduler(component.path.parent, model.params), device, source, residency, dtype
    )


@memory_aware
def load_single_file(path: Path, device: torch.device, memory: MemoryPlan = RESIDENT) -> FluxAdapter:
    """An original `flux1-*.safetensors` (BFL keys, or diffusers keys in one file). FLUX.1's RoPE axes, unless
    a `<stem>.json` beside it gives `axes_dims_rope` (models of another head size)."""
    sidecar = path.with_suffix(".json")
    axes = read_json(sidecar).get("axes_dims_rope") if sidecar.is_file() else None
    model, residency, dtype = _build(path, tuple(axes) if axes else None, str(path), device, memory)
    return FluxAdapter(model, _scheduler(None, model.params), device, str(path), residency, dtype)
