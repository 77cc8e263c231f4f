"""One client per stage service, behind one interface that the in-process mode implements too.

gRPC clients send the bearer token and the request id as metadata, set a deadline on every call, and retry
UNAVAILABLE with exponential backoff (a stage restarting, a replica going away). Every failure surfaces as
a StageError carrying the status code and the endpoint.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, Protocol, TypeVar

import grpc

from orchestrator.channel_tls import ChannelTls
from orchestrator.errors import StageError
from protos import (
    audio_pb2,
    audio_pb2_grpc,
    denoiser_pb2,
    denoiser_pb2_grpc,
    text_encoder_pb2,
    text_encoder_pb2_grpc,
    vae_pb2,
    vae_pb2_grpc,
)

T = TypeVar("T")
REQUEST_ID_KEY = "x-request-id"
RETRYABLE = (grpc.StatusCode.UNAVAILABLE,)  # and DEADLINE_EXCEEDED of an attempt cut by the stage timeout


@dataclass(frozen=True)
class CallOptions:
    request_id: str
    timeout_s: float | None = None  # the request's time left for this call, all attempts; None = no deadline
    attempt_timeout_s: float | None = None  # one attempt (the stage timeout): one that overruns it is retried
    on_retry: Callable[[str], None] | None = None


class TextEncoderClient(Protocol):
    def encode(
        self, req: text_encoder_pb2.EncodeTextRequest, opts: CallOptions
    ) -> text_encoder_pb2.EncodeTextResponse: ...
    def encode_image(
        self, req: text_encoder_pb2.EncodeImageRequest, opts: CallOptions
    ) -> text_encoder_pb2.EncodeImageResponse: ...


class DenoiserClient(Protocol):
    def denoise(
        self, req: denoiser_pb2.DenoiseRequest, opts: CallOptions
    ) -> Iterator[denoiser_pb2.DenoiseEvent]: ...


class VaeClient(Protocol):
    def encode(self, req: vae_pb2.VaeEncodeRequest, opts: CallOptions) -> vae_pb2.VaeEncodeResponse: ...
    def decode(self, req: vae_pb2.VaeDecodeRequest, opts: CallOptions) -> vae_pb2.VaeDecodeResponse: ...


class AudioClient(Protocol):
    def encode(
        self, req: audio_pb2.AudioEncodeRequest, opts: CallOptions
    ) -> audio_pb2.AudioEncodeResponse: ...
    def decode(
        self, req: audio_pb2.AudioDecodeRequest, opts: CallOptions
    ) -> audio_pb2.AudioDecodeResponse: ...


def open_channel(
    endpoint: str, max_message_bytes: int = 64 << 20, tls: ChannelTls | None = None
) -> grpc.Channel:
    options = [
        ("grpc.max_receive_message_length", max_message_bytes),
        ("grpc.max_send_message_length", max_message_bytes),
    ]
    if tls is None:
        return grpc.insecure_channel(endpoint, options=options)
    if tls.server_name:
        options.append(("grpc.ssl_target_name_override", tls.server_name))
    creds = grpc.ssl_channel_credentials(
        root_certificates=tls.ca, private_key=tls.key, certificate_chain=tls.cert
    )
    return grpc.secure_channel(endpoint, creds, options=options)


def _remaining(deadline: float | None) -> float | None:
    return None if deadline is None else max(deadline - time.monotonic(), 0.001)


def _attempt_timeout(deadline: float | None, opts: CallOptions) -> tuple[float | None, bool]:
    """One attempt's timeout, and whether the stage timeout (not the request's deadline) set it."""
    remaining = _remaining(deadline)
    limit = opts.attempt_timeout_s
    if limit is not None and (remaining is None or limit < remaining):
        return limit, True
    return remaining, False


class GrpcStage:
    """Channel, metadata and retry shared by the stage clients. With TLS read from files (`tls.source`), the
    next call after the files changed opens a new channel with the new set (orchestrator/channel_tls.py); calls
    already running finish on the old channel, closed at the following change or at close()."""

    STAGE: str
    STUB: Callable[[grpc.Channel], Any]

    def __init__(
        self,
        endpoint: str,
        token: str | None,
        channel: grpc.Channel | None = None,
        retries: int = 3,
        backoff_s: float = 0.25,
        tls: ChannelTls | None = None,
    ) -> None:
        self.stage = self.STAGE
        self.endpoint = endpoint
        self.token = token
        self.channel = channel or open_channel(endpoint, tls=tls)
        self.retries = retries
        self.backoff_s = backoff_s
        self.tls = tls if channel is None else None  # a channel given is the caller's to manage
        self._retired: grpc.Channel | None = None
        self._swap = threading.Lock()
        self._stub = self.STUB(self.channel)

    @property
    def stub(self) -> Any:
        """The service's stub, on a new channel first when the TLS files changed."""
        source = self.tls.source if self.tls is not None else None
        if source is not None and source.latest() is not self.tls:
            with self._swap:
                latest = source.latest()
                if latest is not self.tls:
                    if self._retired is not None:
                        self._retired.close()
                    self._retired, self.channel = self.channel, open_channel(self.endpoint, tls=latest)
                    self.tls, self._stub = latest, self.STUB(self.channel)
        return self._stub

    def metadata(self, opts: CallOptions) -> list[tuple[str, str]]:
        md = [(REQUEST_ID_KEY, opts.request_id)]
        if self.token:
            md.append(("authorization", f"Bearer {self.token}"))
        return md

    def error(self, e: grpc.RpcError) -> StageError:
        return StageError(e.code(), e.details() or e.code().name, self.stage, self.endpoint)

    def call(self, fn: Callable[..., T], req: Any, opts: CallOptions) -> T:
        """A unary call with a deadline, retried with exponential backoff on UNAVAILABLE, or when an attempt
        overran the stage timeout, while the request's deadline leaves time for another attempt."""
        deadline = None if opts.timeout_s is None else time.monotonic() + opts.timeout_s
        delay = self.backoff_s
        for attempt in range(self.retries + 1):
            started = time.monotonic()
            timeout, capped = _attempt_timeout(deadline, opts)
            try:
                return fn(req, timeout=timeout, metadata=self.metadata(opts))
            except grpc.RpcError as e:
                needed = delay + time.monotonic() - started
                self._before_retry(e, attempt, needed, deadline, opts, capped)
                time.sleep(delay)
                delay *= 2
        raise AssertionError("unreachable")

    def _before_retry(
        self,
        e: grpc.RpcError,
        attempt: int,
        needed: float,
        deadline: float | None,
        opts: CallOptions,
        capped: bool = False,
    ) -> None:
        """Raise the call's error unless it is retryable (UNAVAILABLE; DEADLINE_EXCEEDED of an attempt `capped`
        by the stage timeout) and retries are left and the deadline leaves `needed` seconds (the backoff plus as
        long as this attempt took); else report the retry."""
        timed_out = capped and e.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        if (e.code() not in RETRYABLE and not timed_out) or attempt == self.retries:
            if timed_out:
                raise StageError(
                    e.code(),
                    f"no answer within the stage timeout of {opts.attempt_timeout_s} s, {attempt + 1} attempts",
                    self.stage,
                    self.endpoint,
                ) from None
            raise self.error(e) from None
        if deadline is not None and time.monotonic() + needed >= deadline:
            err = self.error(e)
            raise StageError(
                err.code, f"{err.message} (no time left for another try)", self.stage, self.endpoint
            ) from None
        if opts.on_retry:
            why = f"no answer within {opts.attempt_timeout_s} s" if timed_out else e.code().name
            opts.on_retry(f"{self.stage} at {self.endpoint}: {why}, retry {attempt + 1}")

    def stream(self, fn: Callable[..., Iterator[T]], req: Any, opts: CallOptions) -> Iterator[T]:
        """A server stream; retried on UNAVAILABLE (the stage restarts the work from the stored inputs) while
        the deadline leaves time. Closing the returned iterator cancels the call."""
        deadline = None if opts.timeout_s is None else time.monotonic() + opts.timeout_s
        delay = self.backoff_s
        for attempt in range(self.retries + 1):
            started = time.monotonic()
            timeout, capped = _attempt_timeout(deadline, opts)
            call = fn(req, timeout=timeout, metadata=self.metadata(opts))
            try:
                yield from call
                return
            except grpc.RpcError as e:
                self._before_retry(e, attempt, delay + time.monotonic() - started, deadline, opts, capped)
                time.sleep(delay)
                delay *= 2
            finally:
                call.cancel()  # no-op once finished; stops the server's work when the consumer stops early

    def close(self) -> None:
        self.channel.close()
        if self._retired is not None:
            self._retired.close()


class GrpcTextEncoder(GrpcStage):
    STAGE = "text_encoder"
    STUB = text_encoder_pb2_grpc.TextEncoderStub

    def encode(
        self, req: text_encoder_pb2.EncodeTextRequest, opts: CallOptions
    ) -> text_encoder_pb2.EncodeTextResponse:
        return self.call(self.stub.Encode, req, opts)

    def encode_image(
        self, req: text_encoder_pb2.EncodeImageRequest, opts: CallOptions
    ) -> text_encoder_pb2.EncodeImageResponse:
        return self.call(self.stub.EncodeImage, req, opts)


class GrpcDenoiser(GrpcStage):
    STAGE = "denoiser"
    STUB = denoiser_pb2_grpc.DenoiserStub

    def denoise(
        self, req: denoiser_pb2.DenoiseRequest, opts: CallOptions
    ) -> Iterator[denoiser_pb2.DenoiseEvent]:
        return self.stream(self.stub.Denoise, req, opts)


class GrpcVae(GrpcStage):
    STAGE = "vae"
    STUB = vae_pb2_grpc.VaeStub

    def encode(self, req: vae_pb2.VaeEncodeRequest, opts: CallOptions) -> vae_pb2.VaeEncodeResponse:
        return self.call(self.stub.Encode, req, opts)

    def decode(self, req: vae_pb2.VaeDecodeRequest, opts: CallOptions) -> vae_pb2.VaeDecodeResponse:
        return self.call(self.stub.Decode, req, opts)


class GrpcAudio(GrpcStage):
    STAGE = "audio"
    STUB = audio_pb2_grpc.AudioStub

    def encode(self, req: audio_pb2.AudioEncodeRequest, opts: CallOptions) -> audio_pb2.AudioEncodeResponse:
        return self.call(self.stub.Encode, req, opts)

    def decode(self, req: audio_pb2.AudioDecodeRequest, opts: CallOptions) -> audio_pb2.AudioDecodeResponse:
        return self.call(self.stub.Decode, req, opts)


GRPC_CLIENTS: dict[str, Callable[..., GrpcStage]] = {
    "text_encoder": GrpcTextEncoder,
    "denoiser": GrpcDenoiser,
    "vae": GrpcVae,
    "audio": GrpcAudio,
}


def grpc_clients(
    endpoints: dict[str, str], token: str | None, retries: int = 3, tls: ChannelTls | None = None
) -> dict[str, Any]:
    """A client for every stage that has an endpoint (over TLS with `tls`)."""
    return {
        stage: GRPC_CLIENTS[stage](ep, token, retries=retries, tls=tls) for stage, ep in endpoints.items()
    }
