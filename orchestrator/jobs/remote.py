"""The job operations of `Jobs`, over a running orchestrator's gRPC API (`diffmesh train --endpoint`)."""

from __future__ import annotations

from collections.abc import Iterator

import grpc

from orchestrator.clients import ChannelTls, open_channel
from orchestrator.errors import StageError
from orchestrator.jobs.base import Job, StopFlag
from protos import orchestrator_pb2, orchestrator_pb2_grpc


class RemoteJobs:
    def __init__(
        self,
        endpoint: str,
        token: str | None = None,
        tls_ca: bytes | None = None,
        timeout_s: float | None = 60.0,
    ) -> None:
        self.endpoint = endpoint
        self.channel = open_channel(endpoint, tls=ChannelTls(tls_ca) if tls_ca is not None else None)
        self.stub = orchestrator_pb2_grpc.OrchestratorStub(self.channel)
        self.metadata = (("authorization", f"Bearer {token}"),) if token else ()
        self.timeout_s = timeout_s

    def close(self) -> None:
        self.channel.close()

    def __enter__(self) -> RemoteJobs:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _unary(self, method: str, request):
        try:
            return getattr(self.stub, method)(request, metadata=self.metadata, timeout=self.timeout_s)
        except grpc.RpcError as e:
            raise self._error(e) from None

    def _error(self, e: grpc.RpcError) -> StageError:
        return StageError(e.code(), e.details() or "", "orchestrator", self.endpoint)  # type: ignore[attr-defined]

    def submit(
        self, spec: orchestrator_pb2.TrainSpec, launch: orchestrator_pb2.LaunchOptions | None = None
    ) -> Job:
        return self._unary("SubmitJob", orchestrator_pb2.SubmitJobRequest(spec=spec, launch=launch))

    def get(self, job_id: str) -> Job:
        return self._unary("GetJob", orchestrator_pb2.GetJobRequest(id=job_id))

    def list(self, state: int = orchestrator_pb2.JOB_STATE_UNSPECIFIED, launcher: str = "") -> list[Job]:
        return list(self._unary("ListJobs", orchestrator_pb2.ListJobsRequest(state=state)).jobs)

    def cancel(self, job_id: str) -> Job:
        return self._unary("CancelJob", orchestrator_pb2.CancelJobRequest(id=job_id))

    def logs(
        self, job_id: str, follow: bool = False, tail_lines: int = 0, stop: StopFlag | None = None
    ) -> Iterator[str]:
        request = orchestrator_pb2.JobLogsRequest(id=job_id, follow=follow, tail_lines=tail_lines)
        call = self.stub.JobLogs(request, metadata=self.metadata, timeout=None if follow else self.timeout_s)
        try:
            for line in call:
                yield line.text
                if stop is not None and stop.is_set():
                    call.cancel()
                    return
        except grpc.RpcError as e:
            raise self._error(e) from None
