"""Helpers of the training-job tests (a module of its own: test modules import it, never conftest): a
stand-in trainer script, a valid spec with a real dataset folder, and kmock's emulator as an API server."""

from __future__ import annotations

import asyncio
import json
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import kmock
from kubernetes import client

FAKE_TRAINER = """
import json, os, pathlib, sys, time
spec = json.loads(pathlib.Path(sys.argv[sys.argv.index("--spec") + 1]).read_text())
assert os.environ["DIFFMESH_TRAIN_SPEC_FILE"] == sys.argv[sys.argv.index("--spec") + 1]
out = pathlib.Path(spec["output"])
out.mkdir(parents=True, exist_ok=True)
n, pause = spec["steps"], float(os.environ.get("FAKE_TRAINER_SLEEP", "0"))
for step in range(1, n + 1):
    print(f"step {step}/{n} loss {1.0 / step:.3f}", flush=True)
    status = {"state": "running", "step": step, "total_steps": n, "loss": 1.0 / step, "message": "training"}
    (out / "status.json.tmp").write_text(json.dumps(status))
    (out / "status.json.tmp").replace(out / "status.json")
    time.sleep(pause)
print("saved", out / "lora.safetensors", flush=True)
sys.exit(3 if "fail" in spec["name"] else 0)
"""


def write_spec(folder: Path, name: str = "tiny-lora", steps: int = 3, **extra) -> Path:
    """A valid spec: a dataset folder with a metadata.csv, a local output folder."""
    data = folder / "data"
    data.mkdir(exist_ok=True)
    (data / "metadata.csv").write_text("image,prompt\na.png,a cat\n")
    spec = {
        "name": name,
        "family": "flux",
        "baseModel": "/models/flux-tiny",
        "dataset": {"uri": str(data)},
        "mode": "LORA",
        "lora": {"rank": 4},
        "steps": steps,
        "output": str(folder / f"out-{name}"),
        **extra,
    }
    path = folder / f"{name}.json"
    path.write_text(json.dumps(spec))
    return path


class ApiServer(kmock.KubernetesEmulator):
    """kmock's emulator, plus what the API server adds to every object it creates: a uid and a timestamp."""

    async def _handle(self, request):
        if request.action == kmock.action.CREATE and isinstance(request.data, dict):
            meta = request.data.setdefault("metadata", {})
            meta.setdefault("uid", str(uuid.uuid4()))
            meta.setdefault("creationTimestamp", datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ"))
        return await super()._handle(request)


@dataclass
class Kube:
    """kmock's emulator on a port; `api` is the real client pointed at it (to emulate the controllers)."""

    emulator: ApiServer
    loop: asyncio.AbstractEventLoop
    url: str
    kubeconfig: Path
    api: client.ApiClient

    def on_loop(self, fn) -> None:
        """Run fn() on the emulator's event loop (its DSL is not thread-safe) and wait for it."""

        async def call() -> None:
            fn()

        asyncio.run_coroutine_threadsafe(call(), self.loop).result(5)

    def requests(self) -> list:
        """Every request the emulator received (method, url, params, data), oldest first."""
        return list(self.emulator)

    def serve_log(self, namespace: str, pod: str, text: str) -> None:
        path = f"get /api/v1/namespaces/{namespace}/pods/{pod}/log"
        self.on_loop(lambda: self.emulator[path] << text.encode())
