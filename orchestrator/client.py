"""The Python client of the Orchestrator: `Client(endpoint, token).generate(model=..., prompt=...)`.

The same requests run over gRPC or, with `Client.in_process()`, through the whole engine in this process
(`orchestrator.local`, imported only then: this module stays free of torch and `services`). Optional fields
the caller leaves out stay unset on the wire, so the server applies the model's defaults, then the family's.
Every failure of a request is a ClientError carrying the gRPC status code and the server's message.
"""

from __future__ import annotations

import io
import math
import queue
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from os import PathLike
from pathlib import Path
from typing import Any, Protocol

import grpc
from PIL import Image

from orchestrator.clients import REQUEST_ID_KEY, ChannelTls, open_channel
from orchestrator.errors import StageError
from protos import common_pb2, orchestrator_pb2, orchestrator_pb2_grpc

GenerateRequest = orchestrator_pb2.GenerateRequest
GenerateEvent = orchestrator_pb2.GenerateEvent
GenerateResult = orchestrator_pb2.GenerateResult
OnEvent = Callable[[orchestrator_pb2.GenerateEvent], None]
Lora = str | tuple[str | PathLike, float] | common_pb2.LoraSpec  # "PATH[:SCALE]", (spec, scale), LoraSpec
ImageInput = bytes | Image.Image | str | PathLike  # encoded bytes, a PIL image, or a file path

COMPONENTS = ("text_encoder", "text_encoder_2", "vae", "transformer")  # GenerateRequest.components keys
LORA_MODES = {"hot": common_pb2.LORA_MODE_HOT, "fused": common_pb2.LORA_MODE_FUSED}
_MIME = {".png": "image/png", ".jpg": "image/jpeg", ".jpeg": "image/jpeg", ".webp": "image/webp"}
_UINT32, _UINT64 = (1 << 32) - 1, (1 << 64) - 1


class ClientError(Exception):
    """A request that failed: the gRPC status code and the server's message (also for in-process runs)."""

    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        self.code = code
        self.message = message
        super().__init__(f"{code.name}: {message}")


@dataclass(frozen=True)
class Generation:
    """A finished request: the result message and its images decoded."""

    result: orchestrator_pb2.GenerateResult
    images: list[Image.Image]
    seed: int
    parameters: str  # the resolved parameters, as written into each PNG's tEXt chunk

    @classmethod
    def from_result(cls, result: orchestrator_pb2.GenerateResult) -> Generation:
        images = []
        for png in result.images:
            img = Image.open(io.BytesIO(png))
            img.load()
            images.append(img)
        return cls(result, images, result.seed, result.parameters)

    @property
    def image(self) -> Image.Image:
        """The first image."""
        if not self.images:
            video = " (it holds a video: see .video)" if self.result.video else ""
            raise ValueError(f"request {self.result.request_id!r} produced no images{video}")
        return self.images[0]

    @property
    def video(self) -> bytes:
        return self.result.video


def parse_lora(text: str) -> tuple[str, float]:
    """'PATH[:SCALE]' -> (PATH, SCALE), scale 1.0 when absent.

    The last ':' splits off a scale only when a finite number follows it, so 'hf://org/repo/x.safetensors'
    is a spec as a whole and 's3://b/x.safetensors:0.8' is that file at 0.8.
    """
    spec, scale = text, 1.0
    head, sep, tail = text.rpartition(":")
    if sep:
        try:
            value = float(tail)
        except ValueError:
            value = math.nan
        if math.isfinite(value):
            spec, scale = head, value
    _check_lora(spec, scale, text)
    return spec, scale


def _check_lora(spec: str, scale: float, given: object) -> None:
    if not spec:
        raise ValueError(f"LoRA {given!r}: empty path")
    if not math.isfinite(scale):
        raise ValueError(f"LoRA {given!r}: scale {scale} is not a finite number")
    if scale == 0:
        raise ValueError(
            f"LoRA {given!r}: scale 0 reads as 1.0 on the wire; leave the LoRA out, or use a tiny scale"
        )


def lora_spec(lora: Lora) -> common_pb2.LoraSpec:
    """One LoRA argument as its message: 'PATH[:SCALE]', (path_or_spec, scale), or a LoraSpec as it is."""
    if isinstance(lora, common_pb2.LoraSpec):
        return lora
    if isinstance(lora, str):
        spec, scale = parse_lora(lora)
    else:
        path, scale = lora
        spec, scale = str(path), float(scale)
        _check_lora(spec, scale, lora)
    return common_pb2.LoraSpec(spec=spec, scale=scale)


def image_media(image: ImageInput) -> common_pb2.Media:
    """An input image as Media: bytes as given (type sniffed by the server), a PIL image as PNG, a file read."""
    if isinstance(image, bytes):
        return common_pb2.Media(data=image)
    if isinstance(image, Image.Image):
        buf = io.BytesIO()
        image.save(buf, format="PNG")
        return common_pb2.Media(data=buf.getvalue(), mime_type="image/png")
    path = Path(image)
    return common_pb2.Media(data=path.read_bytes(), mime_type=_MIME.get(path.suffix.lower(), ""))


def _set_number(req: GenerateRequest, name: str, value: float | None, hi: int | None = None) -> None:
    """Set an optional field when given; unset stays unset (the server's defaults apply)."""
    if value is None:
        return
    if hi is not None:
        if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= hi:
            raise ValueError(f"{name}={value!r}: expected an integer in [0, {hi}]")
        setattr(req, name, int(value))
        return
    if not math.isfinite(value):
        raise ValueError(f"{name}={value!r} is not a finite number")
    setattr(req, name, float(value))


def build_request(
    *,
    model: str,
    prompt: str,
    negative_prompt: str | None = None,
    seed: int | None = None,
    steps: int | None = None,
    width: int | None = None,
    height: int | None = None,
    guidance: float | None = None,
    cfg_scale: float | None = None,
    loras: Sequence[Lora] = (),
    lora_mode: str | None = None,
    input_image: ImageInput | None = None,
    last_image: ImageInput | None = None,
    input_video: bytes | str | Path | None = None,
    strength: float | None = None,
    num_frames: int | None = None,
    fps: float | None = None,
    batch_size: int | None = None,
    max_sequence_length: int | None = None,
    components: Mapping[str, str] | None = None,
    request_id: str | None = None,
    family: str = "",
    task: str = "",
    cfg_scale_2: float | None = None,
    solver: str | None = None,
    shift: float | None = None,
    frames_png: bool = False,
) -> GenerateRequest:
    """The GenerateRequest of `Client.generate`'s arguments; ValueError names a bad argument."""
    if not model:
        raise ValueError("model is required")
    req = GenerateRequest(
        model=str(model),
        prompt=prompt,
        negative_prompt=negative_prompt or "",
        request_id=request_id or "",
        family=family,
        task=task,
    )
    uints = (
        ("steps", steps),
        ("width", width),
        ("height", height),
        ("num_frames", num_frames),
        ("max_sequence_length", max_sequence_length),
    )
    for name, value in uints:
        _set_number(req, name, value, _UINT32)
    _set_number(req, "seed", seed, _UINT64)
    for name, value in (
        ("guidance", guidance),
        ("cfg_scale", cfg_scale),
        ("cfg_scale_2", cfg_scale_2),
        ("fps", fps),
    ):
        _set_number(req, name, value)
    if solver:
        req.sampler.solver = solver
    if shift is not None:
        _set_number(req.sampler, "shift", shift)
    req.output.video_frames_png = frames_png
    if batch_size is not None:
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or not 1 <= batch_size <= _UINT32:
            raise ValueError(f"batch_size={batch_size!r}: expected an integer >= 1")
        req.batch_size = batch_size
    req.loras.extend(lora_spec(lora) for lora in loras)
    if lora_mode is not None:
        if lora_mode not in LORA_MODES:
            raise ValueError(f"lora_mode={lora_mode!r}: expected one of {sorted(LORA_MODES)}")
        req.lora_mode = LORA_MODES[lora_mode]
    if input_image is not None:
        req.input_images.append(image_media(input_image))
    if last_image is not None:
        req.last_image.CopyFrom(image_media(last_image))
    if input_video is not None:
        data = input_video if isinstance(input_video, bytes) else Path(input_video).read_bytes()
        req.input_video.CopyFrom(common_pb2.Media(data=data, mime_type="video/mp4"))
    if strength is not None:
        if input_image is None and input_video is None:
            raise ValueError(f"strength={strength!r} needs an input_image or an input_video")
        _set_number(req, "strength", strength)
    for key, spec in (components or {}).items():
        if key not in COMPONENTS:
            raise ValueError(f"components: unknown key {key!r}; known: {list(COMPONENTS)}")
        if not spec:
            raise ValueError(f"components[{key!r}] is empty")
        req.components[key] = str(spec)
    return req


class _Transport(Protocol):
    def stream(self, request: GenerateRequest, timeout_s: float | None) -> Iterator[GenerateEvent]: ...
    def close(self) -> None: ...


class _GrpcTransport:
    def __init__(
        self, endpoint: str, token: str | None, tls: ChannelTls | None, max_message_bytes: int
    ) -> None:
        self._token = token
        self._channel = open_channel(endpoint, max_message_bytes, tls)
        self._stub = orchestrator_pb2_grpc.OrchestratorStub(self._channel)

    def stream(self, request: GenerateRequest, timeout_s: float | None) -> Iterator[GenerateEvent]:
        metadata = [(REQUEST_ID_KEY, request.request_id)] if request.request_id else []
        if self._token:
            metadata.append(("authorization", f"Bearer {self._token}"))
        call = self._stub.Generate(request, timeout=timeout_s, metadata=metadata)
        try:
            yield from call
        except grpc.RpcError as e:
            raise ClientError(e.code(), e.details() or e.code().name) from None
        finally:
            call.cancel()  # a consumer that stops early cancels the request; a no-op once it finished

    def close(self) -> None:
        self._channel.close()


_DONE = object()


class _InProcessTransport:
    """The engine in this process: `generate(request, emit, cancelled)` from orchestrator.local, which raises
    only StageError. A consumer that stops early, or a passed deadline, cancels the work at the next stage or
    denoising step."""

    def __init__(
        self,
        generate: Callable[[GenerateRequest, OnEvent, threading.Event], orchestrator_pb2.GenerateResult],
    ) -> None:
        self._generate = generate

    def stream(self, request: GenerateRequest, timeout_s: float | None) -> Iterator[GenerateEvent]:
        items: queue.Queue = queue.Queue()
        cancelled = threading.Event()

        def work() -> None:
            try:
                items.put(GenerateEvent(result=self._generate(request, items.put, cancelled)))
            except StageError as e:
                items.put(ClientError(e.code, str(e)))
            except Exception as e:  # orchestrator.local maps every error to a StageError; belt and braces
                items.put(ClientError(grpc.StatusCode.INTERNAL, f"{type(e).__name__}: {e}"))
            finally:
                items.put(_DONE)

        threading.Thread(target=work, name="generate-inproc", daemon=True).start()
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        try:
            while True:
                try:
                    wait = None if deadline is None else max(deadline - time.monotonic(), 0.0)
                    item = items.get(timeout=wait)
                except queue.Empty:
                    raise ClientError(
                        grpc.StatusCode.DEADLINE_EXCEEDED, f"no result within {timeout_s}s"
                    ) from None
                if item is _DONE:
                    return
                if isinstance(item, ClientError):
                    raise item
                yield item
        finally:
            cancelled.set()  # a no-op once the work finished

    def close(self) -> None:
        pass


class Client:
    """Generate over gRPC (`Client(endpoint, token)`) or in this process (`Client.in_process()`).

    Use it as a context manager, or call close(): it owns its channel. With `retries`, a request that fails
    UNAVAILABLE (the orchestrator restarting, a connection lost) is submitted again under the same request
    id (one is made when the request has none): the orchestrator's journal resumes it where it stopped, or
    returns its result, so nothing is computed twice.
    """

    def __init__(
        self,
        endpoint: str,
        token: str | None = None,
        *,
        tls_ca: bytes | None = None,
        tls_cert: bytes | None = None,
        tls_key: bytes | None = None,
        tls_server_name: str | None = None,
        timeout_s: float | None = None,
        max_message_bytes: int = 64 << 20,
        retries: int = 0,
        backoff_s: float = 0.5,
    ) -> None:
        """`tls_ca` (PEM): TLS, verifying the orchestrator's certificate with it; `tls_cert` + `tls_key` (PEM):
        this client's certificate, for an orchestrator that requires one (mutual TLS)."""
        if retries < 0:
            raise ValueError(f"retries={retries} must be >= 0")
        if tls_ca is None and (tls_cert is not None or tls_key is not None or tls_server_name):
            raise ValueError("tls_cert, tls_key and tls_server_name need tls_ca (the CA of the server)")
        tls = None if tls_ca is None else ChannelTls(tls_ca, tls_cert, tls_key, tls_server_name)
        self._init(endpoint, _GrpcTransport(endpoint, token, tls, max_message_bytes), timeout_s)
        self.retries = retries
        self.backoff_s = backoff_s

    def _init(self, endpoint: str, transport: _Transport, timeout_s: float | None) -> None:
        self.endpoint = endpoint
        self.timeout_s = timeout_s  # per request, all its attempts; None = no deadline
        self._transport = transport
        self.retries = 0
        self.backoff_s = 0.5

    @classmethod
    def in_process(
        cls, settings: Any = None, *, model_roots: tuple[Path, ...] = (), timeout_s: float | None = None
    ) -> Client:
        """The whole engine in this process (stage servicers called directly, a local or configured store).

        `settings` is a `services.common.settings.Settings` (default: from the environment). With a timeout,
        a request that overruns raises DEADLINE_EXCEEDED (its work stops at the next stage or step).
        """
        from orchestrator.local import in_process_generate  # the composition root, only when asked for

        try:
            generate = in_process_generate(settings, model_roots)
        except StageError as e:
            raise ClientError(e.code, str(e)) from e
        client = cls.__new__(cls)
        client._init("inproc", _InProcessTransport(generate), timeout_s)
        return client

    def stream(self, request: GenerateRequest) -> Iterator[GenerateEvent]:
        """The request's events as they happen, the result last; ClientError when it fails. Stopping the
        iteration early cancels the request (over gRPC)."""
        return self._transport.stream(request, self.timeout_s)

    def run(self, request: GenerateRequest, on_event: OnEvent | None = None) -> Generation:
        """Run a request to its result, passing every event (the result's too) to `on_event`; with `retries`,
        submit it again on UNAVAILABLE (backoff doubling from `backoff_s`, within `timeout_s` in all)."""
        if self.retries and not request.request_id:
            request = GenerateRequest.FromString(request.SerializeToString())
            request.request_id = uuid.uuid4().hex
        deadline = None if self.timeout_s is None else time.monotonic() + self.timeout_s
        delay = self.backoff_s
        for attempt in range(self.retries + 1):
            timeout = None if deadline is None else max(deadline - time.monotonic(), 0.001)
            try:
                return self._run_once(request, on_event, timeout)
            except ClientError as e:
                out_of_time = deadline is not None and time.monotonic() + delay >= deadline
                if e.code != grpc.StatusCode.UNAVAILABLE or attempt == self.retries or out_of_time:
                    raise
            time.sleep(delay)
            delay *= 2
        raise AssertionError("unreachable")

    def _run_once(
        self, request: GenerateRequest, on_event: OnEvent | None, timeout_s: float | None
    ) -> Generation:
        result = None
        for event in self._transport.stream(request, timeout_s):
            if on_event is not None:
                on_event(event)
            if event.WhichOneof("event") == "result":
                result = event.result
        if result is None:
            raise ClientError(
                grpc.StatusCode.INTERNAL, f"the stream from {self.endpoint} ended without a result"
            )
        return Generation.from_result(result)

    def generate(
        self,
        *,
        model: str,
        prompt: str,
        negative_prompt: str | None = None,
        seed: int | None = None,
        steps: int | None = None,
        width: int | None = None,
        height: int | None = None,
        guidance: float | None = None,
        cfg_scale: float | None = None,
        loras: Sequence[Lora] = (),
        lora_mode: str | None = None,
        input_image: ImageInput | None = None,
        strength: float | None = None,
        num_frames: int | None = None,
        fps: float | None = None,
        batch_size: int | None = None,
        max_sequence_length: int | None = None,
        components: Mapping[str, str] | None = None,
        request_id: str | None = None,
        family: str = "",
        task: str = "",
        on_event: OnEvent | None = None,
    ) -> Generation:
        """One generation; arguments left at None take the model's defaults (see build_request)."""
        request = build_request(
            model=model,
            prompt=prompt,
            negative_prompt=negative_prompt,
            seed=seed,
            steps=steps,
            width=width,
            height=height,
            guidance=guidance,
            cfg_scale=cfg_scale,
            loras=loras,
            lora_mode=lora_mode,
            input_image=input_image,
            strength=strength,
            num_frames=num_frames,
            fps=fps,
            batch_size=batch_size,
            max_sequence_length=max_sequence_length,
            components=components,
            request_id=request_id,
            family=family,
            task=task,
        )
        return self.run(request, on_event)

    def close(self) -> None:
        self._transport.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
