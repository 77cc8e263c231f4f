"""`diffmesh up` / `down`: the whole engine on this machine, on loopback.

Starts a SeaweedFS S3 server and every stage service plus the orchestrator as background processes (each
`diffmesh serve <stage>` in its own session), writes their endpoints and pids to a state file, and waits
until each reports SERVING. `down` stops exactly those pids. Credentials and the token are random per
state directory and kept in the state file (mode 0600).
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from orchestrator.stack.s3server import S3Server, pid_alive, start_s3_server

STACK_STAGES = ("text_encoder", "denoiser", "vae", "audio", "orchestrator")
STATE_FILE = "stack.json"


class StackError(RuntimeError):
    pass


@dataclass(frozen=True)
class StackState:
    path: Path
    data: dict

    @property
    def endpoints(self) -> dict[str, str]:
        return {name: s["endpoint"] for name, s in self.data["services"].items()}

    @property
    def token(self) -> str:
        return self.data["token"]

    def pids(self) -> dict[str, int]:
        pids = {name: s["pid"] for name, s in self.data["services"].items()}
        pids["s3"] = self.data["s3"]["pid"]
        return pids


def read_state(state_dir: Path) -> StackState | None:
    path = Path(state_dir) / STATE_FILE
    if not path.is_file():
        return None
    return StackState(path, json.loads(path.read_text()))


def running(state: StackState) -> dict[str, int]:
    return {name: pid for name, pid in state.pids().items() if pid_alive(pid)}


def wait_serving(endpoint: str, timeout: float) -> None:
    """Until the standard health service says SERVING (no token needed)."""
    deadline = time.monotonic() + timeout
    with grpc.insecure_channel(endpoint) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        while True:
            try:
                resp = stub.Check(health_pb2.HealthCheckRequest(service=""), timeout=1.0)
                if resp.status == health_pb2.HealthCheckResponse.SERVING:
                    return
            except grpc.RpcError:
                pass
            if time.monotonic() > deadline:
                raise StackError(f"{endpoint} not SERVING after {timeout:.0f}s")
            time.sleep(0.1)


def _spawn(stage: str, state_dir: Path, env: dict[str, str], port: int = 0) -> tuple[subprocess.Popen, Path]:
    port_file = state_dir / f"{stage}.port"
    port_file.unlink(missing_ok=True)
    _metrics_port_file(state_dir, stage).unlink(missing_ok=True)
    log = (state_dir / f"{stage}.log").open("ab")
    cmd = [
        sys.executable,
        "-m",
        "orchestrator.cli",
        "serve",
        stage.replace("_", "-"),
        "--port",
        str(port),
        "--port-file",
        str(port_file),
        "--metrics-port",
        "0",
        "--metrics-port-file",
        str(_metrics_port_file(state_dir, stage)),
    ]
    proc = subprocess.Popen(
        cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env, start_new_session=True
    )
    log.close()
    return proc, port_file


def _metrics_port_file(state_dir: Path, stage: str) -> Path:
    return state_dir / f"{stage}.metrics-port"


def _service(state_dir: Path, stage: str, port: int, pid: int) -> dict:
    """A service's entry in the state file: its gRPC endpoint, its metrics endpoint (written before the port
    file `_wait_port` waited for), its pid."""
    metrics_file = _metrics_port_file(state_dir, stage)
    entry: dict = {"endpoint": f"127.0.0.1:{port}", "pid": pid}
    if metrics_file.is_file():
        entry["metrics"] = f"127.0.0.1:{int(metrics_file.read_text())}"
    return entry


def _wait_port(proc: subprocess.Popen, port_file: Path, stage: str, timeout: float) -> int:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if port_file.is_file() and port_file.read_text().strip():
            return int(port_file.read_text())
        if proc.poll() is not None:
            raise StackError(f"{stage} exited with code {proc.returncode}; see its log")
        time.sleep(0.05)
    raise StackError(f"{stage} did not bind a port within {timeout:.0f}s")


def stop_pid(pid: int, timeout: float = 15.0) -> None:
    """SIGTERM the process group led by pid (our own child session), then SIGKILL after `timeout`."""
    try:
        os.killpg(pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and pid_alive(pid):
        time.sleep(0.05)
    if pid_alive(pid):
        with contextlib.suppress(ProcessLookupError):
            os.killpg(pid, signal.SIGKILL)


def _env(data: dict) -> dict[str, str]:
    """The environment of the stack's services (the same at every start and restart)."""
    s3 = data["s3"]
    return {
        # glibc's per-thread malloc arenas: 2 held the text encoder at 514 MB over five waves of 50 requests,
        # against 621 MB (and still growing) with the default of 8 per core (make test-reliability)
        "MALLOC_ARENA_MAX": "2",
        **os.environ,
        **data.get("extra_env", {}),
        "DIFFMESH_STORE": "s3",
        "DIFFMESH_S3_ENDPOINT": s3["endpoint"],
        "DIFFMESH_S3_ACCESS_KEY": s3["access_key"],
        "DIFFMESH_S3_SECRET_KEY": s3["secret_key"],
        "DIFFMESH_TOKEN": data["token"],
        "PYTHONUNBUFFERED": "1",
    }


def restart(state: StackState, stage: str, timeout: float = 120.0) -> StackState:
    """Start one service of a running stack again on its own port (after a crash, or stopping it first), or
    the S3 server on its port with its data; the state file follows."""
    data = state.data
    state_dir = state.path.parent
    if stage == "s3":
        s3 = data["s3"]
        if pid_alive(s3["pid"]):
            stop_pid(s3["pid"])
        port = int(s3["endpoint"].rsplit(":", 1)[1])
        server = start_s3_server(
            state_dir / "s3", s3["access_key"], s3["secret_key"], s3_port=port, timeout=timeout
        )
        s3["pid"] = server.pid
    else:
        if stage not in data["services"]:
            raise StackError(f"no service {stage!r} in the stack; it has {sorted(data['services'])}")
        service = data["services"][stage]
        if pid_alive(service["pid"]):
            stop_pid(service["pid"])
        env = _env(data)
        if stage == "orchestrator":
            env.update(
                {
                    f"DIFFMESH_{s.upper()}": v["endpoint"]
                    for s, v in data["services"].items()
                    if s != "orchestrator"
                }
            )
        port = int(service["endpoint"].rsplit(":", 1)[1])
        proc, port_file = _spawn(stage, state_dir, env, port)
        _wait_port(proc, port_file, stage, timeout)
        data["services"][stage] = _service(state_dir, stage, port, proc.pid)
        wait_serving(service["endpoint"], timeout)
    _write_state(state)
    return state


def up(state_dir: Path, timeout: float = 120.0, extra_env: dict[str, str] | None = None) -> StackState:
    """Start the stack; StackError if one from this state dir is already running."""
    state_dir = Path(state_dir).resolve()
    state_dir.mkdir(parents=True, exist_ok=True)
    existing = read_state(state_dir)
    if existing is not None:
        alive = running(existing)
        if alive:
            raise StackError(f"the local stack is already running (pids {alive}); `diffmesh down` first")
        existing.path.unlink()
    started = time.monotonic()
    access_key, secret_key, token = secrets.token_hex(8), secrets.token_hex(16), secrets.token_hex(16)
    s3: S3Server = start_s3_server(state_dir / "s3", access_key, secret_key, timeout=timeout)
    data: dict = {
        "s3": {"endpoint": s3.endpoint, "pid": s3.pid, "access_key": access_key, "secret_key": secret_key},
        "token": token,
        "services": {},
        "extra_env": dict(extra_env or {}),
    }
    env = _env(data)
    state = StackState(state_dir / STATE_FILE, data)
    try:
        procs = {stage: _spawn(stage, state_dir, env) for stage in STACK_STAGES if stage != "orchestrator"}
        for stage, (proc, port_file) in procs.items():
            port = _wait_port(proc, port_file, stage, timeout)
            data["services"][stage] = _service(state_dir, stage, port, proc.pid)
        orch_env = {**env, **{f"DIFFMESH_{s.upper()}": data["services"][s]["endpoint"] for s in procs}}
        proc, port_file = _spawn("orchestrator", state_dir, orch_env)
        port = _wait_port(proc, port_file, "orchestrator", timeout)
        data["services"]["orchestrator"] = _service(state_dir, "orchestrator", port, proc.pid)
        _write_state(state)
        for service in data["services"].values():
            wait_serving(service["endpoint"], max(timeout - (time.monotonic() - started), 1.0))
    except BaseException:
        for service in data["services"].values():
            stop_pid(service["pid"])
        for proc, _ in locals().get("procs", {}).values():
            stop_pid(proc.pid)
        s3.stop()
        state.path.unlink(missing_ok=True)
        raise
    data["ready_s"] = round(time.monotonic() - started, 3)
    _write_state(state)
    return state


def _write_state(state: StackState) -> None:
    tmp = state.path.with_suffix(".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        json.dump(state.data, f, indent=2)
    os.replace(tmp, state.path)


def down(state_dir: Path) -> list[str]:
    """Stop exactly the processes the state file names; return what was stopped."""
    state = read_state(Path(state_dir).resolve())
    if state is None:
        return []
    stopped = []
    for name, pid in state.pids().items():
        if name != "s3" and pid_alive(pid):
            stop_pid(pid)
            stopped.append(name)
    if pid_alive(state.data["s3"]["pid"]):
        stop_pid(state.data["s3"]["pid"])
        stopped.append("s3")
    state.path.unlink(missing_ok=True)
    return stopped
