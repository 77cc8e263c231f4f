"""A test-only family ("testfam") and the real Orchestrator servicer on a real gRPC server (port 0).

No real family exists to test the client and the CLI with, so `testfam` is test data: one stage (on the
"vae" service, whose client it ignores) that reports `steps` Progress events and returns PNGs made with
PIL. It records every request it plans, and fails on purpose for a few prompts.
"""

from __future__ import annotations

import io
import json
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from PIL import Image

from orchestrator import families
from orchestrator.errors import invalid
from orchestrator.graph import Graph, Stage
from orchestrator.pngtext import PARAMETERS_KEY, with_text
from orchestrator.runner import Runner
from orchestrator.server import SERVICE, OrchestratorServicer
from protos import common_pb2, orchestrator_pb2, orchestrator_pb2_grpc
from services.common.errors import NotFound
from services.common.server import Binding, create_server
from services.common.settings import Settings

TOKEN = "orch-test-token"
FAMILY = "testfam"
PIPELINE = "TestPipeline"
DEFAULTS = {"steps": 4, "width": 32, "height": 16, "seed": 1234}
MAX_STEPS = 50


@dataclass
class RecordingFamily:
    """What the family saw and made; `release` unblocks a request whose prompt is "block"."""

    name: str = FAMILY
    defaults: dict = field(default_factory=lambda: dict(DEFAULTS))
    requests: list[orchestrator_pb2.GenerateRequest] = field(default_factory=list)
    pngs: list[bytes] = field(default_factory=list)
    release: threading.Event = field(default_factory=threading.Event)
    saw_cancel: threading.Event = field(default_factory=threading.Event)

    def plan(self, request: orchestrator_pb2.GenerateRequest, model_dir: Path | None) -> families.Plan:
        self.requests.append(orchestrator_pb2.GenerateRequest.FromString(request.SerializeToString()))
        params = {k: getattr(request, k) if request.HasField(k) else v for k, v in self.defaults.items()}
        if not 1 <= params["steps"] <= MAX_STEPS:
            raise invalid(f"steps={params['steps']}: allowed range [1, {MAX_STEPS}]")
        params["batch_size"] = request.batch_size or 1
        stage = Stage("denoise", "vae", ("prompt",), ("images",), self.render)
        return families.Plan(Graph("t2i", (stage,), ("images",)), {"prompt": request.prompt}, params)

    def render(self, client: object, inputs: dict, ctx) -> dict:
        prompt, p = inputs["prompt"], ctx.params
        if prompt == "crash":
            raise RuntimeError("the test stage broke")
        if prompt == "missing":
            raise NotFound("lora 'nowhere.safetensors' not found; known: []")
        if prompt == "block":  # until released, or cancelled (the caller left or its deadline passed)
            while not self.release.wait(0.01):
                if ctx.cancelled.is_set():
                    self.saw_cancel.set()
                    ctx.check_cancelled("denoise")
        for step in range(1, p["steps"] + 1):
            progress = common_pb2.Progress(
                step=step,
                total=p["steps"],
                elapsed_s=0.1 * step,
                eta_s=0.1 * (p["steps"] - step),
                stage="denoise",
            )
            ctx.emit(orchestrator_pb2.GenerateEvent(progress=progress))
        pngs = []
        for i in range(p["batch_size"]):
            buf = io.BytesIO()
            Image.new("RGB", (p["width"], p["height"]), (10 * i, 100, 200)).save(buf, format="PNG")
            pngs.append(with_text(buf.getvalue(), {PARAMETERS_KEY: json.dumps({**p, "prompt": prompt})}))
        self.pngs.extend(pngs)
        return {"images": pngs}

    def finish(self, values: dict, plan: families.Plan) -> orchestrator_pb2.GenerateResult:
        params = json.dumps(plan.params)
        return orchestrator_pb2.GenerateResult(
            seed=plan.params["seed"], images=values["images"], parameters=params
        )


@pytest.fixture
def test_family(monkeypatch: pytest.MonkeyPatch) -> Iterator[RecordingFamily]:
    fam = RecordingFamily()
    monkeypatch.setitem(
        families.FAMILIES, FAMILY, families.Family(FAMILY, (PIPELINE,), ("t2i",), fam.plan, fam.finish)
    )
    yield fam
    fam.release.set()


@dataclass(frozen=True)
class Served:
    endpoint: str
    token: str
    family: RecordingFamily


@pytest.fixture
def served(test_family: RecordingFamily) -> Iterator[Served]:
    """The real OrchestratorServicer behind create_server (auth, error mapping) on a free port."""
    servicer = OrchestratorServicer(Runner({"vae": object()}))
    binding = Binding(SERVICE, orchestrator_pb2_grpc.add_OrchestratorServicer_to_server, servicer)
    server, port = create_server([binding], token=TOKEN)
    yield Served(f"127.0.0.1:{port}", TOKEN, test_family)
    test_family.release.set()
    server.stop(0)


@pytest.fixture
def local_settings(tmp_path: Path) -> Settings:
    return Settings(local_store_dir=tmp_path / "store", cache_dir=tmp_path / "cache")


@pytest.fixture
def model_dir(tmp_path: Path) -> Path:
    """A model directory whose model_index.json names the test family's pipeline class."""
    path = tmp_path / "tiny-model"
    path.mkdir()
    (path / "model_index.json").write_text(json.dumps({"_class_name": PIPELINE}))
    return path
