"""Durable stage resume on `diffmesh up`'s real processes: the orchestrator itself killed with kill -9.

- killed after the denoising finished (the VAE down, its decode backing off): after both restart, the same
  request id resumes from the journal; the text encoder and the denoiser ran once (their own RPC counters),
  the image is the undisturbed one;
- killed mid-denoising under a client with retries: the client submits again under the same id once the
  orchestrator is back; the finished prompt encoding is not run again, the image is the undisturbed one;
- the same id submitted again after it finished: the same bytes, no stage runs.
"""

from __future__ import annotations

import time

import grpc
import numpy as np
from fault_stack import kill9, pixels, request, rpc_calls, run_in_thread, stage_events, wait_for

from orchestrator.client import Client
from orchestrator.stack.local_stack import restart


def finished(events: list, stage: str) -> bool:
    return (stage, "FINISHED") in stage_events(events)


def test_orchestrator_killed_after_denoising_resumes_without_denoising_again(faulty):
    state, model = faulty
    with Client(state.endpoints["orchestrator"], state.token, timeout_s=300) as client:
        undisturbed = pixels(client.run(request(model, steps=6)).result)
        encoded, denoised = (
            rpc_calls(state, "text_encoder", "Encode"),
            rpc_calls(state, "denoiser", "Denoise"),
        )
        kill9(state.data["services"]["vae"]["pid"])
        events: list = []
        thread, out = run_in_thread(client, request(model, steps=6, request_id="orch-kill-1"), events)
        wait_for(lambda: finished(events, "denoise"))
        time.sleep(0.3)  # the decode call meets the dead VAE and backs off
        kill9(state.data["services"]["orchestrator"]["pid"])
        thread.join(60)
    assert out["error"].code == grpc.StatusCode.UNAVAILABLE, out
    restart(state, "vae")
    restart(state, "orchestrator")
    with Client(state.endpoints["orchestrator"], state.token, timeout_s=300) as client:
        events = []
        gen = client.run(request(model, steps=6, request_id="orch-kill-1"), events.append)
    got = [
        e for e in stage_events(events) if e[0] != "request"
    ]  # it may first wait out the dead owner's lease
    assert got == [
        ("encode_prompt", "RESUMED"),
        ("denoise", "RESUMED"),
        ("decode", "STARTED"),
        ("decode", "FINISHED"),
    ]
    assert np.array_equal(pixels(gen.result), undisturbed)
    assert rpc_calls(state, "text_encoder", "Encode") - encoded == 1
    assert rpc_calls(state, "denoiser", "Denoise") - denoised == 1


def test_a_client_with_retries_rides_out_an_orchestrator_crash(faulty):
    state, model = faulty
    endpoint = state.endpoints["orchestrator"]
    with Client(endpoint, state.token, timeout_s=300) as client:
        undisturbed = pixels(client.run(request(model, steps=200)).result)
    encoded = rpc_calls(state, "text_encoder", "Encode")
    with Client(endpoint, state.token, timeout_s=300, retries=30, backoff_s=0.25) as client:
        events: list = []
        thread, out = run_in_thread(client, request(model, steps=200, request_id="orch-kill-2"), events)
        wait_for(lambda: any(e.WhichOneof("event") == "progress" and e.progress.step >= 3 for e in events))
        kill9(state.data["services"]["orchestrator"]["pid"])
        restart(state, "orchestrator")
        thread.join(240)
    assert "error" not in out, out.get("error")
    assert np.array_equal(pixels(out["gen"].result), undisturbed)
    assert ("encode_prompt", "RESUMED") in stage_events(events)  # the second submission's
    assert rpc_calls(state, "text_encoder", "Encode") - encoded == 1


def test_a_finished_id_submitted_again_returns_the_same_bytes(faulty):
    state, model = faulty
    with Client(state.endpoints["orchestrator"], state.token, timeout_s=300) as client:
        first = client.run(request(model, steps=4, request_id="replay-1")).result
        denoised = rpc_calls(state, "denoiser", "Denoise")
        events: list = []
        again = client.run(request(model, steps=4, request_id="replay-1"), events.append).result
    assert list(again.images) == list(first.images) and again.parameters == first.parameters
    assert {kind for _, kind in stage_events(events)} == {"RESUMED"}
    assert rpc_calls(state, "denoiser", "Denoise") == denoised
