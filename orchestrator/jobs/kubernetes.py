"""The kubernetes launcher: each training job is a `batch/v1` Job (plus a ConfigMap with its spec), created
through the official `kubernetes` client, in-cluster (the orchestrator's ServiceAccount) or from a kubeconfig.

The cluster is the source of truth: get / list read the Job's status (active, succeeded, failed, conditions)
and map it to a JobState; cancel deletes the Job (Foreground: its pods first) and the ConfigMap; logs read
the pod's log, streaming with `follow`. Reads use the raw JSON of the API, not the client's models.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import time
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import grpc
import urllib3
import yaml
from google.protobuf import json_format
from kubernetes import client, config

from orchestrator.errors import StageError
from orchestrator.jobs.base import TERMINAL, Job, StopFlag, check_job_id, new_job_id, stamp, unknown_job
from orchestrator.jobs.manifest import (
    CONTAINER,
    GPU,
    LABEL_JOB_ID,
    SELECTOR,
    SPEC_ANNOTATION,
    build_job_manifest,
    build_spec_configmap,
    configmap_name,
)
from orchestrator.settings import JobSettings
from protos import orchestrator_pb2
from trainer.spec import with_defaults

log = logging.getLogger("diffmesh.jobs")
IN_CLUSTER_NAMESPACE = Path("/var/run/secrets/kubernetes.io/serviceaccount/namespace")
TIMEOUT_S = 30
POLL_S = 1.0
MERGE_PATCH = "application/merge-patch+json"
_CODES = {
    400: grpc.StatusCode.INVALID_ARGUMENT,
    401: grpc.StatusCode.UNAUTHENTICATED,
    403: grpc.StatusCode.PERMISSION_DENIED,
    404: grpc.StatusCode.NOT_FOUND,
    409: grpc.StatusCode.ALREADY_EXISTS,
    422: grpc.StatusCode.INVALID_ARGUMENT,
}


def in_cluster(env: Mapping[str, str] | None = None) -> bool:
    env = os.environ if env is None else env
    return bool(env.get("KUBERNETES_SERVICE_HOST")) and IN_CLUSTER_NAMESPACE.is_file()


def kubeconfig_problem(path: str | os.PathLike) -> str | None:
    """What makes `path` not a kubeconfig the kubernetes client can read (it fails on other shapes with a
    TypeError or KeyError, on binary with a decode error), or None."""
    try:
        data = yaml.safe_load(Path(path).read_bytes().decode())
    except FileNotFoundError:
        return "no such file"
    except IsADirectoryError:
        return "no such file (a directory)"
    except UnicodeDecodeError:
        return "not UTF-8 text"
    except OSError as e:
        return f"cannot be read: {e.strerror or e}"
    except yaml.YAMLError as e:
        return f"not YAML: {' '.join(str(e).split())}"
    if not isinstance(data, dict):
        return "not a kubeconfig (a YAML mapping)"
    for key, inner in (("clusters", "cluster"), ("contexts", "context"), ("users", "user")):
        entries = data.get(key) or []
        if not isinstance(entries, list) or not all(
            isinstance(e, dict) and isinstance(e.get(inner) or {}, dict) for e in entries
        ):
            return f"{key!r} is not a list of {{name, {inner}}} entries"
    return None


def _kubeconfig_files(settings: JobSettings) -> list[str]:
    """The kubeconfig files the client reads: the one named, else those of $KUBECONFIG that exist."""
    if settings.kubeconfig:
        return [settings.kubeconfig]
    listed = [p for p in os.environ.get("KUBECONFIG", "").split(os.pathsep) if p]
    return [p for p in listed if Path(p).exists()] or [str(Path("~/.kube/config").expanduser())]


def load_api_client(settings: JobSettings) -> client.ApiClient:
    """In-cluster config in a pod (unless a kubeconfig is named), else the kubeconfig (KUBECONFIG, ~/.kube)."""
    cfg = client.Configuration()
    files = _kubeconfig_files(settings)
    try:
        if not settings.kubeconfig and in_cluster():
            config.load_incluster_config(client_configuration=cfg)
        else:
            for path in files:
                problem = kubeconfig_problem(path) if Path(path).exists() else None
                if problem:
                    raise StageError(
                        grpc.StatusCode.FAILED_PRECONDITION,
                        f"the kubeconfig {path!r} is not a valid kubeconfig: {problem}",
                    )
            config.load_kube_config(config_file=settings.kubeconfig or None, client_configuration=cfg)
    except (config.ConfigException, OSError) as e:
        raise StageError(
            grpc.StatusCode.FAILED_PRECONDITION,
            f"no Kubernetes configuration (in-cluster or {', '.join(files)}): {e}",
        ) from None
    return client.ApiClient(cfg)


def default_namespace(settings: JobSettings) -> str:
    """DIFFMESH_NAMESPACE, else the pod's own namespace, else the kubeconfig context's, else "default"."""
    if settings.namespace:
        return settings.namespace
    if not settings.kubeconfig and in_cluster():
        return IN_CLUSTER_NAMESPACE.read_text().strip()
    # a malformed kubeconfig is reported by load_api_client, with its path
    with contextlib.suppress(
        config.ConfigException, OSError, yaml.YAMLError, ValueError, KeyError, TypeError, AttributeError
    ):
        _, current = config.list_kube_config_contexts(config_file=settings.kubeconfig or None)
        if current and current.get("context", {}).get("namespace"):
            return current["context"]["namespace"]
    return "default"


def _ts(field, text: str | None) -> None:
    if text:
        field.FromJsonString(text)


def job_state(obj: dict) -> tuple[int, str]:
    """(JobState, message) of a Job object as the API returns it."""
    meta, spec, status = obj.get("metadata") or {}, obj.get("spec") or {}, obj.get("status") or {}
    if meta.get("deletionTimestamp"):
        return orchestrator_pb2.JOB_STATE_CANCELLED, "cancelled: the Job and its pods are being deleted"
    for cond in status.get("conditions") or []:
        if cond.get("status") != "True":
            continue
        why = ": ".join(x for x in (cond.get("reason"), cond.get("message")) if x)
        if cond.get("type") in ("Complete", "SuccessCriteriaMet"):
            return orchestrator_pb2.JOB_STATE_SUCCEEDED, why
        if cond.get("type") in ("Failed", "FailureTarget"):
            return orchestrator_pb2.JOB_STATE_FAILED, why or "failed"
        if cond.get("type") == "Suspended":
            return orchestrator_pb2.JOB_STATE_PENDING, why or "suspended"
    active, failed = status.get("active") or 0, status.get("failed") or 0
    backoff = spec.get("backoffLimit", 6)
    if status.get("succeeded"):
        return orchestrator_pb2.JOB_STATE_SUCCEEDED, ""
    if failed > backoff:
        return orchestrator_pb2.JOB_STATE_FAILED, f"{failed} pods failed (backoffLimit {backoff})"
    retry = f"retrying after {failed} failed pod{'s' * (failed > 1)}" if failed else ""
    if active:
        return orchestrator_pb2.JOB_STATE_RUNNING, retry
    return orchestrator_pb2.JOB_STATE_PENDING, retry or "waiting for a pod"


def job_from_object(obj: dict) -> Job:
    """A Job message from a `batch/v1` Job object made by `build_job_manifest`."""
    meta, status = obj.get("metadata") or {}, obj.get("status") or {}
    pod = ((obj.get("spec") or {}).get("template") or {}).get("spec") or {}
    job = Job(id=meta.get("name", ""))
    annotation = (meta.get("annotations") or {}).get(SPEC_ANNOTATION)
    if annotation:
        json_format.Parse(annotation, job.spec, ignore_unknown_fields=True)
    container = next((c for c in pod.get("containers") or [] if c.get("name") == CONTAINER), {})
    limits = (container.get("resources") or {}).get("limits") or {}
    job.launch.launcher = "kubernetes"
    job.launch.namespace = meta.get("namespace") or ""
    job.launch.image = container.get("image", "")
    job.launch.gpus = int(limits.get(GPU, 0))
    job.launch.service_account = pod.get("serviceAccountName", "")
    job.state, job.message = job_state(obj)
    job.total_steps, job.output = job.spec.steps, job.spec.output
    if job.state == orchestrator_pb2.JOB_STATE_SUCCEEDED:
        job.step = job.spec.steps
    _ts(job.created_at, meta.get("creationTimestamp"))
    _ts(job.started_at, status.get("startTime"))
    _ts(job.finished_at, status.get("completionTime"))
    if job.state == orchestrator_pb2.JOB_STATE_FAILED and not status.get("completionTime"):
        ends = [
            c.get("lastTransitionTime") for c in status.get("conditions") or [] if c.get("type") == "Failed"
        ]
        _ts(job.finished_at, next((t for t in ends if t), None))
    return job


class KubernetesLauncher:
    name = "kubernetes"

    def __init__(
        self,
        settings: JobSettings,
        api: client.ApiClient | None = None,
        namespace: str = "",
    ) -> None:
        self.settings = settings
        self._api = api
        self.namespace = namespace or default_namespace(settings)

    def in_namespace(self, namespace: str) -> KubernetesLauncher:
        """The same client, another namespace."""
        if not namespace or namespace == self.namespace:
            return self
        return KubernetesLauncher(self.settings, self._api, namespace)

    @property
    def api(self) -> client.ApiClient:
        if self._api is None:
            self._api = load_api_client(self.settings)
        return self._api

    def _call(self, what: str, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        """One API call; its raw JSON body (dict) or the raw response (stream=True). Errors -> StageError."""
        stream = kwargs.pop("stream", False)
        try:
            resp = fn(*args, _preload_content=False, **kwargs)
        except client.ApiException as e:
            raise self._error(what, e) from None
        except (urllib3.exceptions.HTTPError, OSError) as e:
            host = self.api.configuration.host
            raise StageError(grpc.StatusCode.UNAVAILABLE, f"{what}: Kubernetes API at {host}: {e}") from None
        return resp if stream else json.loads(resp.data or b"{}")

    @staticmethod
    def _error(what: str, e: client.ApiException) -> StageError:
        detail = e.reason or ""
        with contextlib.suppress(ValueError, TypeError):
            detail = json.loads(e.body).get("message") or detail
        code = _CODES.get(e.status or 0, grpc.StatusCode.UNAVAILABLE)
        return StageError(code, f"{what}: Kubernetes API {e.status}: {detail}")

    # -- submit -----------------------------------------------------------------------------------------

    def submit(self, spec: orchestrator_pb2.TrainSpec, launch: orchestrator_pb2.LaunchOptions) -> Job:
        spec = with_defaults(spec)
        launch = orchestrator_pb2.LaunchOptions(
            launcher=self.name,
            namespace=launch.namespace or self.namespace,
            image=launch.image or self.settings.image,
            gpus=launch.gpus,
            service_account=launch.service_account,
        )
        ns, job_id = launch.namespace, new_job_id(spec.name)
        core, batch = client.CoreV1Api(self.api), client.BatchV1Api(self.api)
        self._call(
            "create the spec ConfigMap",
            core.create_namespaced_config_map,
            ns,
            build_spec_configmap(spec, job_id, ns),
        )
        try:
            created = self._call(
                f"create Job {job_id}",
                batch.create_namespaced_job,
                ns,
                build_job_manifest(spec, launch, self.settings, job_id),
            )
        except StageError:
            with contextlib.suppress(StageError):
                self._call(
                    "delete the spec ConfigMap", core.delete_namespaced_config_map, configmap_name(job_id), ns
                )
            raise
        uid = (created.get("metadata") or {}).get("uid")
        if uid:  # the ConfigMap goes with the Job (ttlSecondsAfterFinished, kubectl delete)
            owner = {"apiVersion": "batch/v1", "kind": "Job", "name": job_id, "uid": uid}
            try:
                self._call(
                    "own the spec ConfigMap",
                    core.patch_namespaced_config_map,
                    configmap_name(job_id),
                    ns,
                    {"metadata": {"ownerReferences": [owner]}},
                    _content_type=MERGE_PATCH,  # the client's default is JSON Patch (a list of ops)
                )
            except StageError as e:
                log.warning("job %s: the ConfigMap stays after the Job: %s", job_id, e)
        job = job_from_object(created)
        if not job.HasField("created_at"):
            stamp(job.created_at)
        log.info("job %s: created in namespace %s", job_id, ns)
        return job

    # -- state ------------------------------------------------------------------------------------------

    def _read(self, job_id: str) -> dict:
        batch = client.BatchV1Api(self.api)
        try:
            return self._call(
                f"read Job {job_id}", batch.read_namespaced_job, check_job_id(job_id), self.namespace
            )
        except StageError as e:
            if e.code == grpc.StatusCode.NOT_FOUND:
                raise unknown_job(job_id) from None
            raise

    def get(self, job_id: str) -> Job:
        return job_from_object(self._read(job_id))

    def _list(self, what: str, fn: Callable[..., Any], selector: str) -> list[dict]:
        try:
            body = self._call(what, fn, self.namespace, label_selector=selector, _request_timeout=TIMEOUT_S)
        except StageError as e:
            if e.code == grpc.StatusCode.NOT_FOUND:  # nothing of that kind in the namespace yet
                return []
            raise
        wanted = dict(kv.split("=", 1) for kv in selector.split(","))
        items = [
            i
            for i in body.get("items") or []
            if wanted.items() <= ((i.get("metadata") or {}).get("labels") or {}).items()
        ]
        return sorted(
            items,
            key=lambda i: (
                (i.get("metadata") or {}).get("creationTimestamp") or "",
                i["metadata"].get("name", ""),
            ),
        )

    def list(self, state: int = orchestrator_pb2.JOB_STATE_UNSPECIFIED) -> list[Job]:
        jobs = [
            job_from_object(o)
            for o in self._list("list Jobs", client.BatchV1Api(self.api).list_namespaced_job, SELECTOR)
        ]
        return [j for j in jobs if state in (orchestrator_pb2.JOB_STATE_UNSPECIFIED, j.state)]

    # -- cancel -----------------------------------------------------------------------------------------

    def cancel(self, job_id: str) -> Job:
        job = self.get(job_id)
        if job.state in TERMINAL:
            return job  # finished (or already being deleted): nothing to stop
        batch, core = client.BatchV1Api(self.api), client.CoreV1Api(self.api)
        try:
            self._call(
                f"delete Job {job_id}",
                batch.delete_namespaced_job,
                job_id,
                self.namespace,
                propagation_policy="Foreground",
            )
        except StageError as e:
            if e.code != grpc.StatusCode.NOT_FOUND:
                raise
        with contextlib.suppress(StageError):  # gone already with the Job (its owner)
            self._call(
                "delete the spec ConfigMap",
                core.delete_namespaced_config_map,
                configmap_name(job_id),
                self.namespace,
            )
        job.state, job.message = (
            orchestrator_pb2.JOB_STATE_CANCELLED,
            "cancelled: the Job and its pods were deleted",
        )
        stamp(job.finished_at)
        return job

    # -- logs -------------------------------------------------------------------------------------------

    def _pods(self, job_id: str) -> list[dict]:
        core = client.CoreV1Api(self.api)
        return self._list(f"list the pods of {job_id}", core.list_namespaced_pod, f"{LABEL_JOB_ID}={job_id}")

    def _wait_pod(self, job_id: str, stop: StopFlag | None) -> dict | None:
        """The latest pod of the job once it has started (or the job has ended); None if stopped."""
        while stop is None or not stop.is_set():
            pods = self._pods(job_id)
            phase = ((pods[-1].get("status") or {}).get("phase")) if pods else None
            if pods and phase != "Pending":
                return pods[-1]
            if self.get(job_id).state in TERMINAL:
                return pods[-1] if pods else None
            time.sleep(POLL_S)
        return None

    def logs(
        self, job_id: str, follow: bool = False, tail_lines: int = 0, stop: StopFlag | None = None
    ) -> Iterator[str]:
        """The log of the job's latest pod (its current attempt); with `follow`, streamed until it ends."""
        self._read(job_id)
        if follow:
            pod = self._wait_pod(job_id, stop)
        else:
            pods = self._pods(job_id)
            pod = pods[-1] if pods else None
        if pod is None:
            return
        kwargs: dict[str, Any] = {"container": CONTAINER, "follow": follow, "stream": True}
        if tail_lines:
            kwargs["tail_lines"] = tail_lines
        if not follow:
            kwargs["_request_timeout"] = TIMEOUT_S
        core = client.CoreV1Api(self.api)
        resp = self._call(
            f"read the log of {pod['metadata']['name']}",
            core.read_namespaced_pod_log,
            pod["metadata"]["name"],
            self.namespace,
            **kwargs,
        )
        partial = b""
        try:
            for chunk in resp.stream(1 << 16):
                *lines, partial = (partial + chunk).split(b"\n")
                yield from (ln.decode("utf-8", "replace").rstrip("\r") for ln in lines)
                if stop is not None and stop.is_set():
                    return
            if partial:
                yield partial.decode("utf-8", "replace")
        finally:
            resp.release_conn()
