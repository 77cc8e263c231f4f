"""The training spec: a `TrainSpec` (protos/orchestrator.proto) written as JSON (the proto3 JSON mapping).

`parse_spec` reads it, `with_defaults` fills what was left out, `validate_spec` rejects a bad spec before any
training starts with a `SpecError` naming the field and the value. No torch here: the orchestrator imports this
module to check a spec at submit time.
"""

from __future__ import annotations

import re
from pathlib import Path

from google.protobuf import json_format

from protos import orchestrator_pb2

TrainSpec = orchestrator_pb2.TrainSpec
TRAINABLE_FAMILIES = ("flux",)
COMPONENTS = ("denoiser", "vae")
PRECISIONS = ("no", "bf16", "fp16")
INITS = ("pretrained", "random")
METADATA_FILES = ("metadata.csv", "metadata.jsonl", "metadata.json")
_NAME = re.compile(r"^[a-z0-9]([a-z0-9-]{0,48}[a-z0-9])?$")  # usable as a Kubernetes Job name
_S3 = re.compile(r"^s3://[a-z0-9][a-z0-9.-]{1,61}[a-z0-9](/.*)?$")

DEFAULTS = {
    "learning_rate": 1e-4,
    "batch_size": 1,
    "gradient_accumulation": 1,
    "resolution": 512,
    "component": "denoiser",
    "mixed_precision": "no",
    "init": "pretrained",
}


class SpecError(ValueError):
    """A spec that cannot be trained; `field` names the offending field (JSON name)."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field


def parse_spec(text: str, source: str = "spec") -> orchestrator_pb2.TrainSpec:
    """JSON text -> TrainSpec; unknown fields and wrong types are errors naming the field."""
    spec = TrainSpec()
    try:
        json_format.Parse(text, spec, ignore_unknown_fields=False)
    except json_format.ParseError as e:
        raise SpecError(source, f"not a valid training spec: {e}") from None
    return spec


def to_json(spec: orchestrator_pb2.TrainSpec) -> str:
    return json_format.MessageToJson(spec, indent=2, preserving_proto_field_name=False)


def with_defaults(spec: orchestrator_pb2.TrainSpec) -> orchestrator_pb2.TrainSpec:
    """A copy with the defaults filled in: LoRA mode, alpha = rank, lr 1e-4, batch 1, 512 px, ..."""
    out = TrainSpec()
    out.CopyFrom(spec)
    for name, value in DEFAULTS.items():
        if not getattr(out, name):
            setattr(out, name, value)
    if out.mode == TrainSpec.MODE_UNSPECIFIED:
        out.mode = TrainSpec.LORA
    if out.mode == TrainSpec.LORA and not out.lora.alpha and out.lora.rank > 0:
        out.lora.alpha = float(out.lora.rank)
    if not out.dataset.image_column:
        out.dataset.image_column = "image"
    if not out.dataset.caption_column:
        out.dataset.caption_column = "prompt"
    if not out.dataset.repeats:
        out.dataset.repeats = 1
    return out


def _location(field: str, value: str, check_paths: bool, must_exist: bool) -> None:
    if not value:
        raise SpecError(field, "is required (an s3://bucket/prefix/ or a local folder)")
    if value.startswith("s3://"):
        if not _S3.match(value):
            raise SpecError(field, f"{value!r} is not an s3://bucket/prefix/ uri")
        return
    if "://" in value:
        raise SpecError(field, f"{value!r}: only s3:// uris and local folders are supported")
    if any(ord(c) < 32 or ord(c) == 127 for c in value):
        raise SpecError(field, f"{value!r} contains a control character")
    if check_paths and must_exist:
        path = Path(value)
        try:
            if not path.is_dir():
                raise SpecError(field, f"local folder {value!r} does not exist")
            if not any((path / m).is_file() for m in METADATA_FILES):
                raise SpecError(field, f"{value!r} holds none of {list(METADATA_FILES)}")
        except OSError as e:  # e.g. a name longer than the filesystem allows
            raise SpecError(field, f"local folder {value[:300]!r}: {e.strerror}") from None


def validate_spec(spec: orchestrator_pb2.TrainSpec, *, check_paths: bool = True) -> None:
    """Raise SpecError for the first bad field of a spec (defaults applied first by the caller or here)."""
    s = with_defaults(spec)
    if not _NAME.match(s.name):
        raise SpecError("name", f"{s.name!r}: 1-50 chars of [a-z0-9-], starting and ending alphanumeric")
    if s.family not in TRAINABLE_FAMILIES:
        raise SpecError("family", f"{s.family!r} cannot be trained; trainable: {list(TRAINABLE_FAMILIES)}")
    if not s.base_model:
        raise SpecError("baseModel", "is required (a model directory or hub spec)")
    _location("dataset.uri", s.dataset.uri, check_paths, must_exist=True)
    _location("output", s.output, check_paths=False, must_exist=False)
    if s.component not in COMPONENTS:
        raise SpecError("component", f"{s.component!r}; one of {list(COMPONENTS)}")
    if s.mixed_precision not in PRECISIONS:
        raise SpecError("mixedPrecision", f"{s.mixed_precision!r}; one of {list(PRECISIONS)}")
    if s.mode == TrainSpec.LORA:
        if s.component != "denoiser":
            raise SpecError("mode", f"LoRA training is for the denoiser, not the {s.component}")
        if not 1 <= s.lora.rank <= 1024:
            raise SpecError("lora.rank", f"{s.lora.rank} must be in [1, 1024]")
        if not s.lora.alpha > 0:
            raise SpecError("lora.alpha", f"{s.lora.alpha} must be > 0")
        if not 0 <= s.lora.dropout < 1:
            raise SpecError("lora.dropout", f"{s.lora.dropout} must be in [0, 1)")
    if s.init not in INITS:
        raise SpecError("init", f"{s.init!r}; one of {list(INITS)}")
    if s.init == "random" and s.mode != TrainSpec.FULL:
        raise SpecError("init", "training from random weights needs mode FULL (a LoRA needs trained weights)")
    if not 0 <= s.caption_dropout < 1:
        raise SpecError("captionDropout", f"{s.caption_dropout} must be in [0, 1)")
    if s.component == "vae" and s.caption_dropout:
        raise SpecError("captionDropout", "the VAE is trained on images alone; leave it 0")
    if not 0 < s.learning_rate <= 1:
        raise SpecError("learningRate", f"{s.learning_rate} must be in (0, 1]")
    if not 1 <= s.steps <= 10_000_000:
        raise SpecError("steps", f"{s.steps} must be in [1, 10000000]")
    if not 1 <= s.batch_size <= 1024:
        raise SpecError("batchSize", f"{s.batch_size} must be in [1, 1024]")
    if not 1 <= s.gradient_accumulation <= 1024:
        raise SpecError("gradientAccumulation", f"{s.gradient_accumulation} must be in [1, 1024]")
    if not 16 <= s.resolution <= 4096 or s.resolution % 16:
        raise SpecError("resolution", f"{s.resolution} must be a multiple of 16 in [16, 4096]")
    if s.checkpoint_every > s.steps:
        raise SpecError("checkpointEvery", f"{s.checkpoint_every} is more than steps={s.steps}")


UNIMPLEMENTED_COMPONENTS: dict[str, str] = {}  # component -> why this trainer cannot train it yet


def check_implemented(spec: orchestrator_pb2.TrainSpec) -> None:
    """SpecError for a valid spec this trainer cannot run yet (e.g. component "vae")."""
    s = with_defaults(spec)
    if s.component in UNIMPLEMENTED_COMPONENTS:
        raise SpecError("component", UNIMPLEMENTED_COMPONENTS[s.component])
