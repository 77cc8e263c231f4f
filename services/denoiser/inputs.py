"""The decoded, validated inputs of one Denoise request: what a family's sampling loop receives."""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass, field
from pathlib import Path

import torch

from protos import common_pb2, denoiser_pb2
from services.common import validate
from services.common.errors import InvalidArgument
from services.common.models import resolve_spec
from services.common.runtime import StageRuntime

MAX_SIDE = 8192
MAX_STEPS = 1000
MAX_BATCH = 16
MAX_FRAMES = 1025
MAX_LORAS = 8
MIN_SHIFT, MAX_SHIFT = 0.01, 100.0  # flow-matching shift, as the orchestrator's families check it


@dataclass(kw_only=True)
class DenoiseInputs:
    """One request's inputs; everything but the seed, size, steps and prompt embeddings defaults to "not
    given" (the request decoder sets every field; tests and benches name only what they use)."""

    seed: int
    steps: int
    width: int
    height: int
    positive: dict[str, torch.Tensor]
    num_frames: int = 0
    batch_size: int = 1
    guidance: float | None = None
    cfg_scale: float | None = None
    cfg_scale_2: float | None = None
    negative: dict[str, torch.Tensor] = field(default_factory=dict)
    init_latents: torch.Tensor | None = None
    strength: float | None = None
    mask: torch.Tensor | None = None
    reference_latents: list[torch.Tensor] = field(default_factory=list)
    image_embeds: dict[str, torch.Tensor] = field(default_factory=dict)
    audio_embeds: dict[str, torch.Tensor] = field(default_factory=dict)
    loras: list[tuple[str, float]] = field(default_factory=list)
    lora_mode: int = common_pb2.LORA_MODE_HOT
    solver: str = ""
    shift: float | None = None
    sigmas: list[float] = field(default_factory=list)
    preview_every: int = 0
    extra: dict[str, object] = field(default_factory=dict)


def lora_path(spec: str, rt: StageRuntime, field: str) -> Path:
    """A LoRA spec (a file, or a directory / hub repo holding exactly one .safetensors) -> its file."""
    path = resolve_spec(
        spec, roots=rt.settings.model_roots, cache_dir=rt.settings.cache_dir, offline=rt.settings.offline
    )
    if path.is_dir():
        files = sorted(path.glob("*.safetensors"))
        if len(files) != 1:
            raise InvalidArgument(
                f"{field}: {spec!r} is a directory with {len(files)} .safetensors files; name one file"
            )
        path = files[0]
    if path.suffix != ".safetensors":
        raise InvalidArgument(f"{field}: {spec!r} is not a .safetensors file (LoRAs are never unpickled)")
    return path


def decode_request(req: denoiser_pb2.DenoiseRequest, rt: StageRuntime) -> DenoiseInputs:
    """Check ranges (family-specific factors are checked by the family) and fetch every tensor."""
    validate.required("model", req.model)
    validate.in_range("steps", req.steps, 1, MAX_STEPS)
    validate.in_range("width", req.width, 16, MAX_SIDE)
    validate.in_range("height", req.height, 16, MAX_SIDE)
    validate.in_range("num_frames", req.num_frames, 0, MAX_FRAMES)
    validate.in_range("batch_size", req.batch_size, 0, MAX_BATCH)
    validate.count("loras", len(req.loras), 0, MAX_LORAS)
    if not req.positive:
        raise InvalidArgument("positive: the prompt's embeddings are required")
    opt = {f: getattr(req, f) if req.HasField(f) else None for f in ("guidance", "cfg_scale", "cfg_scale_2")}
    for f, v in opt.items():
        if v is not None:
            validate.in_range(f, v, 0.0, 100.0)
    strength = req.strength if req.HasField("strength") else None
    if strength is not None:
        validate.in_range("strength", strength, 0.0, 1.0)
        if not req.HasField("init_latents"):
            raise InvalidArgument("strength is set but init_latents is not")
    sigmas = list(req.sampler.sigmas)
    if not all(math.isfinite(s) for s in sigmas):
        raise InvalidArgument(f"sampler.sigmas must be finite numbers, got {sigmas[:8]}")
    if any(b >= a for a, b in itertools.pairwise(sigmas)):
        raise InvalidArgument(f"sampler.sigmas must be strictly decreasing, got {sigmas[:8]}")
    validate.count("sampler.sigmas", len(sigmas), 0, MAX_STEPS)
    if req.sampler.HasField("shift"):
        validate.in_range("sampler.shift", req.sampler.shift, MIN_SHIFT, MAX_SHIFT)

    def tensors(m, field: str) -> dict[str, torch.Tensor]:
        out = {k: rt.input(v, f"{field}[{k}]") for k, v in m.items()}
        for k, t in out.items():  # (B, ...) with B >= 1: the prompt batch is read from the first dimension
            if t.ndim == 0 or t.shape[0] == 0:
                raise InvalidArgument(
                    f"{field}[{k}]: expected a batch dimension of at least 1, got {list(t.shape)}"
                )
        return out

    loras = []
    for i, lora in enumerate(req.loras):
        validate.required(f"loras[{i}].spec", lora.spec)
        validate.in_range(f"loras[{i}].scale", lora.scale, -10.0, 10.0)
        loras.append((str(lora_path(lora.spec, rt, f"loras[{i}]")), lora.scale or 1.0))
    return DenoiseInputs(
        seed=req.seed,
        steps=req.steps,
        width=req.width,
        height=req.height,
        num_frames=req.num_frames,
        batch_size=req.batch_size or 1,
        guidance=opt["guidance"],
        cfg_scale=opt["cfg_scale"],
        cfg_scale_2=opt["cfg_scale_2"],
        positive=tensors(req.positive, "positive"),
        negative=tensors(req.negative, "negative"),
        init_latents=rt.input(req.init_latents, "init_latents") if req.HasField("init_latents") else None,
        strength=strength,
        mask=rt.input(req.mask, "mask") if req.HasField("mask") else None,
        reference_latents=[
            rt.input(t, f"reference_latents[{i}]") for i, t in enumerate(req.reference_latents)
        ],
        image_embeds=tensors(req.image_embeds, "image_embeds"),
        audio_embeds=tensors(req.audio_embeds, "audio_embeds"),
        loras=loras,
        lora_mode=req.lora_mode or common_pb2.LORA_MODE_HOT,
        solver=req.sampler.solver,
        shift=req.sampler.shift if req.sampler.HasField("shift") else None,
        sigmas=sigmas,
        preview_every=req.preview_every,
    )
