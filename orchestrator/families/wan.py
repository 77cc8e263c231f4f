"""Wan 2.1 / 2.2 video: defaults and the stage graphs of every task, as data.

    t2v:    encode_prompt [, encode_negative] -> denoise (num_frames) -> decode (MP4, or PNG frames)
    i2v:    + encode_condition (VAE: the first image, then zero frames) [+ encode_clip (2.1 I2V's CLIP vision)]
    flf2v:  i2v with the last image too (condition [first, zeros, last], CLIP of both, frame mask)
    ti2v:   TI2V 5B with an image: + encode_condition (VAE: the image alone; its latent is the first frame)
    v2v:    + encode_video (VAE: the input video) -> denoise from it (strength)

umT5 gives "prompt_embeds" (trimmed to each prompt's tokens and zero-padded to max_sequence_length, as
WanPipeline). CFG runs when `cfg_scale > 1` against the negative prompt (the empty prompt when none is given);
Wan 2.2 A14B models run their low-noise expert with `cfg_scale_2` (default: cfg_scale). The denoiser reads the
sampler (UniPC or flow-match Euler) and shift from the model's scheduler config; `sampler.shift` overrides it.
"""

from __future__ import annotations

import struct
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from orchestrator.errors import invalid
from orchestrator.families import FAMILIES, Family, Plan, stages
from orchestrator.families import common as c
from orchestrator.graph import Graph, Stage
from orchestrator.runner import RunContext
from protos import common_pb2, denoiser_pb2, orchestrator_pb2, tensor_pb2, text_encoder_pb2, vae_pb2

NAME = "wan"
TASKS = ("t2v", "i2v", "flf2v", "ti2v", "v2v")
MAX_SIDE = 2048
MAX_FRAMES = 257
MAX_STEPS = 500
MAX_UMT5_TOKENS = 512
SOLVERS = ("", "unipc", "euler", "flow_euler")


@dataclass(frozen=True)
class WanDefaults:
    steps: int = 50
    cfg_scale: float = 5.0
    width: int = 832
    height: int = 480
    num_frames: int = 81
    fps: float = 16.0
    max_sequence_length: int = 512
    factor: int = 16  # VAE 8x, patch 2x2 (the TI2V 5B's VAE is 16x: 32)
    strength: float = 0.8  # v2v, as WanVideoToVideoPipeline


@dataclass(frozen=True)
class WanModel:
    """What the plan needs to know of the model: its DiT's input channels (16 text-to-video, 36 image-to-video,
    48 TI2V 5B) and whether it takes CLIP image embeddings (Wan 2.1 I2V / FLF2V)."""

    in_channels: int = 16
    image_embeds: bool = False

    @classmethod
    def read(cls, model_dir: Path | None) -> WanModel:
        config = c.read_config(model_dir / "transformer" / "config.json") if model_dir else {}
        return cls(int(config.get("in_channels") or 16), config.get("image_dim") is not None)


@dataclass
class WanRequest:
    """The resolved parameters of one Wan request (what the result's parameters record)."""

    family: str
    task: str
    model: str
    components: dict[str, str]
    prompt: str
    negative_prompt: str
    seed: int
    steps: int
    width: int
    height: int
    num_frames: int
    fps: float
    cfg_scale: float
    cfg_scale_2: float | None
    max_sequence_length: int
    loras: list[tuple[str, float]]
    lora_mode: str
    solver: str
    shift: float | None
    frames_png: bool
    return_latents: bool
    strength: float | None = None
    image_embeds: bool = False

    @property
    def guided(self) -> bool:
        return self.cfg_scale > 1.0  # as WanPipeline: both experts run CFG, or neither


def _encode(p: WanRequest, prompt: str, name: str) -> list[text_encoder_pb2.EncodeTextRequest]:
    spec = p.components["text_encoder"]
    req = text_encoder_pb2.EncodeTextRequest(
        model=spec,
        prompts=[prompt],
        max_sequence_length=p.max_sequence_length,
        name=name,
        outputs=["prompt_embeds"],
    )
    if not c.is_single_file(spec):
        req.encoders.append("text_encoder")
    return [req]


def _encode_prompt(client: Any, inputs: Mapping[str, Any], ctx: RunContext) -> dict[str, Any]:
    return {"positive": stages.encode_text(client, _encode(ctx.params, inputs["prompt"], "positive"), ctx)}


def _encode_negative(client: Any, inputs: Mapping[str, Any], ctx: RunContext) -> dict[str, Any]:
    return {
        "negative": stages.encode_text(
            client, _encode(ctx.params, inputs["negative_prompt"], "negative"), ctx
        )
    }


def _encode_clip(client: Any, inputs: Mapping[str, Any], ctx: RunContext) -> dict[str, Any]:
    p: WanRequest = ctx.params
    images = [inputs["first_image"], *([inputs["last_image"]] if "last_image" in inputs else [])]
    req = text_encoder_pb2.EncodeImageRequest(model=p.model, images=images, name="image")
    resp = client.encode_image(req, ctx.call_options())
    ctx.report(resp.timing)
    return {"image_embeds": dict(resp.outputs)}


def _encode_condition(client: Any, inputs: Mapping[str, Any], ctx: RunContext) -> dict[str, Any]:
    """I2V / FLF2V: the first (and last) image in a video of zeros; TI2V: the image alone (one latent frame)."""
    p: WanRequest = ctx.params
    images = [inputs["first_image"], *([inputs["last_image"]] if "last_image" in inputs else [])]
    req = vae_pb2.VaeEncodeRequest(
        model=p.components["vae"], inputs=images, width=p.width, height=p.height, name="condition"
    )
    if p.task != "ti2v":
        req.num_frames = p.num_frames
        req.frame_positions.extend([0, -1][: len(images)])
    return {"condition": stages.vae_encode(client, req, ctx)}


def _encode_video(client: Any, inputs: Mapping[str, Any], ctx: RunContext) -> dict[str, Any]:
    p: WanRequest = ctx.params
    req = vae_pb2.VaeEncodeRequest(
        model=p.components["vae"],
        inputs=[inputs["input_video"]],
        width=p.width,
        height=p.height,
        num_frames=p.num_frames,
        name="init",
    )
    return {"init_latents": stages.vae_encode(client, req, ctx)}


def frame_mask(num_frames: int) -> tensor_pb2.Tensor:
    """FLF2V's (F,) float32 frame mask: 1 = generate, 0 = given (the first and the last frame)."""
    values = [0.0] + [1.0] * (num_frames - 2) + [0.0]
    data = struct.pack(f"<{num_frames}f", *values)
    return tensor_pb2.Tensor(inline=tensor_pb2.InlineTensor(dtype="F32", shape=[num_frames], data=data))


def _denoise(client: Any, inputs: Mapping[str, Any], ctx: RunContext) -> dict[str, Any]:
    p: WanRequest = ctx.params
    req = denoiser_pb2.DenoiseRequest(
        model=p.components["transformer"],
        seed=p.seed,
        steps=p.steps,
        width=p.width,
        height=p.height,
        num_frames=p.num_frames,
        batch_size=1,
        **c.lora_fields(p.loras, p.lora_mode),
    )
    req.sampler.solver = p.solver
    if p.shift is not None:
        req.sampler.shift = p.shift
    for k, v in inputs["positive"].items():
        req.positive[k].CopyFrom(v)
    if "negative" in inputs:
        req.cfg_scale = p.cfg_scale
        if p.cfg_scale_2 is not None:
            req.cfg_scale_2 = p.cfg_scale_2
        for k, v in inputs["negative"].items():
            req.negative[k].CopyFrom(v)
    if "condition" in inputs:
        req.reference_latents.append(inputs["condition"])
    if "image_embeds" in inputs:
        for k, v in inputs["image_embeds"].items():
            req.image_embeds[k].CopyFrom(v)
    if p.task == "flf2v":
        req.mask.CopyFrom(frame_mask(p.num_frames))
    if "init_latents" in inputs:
        req.init_latents.CopyFrom(inputs["init_latents"])
        req.strength = p.strength if p.strength is not None else WanDefaults.strength
    return {"latents": stages.denoise(client, req, ctx).latents}


def _decode(client: Any, inputs: Mapping[str, Any], ctx: RunContext) -> dict[str, Any]:
    p: WanRequest = ctx.params
    fmt = vae_pb2.OUTPUT_FORMAT_PNG if p.frames_png else vae_pb2.OUTPUT_FORMAT_MP4
    req = vae_pb2.VaeDecodeRequest(
        model=p.components["vae"], latents=inputs["latents"], output_format=fmt, fps=p.fps
    )
    resp = stages.vae_decode(client, req, ctx)
    return {"frames": list(resp.images), "video": resp.video, "pixels": resp.pixels}


ENCODE_PROMPT = Stage("encode_prompt", "text_encoder", ("prompt",), ("positive",), _encode_prompt)
ENCODE_NEGATIVE = Stage(
    "encode_negative", "text_encoder", ("negative_prompt",), ("negative",), _encode_negative
)
IMAGES = ("first_image",)
ENCODE_CLIP = Stage(
    "encode_clip", "text_encoder", IMAGES, ("image_embeds",), _encode_clip, optional_inputs=("last_image",)
)
ENCODE_CONDITION = Stage(
    "encode_condition", "vae", IMAGES, ("condition",), _encode_condition, optional_inputs=("last_image",)
)
ENCODE_VIDEO = Stage("encode_video", "vae", ("input_video",), ("init_latents",), _encode_video)
DENOISE = Stage(
    "denoise",
    "denoiser",
    ("positive",),
    ("latents",),
    _denoise,
    optional_inputs=("negative", "condition", "image_embeds", "init_latents"),
)
DECODE = Stage("decode", "vae", ("latents",), ("frames", "video", "pixels"), _decode)
RESULT = ("frames", "video", "pixels", "latents")


def graph(task: str, guided: bool, image_embeds: bool) -> Graph:
    """The stages of one task: the prompt(s), what the task conditions on, denoise, decode."""
    first: list[Stage] = [ENCODE_PROMPT, *([ENCODE_NEGATIVE] if guided else [])]
    if task in ("i2v", "flf2v"):
        first += [*([ENCODE_CLIP] if image_embeds else []), ENCODE_CONDITION]
    elif task == "ti2v":
        first.append(ENCODE_CONDITION)
    elif task == "v2v":
        first.append(ENCODE_VIDEO)
    return Graph(task, (*first, DENOISE, DECODE), RESULT)


def _task(request: orchestrator_pb2.GenerateRequest, model: WanModel) -> str:
    """The task the request names, else the one its inputs imply; checked against the inputs and the model."""
    has_image, has_last = bool(request.input_images), request.HasField("last_image")
    has_video = request.HasField("input_video")
    if request.task:
        task = request.task
    elif has_video:
        task = "v2v"
    elif has_last:
        task = "flf2v"
    elif has_image:
        task = "ti2v" if model.in_channels == 48 else "i2v"
    else:
        task = "t2v"
    if task == "i2v" and model.in_channels == 48:
        task = "ti2v"  # the TI2V 5B's image-to-video
    if task not in TASKS:
        raise invalid(f"task {task!r}: Wan runs {list(TASKS)}")
    wants_image = task in ("i2v", "flf2v", "ti2v")
    if wants_image and len(request.input_images) != 1:
        raise invalid(
            f"task {task} needs exactly one input image (the first frame), got {len(request.input_images)}"
        )
    if not wants_image and request.input_images:
        raise invalid(f"task {task} takes no input image")
    if has_last != (task == "flf2v"):
        raise invalid(
            "a last image goes with task flf2v only" if has_last else "task flf2v needs a last image"
        )
    if has_video != (task == "v2v"):
        raise invalid(
            "an input video goes with task v2v only" if has_video else "task v2v needs an input video"
        )
    if request.HasField("strength") and task != "v2v":
        raise invalid(f"strength is for task v2v (an input video), not {task}")
    need = {"i2v": (36,), "flf2v": (36,), "ti2v": (48,), "t2v": (16, 48), "v2v": (16,)}[task]
    if model.in_channels not in need:
        kind = {16: "text-to-video", 36: "image-to-video", 48: "TI2V"}.get(model.in_channels, "unknown")
        raise invalid(
            f"task {task}: the model's transformer takes {model.in_channels} input channels ({kind} model); "
            f"{task} needs {' or '.join(map(str, need))}"
        )
    return task


def _video_frames(media: common_pb2.Media) -> int:
    """Frames of an input video given as bytes (the v2v default of num_frames), counted by ffmpeg."""
    import imageio_ffmpeg

    if media.WhichOneof("source") != "data":
        raise invalid(
            "input_video: give the encoded video bytes (MP4) to count its frames, or set num_frames"
        )
    with tempfile.NamedTemporaryFile(suffix=".mp4") as f:
        f.write(media.data)
        f.flush()
        try:
            frames, _ = imageio_ffmpeg.count_frames_and_secs(f.name)
        except (RuntimeError, OSError) as e:
            raise invalid(f"input_video: not a readable video ({type(e).__name__}: {e})") from None
    if frames < 1:
        raise invalid("input_video: the video has no frames")
    return (frames - 1) // 4 * 4 + 1


def _defaults(model: WanModel) -> WanDefaults:
    """TI2V 5B (48-channel latents, a 16x VAE): sizes in multiples of 32, 121 frames at 24 fps."""
    if model.in_channels == 48:
        return WanDefaults(width=1280, height=704, num_frames=121, fps=24.0, factor=32)
    return WanDefaults()


UNUSED = ("guidance", "input_audio", "mask", "preview_every", "sampler.sigmas", "sampler.eta")


def plan(request: orchestrator_pb2.GenerateRequest, model_dir: Path | None) -> Plan:
    c.refuse_unused(request, "Wan", UNUSED)
    if request.batch_size > 1:
        raise invalid(f"batch_size={request.batch_size}: Wan makes one video per request")
    model = WanModel.read(model_dir)
    task = _task(request, model)
    fam = _defaults(model)
    rec = c.recorded_defaults(model_dir)
    solver = request.sampler.solver
    if solver not in SOLVERS:
        raise invalid(f"sampler.solver {solver!r}: Wan runs {[s for s in SOLVERS if s]}")
    if task == "v2v" and not request.HasField("num_frames"):
        frames = _video_frames(request.input_video)
    else:
        frames = int(c.pick(request, "num_frames", rec, fam.num_frames))
    loras, lora_mode = c.loras_of(request)
    p = WanRequest(
        family=NAME,
        task=task,
        model=request.model,
        components=c.component_specs(request),
        prompt=request.prompt,
        negative_prompt=request.negative_prompt,
        seed=c.seed_of(request),
        steps=int(c.pick(request, "steps", rec, fam.steps)),
        width=int(c.pick(request, "width", rec, fam.width)),
        height=int(c.pick(request, "height", rec, fam.height)),
        num_frames=frames,
        fps=float(c.pick(request, "fps", rec, fam.fps)),
        cfg_scale=float(c.pick(request, "cfg_scale", rec, fam.cfg_scale)),
        cfg_scale_2=float(request.cfg_scale_2) if request.HasField("cfg_scale_2") else None,
        max_sequence_length=int(c.pick(request, "max_sequence_length", rec, fam.max_sequence_length)),
        loras=loras,
        lora_mode=lora_mode,
        solver=solver,
        shift=request.sampler.shift if request.sampler.HasField("shift") else None,
        frames_png=request.output.video_frames_png,
        return_latents=request.output.return_latents,
        strength=(request.strength if request.HasField("strength") else fam.strength)
        if task == "v2v"
        else None,
        image_embeds=model.image_embeds and task in ("i2v", "flf2v"),
    )
    _check(p, fam.factor)
    if task in ("i2v", "flf2v", "ti2v") and c.is_single_file(p.model):
        raise invalid(
            f"task {task}: give the model as a directory (its image encoder and VAE are read from it)"
        )
    values: dict[str, Any] = {"prompt": p.prompt}
    if p.guided:
        values["negative_prompt"] = p.negative_prompt
    if task in ("i2v", "flf2v", "ti2v"):
        values["first_image"] = request.input_images[0]
    if task == "flf2v":
        values["last_image"] = request.last_image
    if task == "v2v":
        values["input_video"] = request.input_video
    return Plan(graph=graph(task, p.guided, p.image_embeds), values=values, params=p)


def _check(p: WanRequest, factor: int) -> None:
    if not p.prompt.strip():
        raise invalid("prompt is empty")
    c.check_prompt("prompt", p.prompt)
    c.check_prompt("negative_prompt", p.negative_prompt)
    c.check_range("steps", p.steps, 1, MAX_STEPS)
    c.check_multiple("width", p.width, factor, factor, MAX_SIDE)
    c.check_multiple("height", p.height, factor, factor, MAX_SIDE)
    c.check_range("num_frames", p.num_frames, 1, MAX_FRAMES)
    if (p.num_frames - 1) % 4:
        lower = (p.num_frames - 1) // 4 * 4 + 1
        raise invalid(f"num_frames={p.num_frames}: Wan takes 4k+1 frames (e.g. {lower} or {lower + 4})")
    c.check_range("fps", p.fps, 0.1, 240.0)
    c.check_range("cfg_scale", p.cfg_scale, 0.0, 100.0)
    if p.cfg_scale_2 is not None:
        c.check_range("cfg_scale_2", p.cfg_scale_2, 0.0, 100.0)
        if p.cfg_scale_2 > 1.0 and p.cfg_scale <= 1.0:
            raise invalid(
                f"cfg_scale_2={p.cfg_scale_2} needs cfg_scale > 1 (got {p.cfg_scale}): CFG runs on both experts or neither"
            )
    c.check_range("max_sequence_length", p.max_sequence_length, 1, MAX_UMT5_TOKENS)
    if p.shift is not None:
        c.check_range("sampler.shift", p.shift, 0.01, 100.0)
    if p.strength is not None:
        c.check_range("strength", p.strength, 0.0, 1.0)
        if int(p.steps * p.strength) < 1:
            raise invalid(f"strength={p.strength} with steps={p.steps} runs no step; raise one of them")
    if p.task == "flf2v" and p.num_frames < 2:
        raise invalid(f"num_frames={p.num_frames}: flf2v needs a first and a last frame")


def finish(values: Mapping[str, Any], plan: Plan) -> orchestrator_pb2.GenerateResult:
    out = c.result(plan.params, values["frames"], values, hidden=("frames_png",))
    out.video = values["video"]
    return out


FAMILIES[NAME] = Family(
    name=NAME,
    pipeline_classes=("WanPipeline", "WanImageToVideoPipeline", "WanVideoToVideoPipeline"),
    tasks=TASKS,
    plan=plan,
    finish=finish,
)
