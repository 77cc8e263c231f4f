"""Admission control on a real gRPC server: with one RPC running and a queue of one, the queued call is told
its position and runs after; one more gets RESOURCE_EXHAUSTED naming the queue; a queued call whose deadline
passes leaves the queue; health checks are never queued."""

from __future__ import annotations

import threading
import time

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from slow_stage import SlowDenoiser

from protos import denoiser_pb2, denoiser_pb2_grpc
from services.common.server import Binding, create_server
from services.denoiser.server import queued_event


@pytest.fixture
def stub():
    binding = Binding(
        "diffmesh.v1.Denoiser",
        denoiser_pb2_grpc.add_DenoiserServicer_to_server,
        SlowDenoiser(),
        queued_events={"Denoise": queued_event},
    )
    server, port = create_server([binding], max_running=1, max_queue=1)
    channel = grpc.insecure_channel(f"127.0.0.1:{port}")
    yield denoiser_pb2_grpc.DenoiserStub(channel), channel
    channel.close()
    server.stop(0)


def kinds(events) -> list[str]:
    return [e.WhichOneof("event") for e in events]


def test_queue_positions_then_rejection(stub):
    stub, channel = stub
    results: dict[str, list] = {}

    def call(name: str, steps: int) -> None:
        results[name] = list(stub.Denoise(denoiser_pb2.DenoiseRequest(steps=steps), timeout=30))

    first = threading.Thread(target=call, args=("first", 5))
    first.start()
    time.sleep(0.3)  # first is running
    second = threading.Thread(target=call, args=("second", 1))
    second.start()
    time.sleep(0.3)  # second is queued
    with pytest.raises(grpc.RpcError) as err:
        list(stub.Denoise(denoiser_pb2.DenoiseRequest(steps=1), timeout=30))
    assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "1 requests running and 1 queued (queue size 1" in err.value.details()
    health = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5)
    assert health.status == health_pb2.HealthCheckResponse.SERVING  # not queued
    first.join(30)
    second.join(30)
    assert kinds(results["first"]) == ["progress"] * 5 + ["result"]
    assert kinds(results["second"])[0] == "queued" and kinds(results["second"])[-1] == "result"
    queued = results["second"][0].queued
    assert (queued.position, queued.queue_size) == (0, 1)


def test_deadline_in_the_queue(stub):
    stub, _ = stub
    first = threading.Thread(
        target=lambda: list(stub.Denoise(denoiser_pb2.DenoiseRequest(steps=5), timeout=30))
    )
    first.start()
    time.sleep(0.3)
    with pytest.raises(grpc.RpcError) as err:
        list(stub.Denoise(denoiser_pb2.DenoiseRequest(steps=1), timeout=0.5))
    assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    first.join(30)
    events = list(stub.Denoise(denoiser_pb2.DenoiseRequest(steps=1), timeout=30))  # runs: the queue is free
    assert kinds(events)[-2:] == [
        "progress",
        "result",
    ]  # (queued first if the first call's slot is not back yet)
