"""Faults injected into `diffmesh up`'s real processes (SeaweedFS S3 + one gRPC server per stage):

- kill -9 of the denoiser mid-request: the orchestrator retries the stage; once the denoiser is restarted the
  request completes with the undisturbed run's image;
- kill -9 of the VAE before its stage: the denoiser runs once (its own RPC counter says so), the decode waits
  for the restarted VAE, the image is the undisturbed one;
- the S3 server stopped: UNAVAILABLE naming the store within the request's deadline; after a restart on its
  port and data, requests succeed again;
- an object corrupted in the store: DATA_LOSS, never decoded.
"""

from __future__ import annotations

import io
import os
import signal
import time

import grpc
import numpy as np
import pytest
import torch
from fault_stack import kill9, pixels, request, rpc_calls, run_in_thread, wait_for
from minio import Minio

from orchestrator.client import Client, ClientError
from orchestrator.stack.local_stack import restart
from protos import vae_pb2, vae_pb2_grpc
from services.common.settings import S3Settings, Settings
from services.common.store import open_store


def test_denoiser_killed_mid_request_completes_after_restart(faulty):
    state, model = faulty
    with Client(state.endpoints["orchestrator"], state.token, timeout_s=300) as client:
        req = request(model, steps=300)
        undisturbed = pixels(client.run(req).result)
        events: list = []
        thread, out = run_in_thread(client, req, events)
        wait_for(lambda: any(e.WhichOneof("event") == "progress" and e.progress.step >= 3 for e in events))
        kill9(state.data["services"]["denoiser"]["pid"])
        restart(state, "denoiser")
        thread.join(240)
    assert "error" not in out, out.get("error")
    assert np.array_equal(pixels(out["gen"].result), undisturbed)
    steps = [e.progress.step for e in events if e.WhichOneof("event") == "progress"]
    assert steps.count(1) >= 2  # the denoise stage started over on the restarted service


def test_vae_killed_before_decode_leaves_the_denoising_done_once(faulty):
    state, model = faulty
    with Client(state.endpoints["orchestrator"], state.token, timeout_s=300) as client:
        req = request(model, steps=6)
        undisturbed = pixels(client.run(req).result)
        before = rpc_calls(state, "denoiser", "Denoise")
        kill9(state.data["services"]["vae"]["pid"])
        events: list = []
        thread, out = run_in_thread(client, req, events)
        wait_for(lambda: any(e.WhichOneof("event") == "progress" and e.progress.step == 6 for e in events))
        time.sleep(0.5)  # the decode call meets the dead VAE and backs off
        restart(state, "vae")
        thread.join(240)
    assert "error" not in out, out.get("error")
    assert np.array_equal(pixels(out["gen"].result), undisturbed)
    assert rpc_calls(state, "denoiser", "Denoise") - before == 1


def test_s3_stopped_is_unavailable_in_time_and_restart_recovers(faulty):
    state, model = faulty
    os.killpg(state.data["s3"]["pid"], signal.SIGTERM)
    wait_for(lambda: not _answers(state.data["s3"]["endpoint"]), timeout=30)
    try:
        with Client(state.endpoints["orchestrator"], state.token, timeout_s=8) as client:
            started = time.monotonic()
            with pytest.raises(ClientError) as err:
                client.run(request(model, steps=2))
            elapsed = time.monotonic() - started
        assert err.value.code == grpc.StatusCode.UNAVAILABLE, err.value
        assert "S3" in err.value.message or "store" in err.value.message, err.value.message
        assert elapsed < 8.0
    finally:
        restart(state, "s3")
    with Client(state.endpoints["orchestrator"], state.token, timeout_s=120) as client:
        assert client.run(request(model, steps=2)).result.images


def test_corrupt_object_is_data_loss_never_decoded(faulty):
    state, _ = faulty
    s3 = state.data["s3"]
    settings = Settings(
        store="s3",
        s3=S3Settings(endpoint=s3["endpoint"], access_key=s3["access_key"], secret_key=s3["secret_key"]),
    )
    store = open_store(settings)
    ref = store.put_tensor("runs/faults/test/latents", torch.randn(1, 16, 8, 8), inline=False)
    bucket, key = ref.ref.uri.removeprefix("s3://").split("/", 1)
    raw = Minio(s3["endpoint"], access_key=s3["access_key"], secret_key=s3["secret_key"], secure=False)
    data = bytearray(raw.get_object(bucket, key).read())
    data[100] ^= 0xFF  # one flipped byte, same length
    raw.put_object(bucket, key, io.BytesIO(bytes(data)), len(data))
    with grpc.insecure_channel(state.endpoints["vae"]) as channel:
        stub = vae_pb2_grpc.VaeStub(channel)
        with pytest.raises(grpc.RpcError) as err:
            stub.Decode(
                vae_pb2.VaeDecodeRequest(model="unused", latents=ref),
                metadata=[("authorization", f"Bearer {state.token}")],
                timeout=60,
            )
    assert err.value.code() == grpc.StatusCode.DATA_LOSS, err.value.details()
    assert "sha256" in err.value.details() or "checksum" in err.value.details()


def _answers(endpoint: str) -> bool:
    import socket

    host, port = endpoint.rsplit(":", 1)
    with socket.socket() as sock:
        sock.settimeout(0.5)
        return sock.connect_ex((host, int(port))) == 0
