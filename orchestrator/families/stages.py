"""Stage calls every family uses: encode text (several encoder models merged), denoise (forwarding progress),
encode and decode through the VAE. Each returns protobuf refs, never tensors."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import grpc

from orchestrator.errors import StageError
from orchestrator.runner import RunContext
from protos import denoiser_pb2, orchestrator_pb2, tensor_pb2, text_encoder_pb2, vae_pb2


def encode_text(
    client: Any,
    calls: Iterable[text_encoder_pb2.EncodeTextRequest],
    ctx: RunContext,
) -> dict[str, tensor_pb2.Tensor]:
    """Run each Encode call (one per encoder model) and merge their named outputs."""
    merged: dict[str, tensor_pb2.Tensor] = {}
    for req in calls:
        resp = client.encode(req, ctx.call_options())
        ctx.report(resp.timing)
        clash = sorted(set(merged) & set(resp.outputs))
        if clash:
            raise StageError(grpc.StatusCode.INVALID_ARGUMENT, f"two encoders produced {clash}", "encode")
        merged.update(resp.outputs)
    return merged


def denoise(client: Any, req: denoiser_pb2.DenoiseRequest, ctx: RunContext) -> denoiser_pb2.DenoiseResult:
    """Stream a Denoise call, forwarding queue and step events; the result event ends it. A cancelled request
    stops reading, which cancels the call: the denoiser stops at its next step boundary."""
    result = None
    events = client.denoise(req, ctx.call_options())
    try:
        for event in events:
            kind = event.WhichOneof("event")
            if ctx.cancelled.is_set():
                break
            if kind == "progress":
                ctx.emit(orchestrator_pb2.GenerateEvent(progress=event.progress))
            elif kind == "queued":
                ctx.emit(orchestrator_pb2.GenerateEvent(queued=event.queued))
            elif kind == "result":
                result = event.result
    finally:
        events.close()  # cancels the call when we stop early
    ctx.check_cancelled("denoise")
    if result is None:
        raise StageError(grpc.StatusCode.UNAVAILABLE, "the denoiser stream ended without a result", "denoise")
    ctx.report(result.timing)
    return result


def vae_encode(client: Any, req: vae_pb2.VaeEncodeRequest, ctx: RunContext) -> tensor_pb2.Tensor:
    resp = client.encode(req, ctx.call_options())
    ctx.report(resp.timing)
    return resp.latents


def vae_decode(client: Any, req: vae_pb2.VaeDecodeRequest, ctx: RunContext) -> vae_pb2.VaeDecodeResponse:
    resp = client.decode(req, ctx.call_options())
    ctx.report(resp.timing)
    return resp
