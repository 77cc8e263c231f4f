"""Stage timings of a request: the runner's own per stage (with the endpoint it called) and the services' own
(`<stage>.service`, with the replica that ran it) in the Generate result, the FLUX family's stage calls
passing the services' timings on, and `diffmesh_stage_duration_seconds` / `diffmesh_stage_failures_total`
(orchestrator/metrics.py) on the orchestrator's `/metrics` beside its RPC metrics."""

from __future__ import annotations

import io
import threading
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from PIL import Image
from prometheus_client.parser import text_string_to_metric_families

from orchestrator import metrics
from orchestrator.cli import build_parser
from orchestrator.client import Client, ClientError
from orchestrator.errors import StageError
from orchestrator.graph import Graph, Stage
from orchestrator.runner import RunContext, Runner
from orchestrator.server import OrchestratorServicer
from protos import (
    common_pb2,
    denoiser_pb2,
    orchestrator_pb2,
    tensor_pb2,
    text_encoder_pb2,
    vae_pb2,
)


def sample(name: str, **labels: str) -> float:
    return metrics.REGISTRY.get_sample_value(name, labels) or 0.0


def context() -> RunContext:
    return RunContext(request_id="r1", params=None, emit=lambda _e: None)


class Endpoint:
    def __init__(self, endpoint: str) -> None:
        self.endpoint = endpoint


def timing(seconds: float, replica: str) -> common_pb2.StageTiming:
    return common_pb2.StageTiming(stage="svc", seconds=seconds, endpoint=replica)


def test_each_stage_is_timed_with_its_endpoint_and_the_services_own_time():
    enc, den = f"enc-{uuid.uuid4().hex[:8]}", f"den-{uuid.uuid4().hex[:8]}"

    def encode(client, inputs, ctx):
        ctx.report(timing(0.25, "pod-a"))  # two calls of one stage (two encoders): summed
        ctx.report(timing(0.5, "pod-b"))
        ctx.report(common_pb2.StageTiming())  # a service that sent none: ignored
        return {"emb": 1}

    def denoise(client, inputs, ctx):
        return {"latents": 2}  # reports nothing: no .service timing

    graph = Graph(
        "t2i",
        (
            Stage(enc, "text_encoder", ("prompt",), ("emb",), encode),
            Stage(den, "denoiser", ("emb",), ("latents",), denoise),
        ),
        ("latents",),
    )
    runner = Runner({"text_encoder": Endpoint("te:50051"), "denoiser": Endpoint("dn:50051")})
    ctx = context()
    assert runner.run(graph, {"prompt": "p"}, ctx) == {"latents": 2}
    got = [(t.stage, t.endpoint) for t in ctx.timings]
    assert got == [(enc, "te:50051"), (f"{enc}.service", "pod-a,pod-b"), (den, "dn:50051")]
    assert ctx.timings[1].seconds == pytest.approx(0.75)
    assert all(t.seconds >= 0 for t in ctx.timings)
    for t in (ctx.timings[0], ctx.timings[2]):
        assert sample("diffmesh_stage_duration_seconds_count", stage=t.stage, endpoint=t.endpoint) == 1
        assert sample(
            "diffmesh_stage_duration_seconds_sum", stage=t.stage, endpoint=t.endpoint
        ) == pytest.approx(t.seconds)


@pytest.mark.parametrize(
    "error, code",
    [
        (StageError(grpc.StatusCode.NOT_FOUND, "no such model", "x"), "NOT_FOUND"),
        (RuntimeError("bug"), "INTERNAL"),
    ],
)
def test_a_failed_stage_is_counted_by_code_not_timed(error, code):
    name = f"fail-{uuid.uuid4().hex[:8]}"

    def run(client, inputs, ctx):
        raise error

    graph = Graph("t2i", (Stage(name, "vae", ("x",), ("y",), run),), ("y",))
    with pytest.raises(type(error)):
        Runner({"vae": Endpoint("vae:1")}).run(graph, {"x": 1}, context())
    assert sample("diffmesh_stage_failures_total", stage=name, endpoint="vae:1", code=code) == 1
    assert sample("diffmesh_stage_duration_seconds_count", stage=name, endpoint="vae:1") == 0


# -- the FLUX family end to end over fake stage clients: every stage and every service timing -----------------


def _png() -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (16, 16)).save(buf, format="PNG")
    return buf.getvalue()


class FakeStages:
    """The client interface of orchestrator.clients for all three FLUX services, answering like them."""

    def __init__(self, endpoint: str, replica: str) -> None:
        self.endpoint, self.replica = endpoint, replica

    def _timing(self, stage: str) -> common_pb2.StageTiming:
        return common_pb2.StageTiming(stage=stage, seconds=0.001, endpoint=self.replica)

    def encode(self, req, opts):
        if isinstance(req, vae_pb2.VaeEncodeRequest):
            return vae_pb2.VaeEncodeResponse(latents=tensor_pb2.Tensor(), timing=self._timing("vae"))
        outputs = {name: tensor_pb2.Tensor() for name in req.outputs}
        return text_encoder_pb2.EncodeTextResponse(outputs=outputs, timing=self._timing("text_encoder"))

    def denoise(self, req, opts) -> Iterator[denoiser_pb2.DenoiseEvent]:
        for step in range(1, req.steps + 1):
            yield denoiser_pb2.DenoiseEvent(progress=common_pb2.Progress(step=step, total=req.steps))
        result = denoiser_pb2.DenoiseResult(
            latents=tensor_pb2.Tensor(), steps_run=req.steps, timing=self._timing("denoiser")
        )
        yield denoiser_pb2.DenoiseEvent(result=result)

    def decode(self, req, opts):
        return vae_pb2.VaeDecodeResponse(images=[_png()], timing=self._timing("vae"))


def test_flux_generate_result_carries_every_stage_and_service_timing():
    clients = {
        "text_encoder": FakeStages("text-encoder:50051", "te-pod"),
        "denoiser": FakeStages("denoiser:50051", "dn-pod"),
        "vae": FakeStages("vae:50051", "vae-pod"),
    }
    orch = OrchestratorServicer(Runner(clients))
    req = orchestrator_pb2.GenerateRequest(model="flux-x", family="flux", prompt="a cat", steps=2)
    result = orch.generate(req, lambda _e: None)
    got = [(t.stage, t.endpoint) for t in result.timings]
    assert got == [
        ("encode_prompt", "text-encoder:50051"),
        ("encode_prompt.service", "te-pod"),
        ("denoise", "denoiser:50051"),
        ("denoise.service", "dn-pod"),
        ("decode", "vae:50051"),
        ("decode.service", "vae-pod"),
    ]
    assert [t.seconds for t in result.timings[1::2]] == pytest.approx([0.001] * 3)
    assert sum(t.seconds for t in result.timings[::2]) <= result.total_seconds


# -- the orchestrator's /metrics: its RPCs and its stages on one endpoint ------------------------------------


def scrape(port: int) -> dict:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as resp:
        text = resp.read().decode()
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def delta(before: dict, after: dict, name: str, **labels: str) -> float:
    key = (name, tuple(sorted(labels.items())))
    return after.get(key, 0.0) - before.get(key, 0.0)


@pytest.fixture
def orchestrator_server(test_family, tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """`diffmesh serve orchestrator`'s server (orchestrator.local.start_stage_server) with metrics on a free
    port; its `vae` stage endpoint is never dialled (the test family ignores its client)."""
    from orchestrator.local import start_stage_server

    for name, val in {
        "DIFFMESH_TOKEN": "tok",
        "DIFFMESH_VAE": "127.0.0.1:9",
        "DIFFMESH_STATE_DIR": str(tmp_path / "state"),
        "DIFFMESH_CACHE_DIR": str(tmp_path / "cache"),
        "DIFFMESH_LAUNCHER": "local",
    }.items():
        monkeypatch.setenv(name, val)
    server, port = start_stage_server("orchestrator", "127.0.0.1", 0, metrics_port=0)
    yield server, port
    server.stop(0)


def test_orchestrator_metrics_endpoint_serves_rpcs_and_stages(orchestrator_server):
    server, port = orchestrator_server
    before = scrape(server.metrics_port)
    with Client(f"127.0.0.1:{port}", "tok") as client:
        client.generate(model="tiny", family="testfam", prompt="a cat", steps=2)
        with pytest.raises(ClientError):
            client.generate(model="tiny", family="testfam", prompt="missing", steps=2)
    after = scrape(server.metrics_port)
    stage = dict(stage="denoise", endpoint="127.0.0.1:9")
    assert delta(before, after, "diffmesh_stage_duration_seconds_count", **stage) == 1
    assert delta(before, after, "diffmesh_stage_failures_total", **stage, code="NOT_FOUND") == 1
    rpc = dict(service="orchestrator", method="Generate")
    assert delta(before, after, "diffmesh_rpc_duration_seconds_count", **rpc, code="OK") == 1
    assert delta(before, after, "diffmesh_rpc_duration_seconds_count", **rpc, code="NOT_FOUND") == 1
    assert after[("diffmesh_rpc_in_flight", tuple(sorted(rpc.items())))] == 0


def test_serve_metrics_port_flag_and_env(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.delenv("DIFFMESH_METRICS_PORT", raising=False)
    assert build_parser().parse_args(["serve", "vae"]).metrics_port is None  # off unless asked for
    assert build_parser().parse_args(["serve", "vae", "--metrics-port", "0"]).metrics_port == 0
    monkeypatch.setenv("DIFFMESH_METRICS_PORT", "9090")
    args = build_parser().parse_args(["serve", "vae"])
    assert args.metrics_port == 9090 and args.metrics_host is None
    assert build_parser().parse_args(["serve", "vae", "--metrics-port", "off"]).metrics_port is None
    with pytest.raises(SystemExit):
        build_parser().parse_args(["serve", "vae", "--metrics-port", "70000"])


def test_runner_metrics_are_thread_safe_under_concurrent_requests():
    name = f"par-{uuid.uuid4().hex[:8]}"
    graph = Graph("t2i", (Stage(name, "vae", ("x",), ("y",), lambda c, i, ctx: {"y": 1}),), ("y",))
    runner = Runner({"vae": Endpoint("vae:1")})
    threads = [threading.Thread(target=runner.run, args=(graph, {"x": 1}, context())) for _ in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sample("diffmesh_stage_duration_seconds_count", stage=name, endpoint="vae:1") == 16
