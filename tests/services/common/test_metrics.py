"""Prometheus metrics of a stage server (services/common/metrics.py): a real server with the real denoiser
servicer (its model a registered test class, so no weights are needed) and a local store, `/metrics` scraped
over HTTP and parsed as Prometheus parses it. The registry is per process, so checks are deltas between two
scrapes (or label values unique to the test)."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
import torch
from prometheus_client.parser import text_string_to_metric_families

from protos import denoiser_pb2, denoiser_pb2_grpc, text_encoder_pb2, text_encoder_pb2_grpc
from services.common import metrics
from services.common.errors import Cancelled
from services.common.server import create_server
from services.common.settings import Settings
from services.common.store import LocalTensorStore
from services.denoiser import registry as denoiser_registry
from services.denoiser import server as denoiser_server
from services.text_encoder import server as text_encoder_server

TOKEN = "metrics-token"
AUTH = (("authorization", f"Bearer {TOKEN}"),)
MODEL_CLASS = "MetricsTestDenoiser"
REPO = Path(__file__).parents[3]


class StepModel:
    """A denoiser model that takes `delay` seconds a step and holds a known number of parameter bytes."""

    delay = 0.0

    def __init__(self) -> None:
        self.net = torch.nn.Linear(8, 4)  # 32 + 4 float32 parameters
        self.register = {"scale": torch.ones(6, dtype=torch.float16)}  # 12 bytes, in a dict attribute
        self.shared = self.net.weight  # the same tensor twice: counted once

    def denoise(self, inputs, on_step, is_cancelled) -> dict:
        for step in range(1, inputs.steps + 1):
            time.sleep(self.delay)
            if is_cancelled():
                raise Cancelled(f"cancelled at step {step}")
            on_step(step, inputs.steps)
        return {"latents": torch.zeros(1, 4, inputs.height // 8, inputs.width // 8)}


MODEL_BYTES = (32 + 4) * 4 + 6 * 2


def scrape(port: int) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample of http://127.0.0.1:<port>/metrics, by (name, sorted labels)."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as resp:
        assert resp.status == 200
        text = resp.read().decode()
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def value(samples: dict, name: str, **labels: str) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


def delta(before: dict, after: dict, name: str, **labels: str) -> float:
    return value(after, name, **labels) - value(before, name, **labels)


def wait_for(check, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.02)


@pytest.fixture
def model_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setitem(denoiser_registry.DENOISERS, MODEL_CLASS, lambda component, device: StepModel())
    monkeypatch.setattr(StepModel, "delay", 0.0)
    path = tmp_path / "step-model"
    (path / "transformer").mkdir(parents=True)
    (path / "transformer" / "config.json").write_text(json.dumps({"_class_name": MODEL_CLASS}))
    return path


@pytest.fixture
def store(tmp_path: Path) -> LocalTensorStore:
    return LocalTensorStore(tmp_path / "store", inline_limit=0)  # every tensor through the store


@pytest.fixture
def served(tmp_path: Path, store: LocalTensorStore, model_dir: Path) -> Iterator[tuple[object, grpc.Channel]]:
    settings = Settings(local_store_dir=store.root, token=TOKEN, cache_dir=tmp_path / "cache", device="cpu")
    bindings = [m.binding(settings, store) for m in (text_encoder_server, denoiser_server)]
    server, port = create_server(bindings, port=0, token=TOKEN, metrics_port=0)
    channel = grpc.insecure_channel(f"127.0.0.1:{port}")
    yield server, channel
    channel.close()
    server.stop(0)


def denoise_request(store: LocalTensorStore, model: Path, steps: int) -> denoiser_pb2.DenoiseRequest:
    req = denoiser_pb2.DenoiseRequest(model=str(model), steps=steps, width=32, height=16, seed=1)
    req.positive["prompt_embeds"].CopyFrom(store.put_tensor("runs/t/in/emb", torch.zeros(1, 3, 5)))
    return req


def test_rpcs_steps_models_and_store_are_counted(served, store: LocalTensorStore, model_dir: Path):
    server, channel = served
    port = server.metrics_port
    assert port and server.metrics.url == f"http://127.0.0.1:{port}/metrics"
    before = scrape(port)
    req = denoise_request(store, model_dir, steps=3)  # one put of 60 bytes
    events = list(denoiser_pb2_grpc.DenoiserStub(channel).Denoise(req, metadata=AUTH, timeout=10))
    assert events[-1].result.steps_run == 3
    te = text_encoder_pb2_grpc.TextEncoderStub(channel)
    with pytest.raises(grpc.RpcError) as e:  # a failing unary call
        te.Encode(text_encoder_pb2.EncodeTextRequest(model="", prompts=["p"]), metadata=AUTH, timeout=5)
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    with pytest.raises(grpc.RpcError) as e:  # refused by the token check, recorded all the same
        te.Encode(text_encoder_pb2.EncodeTextRequest(model="m", prompts=["p"]), timeout=5)
    assert e.value.code() == grpc.StatusCode.UNAUTHENTICATED
    after = scrape(port)

    rpc = "diffmesh_rpc_duration_seconds_count"
    assert delta(before, after, rpc, service="denoiser", method="Denoise", code="OK") == 1
    assert delta(before, after, rpc, service="text_encoder", method="Encode", code="INVALID_ARGUMENT") == 1
    assert delta(before, after, rpc, service="text_encoder", method="Encode", code="UNAUTHENTICATED") == 1
    assert delta(before, after, rpc, service="text_encoder", method="Encode", code="OK") == 0
    assert not any(k[0] == rpc and ("service", "health") in k[1] for k in after), "health is not recorded"
    assert value(after, "diffmesh_rpc_in_flight", service="denoiser", method="Denoise") == 0
    assert value(after, "diffmesh_rpc_queued", service="text_encoder+denoiser") == 0

    steps = dict(service="denoiser", model=str(model_dir))
    assert delta(before, after, "diffmesh_denoise_step_seconds_count", **steps) == 3
    assert delta(before, after, "diffmesh_denoise_step_seconds_sum", **steps) > 0

    label = dict(service="denoiser", model=f"{model_dir}/transformer")
    assert value(after, "diffmesh_model_bytes", **label) == MODEL_BYTES
    assert value(after, "diffmesh_models_loaded", service="denoiser") >= 1

    # the request's embeddings: 15 float32 put here, read by the denoiser; its latents (4 x 2 x 4) put by it
    assert delta(before, after, "diffmesh_store_bytes_total", direction="put") == 60 + 128
    assert delta(before, after, "diffmesh_store_bytes_total", direction="get") == 60
    assert delta(before, after, "diffmesh_store_seconds_count", direction="put") == 2
    assert delta(before, after, "diffmesh_store_seconds_count", direction="get") == 1


def test_store_counters_move_with_the_bytes(served, store: LocalTensorStore):
    server, _ = served
    before = scrape(server.metrics_port)
    ref = store.put("runs/r/s/x", torch.arange(1000, dtype=torch.float64))  # 8000 bytes
    store.get(ref)
    store.get(ref)
    after = scrape(server.metrics_port)
    assert delta(before, after, "diffmesh_store_bytes_total", direction="put") == 8000
    assert delta(before, after, "diffmesh_store_bytes_total", direction="get") == 16000
    assert delta(before, after, "diffmesh_store_seconds_count", direction="get") == 2
    assert delta(before, after, "diffmesh_store_seconds_bucket", direction="get", le="+Inf") == 2


def test_cancelled_stream_in_flight_and_queue(tmp_path: Path, store: LocalTensorStore, model_dir: Path):
    """One worker thread: a slow Denoise is in flight, a second waits in the queue; cancelling the first
    records CANCELLED and lets the second run."""
    StepModel.delay = 0.05
    settings = Settings(local_store_dir=store.root, token=TOKEN, cache_dir=tmp_path / "cache", device="cpu")
    server, port = create_server(
        [denoiser_server.binding(settings, store)], port=0, token=TOKEN, max_workers=1, metrics_port=0
    )
    try:
        stub = denoiser_pb2_grpc.DenoiserStub(grpc.insecure_channel(f"127.0.0.1:{port}"))
        labels = dict(service="denoiser", method="Denoise")
        before = scrape(server.metrics_port)
        first = stub.Denoise(denoise_request(store, model_dir, steps=200), metadata=AUTH, timeout=20)
        next(first)  # step 1 ran: the call holds the only worker
        second = stub.Denoise(denoise_request(store, model_dir, steps=1), metadata=AUTH, timeout=20)
        threading.Thread(target=lambda: list(second), daemon=True).start()
        wait_for(lambda: value(scrape(server.metrics_port), "diffmesh_rpc_queued", service="denoiser") == 1)
        assert value(scrape(server.metrics_port), "diffmesh_rpc_in_flight", **labels) == 1
        first.cancel()
        rpc = "diffmesh_rpc_duration_seconds_count"
        wait_for(lambda: delta(before, scrape(server.metrics_port), rpc, **labels, code="OK") == 1)
        after = scrape(server.metrics_port)
        assert delta(before, after, rpc, **labels, code="CANCELLED") == 1
        assert value(after, "diffmesh_rpc_queued", service="denoiser") == 0
        assert value(after, "diffmesh_rpc_in_flight", **labels) == 0
    finally:
        server.stop(0)


def test_stop_closes_the_metrics_port(tmp_path: Path, store: LocalTensorStore):
    settings = Settings(local_store_dir=store.root, cache_dir=tmp_path / "cache")
    server, _ = create_server([denoiser_server.binding(settings, store)], port=0, metrics_port=0)
    port = server.metrics_port
    assert (
        "diffmesh_rpc_duration_seconds"
        in urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    )
    thread = server.metrics._thread
    server.stop(0)
    assert not thread.is_alive()
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.1", port), timeout=2).close()
    server.stop(0)  # a second stop is harmless


def test_metrics_off_by_default_and_a_taken_port_is_an_error(tmp_path: Path, store: LocalTensorStore):
    settings = Settings(local_store_dir=store.root, cache_dir=tmp_path / "cache")
    server, _ = create_server([denoiser_server.binding(settings, store)], port=0)
    assert server.metrics is None and server.metrics_port is None
    server.stop(0)
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        with pytest.raises(OSError, match="metrics endpoint"):
            create_server(
                [denoiser_server.binding(settings, store)], port=0, metrics_port=taken.getsockname()[1]
            )


def test_model_bytes_drop_with_eviction():
    model = StepModel()
    assert metrics.tensor_bytes(model) == MODEL_BYTES
    assert metrics.tensor_bytes(model.net) == (32 + 4) * 4
    label = dict(service="evict-test", model="m")
    n = metrics.model_loaded("evict-test", "m", model)
    metrics.model_loaded("evict-test", "m", model)  # a second copy (another runtime) adds up
    assert metrics.REGISTRY.get_sample_value("diffmesh_model_bytes", label) == 2 * MODEL_BYTES
    metrics.model_evicted("evict-test", "m", n)
    assert metrics.REGISTRY.get_sample_value("diffmesh_model_bytes", label) == MODEL_BYTES
    metrics.model_evicted("evict-test", "m", n)
    assert metrics.REGISTRY.get_sample_value("diffmesh_model_bytes", label) is None  # series gone
    assert metrics.REGISTRY.get_sample_value("diffmesh_models_loaded", {"service": "evict-test"}) == 0


def test_service_labels():
    assert metrics.service_label("diffmesh.v1.TextEncoder") == "text_encoder"
    assert metrics.service_label("diffmesh.v1.Vae") == "vae"
    assert metrics.service_label("diffmesh.v1.Orchestrator") == "orchestrator"


@pytest.mark.timeout(60)
def test_diffmesh_serve_metrics_port(tmp_path: Path):
    """`diffmesh serve vae --metrics-port 0 --metrics-port-file F`: the port in F, before --port-file; SIGTERM
    stops both endpoints."""
    port_file, metrics_file = tmp_path / "vae.port", tmp_path / "vae.metrics-port"
    env = {**os.environ, "DIFFMESH_STORE": "local", "DIFFMESH_LOCAL_STORE": str(tmp_path / "store")}
    env.pop("DIFFMESH_METRICS_PORT", None)
    cmd = [
        sys.executable,
        "-m",
        "orchestrator.cli",
        "serve",
        "vae",
        "--port",
        "0",
        "--port-file",
        str(port_file),
    ]
    cmd += ["--metrics-port", "0", "--metrics-port-file", str(metrics_file)]
    proc = subprocess.Popen(
        cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True
    )
    try:
        wait_for(lambda: port_file.is_file() or proc.poll() is not None, timeout=45)
        assert proc.poll() is None and metrics_file.is_file()
        port = int(metrics_file.read_text())
        samples = scrape(port)
        assert ("diffmesh_rpc_queued", (("service", "vae"),)) in samples
        assert value(samples, "process_resident_memory_bytes") > 0
        assert not any(name.endswith("_created") for name, _ in samples)
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=30)
        assert proc.returncode == 0
        assert json.loads(out.splitlines()[0])["metrics_port"] == port
        with pytest.raises(ConnectionRefusedError):
            socket.create_connection(("127.0.0.1", port), timeout=2).close()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
