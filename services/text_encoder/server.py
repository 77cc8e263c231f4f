"""Text-encoder service: prompts -> embeddings (+ masks, pooled vectors), written to the store."""

from __future__ import annotations

import time

import grpc

from protos import text_encoder_pb2, text_encoder_pb2_grpc
from services.common import validate
from services.common.errors import InvalidArgument
from services.common.runtime import StageRuntime
from services.common.server import Binding, request_id
from services.common.settings import Settings
from services.common.store import TensorStore
from services.text_encoder.registry import ENCODERS

MAX_PROMPTS = 64
MAX_PROMPT_CHARS = 20_000
ENCODER_FOLDERS = ("text_encoder", "text_encoder_2", "text_encoder_3")
SERVICE = text_encoder_pb2.DESCRIPTOR.services_by_name["TextEncoder"].full_name


class TextEncoderServicer(text_encoder_pb2_grpc.TextEncoderServicer):
    def __init__(self, runtime: StageRuntime) -> None:
        self.rt = runtime

    def Encode(self, request: text_encoder_pb2.EncodeTextRequest, context: grpc.ServicerContext):
        started = time.perf_counter()
        rid = request_id(context)
        validate.required("model", request.model)
        validate.count("prompts", len(request.prompts), 1, MAX_PROMPTS)
        if request.prompts_2 and len(request.prompts_2) != len(request.prompts):
            raise InvalidArgument(
                f"prompts_2: {len(request.prompts_2)} items for {len(request.prompts)} prompts"
            )
        for i, p in enumerate([*request.prompts, *request.prompts_2]):
            validate.text(f"prompts[{i}]", p, MAX_PROMPT_CHARS)
        if request.HasField("max_sequence_length"):
            validate.in_range("max_sequence_length", request.max_sequence_length, 1, 4096)
        name = request.name or "prompt"
        encoder = self.rt.load(request.model, ENCODER_FOLDERS, ENCODERS)
        outputs = encoder.encode(
            list(request.prompts),
            prompts_2=list(request.prompts_2) or None,
            max_sequence_length=request.max_sequence_length
            if request.HasField("max_sequence_length")
            else None,
        )
        resp = text_encoder_pb2.EncodeTextResponse(timing=self.rt.timing(started))
        for key, tensor in outputs.items():
            resp.outputs[key].CopyFrom(self.rt.output(rid, f"{name}.{key}", tensor))
        return resp


def binding(settings: Settings, store: TensorStore) -> Binding:
    servicer = TextEncoderServicer(StageRuntime("text_encoder", settings, store))
    return Binding(SERVICE, text_encoder_pb2_grpc.add_TextEncoderServicer_to_server, servicer)
