"""`Jobs`: the one entry to training jobs, shared by `diffmesh train` and the orchestrator's job RPCs.

It checks a spec before anything is launched (INVALID_ARGUMENT naming the field), picks the launcher (the
request's, else the default), records every submitted job in the local index so later commands find the
launcher that runs it, and routes get / cancel / logs there. A job the index does not know is looked up
through the default launcher (for kubernetes: in the cluster, by name).
"""

from __future__ import annotations

import threading
from collections.abc import Iterator

import grpc

from orchestrator.errors import StageError, invalid
from orchestrator.jobs.base import TERMINAL, Job, JobIndex, Launcher, StopFlag, by_creation, check_job_id
from orchestrator.settings import LAUNCHERS, JobSettings
from protos import orchestrator_pb2
from trainer.spec import SpecError, validate_spec


def check_spec(spec: orchestrator_pb2.TrainSpec, check_paths: bool) -> None:
    """StageError INVALID_ARGUMENT "invalid training spec: <field>: <why>" for the first bad field."""
    try:
        validate_spec(spec, check_paths=check_paths)
    except SpecError as e:
        raise invalid(f"invalid training spec: {e}") from None


class Jobs:
    def __init__(
        self,
        settings: JobSettings,
        index: JobIndex | None = None,
        launchers: dict[str, Launcher] | None = None,
    ) -> None:
        """`index` None: no local records (kubernetes only, e.g. an in-cluster orchestrator); `launchers`
        replaces the ones built from settings (tests, a preconfigured API client)."""
        self.settings = settings
        self.index = index
        self._launchers: dict[str, Launcher] = dict(launchers or {})
        self._lock = threading.Lock()  # one launcher of each kind, also under concurrent RPCs

    @classmethod
    def from_settings(cls, settings: JobSettings, record: bool = True) -> Jobs:
        return cls(settings, JobIndex(settings.state_dir / "jobs") if record else None)

    def launcher(self, name: str = "", namespace: str = "") -> Launcher:
        name = name or self.settings.launcher
        if name not in LAUNCHERS:
            raise invalid(f"launch.launcher {name!r}; one of {list(LAUNCHERS)}")
        with self._lock:
            if name not in self._launchers:
                self._launchers[name] = self._make(name)
            launcher = self._launchers[name]
        return (
            launcher.in_namespace(namespace) if namespace and hasattr(launcher, "in_namespace") else launcher
        )

    def _make(self, name: str) -> Launcher:
        if name == "local":
            if self.index is None:
                raise invalid("launch.launcher 'local': this orchestrator keeps no local job state")
            from orchestrator.jobs.local import LocalLauncher

            return LocalLauncher(self.index, self.settings)
        from orchestrator.jobs.kubernetes import KubernetesLauncher

        return KubernetesLauncher(self.settings)

    def submit(
        self, spec: orchestrator_pb2.TrainSpec, launch: orchestrator_pb2.LaunchOptions | None = None
    ) -> Job:
        launch = launch or orchestrator_pb2.LaunchOptions()
        name = launch.launcher or self.settings.launcher
        # local folders in the spec are checked where the trainer runs: here for the local launcher
        check_spec(spec, check_paths=name == "local")
        job = self.launcher(name).submit(spec, launch)
        if self.index is not None and name != "local":  # the local launcher keeps its own record
            self.index.save(job)
        return job

    def _route(self, job_id: str, launcher: str = "") -> tuple[Launcher, Job | None]:
        """The launcher that runs a job (its record's, or `launcher` when named) and its record, if any."""
        record = self.index.load(check_job_id(job_id)) if self.index is not None else None
        if launcher:
            same = record is not None and (record.launch.launcher or "local") == launcher
            return self.launcher(launcher), record if same else None
        if record is None:
            return self.launcher(), None
        return self.launcher(record.launch.launcher or "local", record.launch.namespace), record

    def get(self, job_id: str, launcher: str = "") -> Job:
        """`launcher` overrides the recorded one (and the default for a job with no record)."""
        launcher, record = self._route(job_id, launcher)
        if record is not None and record.state in TERMINAL and launcher.name != "local":
            return record  # e.g. a cancelled Kubernetes Job, deleted from the cluster since
        job = launcher.get(job_id)
        self._remember(job, record)
        return job

    def list(self, state: int = orchestrator_pb2.JOB_STATE_UNSPECIFIED, launcher: str = "") -> list[Job]:
        """Jobs of one launcher (`launcher` named: the cluster's Jobs for kubernetes), else every job in the
        local index, each as its launcher sees it now."""
        if launcher or self.index is None:
            return self.launcher(launcher).list(state)
        jobs = []
        for job_id in self.index.ids():
            try:
                job = self.get(job_id)
            except StageError as e:  # one unreachable cluster must not hide the other jobs
                record = self.index.load(job_id)
                if record is None:
                    continue
                job = record
                job.message = f"(last known state; cannot refresh: {e})"
            if state in (orchestrator_pb2.JOB_STATE_UNSPECIFIED, job.state):
                jobs.append(job)
        return by_creation(jobs)

    def cancel(self, job_id: str, launcher: str = "") -> Job:
        launcher, record = self._route(job_id, launcher)
        if record is not None and record.state in TERMINAL:
            return record
        job = launcher.cancel(job_id)
        self._remember(job, record)
        return job

    def logs(
        self,
        job_id: str,
        follow: bool = False,
        tail_lines: int = 0,
        stop: StopFlag | None = None,
        launcher: str = "",
    ) -> Iterator[str]:
        launcher, record = self._route(job_id, launcher)
        if (
            record is not None
            and record.state == orchestrator_pb2.JOB_STATE_CANCELLED
            and launcher.name != "local"
        ):
            raise StageError(
                grpc.StatusCode.FAILED_PRECONDITION, f"job {job_id!r} was cancelled: its pods are gone"
            )
        return launcher.logs(job_id, follow=follow, tail_lines=tail_lines, stop=stop)

    def _remember(self, job: Job, record: Job | None) -> None:
        """Keep the index's copy of a remote job current (its last known state survives the cluster's)."""
        if self.index is not None and record is not None and job.launch.launcher != "local":
            self.index.save(job)


def jobs_from_env() -> Jobs:
    """The orchestrator server's jobs: the local launcher by default, kubernetes with DIFFMESH_LAUNCHER=kubernetes
    (then without a local index: the cluster is the record, and the pod's filesystem is read-only)."""
    settings = JobSettings.from_env()
    return Jobs.from_settings(settings, record=settings.launcher == "local")
