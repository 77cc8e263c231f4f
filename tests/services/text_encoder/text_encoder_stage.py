"""The text-encoder servicer on a real gRPC server (port 0) over a local store that keeps every output as a
TensorRef (inline limit 0), for the text-encoder tests."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import grpc
import torch

from protos import text_encoder_pb2, text_encoder_pb2_grpc
from services.common.server import create_server
from services.common.settings import Settings
from services.common.store import LocalTensorStore
from services.text_encoder.server import binding


@dataclass
class Stage:
    stub: text_encoder_pb2_grpc.TextEncoderStub
    store: LocalTensorStore

    def encode(self, **fields: object) -> tuple[text_encoder_pb2.EncodeTextResponse, dict[str, torch.Tensor]]:
        """One Encode call; the response and its outputs read back through the store (refs only)."""
        resp = self.stub.Encode(text_encoder_pb2.EncodeTextRequest(**fields), timeout=60)
        if any(t.WhichOneof("value") != "ref" for t in resp.outputs.values()):
            raise AssertionError("every output should come back as a TensorRef")
        return resp, {k: self.store.load(t, k) for k, t in resp.outputs.items()}

    def code(self, **fields: object) -> tuple[grpc.StatusCode, str]:
        """The status code and details of a call that must fail."""
        try:
            self.stub.Encode(text_encoder_pb2.EncodeTextRequest(**fields), timeout=60)
        except grpc.RpcError as e:
            return e.code(), e.details()
        raise AssertionError(f"Encode({fields}) succeeded")


@contextmanager
def serve(tmp: Path) -> Iterator[Stage]:
    settings = Settings(local_store_dir=tmp / "store", cache_dir=tmp / "cache", device="cpu")
    store = LocalTensorStore(settings.local_store_dir, inline_limit=0)
    server, port = create_server([binding(settings, store)], port=0)
    channel = grpc.insecure_channel(f"127.0.0.1:{port}")
    try:
        yield Stage(text_encoder_pb2_grpc.TextEncoderStub(channel), store)
    finally:
        channel.close()
        server.stop(0)
