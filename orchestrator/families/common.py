"""What every family's plan shares: resolving a request against recorded and family defaults, range checks
that name the field, seeds, the model specs of each component, and the PNG parameters text."""

from __future__ import annotations

import io
import json
import secrets
from collections.abc import Mapping
from dataclasses import asdict
from pathlib import Path
from typing import Any

from PIL import Image

from orchestrator.errors import invalid
from orchestrator.pngtext import PARAMETERS_KEY, with_text
from protos import common_pb2, orchestrator_pb2

DEFAULTS_FILE = (
    "diffmesh.json"  # a model directory's own generation defaults: {"defaults": {"steps": 8, ...}}
)
COMPONENT_KEYS = ("text_encoder", "text_encoder_2", "vae", "transformer")
MAX_PROMPT_CHARS = 20_000
SEED_BITS = 32


def recorded_defaults(model_dir: Path | None) -> dict[str, Any]:
    """The generation defaults a model directory records in `diffmesh.json` (empty when it has none)."""
    if model_dir is None or not (model_dir / DEFAULTS_FILE).is_file():
        return {}
    path = model_dir / DEFAULTS_FILE
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise invalid(f"{path} is not valid JSON: {e}") from None
    defaults = data.get("defaults", {}) if isinstance(data, dict) else None
    if not isinstance(defaults, dict):
        raise invalid(f"{path}: 'defaults' must be an object")
    return defaults


def read_config(path: Path) -> dict[str, Any]:
    """A JSON config of the model (e.g. transformer/config.json), or {} when absent."""
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise invalid(f"{path} is not valid JSON: {e}") from None
    return data if isinstance(data, dict) else {}


def pick(request: Any, field: str, recorded: Mapping[str, Any], default: Any) -> Any:
    """The request's value when set, else the model's recorded default, else the family's."""
    if request.HasField(field):
        return getattr(request, field)
    return recorded.get(field, default)


def check_range(field: str, value: float, low: float, high: float) -> None:
    if not low <= value <= high:
        raise invalid(f"{field}={value} is out of range [{low}, {high}]")


def check_multiple(field: str, value: int, factor: int, low: int, high: int) -> None:
    check_range(field, value, low, high)
    if value % factor:
        raise invalid(
            f"{field}={value} must be a multiple of {factor} (e.g. {value // factor * factor or factor})"
        )


def check_prompt(field: str, text: str) -> None:
    if len(text) > MAX_PROMPT_CHARS:
        raise invalid(f"{field} is {len(text)} characters long; at most {MAX_PROMPT_CHARS}")
    if "\x00" in text:
        raise invalid(f"{field} contains a NUL character")


def seed_of(request: orchestrator_pb2.GenerateRequest) -> int:
    return request.seed if request.HasField("seed") else secrets.randbits(SEED_BITS)


def component_specs(request: orchestrator_pb2.GenerateRequest) -> dict[str, str]:
    """The model spec of each component: `model` unless `components` overrides it."""
    unknown = sorted(set(request.components) - set(COMPONENT_KEYS))
    if unknown:
        raise invalid(f"components: unknown keys {unknown}; known: {list(COMPONENT_KEYS)}")
    return {key: request.components.get(key) or request.model for key in COMPONENT_KEYS}


def is_single_file(spec: str) -> bool:
    return "://" not in spec and Path(spec).suffix in (".safetensors", ".ckpt", ".pt", ".pth", ".bin")


def image_size(media: common_pb2.Media, field: str) -> tuple[int, int] | None:
    """(width, height) of an encoded image given as bytes (None for a tensor or uri)."""
    if media.WhichOneof("source") != "data":
        return None
    try:
        with Image.open(io.BytesIO(media.data)) as img:
            return img.size
    except Exception as e:
        raise invalid(f"{field}: not a readable image ({type(e).__name__}: {e})") from None


def parameters_text(params: Mapping[str, Any]) -> str:
    """The resolved parameters as one JSON line (written into the PNG and the result)."""
    return json.dumps(params, sort_keys=True, separators=(",", ":"))


def refuse_unused(request: orchestrator_pb2.GenerateRequest, family: str, fields: tuple[str, ...]) -> None:
    """INVALID_ARGUMENT for request fields this family does not use (never a silent fallback). Names are
    GenerateRequest fields, or `sampler.<field>` / `output.<field>`."""
    for name in fields:
        msg, _, leaf = name.rpartition(".")
        holder = getattr(request, msg) if msg else request
        field = holder.DESCRIPTOR.fields_by_name[leaf]
        if field.is_repeated:
            used = len(getattr(holder, leaf)) > 0
        elif field.has_presence:
            used = holder.HasField(leaf)
        else:
            used = bool(getattr(holder, leaf))
        if used:
            raise invalid(f"{name} is set, but {family} does not use it")


def result(
    params: Any, images: list[bytes], values: Mapping[str, Any], hidden: tuple[str, ...] = ()
) -> orchestrator_pb2.GenerateResult:
    """The GenerateResult of a family's params dataclass (with `seed`, `return_latents`): the resolved parameters
    as JSON (fields in `hidden`, `return_latents` and unset ones left out) in the result and in each PNG's
    tEXt chunk, and the store refs of the decoded pixels (and the latents when asked)."""
    shown = {
        k: v for k, v in asdict(params).items() if v is not None and k not in ("return_latents", *hidden)
    }
    text = parameters_text(shown)
    out = orchestrator_pb2.GenerateResult(seed=params.seed, parameters=text)
    out.images.extend(with_text(png, {PARAMETERS_KEY: text}) for png in images)
    for name in ("pixels", "latents") if params.return_latents else ("pixels",):
        if values[name].WhichOneof("value") == "ref":
            out.outputs.append(values[name].ref)
    return out


def loras_of(request: orchestrator_pb2.GenerateRequest) -> tuple[list[tuple[str, float]], str]:
    """The request's LoRAs as (spec, scale) (scale 0 = unset = 1.0) and the LoRA mode ("hot" / "fused")."""
    mode = "fused" if request.lora_mode == common_pb2.LORA_MODE_FUSED else "hot"
    return [(lora.spec, lora.scale or 1.0) for lora in request.loras], mode


def lora_fields(loras: list[tuple[str, float]], mode: str) -> dict[str, Any]:
    """The DenoiseRequest fields of resolved LoRAs."""
    return {
        "loras": [common_pb2.LoraSpec(spec=s, scale=w) for s, w in loras],
        "lora_mode": common_pb2.LORA_MODE_FUSED if mode == "fused" else common_pb2.LORA_MODE_HOT,
    }
