"""`diffmesh up` / `down` through the real CLI: every service SERVING, nothing left behind, no duplicates."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from orchestrator.stack.s3server import pid_alive

REPO = Path(__file__).parents[2]


def diffmesh(state_dir: Path, *args: str, timeout: float = 180) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "orchestrator.cli", "--state-dir", str(state_dir), *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=REPO,
    )


@pytest.mark.timeout(300)
def test_up_down_leaves_nothing_and_refuses_duplicates(tmp_path: Path):
    state_dir = tmp_path / "stack"
    first = diffmesh(state_dir, "up")
    try:
        assert first.returncode == 0, first.stderr
        state = json.loads((state_dir / "stack.json").read_text())
        assert set(state["services"]) == {"text_encoder", "denoiser", "vae", "audio", "orchestrator"}
        pids = [s["pid"] for s in state["services"].values()] + [state["s3"]["pid"]]
        assert all(pid_alive(p) for p in pids)
        for service in state["services"].values():
            assert service["endpoint"].startswith("127.0.0.1:")
            with grpc.insecure_channel(service["endpoint"]) as ch:
                resp = health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), timeout=5)
            assert resp.status == health_pb2.HealthCheckResponse.SERVING
            environ = Path(f"/proc/{service['pid']}/environ").read_bytes().split(b"\0")
            arenas = os.environ.get("MALLOC_ARENA_MAX", "2").encode()  # the stack's default, unless set here
            assert b"MALLOC_ARENA_MAX=" + arenas in environ
        assert (state_dir / "stack.json").stat().st_mode & 0o077 == 0  # secrets inside: owner-only

        second = diffmesh(state_dir, "up")
        assert second.returncode == 1
        assert "already running" in second.stderr
        assert json.loads((state_dir / "stack.json").read_text())["services"] == state["services"]

        status = diffmesh(state_dir, "status")
        assert status.returncode == 0 and status.stdout.count("SERVING") == 5
    finally:
        down = diffmesh(state_dir, "down")
    assert down.returncode == 0, down.stderr
    assert not any(pid_alive(p) for p in pids), [p for p in pids if pid_alive(p)]
    assert not (state_dir / "stack.json").exists()
    assert diffmesh(state_dir, "down").stdout.strip() == "nothing running"
