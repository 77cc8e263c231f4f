"""The Job manifest as a pure function: its variants, the state mapping of a Job's status, job ids, and the
rendered YAML validated strictly against the Kubernetes 1.33 schemas by `kubernetes-validate`."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from orchestrator.jobs.base import JOB_ID, new_job_id
from orchestrator.jobs.kubernetes import job_from_object, job_state
from orchestrator.jobs.manifest import build_job_manifest, build_spec_configmap, to_yaml
from orchestrator.settings import JobSettings
from protos import orchestrator_pb2
from trainer.spec import parse_spec

VALIDATE = Path(sys.executable).parent / "kubernetes-validate"
SPEC = parse_spec(
    json.dumps(
        {
            "name": "tiny-lora",
            "family": "flux",
            "baseModel": "s3://models/flux-dev/",
            "dataset": {"uri": "s3://data/cats/"},
            "lora": {"rank": 8},
            "steps": 100,
            "output": "s3://diffmesh/loras/tiny/",
        }
    )
)


def _pod(job: dict) -> dict:
    return job["spec"]["template"]["spec"]


def test_cpu_job_has_no_gpu_and_optional_fields_only_when_set():
    job = build_job_manifest(SPEC, orchestrator_pb2.LaunchOptions(), JobSettings(), job_id="tiny-lora-abcdef")
    pod = _pod(job)
    (c,) = pod["containers"]
    assert "nvidia.com/gpu" not in c["resources"]["limits"] and "tolerations" not in pod
    assert "serviceAccountName" not in pod and "activeDeadlineSeconds" not in job["spec"]
    assert c["image"] == "diffmesh:0.1.0" and job["metadata"]["namespace"] == "default"
    assert {v["name"]: v for v in pod["volumes"]}["cache"] == {"name": "cache", "emptyDir": {}}
    assert json.loads(job["metadata"]["annotations"]["diffmesh.io/spec"])["lora"] == {"rank": 8, "alpha": 8.0}
    assert not any(e["name"].startswith("DIFFMESH_S3_ENDPOINT") for e in c["env"])


def test_settings_shape_the_job():
    settings = dataclasses.replace(
        JobSettings(),
        namespace="train",
        image="reg/diffmesh:2",
        cpu="8",
        memory="64Gi",
        backoff_limit=0,
        ttl_seconds=3600,
        deadline_seconds=86400,
        cache_pvc="model-cache",
        store_env=(("DIFFMESH_STORE", "s3"),),
    )
    job = build_job_manifest(SPEC, orchestrator_pb2.LaunchOptions(gpus=4), settings)
    assert JOB_ID.match(job["metadata"]["name"]) and job["metadata"]["name"].startswith("tiny-lora-")
    assert job["metadata"]["namespace"] == "train"
    spec = job["spec"]
    assert (spec["backoffLimit"], spec["ttlSecondsAfterFinished"], spec["activeDeadlineSeconds"]) == (
        0,
        3600,
        86400,
    )
    (c,) = _pod(job)["containers"]
    assert c["image"] == "reg/diffmesh:2"
    assert c["resources"] == {
        "requests": {"cpu": "8", "memory": "64Gi"},
        "limits": {"cpu": "8", "memory": "64Gi", "nvidia.com/gpu": "4"},
    }
    volumes = {v["name"]: v for v in _pod(job)["volumes"]}
    assert volumes["cache"]["persistentVolumeClaim"] == {"claimName": "model-cache"}
    assert {"name": "DIFFMESH_STORE", "value": "s3"} in c["env"]


def test_manifest_validates_strictly_against_kubernetes_1_33(tmp_path: Path):
    launch = orchestrator_pb2.LaunchOptions(namespace="ml", gpus=1, service_account="diffmesh-trainer")
    settings = dataclasses.replace(
        JobSettings(), deadline_seconds=3600, store_env=(("DIFFMESH_STORE", "s3"),)
    )
    job = build_job_manifest(SPEC, launch, settings)
    path = tmp_path / "job.yaml"
    path.write_text(to_yaml(build_spec_configmap(SPEC, job["metadata"]["name"], "ml"), job))
    result = subprocess.run(
        [str(VALIDATE), "--strict", "-k", "1.33.0", str(path)], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.count("passed") == 2, result.stdout
    assert [d["kind"] for d in yaml.safe_load_all(path.read_text())] == ["ConfigMap", "Job"]


def test_job_ids_are_dns_labels():
    for name in ("a", "tiny-lora", "x" * 50):
        job_id = new_job_id(name)
        assert JOB_ID.match(job_id) and len(job_id) == len(name) + 7 and job_id[-6:].isalpha()
    assert new_job_id("tiny") != new_job_id("tiny")


S = orchestrator_pb2


@pytest.mark.parametrize(
    ("meta", "status", "state"),
    [
        ({}, {}, S.JOB_STATE_PENDING),
        ({}, {"active": 1}, S.JOB_STATE_RUNNING),
        ({}, {"active": 1, "failed": 1}, S.JOB_STATE_RUNNING),
        ({}, {"failed": 1}, S.JOB_STATE_PENDING),  # between retries
        ({}, {"failed": 3}, S.JOB_STATE_FAILED),  # past backoffLimit 2
        ({}, {"succeeded": 1}, S.JOB_STATE_SUCCEEDED),
        ({}, {"conditions": [{"type": "Complete", "status": "True"}]}, S.JOB_STATE_SUCCEEDED),
        ({}, {"active": 1, "conditions": [{"type": "FailureTarget", "status": "True"}]}, S.JOB_STATE_FAILED),
        ({}, {"conditions": [{"type": "Failed", "status": "False"}], "active": 1}, S.JOB_STATE_RUNNING),
        ({}, {"conditions": [{"type": "Suspended", "status": "True"}]}, S.JOB_STATE_PENDING),
        ({"deletionTimestamp": "2026-01-01T00:00:00Z"}, {"active": 1}, S.JOB_STATE_CANCELLED),
    ],
)
def test_job_status_maps_to_a_state(meta: dict, status: dict, state: int):
    obj = {"metadata": {"name": "j-abcdef", **meta}, "spec": {"backoffLimit": 2}, "status": status}
    assert job_state(obj)[0] == state


def test_a_created_job_reads_back_as_its_job_message():
    launch = orchestrator_pb2.LaunchOptions(namespace="ml", image="i:1", gpus=2, service_account="sa")
    obj = build_job_manifest(SPEC, launch, JobSettings(), job_id="tiny-lora-qwerty")
    job = job_from_object({**obj, "status": {"active": 1, "startTime": "2026-05-06T07:08:09Z"}})
    assert job.id == "tiny-lora-qwerty" and job.state == S.JOB_STATE_RUNNING
    assert job.spec.name == "tiny-lora" and job.spec.lora.rank == 8 and job.total_steps == 100
    assert job.output == "s3://diffmesh/loras/tiny/"
    assert (job.launch.launcher, job.launch.namespace, job.launch.image) == ("kubernetes", "ml", "i:1")
    assert (job.launch.gpus, job.launch.service_account) == (2, "sa")
    assert job.started_at.ToJsonString() == "2026-05-06T07:08:09Z"
