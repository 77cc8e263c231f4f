"""FLUX.1 (dev, schnell, Krea-dev): defaults and the t2i / img2img stage graphs, as data.

    t2i:      encode_prompt [, encode_negative] -> denoise -> decode
    img2img:  encode_prompt [, encode_negative], encode_image -> denoise (init_latents, strength) -> decode

CLIP-L gives the pooled vector ("pooled_prompt_embeds"), T5 the sequence ("prompt_embeds"). True CFG (a
second pass on the negative prompt, the empty prompt when none is given) runs when `cfg_scale > 1`; the distilled
`guidance` is embedded by dev models.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from orchestrator.errors import invalid
from orchestrator.families import FAMILIES, Family, Plan, stages
from orchestrator.families import common as c
from orchestrator.graph import Graph, Stage
from orchestrator.runner import RunContext
from protos import denoiser_pb2, orchestrator_pb2, text_encoder_pb2, vae_pb2

NAME = "flux"
TASKS = ("t2i", "img2img")
FACTOR = 16  # VAE 8x, then 2x2 patches
MAX_SIDE = 4096
MAX_STEPS = 500
MAX_BATCH = 8
MAX_T5_TOKENS = 512


@dataclass(frozen=True)
class FluxDefaults:
    steps: int
    guidance: float
    max_sequence_length: int
    width: int = 1024
    height: int = 1024
    cfg_scale: float = 1.0
    strength: float = 0.6


DEV = FluxDefaults(steps=28, guidance=3.5, max_sequence_length=512)
SCHNELL = FluxDefaults(steps=4, guidance=0.0, max_sequence_length=256)


@dataclass
class FluxRequest:
    """The resolved parameters of one FLUX request (what the PNG records)."""

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
    guidance: float
    cfg_scale: float
    max_sequence_length: int
    batch_size: int
    loras: list[tuple[str, float]] = field(default_factory=list)
    lora_mode: str = "hot"
    strength: float | None = None
    shift: float | None = None
    return_latents: bool = False

    @property
    def guided(self) -> bool:
        return self.cfg_scale > 1.0  # an empty negative prompt is the unconditional pass


# -- stages ------------------------------------------------------------------------------------------
def _encode_calls(p: FluxRequest, prompt: str, name: str) -> list[text_encoder_pb2.EncodeTextRequest]:
    """One Encode per distinct encoder model: CLIP (text_encoder) -> pooled, T5 (text_encoder_2) -> sequence."""
    wanted = {"text_encoder": "pooled_prompt_embeds", "text_encoder_2": "prompt_embeds"}
    by_spec: dict[str, list[str]] = {}
    for key in wanted:
        by_spec.setdefault(p.components[key], []).append(key)
    calls = []
    for spec, keys in by_spec.items():
        req = text_encoder_pb2.EncodeTextRequest(
            model=spec,
            prompts=[prompt],
            max_sequence_length=p.max_sequence_length,
            name=name,
            outputs=[wanted[k] for k in keys],
        )
        if not c.is_single_file(spec):
            req.encoders.extend(keys)
        calls.append(req)
    return calls


def _encode_prompt(client: Any, inputs: Mapping[str, Any], ctx: RunContext) -> dict[str, Any]:
    return {
        "positive": stages.encode_text(client, _encode_calls(ctx.params, inputs["prompt"], "positive"), ctx)
    }


def _encode_negative(client: Any, inputs: Mapping[str, Any], ctx: RunContext) -> dict[str, Any]:
    calls = _encode_calls(ctx.params, inputs["negative_prompt"], "negative")
    return {"negative": stages.encode_text(client, calls, ctx)}


def _encode_image(client: Any, inputs: Mapping[str, Any], ctx: RunContext) -> dict[str, Any]:
    p: FluxRequest = ctx.params
    req = vae_pb2.VaeEncodeRequest(
        model=p.components["vae"], inputs=[inputs["init_image"]], width=p.width, height=p.height, name="init"
    )
    return {"init_latents": stages.vae_encode(client, req, ctx)}


def _denoise(client: Any, inputs: Mapping[str, Any], ctx: RunContext) -> dict[str, Any]:
    p: FluxRequest = ctx.params
    req = denoiser_pb2.DenoiseRequest(
        model=p.components["transformer"],
        seed=p.seed,
        steps=p.steps,
        width=p.width,
        height=p.height,
        batch_size=p.batch_size,
        guidance=p.guidance,
        **c.lora_fields(p.loras, p.lora_mode),
    )
    if p.shift is not None:
        req.sampler.shift = p.shift
    for k, v in inputs["positive"].items():
        req.positive[k].CopyFrom(v)
    if "negative" in inputs:
        req.cfg_scale = p.cfg_scale
        for k, v in inputs["negative"].items():
            req.negative[k].CopyFrom(v)
    if "init_latents" in inputs:
        req.init_latents.CopyFrom(inputs["init_latents"])
        req.strength = p.strength if p.strength is not None else DEV.strength
    return {"latents": stages.denoise(client, req, ctx).latents}


def _decode(client: Any, inputs: Mapping[str, Any], ctx: RunContext) -> dict[str, Any]:
    p: FluxRequest = ctx.params
    req = vae_pb2.VaeDecodeRequest(
        model=p.components["vae"], latents=inputs["latents"], output_format=vae_pb2.OUTPUT_FORMAT_PNG
    )
    resp = stages.vae_decode(client, req, ctx)
    return {"images": list(resp.images), "pixels": resp.pixels}


ENCODE_PROMPT = Stage("encode_prompt", "text_encoder", ("prompt",), ("positive",), _encode_prompt)
ENCODE_NEGATIVE = Stage(
    "encode_negative", "text_encoder", ("negative_prompt",), ("negative",), _encode_negative
)
ENCODE_IMAGE = Stage("encode_image", "vae", ("init_image",), ("init_latents",), _encode_image)
DENOISE = Stage(
    "denoise", "denoiser", ("positive",), ("latents",), _denoise, optional_inputs=("negative", "init_latents")
)
DECODE = Stage("decode", "vae", ("latents",), ("images", "pixels"), _decode)
RESULT = ("images", "pixels", "latents")

GRAPHS: dict[tuple[str, bool], Graph] = {
    ("t2i", False): Graph("t2i", (ENCODE_PROMPT, DENOISE, DECODE), RESULT),
    ("t2i", True): Graph("t2i", (ENCODE_PROMPT, ENCODE_NEGATIVE, DENOISE, DECODE), RESULT),
    ("img2img", False): Graph("img2img", (ENCODE_PROMPT, ENCODE_IMAGE, DENOISE, DECODE), RESULT),
    ("img2img", True): Graph(
        "img2img", (ENCODE_PROMPT, ENCODE_NEGATIVE, ENCODE_IMAGE, DENOISE, DECODE), RESULT
    ),
}


# -- plan --------------------------------------------------------------------------------------------
def _family_defaults(model_dir: Path | None) -> FluxDefaults:
    """schnell (no guidance embedding) or dev, from transformer/config.json when the model is a directory."""
    config = c.read_config(model_dir / "transformer" / "config.json") if model_dir else {}
    return SCHNELL if config.get("guidance_embeds") is False else DEV


def _task(request: orchestrator_pb2.GenerateRequest) -> str:
    task = request.task or ("img2img" if request.input_images else "t2i")
    if task not in TASKS:
        raise invalid(f"task {task!r}: FLUX.1 runs {list(TASKS)}")
    if task == "img2img" and len(request.input_images) != 1:
        raise invalid(f"img2img needs exactly one input image, got {len(request.input_images)}")
    if task == "t2i" and request.input_images:
        raise invalid("input_images given for task t2i; use task img2img")
    if request.HasField("strength") and task != "img2img":
        raise invalid("strength is set but there is no input image (img2img)")
    return task


def _components(request: orchestrator_pb2.GenerateRequest) -> dict[str, str]:
    specs = c.component_specs(request)
    if c.is_single_file(request.model):
        missing = [k for k in ("text_encoder", "text_encoder_2", "vae") if k not in request.components]
        if missing:
            raise invalid(
                f"model {request.model!r} is a single DiT file: give the other components too "
                f"(components {missing}, e.g. --text-encoder, --text-encoder-2, --vae)"
            )
    return specs


UNUSED = (
    "num_frames", "fps", "cfg_scale_2", "last_image", "input_video", "input_audio", "mask", "preview_every",
    "sampler.sigmas", "sampler.eta", "output.video_frames_png",
)  # fmt: skip
SOLVERS = ("", "euler", "flow_euler")


def plan(request: orchestrator_pb2.GenerateRequest, model_dir: Path | None) -> Plan:
    c.refuse_unused(request, "FLUX.1", UNUSED)
    if request.sampler.solver not in SOLVERS:
        raise invalid(f"sampler.solver {request.sampler.solver!r}: FLUX.1 runs {[s for s in SOLVERS if s]}")
    task = _task(request)
    fam = _family_defaults(model_dir)
    rec = c.recorded_defaults(model_dir)
    size = c.image_size(request.input_images[0], "input_images[0]") if task == "img2img" else None
    width = c.pick(request, "width", rec, size[0] // FACTOR * FACTOR if size else fam.width)
    height = c.pick(request, "height", rec, size[1] // FACTOR * FACTOR if size else fam.height)
    loras, lora_mode = c.loras_of(request)
    p = FluxRequest(
        family=NAME,
        task=task,
        model=request.model,
        components=_components(request),
        prompt=request.prompt,
        negative_prompt=request.negative_prompt,
        seed=c.seed_of(request),
        steps=int(c.pick(request, "steps", rec, fam.steps)),
        width=int(width),
        height=int(height),
        guidance=float(c.pick(request, "guidance", rec, fam.guidance)),
        cfg_scale=float(c.pick(request, "cfg_scale", rec, fam.cfg_scale)),
        max_sequence_length=int(c.pick(request, "max_sequence_length", rec, fam.max_sequence_length)),
        batch_size=request.batch_size or 1,
        loras=loras,
        lora_mode=lora_mode,
        strength=(request.strength if request.HasField("strength") else fam.strength)
        if task == "img2img"
        else None,
        shift=request.sampler.shift if request.sampler.HasField("shift") else None,
        return_latents=request.output.return_latents,
    )
    _check(p)
    values: dict[str, Any] = {"prompt": p.prompt}
    if p.guided:
        values["negative_prompt"] = p.negative_prompt
    if task == "img2img":
        values["init_image"] = request.input_images[0]
    return Plan(graph=GRAPHS[(task, p.guided)], values=values, params=p)


def _check(p: FluxRequest) -> None:
    if not p.prompt.strip():
        raise invalid("prompt is empty")
    c.check_prompt("prompt", p.prompt)
    c.check_prompt("negative_prompt", p.negative_prompt)
    c.check_range("steps", p.steps, 1, MAX_STEPS)
    c.check_multiple("width", p.width, FACTOR, FACTOR, MAX_SIDE)
    c.check_multiple("height", p.height, FACTOR, FACTOR, MAX_SIDE)
    c.check_range("guidance", p.guidance, 0.0, 100.0)
    c.check_range("cfg_scale", p.cfg_scale, 0.0, 100.0)
    c.check_range("max_sequence_length", p.max_sequence_length, 1, MAX_T5_TOKENS)
    c.check_range("batch_size", p.batch_size, 1, MAX_BATCH)
    if p.strength is not None:
        c.check_range("strength", p.strength, 0.0, 1.0)
        if int(p.steps * p.strength) < 1:
            raise invalid(f"strength={p.strength} with steps={p.steps} runs no step; raise one of them")
    if p.shift is not None:
        c.check_range("sampler.shift", p.shift, 0.01, 100.0)


def finish(values: Mapping[str, Any], plan: Plan) -> orchestrator_pb2.GenerateResult:
    return c.result(plan.params, values["images"], values)


FAMILIES[NAME] = Family(
    name=NAME,
    pipeline_classes=("FluxPipeline", "FluxImg2ImgPipeline"),
    tasks=TASKS,
    plan=plan,
    finish=finish,
)
