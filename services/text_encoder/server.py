"""Text-encoder service: prompts -> embeddings (+ masks, pooled vectors), written to the store.

A hub-layout model runs every encoder folder it has (`text_encoder`, `text_encoder_2`, ...) or the subset a
request names, and merges their named outputs; a single weight file (or one component directory) runs alone.
Prompts are routed as diffusers does: `text_encoder` gets `prompts`, the later ones `prompts_2` when given.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import grpc

from protos import text_encoder_pb2, text_encoder_pb2_grpc
from services.common import validate
from services.common.errors import InvalidArgument, NotFound
from services.common.runtime import StageRuntime
from services.common.server import Binding, request_id
from services.common.settings import Settings
from services.common.store import TensorStore
from services.text_encoder.registry import ENCODERS, IMAGE_ENCODERS

MAX_PROMPTS = 64
MAX_IMAGES = 8
MAX_IMAGE_BYTES = 64 * 2**20
MAX_IMAGE_PIXELS = 8192 * 8192
MAX_PROMPT_CHARS = 20_000
MAX_SEQUENCE_LENGTH = 4096
ENCODER_FOLDERS = ("text_encoder", "text_encoder_2", "text_encoder_3")
SECOND_PROMPT_FOLDERS = ("text_encoder_2", "text_encoder_3")
SERVICE = text_encoder_pb2.DESCRIPTOR.services_by_name["TextEncoder"].full_name


def check_request(request: text_encoder_pb2.EncodeTextRequest) -> int | None:
    """Field checks at the entry; returns max_sequence_length (None when unset)."""
    validate.required("model", request.model)
    validate.count("prompts", len(request.prompts), 1, MAX_PROMPTS)
    if request.prompts_2 and len(request.prompts_2) != len(request.prompts):
        raise InvalidArgument(f"prompts_2: {len(request.prompts_2)} items for {len(request.prompts)} prompts")
    for i, p in enumerate(request.prompts):
        validate.text(f"prompts[{i}]", p, MAX_PROMPT_CHARS)
    for i, p in enumerate(request.prompts_2):
        validate.text(f"prompts_2[{i}]", p, MAX_PROMPT_CHARS)
    if not request.HasField("max_sequence_length"):
        return None
    return int(validate.in_range("max_sequence_length", request.max_sequence_length, 1, MAX_SEQUENCE_LENGTH))


def output_owners(encoders: list[tuple[str, Any]]) -> dict[str, str]:
    """Output name -> the encoder folder producing it; two producing one name is an error."""
    owners: dict[str, str] = {}
    for folder, enc in encoders:
        for name in enc.outputs:
            if name in owners:
                raise InvalidArgument(
                    f"encoders {owners[name]} and {folder} both produce {name!r}; "
                    "pick one of them with `encoders`"
                )
            owners[name] = folder
    return owners


class TextEncoderServicer(text_encoder_pb2_grpc.TextEncoderServicer):
    def __init__(self, runtime: StageRuntime) -> None:
        self.rt = runtime

    def EncodeImage(self, request: text_encoder_pb2.EncodeImageRequest, context: grpc.ServicerContext):
        started = time.perf_counter()
        rid = request_id(context)
        validate.required("model", request.model)
        validate.count("images", len(request.images), 1, MAX_IMAGES)
        images = [read_image(m, f"images[{i}]") for i, m in enumerate(request.images)]
        encoder = self.rt.load_component(request.model, "image_encoder", IMAGE_ENCODERS)
        with self.rt.active(encoder):
            embeds = encoder.encode_images(images)
        name = f"{request.name or 'image'}.image_embeds"
        resp = text_encoder_pb2.EncodeImageResponse(timing=self.rt.timing(started))
        resp.outputs["image_embeds"].CopyFrom(self.rt.output(rid, name, embeds))
        return resp

    def encoders(self, spec: str, requested: list[str]) -> list[tuple[str, Any]]:
        """(folder name, loaded encoder) of each encoder to run, in folder order."""
        path = self.rt.resolve(spec)
        present = (
            [f for f in ENCODER_FOLDERS if (path / f / "config.json").is_file()] if path.is_dir() else []
        )
        if not present:
            return [(self.single_role(spec, path, requested), self.rt.load(spec, ENCODER_FOLDERS, ENCODERS))]
        unknown = sorted(set(requested) - set(present))
        if unknown:
            raise NotFound(f"encoders {unknown} are not in model {spec!r}; it has {present}")
        chosen = [f for f in present if f in requested] if requested else present
        return [(f, self.rt.load_component(spec, f, ENCODERS)) for f in chosen]

    @staticmethod
    def single_role(spec: str, path: Path, requested: list[str]) -> str:
        """The folder a one-encoder spec (a weight file or a component directory) stands for: its own name,
        or the one folder the request names (`encoders=["text_encoder_2"]` routes it `prompts_2`)."""
        roles = {path.name, *ENCODER_FOLDERS}
        if not requested:
            return path.name
        if len(set(requested)) == 1 and requested[0] in roles:
            return requested[0]
        raise NotFound(f"encoders {sorted(set(requested))}: model {spec!r} is one encoder ({path.name})")

    def Encode(self, request: text_encoder_pb2.EncodeTextRequest, context: grpc.ServicerContext):
        started = time.perf_counter()
        rid = request_id(context)
        max_len = check_request(request)
        encoders = self.encoders(request.model, list(request.encoders))
        for _, enc in encoders:
            enc.max_length(max_len)  # a too-long max_sequence_length fails before any encoder runs
        owners = output_owners(encoders)
        wanted = list(dict.fromkeys(request.outputs)) or list(owners)
        unknown = [n for n in wanted if n not in owners]
        if unknown:
            raise InvalidArgument(
                f"outputs: unknown {unknown}; model {request.model!r} gives {sorted(owners)}"
            )
        prompts, prompts_2 = list(request.prompts), list(request.prompts_2) or list(request.prompts)
        counts = [0] * len(prompts)
        truncated = [False] * len(prompts)
        outputs: dict[str, Any] = {}
        for folder, enc in encoders:
            if not set(enc.outputs) & set(wanted):
                continue
            text = prompts_2 if folder in SECOND_PROMPT_FOLDERS else prompts
            with self.rt.active(enc):
                result = enc.encode(text, max_sequence_length=max_len)
            outputs.update({k: v for k, v in result.outputs.items() if k in wanted})
            counts = [max(a, b) for a, b in zip(counts, result.token_counts, strict=True)]
            truncated = [a or b for a, b in zip(truncated, result.truncated, strict=True)]
        name = request.name or "prompt"
        resp = text_encoder_pb2.EncodeTextResponse(token_counts=counts, truncated=truncated)
        for key in wanted:
            resp.outputs[key].CopyFrom(self.rt.output(rid, f"{name}.{key}", outputs[key]))
        resp.timing.CopyFrom(self.rt.timing(started))
        return resp


def read_image(media: Any, field: str) -> Any:
    """An encoded image of a Media message -> a PIL image (RGB), named errors for anything else."""
    import io

    from PIL import Image, UnidentifiedImageError

    if media.WhichOneof("source") != "data":
        raise InvalidArgument(
            f"{field}: give the encoded image bytes (got {media.WhichOneof('source') or 'nothing'})"
        )
    if len(media.data) > MAX_IMAGE_BYTES:
        raise InvalidArgument(f"{field}: {len(media.data)} bytes; at most {MAX_IMAGE_BYTES}")
    try:
        img = Image.open(io.BytesIO(media.data))  # reads the header only
        if img.width * img.height > MAX_IMAGE_PIXELS:  # before the pixels are decoded into memory
            raise InvalidArgument(
                f"{field}: a {img.width}x{img.height} image; at most {MAX_IMAGE_PIXELS} pixels"
            )
        img.load()
    except (UnidentifiedImageError, Image.DecompressionBombError, OSError, ValueError) as e:
        raise InvalidArgument(f"{field}: not a readable image ({type(e).__name__}: {e})") from None
    return img


def binding(settings: Settings, store: TensorStore) -> Binding:
    servicer = TextEncoderServicer(StageRuntime("text_encoder", settings, store))
    return Binding(SERVICE, text_encoder_pb2_grpc.add_TextEncoderServicer_to_server, servicer)
