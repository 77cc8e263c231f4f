"""Helpers of the fault tests (test_faults.py, test_resume.py) on `diffmesh up`'s real processes: requests of
the tiny FLUX.1, kill -9 of a service, a service's own RPC counts from its Prometheus endpoint, a request run
in a thread, waiting for an event."""

from __future__ import annotations

import io
import os
import re
import signal
import threading
import time
import urllib.request
from pathlib import Path

import numpy as np
from PIL import Image

from orchestrator.client import Client, ClientError
from protos import orchestrator_pb2

# the orchestrator's retries of a stage (backoff 0.25 s doubling): enough for a restart
STACK_ENV = {"DIFFMESH_RETRIES": "12", "DIFFMESH_JOURNAL_LEASE_S": "2"}


def request(model: Path, steps: int, request_id: str = "") -> orchestrator_pb2.GenerateRequest:
    return orchestrator_pb2.GenerateRequest(
        model=str(model),
        prompt="a red circle",
        seed=9,
        steps=steps,
        width=64,
        height=64,
        guidance=3.5,
        request_id=request_id,
    )


def pixels(result: orchestrator_pb2.GenerateResult) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(result.images[0])).convert("RGB"))


def kill9(pid: int) -> None:
    os.killpg(pid, signal.SIGKILL)  # each service leads its own session


def rpc_calls(state, service: str, method: str) -> float:
    """A service's own count of `method` RPCs that ended OK (its Prometheus endpoint; a restart resets it)."""
    url = f"http://{state.data['services'][service]['metrics']}/metrics"
    text = urllib.request.urlopen(url, timeout=10).read().decode()
    pattern = (
        r"^diffmesh_rpc_duration_seconds_count\{"
        rf'(?=[^}}]*method="{method}")(?=[^}}]*code="OK")[^}}]*\}} (\S+)$'
    )
    return sum(float(m.group(1)) for m in re.finditer(pattern, text, re.M))


def run_in_thread(client: Client, req, events: list) -> tuple[threading.Thread, dict]:
    out: dict = {}

    def go() -> None:
        try:
            out["gen"] = client.run(req, events.append)
        except ClientError as e:
            out["error"] = e

    thread = threading.Thread(target=go, daemon=True)
    thread.start()
    return thread, out


def wait_for(cond, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError("timed out waiting for the request to get there")
        time.sleep(0.01)


def stage_events(events: list) -> list[tuple[str, str]]:
    kinds = orchestrator_pb2.StageEvent.Kind
    return [(e.stage.stage, kinds.Name(e.stage.kind)) for e in events if e.WhichOneof("event") == "stage"]
