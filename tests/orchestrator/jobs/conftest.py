"""Fixtures of the training-job tests: a clean environment, the stand-in trainer as DIFFMESH_TRAIN_COMMAND (a
tiny script that behaves like `python -m trainer`: reads --spec, logs, writes status.json, sleeps), and kmock's
in-memory Kubernetes API on a loopback port, reached through a kubeconfig file (helpers: jobs_testkit.py)."""

from __future__ import annotations

import asyncio
import json
import shlex
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import kmock
import pytest
from jobs_testkit import FAKE_TRAINER, ApiServer, Kube
from kubernetes import client

ENV_VARS = (
    "DIFFMESH_LAUNCHER",
    "DIFFMESH_NAMESPACE",
    "DIFFMESH_TRAIN_IMAGE",
    "DIFFMESH_TRAIN_COMMAND",
    "DIFFMESH_TRAIN_CPU",
    "DIFFMESH_TRAIN_MEMORY",
    "DIFFMESH_TRAIN_BACKOFF_LIMIT",
    "DIFFMESH_TRAIN_TTL_S",
    "DIFFMESH_TRAIN_DEADLINE_S",
    "DIFFMESH_TRAIN_CACHE_PVC",
    "DIFFMESH_TRAIN_CANCEL_GRACE_S",
    "DIFFMESH_S3_SECRET",
    "DIFFMESH_STORE",
    "DIFFMESH_S3_ENDPOINT",
    "DIFFMESH_S3_BUCKET",
    "DIFFMESH_S3_SECURE",
    "DIFFMESH_S3_REGION",
    "DIFFMESH_ORCHESTRATOR",
    "DIFFMESH_TOKEN",
    "DIFFMESH_TOKEN_FILE",
    "KUBECONFIG",
    "KUBERNETES_SERVICE_HOST",
)


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    """No launcher, cluster or orchestrator from the machine leaks in; job state in tmp_path/state."""
    for name in ENV_VARS:
        monkeypatch.delenv(name, raising=False)
    state = tmp_path / "state"
    monkeypatch.setenv("DIFFMESH_STATE_DIR", str(state))
    return state


@pytest.fixture
def fake_trainer(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """DIFFMESH_TRAIN_COMMAND runs FAKE_TRAINER; FAKE_TRAINER_SLEEP (s per step) is read at submit."""
    monkeypatch.setenv("FAKE_TRAINER_SLEEP", "0")
    script = tmp_path / "fake_trainer.py"
    script.write_text(FAKE_TRAINER)
    monkeypatch.setenv("DIFFMESH_TRAIN_COMMAND", shlex.join([sys.executable, str(script)]))
    return script


@pytest.fixture
def kube(tmp_path: Path) -> Iterator[Kube]:
    started = threading.Event()
    box: dict = {}

    async def serve() -> None:
        async with ApiServer() as emulator, kmock.Server(emulator) as server:
            box.update(emulator=emulator, url=str(server.url).rstrip("/"), loop=asyncio.get_running_loop())
            box["stop"] = asyncio.Event()
            started.set()
            await box["stop"].wait()

    thread = threading.Thread(target=lambda: asyncio.run(serve()), name="kmock", daemon=True)
    thread.start()
    assert started.wait(10), "kmock did not start"
    kubeconfig = tmp_path / "kubeconfig"
    kubeconfig.write_text(
        json.dumps(
            {
                "apiVersion": "v1",
                "kind": "Config",
                "clusters": [{"name": "kmock", "cluster": {"server": box["url"]}}],
                "users": [{"name": "tester", "user": {"token": "kmock-token"}}],
                "contexts": [
                    {"name": "kmock", "context": {"cluster": "kmock", "user": "tester", "namespace": "ml"}}
                ],
                "current-context": "kmock",
            }
        )
    )
    cfg = client.Configuration()
    cfg.host = box["url"]
    api = client.ApiClient(cfg)
    yield Kube(box["emulator"], box["loop"], box["url"], kubeconfig, api)
    api.close()
    box["loop"].call_soon_threadsafe(box["stop"].set)
    thread.join(10)
