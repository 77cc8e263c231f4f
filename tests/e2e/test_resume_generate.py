"""Durable stage resume and request-id idempotency through the whole engine in this process (real servicers,
the tiny FLUX.1, a local store holding both the tensors and the orchestrator's journal).

The stack version, with real processes killed, is tests/reliability/test_resume.py."""

from __future__ import annotations

import threading
from pathlib import Path

import grpc
import pytest

from orchestrator.errors import StageError
from orchestrator.journal import Journal
from orchestrator.local import in_process_clients, journal_of
from orchestrator.runner import Runner
from orchestrator.server import OrchestratorServicer
from protos import orchestrator_pb2
from services.common.settings import Settings

KIND = orchestrator_pb2.StageEvent.Kind


def engine(store: Path, without: tuple[str, ...] = (), **env: str) -> OrchestratorServicer:
    """An orchestrator over in-process stages (`without` some of them) and the journal in `store`."""
    settings = Settings.from_env({"DIFFMESH_STORE": "local", "DIFFMESH_LOCAL_STORE": str(store), **env})
    clients = {k: v for k, v in in_process_clients(settings).items() if k not in without}
    return OrchestratorServicer(Runner(clients), (), settings.cache_dir, journal=journal_of(settings))


def request(model: Path, request_id: str, **kw) -> orchestrator_pb2.GenerateRequest:
    base = dict(model=str(model), prompt="a red circle", steps=3, width=64, height=48, guidance=3.5)
    base.update(kw)
    return orchestrator_pb2.GenerateRequest(request_id=request_id, **base)


def run(orch: OrchestratorServicer, req) -> tuple[orchestrator_pb2.GenerateResult, list]:
    events: list = []
    return orch.generate(req, events.append), events


def stages(events: list) -> list[tuple[str, str]]:
    return [(e.stage.stage, KIND.Name(e.stage.kind)) for e in events if e.HasField("stage")]


def test_a_retried_id_returns_the_same_result_computing_nothing(flux_dir, tmp_path: Path):
    orch = engine(tmp_path / "store")
    req = request(flux_dir[0], "retry-1")  # no seed: the first run draws one, the retry must keep it
    first, _ = run(orch, req)
    again, events = run(orch, req)
    assert stages(events) == [(s, "RESUMED") for s in ("encode_prompt", "denoise", "decode")]
    assert not [e for e in events if e.HasField("progress")]  # no denoising step ran
    assert list(again.images) == list(first.images)
    assert (again.seed, again.parameters, again.request_id) == (first.seed, first.parameters, "retry-1")
    # a fresh orchestrator (a restart) on the same store replays it too
    third, events = run(engine(tmp_path / "store"), req)
    assert list(third.images) == list(first.images)
    assert {kind for _, kind in stages(events)} == {"RESUMED"}


def test_a_vae_failure_after_denoising_resumes_without_denoising_again(flux_dir, tmp_path: Path):
    store = tmp_path / "store"
    req = request(flux_dir[0], "resume-1", seed=5)
    events: list = []
    with pytest.raises(StageError) as err:
        engine(store, without=("vae",)).generate(req, events.append)
    assert err.value.code == grpc.StatusCode.UNAVAILABLE and "vae" in err.value.message
    assert ("denoise", "FINISHED") in stages(events)

    full = engine(store)
    resumed, events = run(full, req)
    assert stages(events) == [
        ("encode_prompt", "RESUMED"),
        ("denoise", "RESUMED"),
        ("decode", "STARTED"),
        ("decode", "FINISHED"),
    ]
    assert not [e for e in events if e.HasField("progress")]
    undisturbed, _ = run(full, request(flux_dir[0], "resume-1-undisturbed", seed=5))
    assert list(resumed.images) == list(undisturbed.images)


def test_one_id_for_two_different_requests_is_already_exists(flux_dir, tmp_path: Path):
    orch = engine(tmp_path / "store")
    run(orch, request(flux_dir[0], "taken", seed=1))
    with pytest.raises(StageError) as err:
        run(orch, request(flux_dir[0], "taken", seed=2))
    assert err.value.code == grpc.StatusCode.ALREADY_EXISTS and "taken" in err.value.message


def test_concurrent_submissions_of_one_id_compute_once(flux_dir, tmp_path: Path):
    orch = engine(tmp_path / "store")
    req = request(flux_dir[0], "twice-at-once", seed=3, steps=8)
    outs: list = [None, None]

    def go(i: int) -> None:
        outs[i] = run(orch, req)

    threads = [threading.Thread(target=go, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    ran = [events for _, events in outs if ("denoise", "STARTED") in stages(events)]
    waited = [events for _, events in outs if ("request", "WAITING") in stages(events)]
    assert len(ran) == 1 and len(waited) == 1
    assert ("denoise", "RESUMED") in stages(waited[0])
    assert list(outs[0][0].images) == list(outs[1][0].images)


def test_a_request_without_an_id_leaves_no_journal(flux_dir, tmp_path: Path):
    store = tmp_path / "store"
    result, _ = run(engine(store), request(flux_dir[0], "", seed=1))
    assert len(result.request_id) == 32
    assert not (store / Journal.head_key(result.request_id)).exists()
    assert (store / Journal.head_key("with-id")).exists() is False
    run(engine(store), request(flux_dir[0], "with-id", seed=1))
    assert (store / Journal.head_key("with-id")).is_file()


def test_a_bad_request_with_an_id_fails_before_touching_the_journal(flux_dir, tmp_path: Path):
    store = tmp_path / "store"
    with pytest.raises(StageError) as err:
        run(engine(store), request(flux_dir[0], "bad-1", width=65))
    assert err.value.code == grpc.StatusCode.INVALID_ARGUMENT
    assert not (store / "runs" / "bad-1").exists()


def test_a_stage_whose_tensors_are_gone_runs_again_only_when_needed(flux_dir, tmp_path: Path):
    """Every tensor through the store (no inlining); the decode fails, then tensors of the finished stages
    are deleted (a bucket rule, an operator) before the retry."""
    store = tmp_path / "store"
    env = {"DIFFMESH_INLINE_LIMIT_BYTES": "0"}
    req = request(flux_dir[0], "gone-1", seed=9)
    with pytest.raises(StageError):
        engine(store, without=("vae",), **env).generate(req, lambda e: None)
    runs = store / "runs" / "gone-1"
    prompt = [p for p in runs.rglob("*") if p.is_file() and "text_encoder" in p.parts]
    latents = [p for p in runs.rglob("*") if p.is_file() and "denoiser" in p.parts]
    assert prompt and latents, sorted(p.relative_to(runs) for p in runs.rglob("*") if p.is_file())

    # the prompt embeddings are gone, the latents are not: decode needs only the latents
    for p in prompt:
        p.unlink()
    resumed, events = run(engine(store, **env), req)
    assert stages(events) == [
        ("encode_prompt", "RESUMED"),
        ("denoise", "RESUMED"),
        ("decode", "STARTED"),
        ("decode", "FINISHED"),
    ]
    (note,) = [e.stage.message for e in events if e.stage.stage == "encode_prompt"]
    assert note.startswith("not run")
    undisturbed, _ = run(engine(tmp_path / "other", **env), request(flux_dir[0], "gone-1", seed=9))
    assert list(resumed.images) == list(undisturbed.images)

    # the latents gone too, from a failed run: denoise runs again, and so the text encoder before it
    req2 = request(flux_dir[0], "gone-2", seed=9)
    with pytest.raises(StageError):
        engine(store, without=("vae",), **env).generate(req2, lambda e: None)
    for p in (store / "runs" / "gone-2").rglob("*"):
        if p.is_file() and "denoiser" in p.parts:
            p.unlink()
    again, events = run(engine(store, **env), req2)
    assert stages(events) == [
        ("encode_prompt", "RESUMED"),
        ("denoise", "STARTED"),
        ("denoise", "FINISHED"),
        ("decode", "STARTED"),
        ("decode", "FINISHED"),
    ]
    assert list(again.images) == list(undisturbed.images)
