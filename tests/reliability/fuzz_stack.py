"""The whole engine on real gRPC servers for the reliability tests, and a client that counts what it gets back.

Every stage servicer runs on a server of its own at port 0 and the orchestrator on another, calling the stages
over gRPC: token auth on everywhere, one local store in a tmp dir, the model root holding a tiny FLUX.1
(`tiny-flux`) and a tiny CLIP image encoder (`tiny-i2v`). `FuzzClient.call` sends one request (a message, or
raw bytes through an identity serializer) with the token and a deadline, and records the status code per RPC.
"""

from __future__ import annotations

import io
import os
import threading
import wave
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import torch
from google.protobuf import message_factory
from google.protobuf.message import Message
from grpc_health.v1 import health_pb2, health_pb2_grpc
from PIL import Image

from orchestrator.clients import grpc_clients
from orchestrator.jobs.base import JobIndex
from orchestrator.jobs.service import Jobs
from orchestrator.journal import Journal
from orchestrator.objects import DirObjects
from orchestrator.runner import Runner
from orchestrator.server import SERVICE as ORCHESTRATOR_SERVICE
from orchestrator.server import OrchestratorServicer
from orchestrator.settings import JobSettings
from protos import (
    audio_pb2,
    common_pb2,
    denoiser_pb2,
    orchestrator_pb2,
    orchestrator_pb2_grpc,
    tensor_pb2,
    text_encoder_pb2,
    vae_pb2,
)
from services.audio import server as audio_server
from services.common import wire
from services.common.server import Binding, Server, create_server
from services.common.settings import Settings
from services.common.store import LocalTensorStore
from services.denoiser import server as denoiser_server
from services.text_encoder import server as text_encoder_server
from services.vae import server as vae_server

TOKEN = "reliability-fuzz-token"
FLUX = "tiny-flux"
I2V = "tiny-i2v"
# Generated requests per RPC and kind: `make test` runs the default, `make test-reliability` 3000.
EXAMPLES = int(os.environ.get("DIFFMESH_FUZZ_EXAMPLES", "200"))
CALL_TIMEOUT_S = 60.0  # generous: a tiny Generate takes well under a second; nothing may reach it
STAGES: dict[str, Callable[[Settings, LocalTensorStore], Binding]] = {
    "text_encoder": text_encoder_server.binding,
    "denoiser": denoiser_server.binding,
    "vae": vae_server.binding,
    "audio": audio_server.binding,
}
FILES = (text_encoder_pb2, denoiser_pb2, vae_pb2, audio_pb2, orchestrator_pb2)
# A status that says "the server did not handle this input": never acceptable.
BAD_CODES = frozenset({grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN, grpc.StatusCode.DEADLINE_EXCEEDED})


@dataclass(frozen=True)
class Rpc:
    """One method of one service, from its descriptor."""

    service: str  # "diffmesh.v1.Vae"
    method: str  # "Decode"
    request: type[Message]
    response: type[Message]
    streaming: bool
    server: str  # which of the stack's servers hosts it

    @property
    def name(self) -> str:
        return f"{self.service.rsplit('.', 1)[-1]}.{self.method}"

    @property
    def path(self) -> str:
        return f"/{self.service}/{self.method}"


def _server_of(service: str) -> str:
    return {
        "TextEncoder": "text_encoder",
        "Denoiser": "denoiser",
        "Vae": "vae",
        "Audio": "audio",
        "Orchestrator": "orchestrator",
    }[service.rsplit(".", 1)[-1]]


def all_rpcs() -> list[Rpc]:
    """Every RPC of every diffmesh service, in proto order."""
    out = []
    for module in FILES:
        for service in module.DESCRIPTOR.services_by_name.values():
            for m in service.methods:
                out.append(
                    Rpc(
                        service=service.full_name,
                        method=m.name,
                        request=message_factory.GetMessageClass(m.input_type),
                        response=message_factory.GetMessageClass(m.output_type),
                        streaming=m.server_streaming,
                        server=_server_of(service.full_name),
                    )
                )
    return out


@dataclass
class FuzzLog:
    """Requests sent and status codes got, per RPC; the calls that ended in a bad code, with their details."""

    codes: dict[str, Counter] = field(default_factory=dict)
    details: dict[tuple[str, str], str] = field(default_factory=dict)  # (rpc, code) -> the first details seen
    failures: list[str] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def record(self, rpc: str, code: grpc.StatusCode, details: str = "") -> None:
        with self.lock:
            self.codes.setdefault(rpc, Counter())[code.name] += 1
            self.details.setdefault((rpc, code.name), details[:300])

    def lines(self) -> list[str]:
        out = []
        for rpc in sorted(self.codes):
            counts = self.codes[rpc]
            hist = ", ".join(f"{name} {n}" for name, n in counts.most_common())
            out.append(f"{rpc:<28} {sum(counts.values()):>6} requests: {hist}")
        return out


# -- media and tensors the requests use ---------------------------------------------------------------------
def png(width: int, height: int, mode: str = "RGB", seed: int = 0) -> bytes:
    g = torch.Generator().manual_seed(seed)
    pixels = torch.randint(0, 256, (height, width, 3), generator=g, dtype=torch.uint8)
    img = Image.fromarray(pixels.numpy(), "RGB")
    if mode != "RGB":
        img = img.convert(mode if mode in ("L", "RGBA", "P") else "L").convert(mode)
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def wav(samples: int = 1600, channels: int = 1, width: int = 2, rate: int = 16000) -> bytes:
    buf = io.BytesIO()
    with wave.open(buf, "wb") as w:
        w.setnchannels(channels)
        w.setsampwidth(width)
        w.setframerate(rate)
        w.writeframes(bytes(samples * channels * width))
    return buf.getvalue()


@dataclass
class Stack:
    root: Path  # the model root
    store: LocalTensorStore
    servers: dict[str, tuple[Server, int]]
    channels: dict[str, grpc.Channel]
    jobs_dir: Path
    seeds: dict[str, tensor_pb2.Tensor] = field(default_factory=dict)  # named tensors, inline and as refs

    def channel(self, rpc: Rpc) -> grpc.Channel:
        return self.channels[rpc.server]

    def close(self) -> None:
        for channel in self.channels.values():
            channel.close()
        for server, _ in self.servers.values():
            server.stop(0)


def start_stack(tmp: Path, root: Path) -> Stack:
    """Every stage and the orchestrator on servers of their own; the orchestrator calls the stages over gRPC."""
    settings = Settings(
        local_store_dir=tmp / "store",
        cache_dir=tmp / "cache",
        token=TOKEN,
        model_roots=(root,),
        device="cpu",
        offline=True,
    )
    store = LocalTensorStore(settings.local_store_dir, settings.inline_limit)
    servers: dict[str, tuple[Server, int]] = {}
    for stage, make in STAGES.items():
        servers[stage] = create_server(
            [make(settings, store)], port=0, token=TOKEN, max_message_bytes=settings.max_message_bytes
        )
    endpoints = {stage: f"127.0.0.1:{port}" for stage, (_, port) in servers.items()}
    runner = Runner(grpc_clients(endpoints, TOKEN, retries=1), stage_timeout_s=CALL_TIMEOUT_S)
    jobs_dir = tmp / "state"
    # the local launcher runs `true` instead of the trainer: a spec that passes every check starts nothing heavy
    job_settings = JobSettings(state_dir=jobs_dir, train_command=("true",), cancel_grace_s=1.0)
    jobs = Jobs(job_settings, JobIndex(jobs_dir / "jobs"))
    # the request journal in the stages' store: fuzzed request ids go through it too
    journal = Journal(DirObjects(settings.local_store_dir))
    servicer = OrchestratorServicer(runner, (root,), settings.cache_dir, jobs, journal)
    binding = Binding(
        ORCHESTRATOR_SERVICE, orchestrator_pb2_grpc.add_OrchestratorServicer_to_server, servicer
    )
    servers["orchestrator"] = create_server([binding], port=0, token=TOKEN)
    channels = {name: grpc.insecure_channel(f"127.0.0.1:{port}") for name, (_, port) in servers.items()}
    stack = Stack(root, store, servers, channels, jobs_dir)
    _seed_tensors(stack)
    return stack


def _seed_tensors(stack: Stack) -> None:
    """Real text embeddings of the tiny FLUX (from the text encoder) and a few plain tensors, each inline and
    as a ref to an object in the store: what fuzzed refs point at, or mangle."""
    client = FuzzClient(stack, FuzzLog())
    resp = client.unary(
        "text_encoder",
        "/diffmesh.v1.TextEncoder/Encode",
        text_encoder_pb2.EncodeTextRequest(model=FLUX, prompts=["a red cat"]),
        text_encoder_pb2.EncodeTextResponse,
    )
    tensors = {name: stack.store.load(t, name) for name, t in resp.outputs.items()}
    tensors |= {
        "latents": torch.zeros(1, 16, 2, 2),
        "image": torch.rand(3, 16, 16) * 2 - 1,
        "images": torch.rand(2, 3, 16, 16) * 2 - 1,
        "video": torch.rand(3, 5, 16, 16) * 2 - 1,
        "waveform": torch.zeros(1, 1600),
        "scalar": torch.tensor(1.5),
        "bools": torch.tensor([True, False]),
        "bf16": torch.ones(2, 3, dtype=torch.bfloat16),
        "f8": torch.zeros(4, dtype=torch.float8_e4m3fn),
        "ints": torch.arange(6, dtype=torch.int64).reshape(2, 3),
        "empty": torch.zeros(0, 16, 2, 2),
    }
    for name, t in tensors.items():
        stack.seeds[name] = wire.to_inline(t)
        stack.seeds[f"{name}@ref"] = tensor_pb2.Tensor(ref=stack.store.put(f"runs/fuzz-seed/s/{name}", t))


# -- the client --------------------------------------------------------------------------------------------
class FuzzClient:
    """Sends one request with the token and a deadline; returns the status code and records it."""

    def __init__(self, stack: Stack, log: FuzzLog, timeout: float = CALL_TIMEOUT_S) -> None:
        self.stack = stack
        self.log = log
        self.timeout = timeout
        self.metadata = (("authorization", f"Bearer {TOKEN}"),)

    def unary(self, server: str, path: str, request: Message, response: type[Message]) -> Any:
        call = self.stack.channels[server].unary_unary(
            path,
            request_serializer=type(request).SerializeToString,
            response_deserializer=response.FromString,
        )
        return call(request, timeout=self.timeout, metadata=self.metadata)

    def stream(self, server: str, path: str, request: Message, response: type[Message]) -> list[Any]:
        call = self.stack.channels[server].unary_stream(
            path,
            request_serializer=type(request).SerializeToString,
            response_deserializer=response.FromString,
        )
        return list(call(request, timeout=self.timeout, metadata=self.metadata))

    def call(
        self, rpc: Rpc, request: Message | bytes, metadata: tuple[tuple[str, str], ...] = ()
    ) -> tuple[grpc.StatusCode, str]:
        """(code, details) of one call; a message goes through its serializer, bytes as they are."""
        serialize = (lambda b: b) if isinstance(request, bytes) else rpc.request.SerializeToString
        channel = self.stack.channel(rpc)
        metadata = self.metadata + metadata
        try:
            if rpc.streaming:
                call = channel.unary_stream(
                    rpc.path, request_serializer=serialize, response_deserializer=rpc.response.FromString
                )
                for _ in call(request, timeout=self.timeout, metadata=metadata):
                    pass
            else:
                call = channel.unary_unary(
                    rpc.path, request_serializer=serialize, response_deserializer=rpc.response.FromString
                )
                call(request, timeout=self.timeout, metadata=metadata)
            code, details = grpc.StatusCode.OK, ""
        except grpc.RpcError as e:
            code, details = e.code(), e.details() or ""
        self.log.record(rpc.name, code, details)
        return code, details

    def expect_handled(
        self, rpc: Rpc, request: Message | bytes, metadata: tuple[tuple[str, str], ...] = ()
    ) -> grpc.StatusCode:
        """One call that must end in success or a code that names a bad request, never INTERNAL / UNKNOWN /
        DEADLINE_EXCEEDED."""
        code, details = self.call(rpc, request, metadata)
        if code in BAD_CODES:
            shown = _short(request)
            self.log.failures.append(f"{rpc.name}: {code.name}: {details}")
            raise AssertionError(f"{rpc.name} answered {code.name} ({details!r}) to:\n{shown}")
        return code

    # -- known-good requests: the servers still answer them after the fuzzing ------------------------
    def healthy(self, server: str) -> bool:
        stub = health_pb2_grpc.HealthStub(self.stack.channels[server])
        resp = stub.Check(health_pb2.HealthCheckRequest(service=""), timeout=10)
        return resp.status == health_pb2.HealthCheckResponse.SERVING

    def known_good(self, server: str) -> None:
        """A request of each RPC of `server` that must succeed (Audio: one that must reach the model lookup,
        NOT_FOUND: no audio model exists yet); AssertionError otherwise."""
        assert self.healthy(server), f"{server}: health is not SERVING"
        s = self.stack.seeds
        te, dn, va = "/diffmesh.v1.TextEncoder/", "/diffmesh.v1.Denoiser/", "/diffmesh.v1.Vae/"
        if server == "text_encoder":
            req = text_encoder_pb2.EncodeTextRequest(model=FLUX, prompts=["a cat"], encoders=["text_encoder"])
            resp = self.unary(server, te + "Encode", req, text_encoder_pb2.EncodeTextResponse)
            assert "pooled_prompt_embeds" in resp.outputs
            req = text_encoder_pb2.EncodeImageRequest(model=I2V, images=[common_pb2.Media(data=png(32, 32))])
            resp = self.unary(server, te + "EncodeImage", req, text_encoder_pb2.EncodeImageResponse)
            assert "image_embeds" in resp.outputs
        elif server == "denoiser":
            events = self.stream(server, dn + "Denoise", good_denoise(s), denoiser_pb2.DenoiseEvent)
            assert events[-1].WhichOneof("event") == "result"
        elif server == "vae":
            req = vae_pb2.VaeDecodeRequest(model=FLUX, latents=s["latents"])
            resp = self.unary(server, va + "Decode", req, vae_pb2.VaeDecodeResponse)
            assert len(resp.images) == 1
            req = vae_pb2.VaeEncodeRequest(model=FLUX, inputs=[common_pb2.Media(data=png(16, 16))])
            resp = self.unary(server, va + "Encode", req, vae_pb2.VaeEncodeResponse)
            assert resp.latents.WhichOneof("value")
        elif server == "audio":
            for method, req in (
                ("Encode", audio_pb2.AudioEncodeRequest(model=FLUX, input=common_pb2.Media(data=wav()))),
                ("Decode", audio_pb2.AudioDecodeRequest(model=FLUX, latents=s["waveform"])),
            ):
                try:
                    self.unary(server, f"/diffmesh.v1.Audio/{method}", req, audio_pb2.AudioEncodeResponse)
                except grpc.RpcError as e:
                    assert e.code() == grpc.StatusCode.NOT_FOUND, (method, e.code(), e.details())
                else:
                    raise AssertionError(f"Audio.{method} found an audio model in {FLUX}")
        elif server == "orchestrator":
            path = "/diffmesh.v1.Orchestrator/"
            events = self.stream(server, path + "Generate", good_generate(), orchestrator_pb2.GenerateEvent)
            assert events[-1].result.images, "Generate gave no image"
            resp = self.unary(
                server,
                path + "ListModels",
                orchestrator_pb2.ListModelsRequest(),
                orchestrator_pb2.ListModelsResponse,
            )
            assert "flux" in resp.families
            self.unary(
                server,
                path + "ListJobs",
                orchestrator_pb2.ListJobsRequest(),
                orchestrator_pb2.ListJobsResponse,
            )
        else:
            raise KeyError(server)


def good_denoise(seeds: dict[str, tensor_pb2.Tensor]) -> denoiser_pb2.DenoiseRequest:
    req = denoiser_pb2.DenoiseRequest(model=FLUX, seed=1, steps=1, width=16, height=16)
    req.positive["prompt_embeds"].CopyFrom(seeds["prompt_embeds"])
    req.positive["pooled_prompt_embeds"].CopyFrom(seeds["pooled_prompt_embeds@ref"])
    return req


def good_generate() -> orchestrator_pb2.GenerateRequest:
    return orchestrator_pb2.GenerateRequest(
        model=FLUX, prompt="a red cat", seed=3, steps=1, width=16, height=16, max_sequence_length=16
    )


def _short(request: Message | bytes, limit: int = 1500) -> str:
    text = repr(request) if isinstance(request, bytes) else str(request)
    return text if len(text) <= limit else text[:limit] + f"... ({len(text)} chars)"
