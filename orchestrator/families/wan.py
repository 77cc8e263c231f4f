"""Wan 2.1 / 2.2 video: defaults and the t2v stage graph, as data.

    t2v:  encode_prompt [, encode_negative] -> denoise (num_frames) -> decode (MP4, or PNG frames)

umT5 gives "prompt_embeds" (trimmed to each prompt's tokens and zero-padded to max_sequence_length, as
WanPipeline). CFG runs when `cfg_scale > 1` against the negative prompt (the empty prompt when none is given);
Wan 2.2 A14B models run their low-noise expert with `cfg_scale_2` (default: cfg_scale). The denoiser reads the
sampler (UniPC or flow-match Euler) and shift from the model's scheduler config; `sampler.shift` overrides it.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from orchestrator.errors import invalid
from orchestrator.families import FAMILIES, Family, Plan, stages
from orchestrator.families import common as c
from orchestrator.graph import Graph, Stage
from orchestrator.pngtext import PARAMETERS_KEY, with_text
from orchestrator.runner import RunContext
from protos import common_pb2, denoiser_pb2, orchestrator_pb2, text_encoder_pb2, vae_pb2

NAME = "wan"
TASKS = ("t2v",)
PLANNED = ("i2v", "flf2v", "v2v", "ti2v")  # the denoiser and VAE run them; their graphs come next
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
        loras=[common_pb2.LoraSpec(spec=s, scale=w) for s, w in p.loras],
        lora_mode=common_pb2.LORA_MODE_FUSED if p.lora_mode == "fused" else common_pb2.LORA_MODE_HOT,
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
DENOISE = Stage("denoise", "denoiser", ("positive",), ("latents",), _denoise, optional_inputs=("negative",))
DECODE = Stage("decode", "vae", ("latents",), ("frames", "video", "pixels"), _decode)
RESULT = ("frames", "video", "pixels", "latents")

GRAPHS: dict[tuple[str, bool], Graph] = {
    ("t2v", False): Graph("t2v", (ENCODE_PROMPT, DENOISE, DECODE), RESULT),
    ("t2v", True): Graph("t2v", (ENCODE_PROMPT, ENCODE_NEGATIVE, DENOISE, DECODE), RESULT),
}


def _task(request: orchestrator_pb2.GenerateRequest) -> str:
    task = request.task or "t2v"
    if task in PLANNED:
        raise invalid(
            f"task {task!r}: this engine runs Wan {list(TASKS)} so far ({', '.join(PLANNED)} are next)"
        )
    if task not in TASKS:
        raise invalid(f"task {task!r}: Wan runs {list(TASKS)}")
    if request.input_images or request.HasField("last_image") or request.HasField("input_video"):
        raise invalid("task t2v takes no input image or video")
    return task


def _defaults(model_dir: Path | None) -> WanDefaults:
    """TI2V 5B (48-channel latents, a 16x VAE): sizes in multiples of 32, 121 frames at 24 fps."""
    config = c.read_config(model_dir / "transformer" / "config.json") if model_dir else {}
    if config.get("in_channels") == 48:
        return WanDefaults(width=1280, height=704, num_frames=121, fps=24.0, factor=32)
    return WanDefaults()


def plan(request: orchestrator_pb2.GenerateRequest, model_dir: Path | None) -> Plan:
    task = _task(request)
    fam = _defaults(model_dir)
    rec = c.recorded_defaults(model_dir)
    solver = request.sampler.solver
    if solver not in SOLVERS:
        raise invalid(f"sampler.solver {solver!r}: Wan runs {[s for s in SOLVERS if s]}")
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
        num_frames=int(c.pick(request, "num_frames", rec, fam.num_frames)),
        fps=float(c.pick(request, "fps", rec, fam.fps)),
        cfg_scale=float(c.pick(request, "cfg_scale", rec, fam.cfg_scale)),
        cfg_scale_2=float(request.cfg_scale_2) if request.HasField("cfg_scale_2") else None,
        max_sequence_length=int(c.pick(request, "max_sequence_length", rec, fam.max_sequence_length)),
        loras=[(lora.spec, lora.scale or 1.0) for lora in request.loras],
        lora_mode="fused" if request.lora_mode == common_pb2.LORA_MODE_FUSED else "hot",
        solver=solver,
        shift=request.sampler.shift if request.sampler.HasField("shift") else None,
        frames_png=request.output.video_frames_png,
        return_latents=request.output.return_latents,
    )
    _check(p, fam.factor)
    values: dict[str, Any] = {"prompt": p.prompt}
    if p.guided:
        values["negative_prompt"] = p.negative_prompt
    return Plan(graph=GRAPHS[(task, p.guided)], values=values, params=p)


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


def finish(values: Mapping[str, Any], plan: Plan) -> orchestrator_pb2.GenerateResult:
    p: WanRequest = plan.params
    params = {
        k: v for k, v in asdict(p).items() if v is not None and k not in ("return_latents", "frames_png")
    }
    text = c.parameters_text(params)
    result = orchestrator_pb2.GenerateResult(seed=p.seed, parameters=text, video=values["video"])
    result.images.extend(with_text(png, {PARAMETERS_KEY: text}) for png in values["frames"])
    for name in ("pixels", "latents") if p.return_latents else ("pixels",):
        if values[name].WhichOneof("value") == "ref":
            result.outputs.append(values[name].ref)
    return result


FAMILIES[NAME] = Family(
    name=NAME,
    pipeline_classes=("WanPipeline",),
    tasks=TASKS,
    plan=plan,
    finish=finish,
)
