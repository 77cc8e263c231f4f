"""What every launcher shares: the `Launcher` protocol, job ids, and the on-disk job index.

The index is `<state_dir>/jobs/<id>/job.json`: the `Job` message as JSON (mode 0600, written atomically), one
folder per job, for every launcher, so a later `diffmesh train status JOB` in a new process finds the job and
the launcher that runs it. The local launcher keeps its spec file, log and exit code in the same folder.
"""

from __future__ import annotations

import os
import re
import secrets
import string
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Protocol

from google.protobuf import json_format

from orchestrator.errors import invalid, not_found
from protos import orchestrator_pb2

Job = orchestrator_pb2.Job
JobState = orchestrator_pb2.JobState
TERMINAL = frozenset(
    {
        orchestrator_pb2.JOB_STATE_SUCCEEDED,
        orchestrator_pb2.JOB_STATE_FAILED,
        orchestrator_pb2.JOB_STATE_CANCELLED,
    }
)
JOB_ID = re.compile(r"^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$")  # DNS-1123 label: a Kubernetes Job name
_SUFFIX = 6


class Launcher(Protocol):
    """Runs training jobs somewhere. Errors are StageErrors (INVALID_ARGUMENT, NOT_FOUND, UNAVAILABLE...)."""

    name: str

    def submit(self, spec: orchestrator_pb2.TrainSpec, launch: orchestrator_pb2.LaunchOptions) -> Job: ...

    def get(self, job_id: str) -> Job: ...

    def list(self, state: int = orchestrator_pb2.JOB_STATE_UNSPECIFIED) -> list[Job]: ...

    def cancel(self, job_id: str) -> Job: ...

    def logs(
        self, job_id: str, follow: bool = False, tail_lines: int = 0, stop: StopFlag | None = None
    ) -> Iterator[str]: ...


class StopFlag(Protocol):
    """Ends a followed log stream early (a threading.Event, set when the caller goes away)."""

    def is_set(self) -> bool: ...


def new_job_id(name: str) -> str:
    """`<spec.name>-<6 random lowercase letters>`: a valid DNS-1123 label (spec names are at most 50 chars)."""
    suffix = "".join(secrets.choice(string.ascii_lowercase) for _ in range(_SUFFIX))
    job_id = f"{name}-{suffix}"
    if not JOB_ID.match(job_id):
        raise invalid(f"spec.name {name!r} does not make a valid job id ({job_id!r})")
    return job_id


def check_job_id(job_id: str) -> str:
    if not JOB_ID.match(job_id):
        raise invalid(f"id {job_id!r} is not a job id (a DNS-1123 label, like my-lora-abcdef)")
    return job_id


def unknown_job(job_id: str) -> Exception:
    return not_found(f"no training job {job_id!r}")


def state_name(state: int) -> str:
    """JOB_STATE_RUNNING -> "RUNNING"."""
    return orchestrator_pb2.JobState.Name(state).removeprefix("JOB_STATE_")


def parse_state(text: str) -> int:
    """ "running" / "RUNNING" / "JOB_STATE_RUNNING" -> the enum value; ValueError listing the states."""
    name = text.strip().upper()
    name = name if name.startswith("JOB_STATE_") else f"JOB_STATE_{name}"
    try:
        return orchestrator_pb2.JobState.Value(name)
    except ValueError:
        known = [state_name(v) for v in orchestrator_pb2.JobState.values() if v]
        raise ValueError(f"unknown job state {text!r}; one of {known}") from None


def now() -> datetime:
    return datetime.now(UTC)


def stamp(field, when: datetime | None = None) -> None:
    """Set a Timestamp field to `when` (default now)."""
    field.FromDatetime(when or now())


def write_private(path: Path, text: str) -> None:
    """Write `text` to `path` atomically (a temp file renamed over it), readable by the owner only."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(text)
    os.replace(tmp, path)


class JobIndex:
    """`<root>/<id>/job.json` for every job this machine submitted (root = `<state_dir>/jobs`)."""

    RECORD = "job.json"

    def __init__(self, root: Path) -> None:
        self.root = Path(root)

    def folder(self, job_id: str, create: bool = False) -> Path:
        path = self.root / check_job_id(job_id)
        if create:
            self.root.mkdir(parents=True, exist_ok=True, mode=0o700)
            path.mkdir(mode=0o700)  # a fresh id: an existing folder is an id collision, an error
        return path

    def save(self, job: Job) -> None:
        folder = self.folder(job.id)
        folder.mkdir(parents=True, exist_ok=True, mode=0o700)
        write_private(folder / self.RECORD, json_format.MessageToJson(job, indent=2))

    def load(self, job_id: str) -> Job | None:
        path = self.folder(job_id) / self.RECORD
        if not path.is_file():
            return None
        return json_format.Parse(path.read_text(), Job(), ignore_unknown_fields=True)

    def ids(self) -> list[str]:
        if not self.root.is_dir():
            return []
        return sorted(
            p.parent.name for p in self.root.glob(f"*/{self.RECORD}") if JOB_ID.match(p.parent.name)
        )


def by_creation(jobs: list[Job]) -> list[Job]:
    """Oldest first (as `kubectl get` shows them), ties by id."""
    return sorted(jobs, key=lambda j: (j.created_at.seconds, j.created_at.nanos, j.id))
