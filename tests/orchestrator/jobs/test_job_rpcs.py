"""The job RPCs (SubmitJob, GetJob, ListJobs, CancelJob, JobLogs) of the real OrchestratorServicer on a real
gRPC server (port 0, token auth) with the local launcher and the stand-in trainer; and `diffmesh train
--endpoint` through them."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
from jobs_testkit import write_spec

from orchestrator.cli import main
from orchestrator.jobs.service import Jobs
from orchestrator.runner import Runner
from orchestrator.server import SERVICE, OrchestratorServicer
from orchestrator.settings import JobSettings
from protos import orchestrator_pb2, orchestrator_pb2_grpc
from services.common.server import Binding, create_server
from trainer.spec import parse_spec

TOKEN = "jobs-test-token"
AUTH = (("authorization", f"Bearer {TOKEN}"),)
S = orchestrator_pb2


@dataclass
class Api:
    endpoint: str
    stub: orchestrator_pb2_grpc.OrchestratorStub

    def call(self, method: str, request, **kwargs):
        return getattr(self.stub, method)(request, metadata=AUTH, timeout=20, **kwargs)

    def wait(self, job_id: str, done, timeout: float = 20.0) -> orchestrator_pb2.Job:
        deadline = time.monotonic() + timeout
        while True:
            job = self.call("GetJob", S.GetJobRequest(id=job_id))
            if done(job) or time.monotonic() > deadline:
                return job
            time.sleep(0.05)


def serve(jobs: Jobs | None) -> tuple[object, Api, grpc.Channel]:
    servicer = OrchestratorServicer(Runner({}), jobs=jobs)
    binding = Binding(SERVICE, orchestrator_pb2_grpc.add_OrchestratorServicer_to_server, servicer)
    server, port = create_server([binding], token=TOKEN)
    channel = grpc.insecure_channel(f"127.0.0.1:{port}")
    return server, Api(f"127.0.0.1:{port}", orchestrator_pb2_grpc.OrchestratorStub(channel)), channel


@pytest.fixture
def api(fake_trainer) -> Iterator[Api]:
    server, api, channel = serve(Jobs.from_settings(JobSettings.from_env()))
    yield api
    channel.close()
    server.stop(0)


def spec_of(path: Path) -> orchestrator_pb2.TrainSpec:
    return parse_spec(path.read_text())


def test_submit_get_list_logs(api: Api, tmp_path: Path, monkeypatch):
    monkeypatch.setenv("FAKE_TRAINER_SLEEP", "0.2")
    job = api.call("SubmitJob", S.SubmitJobRequest(spec=spec_of(write_spec(tmp_path, steps=3))))
    assert job.state == S.JOB_STATE_RUNNING and job.launch.launcher == "local" and job.total_steps == 3
    assert job.id.startswith("tiny-lora-") and job.HasField("created_at") and job.HasField("started_at")
    follow = api.call("JobLogs", S.JobLogsRequest(id=job.id, follow=True))
    assert [line.text for line in follow][:3] == [f"step {i}/3 loss {1 / i:.3f}" for i in (1, 2, 3)]
    done = api.wait(job.id, lambda j: j.state != S.JOB_STATE_RUNNING)
    assert done.state == S.JOB_STATE_SUCCEEDED and done.step == 3 and done.HasField("finished_at")
    tail = api.call("JobLogs", S.JobLogsRequest(id=job.id, tail_lines=1))
    assert [line.text for line in tail] == [f"saved {tmp_path / 'out-tiny-lora' / 'lora.safetensors'}"]
    listed = api.call("ListJobs", S.ListJobsRequest()).jobs
    assert [j.id for j in listed] == [job.id]
    assert api.call("ListJobs", S.ListJobsRequest(state=S.JOB_STATE_RUNNING)).jobs == []


def test_cancel_and_the_cli_through_the_endpoint(api: Api, tmp_path: Path, capsys, monkeypatch):
    monkeypatch.setenv("FAKE_TRAINER_SLEEP", "30")
    remote = ["--endpoint", api.endpoint, "--token", TOKEN]
    assert main(["train", "submit", "--spec", str(write_spec(tmp_path, name="sleeper")), *remote]) == 0
    job_id = capsys.readouterr().out.strip()
    assert api.wait(job_id, lambda j: j.step >= 1).state == S.JOB_STATE_RUNNING
    assert main(["train", "status", job_id, "--json", *remote]) == 0
    assert json.loads(capsys.readouterr().out)["state"] == "JOB_STATE_RUNNING"
    cancelled = api.call("CancelJob", S.CancelJobRequest(id=job_id))
    assert cancelled.state == S.JOB_STATE_CANCELLED and cancelled.message == "cancelled"
    assert api.call("GetJob", S.GetJobRequest(id=job_id)).state == S.JOB_STATE_CANCELLED
    assert main(["train", "list", "--state", "cancelled", *remote]) == 0
    assert [r.split()[0] for r in capsys.readouterr().out.splitlines()[1:]] == [job_id]
    assert main(["train", "status", "gone-abcdef", *remote]) == 1
    assert "NOT_FOUND" in capsys.readouterr().err


def test_bad_requests_name_the_field_and_unknown_ids_list_nothing(api: Api, tmp_path: Path):
    bad = spec_of(write_spec(tmp_path, name="first"))
    bad.lora.rank = 0
    with pytest.raises(grpc.RpcError) as e:
        api.call("SubmitJob", S.SubmitJobRequest(spec=bad))
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "lora.rank" in e.value.details()
    good = spec_of(write_spec(tmp_path, name="second"))
    with pytest.raises(grpc.RpcError) as e:
        api.call("SubmitJob", S.SubmitJobRequest(spec=good, launch=S.LaunchOptions(launcher="slurm")))
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "launch.launcher" in e.value.details()
    with pytest.raises(grpc.RpcError) as e:
        api.call("SubmitJob", S.SubmitJobRequest())
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "spec" in e.value.details()
    existing = api.call("SubmitJob", S.SubmitJobRequest(spec=good)).id
    for method, request in (
        ("GetJob", S.GetJobRequest(id="second-zzzzzz")),
        ("CancelJob", S.CancelJobRequest(id="second-zzzzzz")),
    ):
        with pytest.raises(grpc.RpcError) as e:
            api.call(method, request)
        assert e.value.code() == grpc.StatusCode.NOT_FOUND, method
        assert "second-zzzzzz" in e.value.details() and existing not in e.value.details()
    with pytest.raises(grpc.RpcError) as e:
        list(api.call("JobLogs", S.JobLogsRequest(id="second-zzzzzz")))
    assert e.value.code() == grpc.StatusCode.NOT_FOUND
    with pytest.raises(grpc.RpcError) as e:
        api.call("GetJob", S.GetJobRequest(id="../../etc/passwd"))
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    with pytest.raises(grpc.RpcError) as e:
        api.stub.GetJob(S.GetJobRequest(id=existing), timeout=5)  # no token
    assert e.value.code() == grpc.StatusCode.UNAUTHENTICATED


def test_an_orchestrator_without_jobs_says_unimplemented():
    server, api, channel = serve(None)
    try:
        with pytest.raises(grpc.RpcError) as e:
            api.call("ListJobs", S.ListJobsRequest())
        assert e.value.code() == grpc.StatusCode.UNIMPLEMENTED
    finally:
        channel.close()
        server.stop(0)
