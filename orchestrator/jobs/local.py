"""The local launcher (the default): the trainer as a subprocess of this machine, in a session of its own.

Everything lives in `<state_dir>/jobs/<id>/`: `job.json` (the Job), `spec.json` (what the trainer reads),
`process.json` (pid and its start time), `log.txt` (stdout + stderr) and `exit_code`, written by a tiny `sh`
wrapper when the trainer ends. A job's state derives from those files and the trainer's own
`<output>/status.json` (when the output is a local folder), so it survives the process that submitted it:
`status` / `list` / `logs` / `cancel` from a new process read the same files. Cancel signals the process
group of the recorded pid, and only when that pid is still the process this launcher started.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import signal
import subprocess
import sys
import time
from collections import deque
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

from orchestrator.errors import invalid
from orchestrator.jobs.base import (
    TERMINAL,
    Job,
    JobIndex,
    StopFlag,
    new_job_id,
    stamp,
    unknown_job,
    write_private,
)
from orchestrator.settings import JobSettings
from protos import orchestrator_pb2
from trainer.spec import to_json, with_defaults

log = logging.getLogger("diffmesh.jobs")

# `sh -c WRAPPER sh EXIT_FILE CMD...`: run CMD, then record its exit code atomically.
WRAPPER = 'f=$1; shift; "$@"; c=$?; echo $c > "$f.tmp" && mv "$f.tmp" "$f"; exit $c'
POLL_S = 0.2


def default_command() -> tuple[str, ...]:
    return (sys.executable, "-m", "trainer")


def _start_ticks(pid: int) -> int | None:
    """The start time of a process (clock ticks since boot, /proc/<pid>/stat field 22): its identity."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat[stat.rindex(")") + 2 :].split()  # after "pid (comm) "
    return int(fields[19]) if fields[0] != "Z" else None


def _group_alive(pgid: int) -> bool:
    """Whether any live (non-zombie) process is left in the process group."""
    proc = Path("/proc")
    if not proc.is_dir():
        try:
            os.killpg(pgid, 0)
        except (ProcessLookupError, PermissionError):
            return False
        return True
    for stat in proc.glob("[0-9]*/stat"):
        try:
            text = stat.read_text()
        except OSError:
            continue
        fields = text[text.rindex(")") + 2 :].split()
        if fields[0] != "Z" and int(fields[2]) == pgid:
            return True
    return False


def _local_path(uri: str) -> Path | None:
    return None if not uri or "://" in uri else Path(uri)


class LocalLauncher:
    name = "local"

    def __init__(self, index: JobIndex, settings: JobSettings) -> None:
        self.index = index
        self.settings = settings
        self.command = settings.train_command or default_command()
        self._children: dict[int, subprocess.Popen] = {}  # reaped on every look, so no zombies pile up

    # -- submit -----------------------------------------------------------------------------------------

    def submit(self, spec: orchestrator_pb2.TrainSpec, launch: orchestrator_pb2.LaunchOptions) -> Job:
        for field in ("namespace", "image", "service_account"):
            if getattr(launch, field):
                raise invalid(f"launch.{field}: the local launcher runs no pod; use the kubernetes launcher")
        spec = with_defaults(spec)
        # local folders as absolute paths: the job must not depend on the submitter's working directory
        if (data := _local_path(spec.dataset.uri)) is not None:
            spec.dataset.uri = str(data.resolve())
        if (out := _local_path(spec.output)) is not None:
            spec.output = str(out.resolve())
        job_id = new_job_id(spec.name)
        folder = self.index.folder(job_id, create=True)
        spec_file = folder / "spec.json"
        write_private(spec_file, to_json(spec))
        job = Job(id=job_id, spec=spec, launch=launch, total_steps=spec.steps, output=spec.output)
        job.launch.launcher = self.name
        job.state = orchestrator_pb2.JOB_STATE_PENDING
        stamp(job.created_at)
        self.index.save(job)
        argv = ["/bin/sh", "-c", WRAPPER, "sh", str(folder / "exit_code"), *self.command]
        argv += ["--spec", str(spec_file)]
        env = {
            **os.environ,
            "PYTHONUNBUFFERED": "1",
            "DIFFMESH_TRAIN_SPEC_FILE": str(spec_file),
            "DIFFMESH_JOB_ID": job_id,
        }
        log_fd = os.open(folder / "log.txt", os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        with os.fdopen(log_fd, "ab") as out:
            try:
                proc = subprocess.Popen(
                    argv,
                    stdout=out,
                    stderr=subprocess.STDOUT,
                    stdin=subprocess.DEVNULL,
                    env=env,
                    start_new_session=True,
                )
            except OSError as e:
                job.state, job.message = orchestrator_pb2.JOB_STATE_FAILED, f"cannot start the trainer: {e}"
                stamp(job.finished_at)
                self.index.save(job)
                return job
        self._children[proc.pid] = proc
        write_private(
            folder / "process.json",
            json.dumps({"pid": proc.pid, "start_ticks": _start_ticks(proc.pid), "argv": argv}),
        )
        job.state = orchestrator_pb2.JOB_STATE_RUNNING
        stamp(job.started_at)
        self.index.save(job)
        log.info("job %s: pid %d: %s", job_id, proc.pid, " ".join(self.command))
        return job

    # -- state ------------------------------------------------------------------------------------------

    def _record(self, job_id: str) -> Job:
        job = self.index.load(job_id)
        if job is None or job.launch.launcher not in ("", self.name):
            raise unknown_job(job_id)
        return job

    def _process(self, job_id: str) -> dict:
        """The job's process.json: {"pid": int > 1, "start_ticks": int | None}; {} when there is none; and
        {"damaged": why} when it cannot be trusted (such a process is never signalled)."""
        path = self.index.folder(job_id) / "process.json"
        if not path.is_file():
            return {}
        try:
            proc = json.loads(path.read_bytes())
            pid, ticks = proc["pid"], proc.get("start_ticks")
            if type(pid) is not int or pid <= 1 or not (ticks is None or type(ticks) is int):
                raise ValueError(f"pid {pid!r}, start_ticks {ticks!r}")
        except (OSError, ValueError, TypeError, KeyError, AttributeError) as e:
            return {"damaged": f"{path} is damaged ({type(e).__name__}: {' '.join(str(e).split())[:200]})"}
        return {"pid": pid, "start_ticks": ticks}

    def _reap(self) -> None:
        for pid, proc in list(self._children.items()):
            if proc.poll() is not None:
                self._children.pop(pid, None)  # several RPC threads may reap at once

    def _ours_alive(self, proc: dict) -> bool:
        pid = proc.get("pid")
        if not pid:
            return False
        self._reap()
        ticks = _start_ticks(pid)
        return ticks is not None and (proc.get("start_ticks") in (None, ticks))

    def _read_status(self, job: Job) -> None:
        """Step, total and loss from the trainer's `<output>/status.json`, when the output is local."""
        out = _local_path(job.spec.output)
        if out is None:
            return
        try:
            status = json.loads((out / "status.json").read_text())
        except (OSError, ValueError):
            return  # not written yet (or being replaced): the last values stand
        if not isinstance(status, dict):
            return
        began = status.get("started_at")
        if isinstance(began, int | float) and began < job.created_at.seconds - 1:
            return  # an earlier run's status in the same output folder
        job.step = int(status.get("step") or 0)
        job.total_steps = int(status.get("total_steps") or job.total_steps)
        parts = [str(status["message"])] if status.get("message") else []
        if isinstance(status.get("loss"), int | float):
            parts.append(f"loss {status['loss']:.4g}")
        job.message = "; ".join(parts)
        artifacts = status.get("artifacts")
        if isinstance(artifacts, list) and len(artifacts) == 1 and isinstance(artifacts[0], str):
            job.output = str(out / artifacts[0])  # the final weights

    def _last_log_line(self, job_id: str) -> str:
        lines = list(self._tail(self.index.folder(job_id) / "log.txt", 1))
        return lines[0] if lines else ""

    def get(self, job_id: str) -> Job:
        job = self._record(job_id)
        if job.state in TERMINAL:
            return job
        folder = self.index.folder(job_id)
        self._read_status(job)
        exit_file = folder / "exit_code"
        if exit_file.is_file():
            text = exit_file.read_bytes().decode("ascii", "replace").strip()
            code = int(text) if text.lstrip("-").isdigit() and len(text) < 12 else -1  # damaged: a failure
            job.finished_at.FromDatetime(datetime.fromtimestamp(exit_file.stat().st_mtime, UTC))
            if code == 0:
                job.state = orchestrator_pb2.JOB_STATE_SUCCEEDED
            else:
                job.state = orchestrator_pb2.JOB_STATE_FAILED
                job.message = f"the trainer exited with code {code}: {self._last_log_line(job_id)}"
            self.index.save(job)
        elif job.state == orchestrator_pb2.JOB_STATE_RUNNING and not self._ours_alive(
            proc := self._process(job_id)
        ):
            time.sleep(POLL_S)  # the wrapper may be writing exit_code right now
            if not exit_file.is_file():
                job.state = orchestrator_pb2.JOB_STATE_FAILED
                job.message = "the trainer process ended without an exit code (killed?)"
                if "damaged" in proc:
                    job.message = (
                        f"{proc['damaged']}: the trainer process can no longer be tracked or cancelled"
                    )
                    log.warning("job %s: %s", job_id, job.message)
                stamp(job.finished_at)
                self.index.save(job)
            else:
                return self.get(job_id)
        return job

    def list(self, state: int = orchestrator_pb2.JOB_STATE_UNSPECIFIED) -> list[Job]:
        jobs = []
        for job_id in self.index.ids():
            record = self.index.load(job_id)
            if record is None or record.launch.launcher not in ("", self.name):
                continue
            job = self.get(job_id)
            if state in (orchestrator_pb2.JOB_STATE_UNSPECIFIED, job.state):
                jobs.append(job)
        return jobs

    # -- cancel -----------------------------------------------------------------------------------------

    def cancel(self, job_id: str) -> Job:
        job = self.get(job_id)
        if job.state in TERMINAL:
            return job  # nothing to stop; cancelling twice is no error
        proc = self._process(job_id)
        job.state, job.message = orchestrator_pb2.JOB_STATE_CANCELLED, "cancelled"
        stamp(job.finished_at)
        self.index.save(job)  # first, so nobody reads the dying process as a failure
        pid, recorded = proc.get("pid"), proc.get("start_ticks")
        ticks = _start_ticks(pid) if pid else None
        reused = ticks is not None and recorded is not None and ticks != recorded  # then our group is gone
        if pid and not reused and (ticks is not None or _group_alive(pid)):
            self._stop_group(pid)  # the wrapper's group: it and the trainer, even if the wrapper died first
        self._reap()
        return job

    def _stop_group(self, pgid: int) -> None:
        """SIGTERM the job's process group (its own session), SIGKILL what is left after the grace."""
        with contextlib.suppress(ProcessLookupError):
            os.killpg(pgid, signal.SIGTERM)
        deadline = time.monotonic() + self.settings.cancel_grace_s
        while time.monotonic() < deadline:
            self._reap()
            if not _group_alive(pgid):
                return
            time.sleep(0.05)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(pgid, signal.SIGKILL)
        self._reap()

    # -- logs -------------------------------------------------------------------------------------------

    @staticmethod
    def _tail(path: Path, n: int) -> Iterator[str]:
        if not path.is_file():
            return iter(())
        with path.open("rb") as f:
            lines = deque(f, maxlen=n) if n else list(f)
        return (line.decode("utf-8", "replace").rstrip("\r\n") for line in lines)

    def logs(
        self, job_id: str, follow: bool = False, tail_lines: int = 0, stop: StopFlag | None = None
    ) -> Iterator[str]:
        """The log's lines (the last `tail_lines`, 0 = all); with `follow`, new lines until the job ends."""
        self._record(job_id)
        path = self.index.folder(job_id) / "log.txt"
        if not follow:
            yield from self._tail(path, tail_lines)
            return
        with path.open("rb") as f:
            if tail_lines:
                yield from (
                    ln.decode("utf-8", "replace").rstrip("\r\n") for ln in deque(f, maxlen=tail_lines)
                )
            partial = b""
            while stop is None or not stop.is_set():
                chunk = f.read()
                if chunk:
                    *lines, partial = (partial + chunk).split(b"\n")
                    yield from (ln.decode("utf-8", "replace").rstrip("\r") for ln in lines)
                    continue
                if self.get(job_id).state in TERMINAL:
                    lines = (partial + f.read()).split(b"\n")
                    if not lines[-1]:
                        lines.pop()
                    yield from (ln.decode("utf-8", "replace").rstrip("\r") for ln in lines)
                    return
                time.sleep(POLL_S)
