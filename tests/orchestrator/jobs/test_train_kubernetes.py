"""`diffmesh train --launcher kubernetes` against kmock's in-memory Kubernetes API, through the real
`kubernetes` client and a kubeconfig: the Job and ConfigMap it creates (fields checked), status as the Job's
status changes (emulated by patching it, as the Job controller would), list, logs, cancel."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import yaml
from jobs_testkit import Kube, write_spec
from kubernetes import client

from orchestrator.cli import main

NS = "ml"  # the kubeconfig context's namespace
IMAGE = "registry.example/diffmesh:1.2.3"


def train(*args: str) -> int:
    return main(["train", *args])


def raw(fn, *args) -> dict:
    return json.loads(fn(*args, _preload_content=False).data)


def submit(kube: Kube, spec: Path, capsys, *extra: str) -> str:
    code = train(
        "submit",
        "--spec",
        str(spec),
        "--launcher",
        "kubernetes",
        "--kubeconfig",
        str(kube.kubeconfig),
        *extra,
    )
    cap = capsys.readouterr()
    assert code == 0, cap.err
    return cap.out.strip()


def status(job_id: str, capsys) -> dict:
    assert train("status", job_id, "--json") == 0
    return json.loads(capsys.readouterr().out)


def set_status(kube: Kube, job_id: str, status: dict) -> None:
    patch = client.BatchV1Api(kube.api).patch_namespaced_job_status
    patch(job_id, NS, {"status": status}, _content_type="application/merge-patch+json")


def test_submit_creates_the_job_and_its_spec_configmap(kube: Kube, tmp_path: Path, capsys, monkeypatch):
    monkeypatch.setenv("DIFFMESH_S3_ENDPOINT", "minio.ml.svc:9000")
    monkeypatch.setenv("DIFFMESH_S3_BUCKET", "diffmesh")
    monkeypatch.setenv("DIFFMESH_S3_SECRET", "s3-creds")
    spec = write_spec(tmp_path, steps=7, output="s3://diffmesh/loras/tiny/")
    extra = ("--gpus", "1", "--image", IMAGE, "--service-account", "diffmesh-trainer")
    job_id = submit(kube, spec, capsys, *extra)
    assert re.fullmatch(r"tiny-lora-[a-z]{6}", job_id)

    job = raw(client.BatchV1Api(kube.api).read_namespaced_job, job_id, NS)
    labels = {
        "app.kubernetes.io/name": "diffmesh-trainer",
        "app.kubernetes.io/component": "trainer",
        "app.kubernetes.io/managed-by": "diffmesh",
        "diffmesh.io/job-id": job_id,
    }
    assert job["metadata"]["labels"] == labels and job["metadata"]["namespace"] == NS
    assert job["spec"]["backoffLimit"] == 2
    assert job["spec"]["ttlSecondsAfterFinished"] == 7 * 24 * 3600
    assert "activeDeadlineSeconds" not in job["spec"]
    template = job["spec"]["template"]
    assert template["metadata"]["labels"] == labels
    pod = template["spec"]
    assert pod["restartPolicy"] == "Never" and pod["serviceAccountName"] == "diffmesh-trainer"
    assert pod["automountServiceAccountToken"] is False
    assert pod["securityContext"] == {
        "runAsNonRoot": True,
        "runAsUser": 10001,
        "runAsGroup": 10001,
        "fsGroup": 10001,
        "seccompProfile": {"type": "RuntimeDefault"},
    }
    assert pod["tolerations"] == [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}]
    (c,) = pod["containers"]
    assert c["image"] == IMAGE and c["command"] == ["python", "-m", "trainer"]
    assert c["resources"]["limits"]["nvidia.com/gpu"] == "1"
    assert c["resources"]["requests"] == {"cpu": "4", "memory": "32Gi"}
    assert {"cpu": "4", "memory": "32Gi"}.items() <= c["resources"]["limits"].items()
    sc = c["securityContext"]
    assert sc["allowPrivilegeEscalation"] is False and sc["capabilities"] == {"drop": ["ALL"]}
    assert sc["readOnlyRootFilesystem"] is True and sc["runAsNonRoot"] is True and sc["runAsUser"] == 10001
    env = {e["name"]: e for e in c["env"]}
    assert env["DIFFMESH_TRAIN_SPEC_FILE"]["value"] == "/etc/diffmesh/spec/spec.json"
    assert env["DIFFMESH_S3_ENDPOINT"]["value"] == "minio.ml.svc:9000"
    assert env["DIFFMESH_S3_BUCKET"]["value"] == "diffmesh"
    for key in ("DIFFMESH_S3_ACCESS_KEY", "DIFFMESH_S3_SECRET_KEY"):
        assert env[key]["valueFrom"] == {"secretKeyRef": {"name": "s3-creds", "key": key}}
        assert "value" not in env[key]
    mounts = {m["mountPath"]: m["name"] for m in c["volumeMounts"]}
    assert mounts["/etc/diffmesh/spec"] == "spec" and mounts["/tmp"] == "tmp" and "/cache" in mounts
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert volumes["spec"]["configMap"]["name"] == f"{job_id}-spec"
    assert volumes["tmp"] == {"name": "tmp", "emptyDir": {}}
    rules = job["spec"]["podFailurePolicy"]["rules"]
    assert rules[0]["action"] == "FailJob" and rules[0]["onExitCodes"]["values"] == [2]

    cm = raw(client.CoreV1Api(kube.api).read_namespaced_config_map, f"{job_id}-spec", NS)
    sent = json.loads(cm["data"]["spec.json"])
    assert sent["name"] == "tiny-lora" and sent["steps"] == 7 and sent["lora"] == {"rank": 4, "alpha": 4.0}
    assert sent["output"] == "s3://diffmesh/loras/tiny/" and cm["metadata"]["labels"] == labels
    owner = {"apiVersion": "batch/v1", "kind": "Job", "name": job_id, "uid": job["metadata"]["uid"]}
    assert cm["metadata"]["ownerReferences"] == [owner]  # deleted with the Job (TTL, kubectl delete)
    (patch,) = [r for r in kube.requests() if r.method == "PATCH"]
    assert patch.headers["Content-Type"] == "application/merge-patch+json"

    # recorded locally, so later commands find the launcher and namespace
    record = json.loads((tmp_path / "state" / "jobs" / job_id / "job.json").read_text())
    assert record["launch"] == {"launcher": "kubernetes", "namespace": NS, "image": IMAGE, "gpus": 1,
                                "serviceAccount": "diffmesh-trainer"}  # fmt: skip
    assert (tmp_path / "state" / "jobs" / job_id / "job.json").stat().st_mode & 0o777 == 0o600


def test_status_follows_the_job_status_then_list_and_cancel(kube: Kube, tmp_path: Path, capsys, monkeypatch):
    monkeypatch.setenv("KUBECONFIG", str(kube.kubeconfig))  # later commands: the current kubeconfig
    first = submit(kube, write_spec(tmp_path, name="first"), capsys)
    second = submit(kube, write_spec(tmp_path, name="second"), capsys)
    assert status(first, capsys)["state"] == "JOB_STATE_PENDING"

    set_status(kube, first, {"active": 1, "startTime": "2026-01-02T03:04:05Z"})
    job = status(first, capsys)
    assert job["state"] == "JOB_STATE_RUNNING" and job["startedAt"] == "2026-01-02T03:04:05Z"
    assert job["launch"]["launcher"] == "kubernetes" and job["spec"]["name"] == "first"

    set_status(kube, first, {"active": 0, "succeeded": 1, "completionTime": "2026-01-02T04:00:00Z"})
    job = status(first, capsys)
    assert job["state"] == "JOB_STATE_SUCCEEDED" and job["finishedAt"] == "2026-01-02T04:00:00Z"

    failed = {"type": "Failed", "status": "True", "reason": "BackoffLimitExceeded", "message": "too many"}
    set_status(kube, second, {"failed": 3, "conditions": [failed]})
    job = status(second, capsys)
    assert job["state"] == "JOB_STATE_FAILED" and "BackoffLimitExceeded" in job["message"]

    third = submit(kube, write_spec(tmp_path, name="third"), capsys)
    set_status(kube, third, {"active": 1})
    assert train("list", "--launcher", "kubernetes", "--kubeconfig", str(kube.kubeconfig)) == 0
    rows = {line.split()[0]: line.split()[1] for line in capsys.readouterr().out.splitlines()[1:]}
    assert rows == {first: "SUCCEEDED", second: "FAILED", third: "RUNNING"}
    assert train("list", "--state", "running") == 0  # from the local index, each refreshed from the cluster
    assert [line.split()[0] for line in capsys.readouterr().out.splitlines()[1:]] == [third]

    assert train("cancel", third) == 0
    assert capsys.readouterr().out.strip() == f"{third} CANCELLED"
    batch, core = client.BatchV1Api(kube.api), client.CoreV1Api(kube.api)
    for read, name in (
        (batch.read_namespaced_job, third),
        (core.read_namespaced_config_map, f"{third}-spec"),
    ):
        with pytest.raises(client.ApiException) as e:
            read(name, NS)
        assert e.value.status == 404
    (delete,) = [r for r in kube.requests() if r.method == "DELETE" and f"/jobs/{third}" in str(r.url)]
    assert delete.params.get("propagationPolicy") == "Foreground"
    assert status(third, capsys)["state"] == "JOB_STATE_CANCELLED"  # the record outlives the Job
    assert train("cancel", first) == 0  # a finished job: nothing to stop, nothing deleted
    assert capsys.readouterr().out.strip() == f"{first} SUCCEEDED"
    raw(batch.read_namespaced_job, first, NS)


def test_logs_read_the_pod_of_the_job(kube: Kube, tmp_path: Path, capsys, monkeypatch):
    monkeypatch.setenv("KUBECONFIG", str(kube.kubeconfig))
    job_id = submit(kube, write_spec(tmp_path), capsys)
    pod = f"{job_id}-x7k2p"
    meta = {"name": pod, "namespace": NS, "labels": {"diffmesh.io/job-id": job_id, "job-name": job_id}}
    body = {"metadata": meta, "spec": {"containers": [{"name": "trainer", "image": IMAGE}]}}
    client.CoreV1Api(kube.api).create_namespaced_pod(NS, {**body, "status": {"phase": "Running"}})
    kube.serve_log(NS, pod, "step 1/3 loss 1.0\nstep 2/3 loss 0.5\n")
    assert train("logs", job_id) == 0
    assert capsys.readouterr().out.splitlines() == ["step 1/3 loss 1.0", "step 2/3 loss 0.5"]
    assert train("logs", job_id, "--follow") == 0  # streamed; ends when the pod's log does
    assert capsys.readouterr().out.splitlines() == ["step 1/3 loss 1.0", "step 2/3 loss 0.5"]
    assert train("logs", job_id, "--tail", "1") == 0
    capsys.readouterr()
    log_call = [r for r in kube.requests() if str(r.url).split("?")[0].endswith(f"/pods/{pod}/log")][-1]
    assert "tailLines=1" in str(log_call.url) and "container=trainer" in str(log_call.url)


def test_unknown_jobs_empty_namespaces_and_dry_run(kube: Kube, tmp_path: Path, capsys):
    kc = ("--kubeconfig", str(kube.kubeconfig))
    assert train("list", "--launcher", "kubernetes", "--namespace", "empty", *kc) == 0  # kmock: 404 = none
    assert capsys.readouterr().out.splitlines()[1:] == []
    assert train("status", "nope-abcdef", "--launcher", "kubernetes", *kc) == 1
    assert "NOT_FOUND: no training job 'nope-abcdef'" in capsys.readouterr().err

    sent = len(kube.requests())
    spec = write_spec(tmp_path)
    code = train("submit", "--spec", str(spec), "--launcher", "kubernetes", "--dry-run", "--gpus", "2", *kc)
    assert code == 0
    cm, job = yaml.safe_load_all(capsys.readouterr().out)
    assert cm["kind"] == "ConfigMap" and job["kind"] == "Job" and job["metadata"]["namespace"] == NS
    assert job["spec"]["template"]["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] == "2"
    assert len(kube.requests()) == sent  # nothing sent to the cluster


def test_bad_spec_creates_nothing(kube: Kube, tmp_path: Path, capsys):
    spec = write_spec(tmp_path, lora={"rank": 0})
    code = train(
        "submit", "--spec", str(spec), "--launcher", "kubernetes", "--kubeconfig", str(kube.kubeconfig)
    )
    assert code == 2
    assert "lora.rank" in capsys.readouterr().err
    assert not kube.requests()
