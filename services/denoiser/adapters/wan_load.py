"""Loading Wan 2.1 / 2.2 denoisers into a `WanAdapter`, under the service's memory plan.

- hub: a diffusers model directory's `transformer/` (WanTransformer3DModel, sharded or not), its
  `model_index.json` (`boundary_ratio`, `expand_timesteps`, as WanPipeline saves them) and
  `scheduler/scheduler_config.json` (UniPCMultistepScheduler or FlowMatchEulerDiscreteScheduler); with a
  `boundary_ratio` (Wan 2.2 A14B) the sibling `transformer_2/` is the low-noise expert.
- single file: an official / ComfyUI checkpoint (Wan keys, `model.diffusion_model.` prefix) or diffusers keys in
  one file; one expert.

Memory plan: weights cast to the storage dtype (what diffusers keeps in float32 under a reduced dtype stays
float32, `keeps_float32`), resident or offloaded through `Residency`; `sequential` streams each block from the
safetensors file(s) (`BlockStreamer`, one per expert); there every block weight takes the storage dtype, the
block modulation tables and affine norms included.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from services.common.errors import InvalidArgument
from services.common.memory import RESIDENT, MemoryPlan, Residency, cast_tensor, memory_aware, to_device
from services.common.models import Component, load_state_dict, read_json, weight_files
from services.common.streaming import BlockStreamer, SafetensorsIndex
from services.denoiser.adapters.wan import WanAdapter
from services.denoiser.convert.wan import (
    CheckpointLayoutError,
    block_sources,
    detect_wan_layout,
    load_wan_state_dict,
    num_heads_from_config,
    strip_prefix,
    to_wan,
)
from services.denoiser.models.wan import WanDiT, WanParams, keeps_float32
from services.denoiser.sampling.scheduler_config import (
    WAN21_UNIPC_SCHEDULER,
    WAN22_I2V_UNIPC_SCHEDULER,
    SchedulerConfig,
)

TI2V_CHANNELS = 48  # Wan 2.2 TI2V-5B: the 2.2 VAE's latent, per-token timesteps

Expert = tuple[Path | list[Path], int | None]  # weight file(s), head count (None: head dim 128)


def _scheduler(model_dir: Path | None, params: WanParams) -> SchedulerConfig:
    """The model's `scheduler/scheduler_config.json` when present, else Wan's UniPC at the official shift
    (3.0 for the 2.1 geometry, 5.0 for TI2V-5B)."""
    default = WAN22_I2V_UNIPC_SCHEDULER if params.out_dim == TI2V_CHANNELS else WAN21_UNIPC_SCHEDULER
    path = None if model_dir is None else model_dir / "scheduler" / "scheduler_config.json"
    if path is None or not path.is_file():
        return default
    try:
        return SchedulerConfig.from_dict(read_json(path))
    except ValueError as e:
        raise InvalidArgument(f"{path}: {e}") from None


def _pipeline_options(model_dir: Path) -> tuple[float | None, bool | None]:
    """(boundary_ratio, expand_timesteps) from `model_index.json`; None where the file or the key is absent
    (no boundary: one expert; expand_timesteps: decided by the model's latent channels)."""
    path = model_dir / "model_index.json"
    if not path.is_file():
        return None, None
    index = read_json(path)
    ratio = index.get("boundary_ratio")  # absent or null: one expert (Wan 2.1, TI2V-5B)
    if ratio is not None and (
        isinstance(ratio, bool) or not isinstance(ratio, int | float) or not 0 <= ratio <= 1
    ):
        raise InvalidArgument(f"{path}: boundary_ratio={ratio!r}, expected a number in [0, 1] or null")
    expand = index.get("expand_timesteps")  # absent: decided by the latent channels
    if expand is not None and not isinstance(expand, bool):
        raise InvalidArgument(f"{path}: expand_timesteps={expand!r}, expected true or false")
    return ratio, expand


def _checkpoint_dtype(sd: Mapping[str, Tensor]) -> torch.dtype:
    return next(t.dtype for k, t in sd.items() if k.endswith("patch_embedding.weight"))


def _cast(sd: Mapping[str, Tensor], storage: torch.dtype, compute: torch.dtype) -> dict[str, Tensor]:
    """The storage dtype, except what diffusers keeps in float32 under a reduced dtype (`keeps_float32`)."""
    return {
        k: v.float() if keeps_float32(k) and v.is_floating_point() else cast_tensor(k, v, storage, compute)
        for k, v in sd.items()
    }


def _model(params: WanParams) -> WanDiT:
    with torch.device("meta"):
        model = WanDiT(params)
    return model.requires_grad_(False).eval()


def _build(
    files: Path | list[Path], num_heads: int | None, source: str, device: torch.device, plan: MemoryPlan
) -> tuple[WanDiT, BlockStreamer | None]:
    """One expert; `sequential`: only its non-block weights are read now, each block when it runs."""
    if plan.mode == "sequential":
        return _build_streamed(files, num_heads, source, device, plan)
    sd = load_state_dict(files)
    stored = _checkpoint_dtype(sd)
    try:
        params, wan = load_wan_state_dict(sd, num_heads=num_heads, source=source)
    except CheckpointLayoutError as e:
        raise InvalidArgument(str(e)) from None
    model = _model(params)
    model.load_state_dict(
        _cast(wan, plan.storage_dtype(stored), plan.compute_dtype(stored)), strict=True, assign=True
    )
    return model, None


def _build_streamed(
    files: Path | list[Path], num_heads: int | None, source: str, device: torch.device, plan: MemoryPlan
) -> tuple[WanDiT, BlockStreamer]:
    index = SafetensorsIndex(files)
    original = strip_prefix({k: k for k in index})  # stripped key -> key in the file
    meta = index.meta()
    try:
        layout = detect_wan_layout(original, source=source)
        params, _ = load_wan_state_dict(meta, num_heads=num_heads, source=source)  # shapes only
        # renaming only: Wan key -> the key in the file (the converter carries the strings through)
        wan_keys: dict[str, str] = to_wan(original, layout, source=source)  # type: ignore[arg-type,assignment]
    except CheckpointLayoutError as e:
        raise InvalidArgument(str(e)) from None
    stored = _checkpoint_dtype(meta)
    compute, storage = plan.compute_dtype(stored), plan.storage_dtype(stored)
    top, per_block = block_sources(wan_keys)
    model = _model(params)
    top_sd = {k: index[wan_keys[k]] for k in top}
    missing, unexpected = model.load_state_dict(_cast(top_sd, storage, compute), strict=False, assign=True)
    names = [f"blocks.{i}" for i in range(params.num_layers)]
    not_blocks = [k for k in missing if not k.startswith("blocks.")]
    if unexpected or not_blocks or set(per_block) != set(names):
        raise InvalidArgument(
            f"{source}: cannot stream: missing {not_blocks[:4]}, unexpected {unexpected[:4]}"
        )
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    layouts = [
        {k.removeprefix(name + "."): (shapes[k], [wan_keys[k]]) for k in per_block[name]} for name in names
    ]
    to_device(model, device)  # the non-block weights; blocks stay on the meta device until they run
    return model, BlockStreamer(model.blocks, layouts, index, device, storage, compute)


class _Streamers:
    """The block streamers of both experts, settled together (a Residency's `streamer`)."""

    def __init__(self, streamers: Sequence[BlockStreamer]) -> None:
        self.streamers = list(streamers)

    @property
    def loads(self) -> int:
        return sum(s.loads for s in self.streamers)

    def settle(self) -> None:
        for s in self.streamers:
            s.settle()


def _adapter(
    experts: list[Expert],
    source: str,
    model_dir: Path | None,
    device: torch.device,
    plan: MemoryPlan,
    boundary_ratio: float | None,
    expand: bool | None,
) -> WanAdapter:
    built = [_build(files, heads, source, device, plan) for files, heads in experts]
    models = [m for m, _ in built]
    params = models[0].params
    if any((m.params.in_dim, m.params.out_dim) != (params.in_dim, params.out_dim) for m in models):
        raise InvalidArgument(f"{source}: transformer and transformer_2 take different latents")
    streamers = [s for _, s in built if s is not None]
    residency = Residency(
        nn.ModuleList(models), device, plan, streamer=_Streamers(streamers) if streamers else None
    )
    return WanAdapter(
        models,
        _scheduler(model_dir, params),
        device,
        source,
        residency,
        boundary_ratio=boundary_ratio,
        expand_timesteps=params.out_dim == TI2V_CHANNELS if expand is None else expand,
    )


def _heads(config: Mapping[str, Any], source: str) -> int:
    try:
        return num_heads_from_config(config, source=source)
    except CheckpointLayoutError as e:
        raise InvalidArgument(str(e)) from None


@memory_aware
def load_hub(component: Component, device: torch.device, memory: MemoryPlan = RESIDENT) -> WanAdapter:
    """A diffusers `transformer/` folder and its model directory (module docstring). Without `boundary_ratio`,
    a `transformer_2/` is never run (as in WanPipeline) and not loaded."""
    model_dir = component.path.parent
    experts: list[Expert] = [
        (weight_files(component.path), _heads(component.config, f"{component.path}/config.json"))
    ]
    ratio, expand = _pipeline_options(model_dir)
    if ratio is not None:
        second = model_dir / "transformer_2"
        if not (second / "config.json").is_file():
            raise InvalidArgument(
                f"{model_dir}/model_index.json: boundary_ratio={ratio} needs transformer_2/config.json, not found"
            )
        experts.append(
            (weight_files(second), _heads(read_json(second / "config.json"), f"{second}/config.json"))
        )
    return _adapter(experts, str(component.path), model_dir, device, memory, ratio, expand)


@memory_aware
def load_single_file(path: Path, device: torch.device, memory: MemoryPlan = RESIDENT) -> WanAdapter:
    """One official / ComfyUI Wan file (e.g. `wan2.1_t2v_1.3B_fp16.safetensors`) or diffusers keys in one file:
    the head count from a `<stem>.json` beside it (`num_attention_heads` or `num_heads`), else head dim 128;
    Wan's default scheduler for its geometry; per-token timesteps for the 48-channel TI2V-5B."""
    sidecar = path.with_suffix(".json")
    heads = _heads(read_json(sidecar), str(sidecar)) if sidecar.is_file() else None
    return _adapter([(path, heads)], str(path), None, device, memory, None, None)
