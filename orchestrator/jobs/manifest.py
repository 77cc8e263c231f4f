"""The Kubernetes objects of one training job, as plain dicts: a `batch/v1` Job and the ConfigMap holding its
spec. Pure functions of (spec, launch options, settings), so the manifest can be printed (`--dry-run`),
validated (`kubernetes-validate --strict`) and tested without a cluster.
"""

from __future__ import annotations

import json

import yaml

from orchestrator.jobs.base import new_job_id
from orchestrator.settings import JobSettings
from protos import orchestrator_pb2
from trainer.spec import to_json, with_defaults

APP = "diffmesh-trainer"
LABEL_NAME = "app.kubernetes.io/name"
LABEL_MANAGED_BY = "app.kubernetes.io/managed-by"
LABEL_JOB_ID = "diffmesh.io/job-id"
SELECTOR = f"{LABEL_NAME}={APP},{LABEL_MANAGED_BY}=diffmesh"
SPEC_ANNOTATION = "diffmesh.io/spec"  # the spec as compact JSON, so a Job read back names its spec
CONTAINER = "trainer"
SPEC_DIR = "/etc/diffmesh/spec"
SPEC_KEY = "spec.json"
CACHE_DIR = "/cache"
GPU = "nvidia.com/gpu"
UID = 10001  # the image's user (Dockerfile) and the deployments' fsGroup: one owner for the shared cache
SECRET_KEYS = ("DIFFMESH_S3_ACCESS_KEY", "DIFFMESH_S3_SECRET_KEY")  # env name = key in the Secret
EXIT_BAD_SPEC = 2  # the trainer's exit code for a bad spec: fail the Job at once, no retries


def labels(job_id: str) -> dict[str, str]:
    return {
        LABEL_NAME: APP,
        "app.kubernetes.io/component": "trainer",
        LABEL_MANAGED_BY: "diffmesh",
        LABEL_JOB_ID: job_id,
    }


def configmap_name(job_id: str) -> str:
    return f"{job_id}-spec"


def namespace_of(launch: orchestrator_pb2.LaunchOptions, settings: JobSettings) -> str:
    return launch.namespace or settings.namespace or "default"


def build_spec_configmap(spec: orchestrator_pb2.TrainSpec, job_id: str, namespace: str) -> dict:
    return {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": {"name": configmap_name(job_id), "namespace": namespace, "labels": labels(job_id)},
        "data": {SPEC_KEY: to_json(with_defaults(spec))},
    }


def _env(job_id: str, settings: JobSettings) -> list[dict]:
    env = [
        {"name": "DIFFMESH_TRAIN_SPEC_FILE", "value": f"{SPEC_DIR}/{SPEC_KEY}"},
        {"name": "DIFFMESH_JOB_ID", "value": job_id},
        {"name": "PYTHONUNBUFFERED", "value": "1"},
        {"name": "HOME", "value": "/tmp"},  # the root filesystem is read-only
        {"name": "DIFFMESH_CACHE_DIR", "value": CACHE_DIR},
        {"name": "HF_HOME", "value": f"{CACHE_DIR}/huggingface"},
        {"name": "MODELSCOPE_CACHE", "value": f"{CACHE_DIR}/modelscope"},
        {"name": "TORCH_HOME", "value": f"{CACHE_DIR}/torch"},
    ]
    env += [{"name": k, "value": v} for k, v in settings.store_env]
    env += [
        {"name": key, "valueFrom": {"secretKeyRef": {"name": settings.s3_secret, "key": key}}}
        for key in SECRET_KEYS
    ]
    return env


def _resources(launch: orchestrator_pb2.LaunchOptions, settings: JobSettings) -> dict:
    requests = {"cpu": settings.cpu, "memory": settings.memory}
    limits = dict(requests)
    if launch.gpus:
        limits[GPU] = str(launch.gpus)
    return {"requests": requests, "limits": limits}


def _volumes(job_id: str, settings: JobSettings) -> list[dict]:
    cache = (
        {"persistentVolumeClaim": {"claimName": settings.cache_pvc}}
        if settings.cache_pvc
        else {"emptyDir": {}}
    )
    return [
        {
            "name": "spec",
            "configMap": {
                "name": configmap_name(job_id),
                "items": [{"key": SPEC_KEY, "path": SPEC_KEY}],
                "defaultMode": 0o444,
            },
        },
        {"name": "tmp", "emptyDir": {}},
        {"name": "cache", **cache},
        {"name": "dshm", "emptyDir": {"medium": "Memory"}},  # torch DataLoader workers share memory here
    ]


def build_job_manifest(
    spec: orchestrator_pb2.TrainSpec,
    launch: orchestrator_pb2.LaunchOptions,
    settings: JobSettings,
    job_id: str | None = None,
) -> dict:
    """The `batch/v1` Job that runs `python -m trainer` on `spec` (read from the ConfigMap of
    `build_spec_configmap`). `job_id` defaults to a new `<spec.name>-<6 letters>`."""
    spec = with_defaults(spec)
    job_id = job_id or new_job_id(spec.name)
    namespace = namespace_of(launch, settings)
    container = {
        "name": CONTAINER,
        "image": launch.image or settings.image,
        "imagePullPolicy": "IfNotPresent",
        "command": ["python", "-m", "trainer"],
        "env": _env(job_id, settings),
        "resources": _resources(launch, settings),
        "securityContext": {
            "allowPrivilegeEscalation": False,
            "capabilities": {"drop": ["ALL"]},
            "readOnlyRootFilesystem": True,
            "runAsNonRoot": True,
            "runAsUser": UID,
            "runAsGroup": UID,
        },
        "volumeMounts": [
            {"name": "spec", "mountPath": SPEC_DIR, "readOnly": True},
            {"name": "tmp", "mountPath": "/tmp"},
            {"name": "cache", "mountPath": CACHE_DIR},
            {"name": "dshm", "mountPath": "/dev/shm"},
        ],
    }
    pod = {
        "restartPolicy": "Never",
        "automountServiceAccountToken": False,  # the trainer never calls the Kubernetes API
        "securityContext": {
            "runAsNonRoot": True,
            "runAsUser": UID,
            "runAsGroup": UID,
            "fsGroup": UID,
            "seccompProfile": {"type": "RuntimeDefault"},
        },
        "containers": [container],
        "volumes": _volumes(job_id, settings),
    }
    if launch.service_account:
        pod["serviceAccountName"] = launch.service_account
    if launch.gpus:
        pod["tolerations"] = [{"key": GPU, "operator": "Exists", "effect": "NoSchedule"}]
    job_spec: dict = {
        "backoffLimit": settings.backoff_limit,
        "ttlSecondsAfterFinished": settings.ttl_seconds,
        "podFailurePolicy": {
            "rules": [
                {  # a bad spec fails the same way on every retry
                    "action": "FailJob",
                    "onExitCodes": {"containerName": CONTAINER, "operator": "In", "values": [EXIT_BAD_SPEC]},
                },
                {  # preemption, eviction, node drain: retry without counting against backoffLimit
                    "action": "Ignore",
                    "onPodConditions": [{"type": "DisruptionTarget", "status": "True"}],
                },
            ]
        },
        "template": {"metadata": {"labels": labels(job_id)}, "spec": pod},
    }
    if settings.deadline_seconds:
        job_spec["activeDeadlineSeconds"] = settings.deadline_seconds
    return {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": {
            "name": job_id,
            "namespace": namespace,
            "labels": labels(job_id),
            "annotations": {SPEC_ANNOTATION: json.dumps(json.loads(to_json(spec)), separators=(",", ":"))},
        },
        "spec": job_spec,
    }


def to_yaml(*objects: dict) -> str:
    """Objects as one multi-document YAML stream (what `kubectl apply -f` takes)."""
    return yaml.safe_dump_all(objects, sort_keys=False)
