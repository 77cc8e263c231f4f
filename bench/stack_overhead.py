"""Whole requests through `diffmesh up`'s services (S3 store, gRPC) vs the same graph in-process, on the shipped
hidden-256 FLUX model (models/diffmesh-shapes). (The denoiser step against diffusers is bench/denoiser_step.py.)

- `stack_overhead`: one 256x256, 8-step request; `ratio` = services / in-process (median of `repeats`, timed
  alternately). `per_hop_ms`: per stage, the orchestrator's wait for the stage minus the stage service's own time
  (RPC, serialisation and the store round trips of that hop), from the result's timings; `store_ms`: put + get of
  a latent-sized and a pixels-sized tensor on the stack's S3 server.
- `journal`: the same request through the stack with a request id (journaled: a head and one record per stage
  written to S3) vs without; `ratio` = journaled / plain; `replay_s`: the same id sent again (the result rebuilt
  from the journal, no stage runs).
- `concurrency`: 8 requests (different seeds) sent at once through the stack vs the same 8 one after another
  in-process; `throughput_ratio` = sequential in-process time / concurrent stack time (> 1: the split engine
  serves more per second).

    .venv/bin/python -m bench.stack_overhead
"""

from __future__ import annotations

import statistics
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc

MODEL = Path(__file__).parents[1] / "models" / "diffmesh-shapes"
PROMPT = "a blue circle on a white background"


def _request(seed: int, steps: int, size: int, request_id: str = ""):
    from protos import orchestrator_pb2

    return orchestrator_pb2.GenerateRequest(
        model=str(MODEL),
        prompt=PROMPT,
        seed=seed,
        steps=steps,
        width=size,
        height=size,
        cfg_scale=1.0,
        request_id=request_id,
    )


def _hops(result) -> dict[str, float]:
    waits = {t.stage: t.seconds for t in result.timings if not t.stage.endswith(".service")}
    own = {
        t.stage.removesuffix(".service"): t.seconds for t in result.timings if t.stage.endswith(".service")
    }
    return {stage: (waits[stage] - own[stage]) * 1000 for stage in waits if stage in own}


def _store_ms(state, repeats: int = 9) -> dict[str, float]:
    import torch

    from services.common.settings import S3Settings, Settings
    from services.common.store import open_store

    s3 = state.data["s3"]
    settings = Settings(
        store="s3",
        s3=S3Settings(endpoint=s3["endpoint"], access_key=s3["access_key"], secret_key=s3["secret_key"]),
    )
    store = open_store(settings)
    out = {}
    for name, shape in (
        ("latents 1x16x32x32 f32", (1, 16, 32, 32)),
        ("pixels 1x3x256x256 f32", (1, 3, 256, 256)),
    ):
        t = torch.randn(shape)
        times = []
        for i in range(repeats):
            t0 = time.perf_counter()
            ref = store.put_tensor(f"bench/hop/{i}", t, inline=False)
            store.load(ref, "bench")
            times.append((time.perf_counter() - t0) * 1000)
        out[name] = round(statistics.median(times), 2)
    return out


def run(repeats: int = 9, steps: int = 8, size: int = 256, concurrent: int = 8) -> dict:
    from orchestrator.local import in_process_orchestrator
    from orchestrator.stack.local_stack import down, up
    from protos import orchestrator_pb2_grpc
    from services.common.settings import Settings

    with tempfile.TemporaryDirectory(prefix="diffmesh-bench-") as tmp:
        settings = Settings.from_env({"DIFFMESH_STORE": "local", "DIFFMESH_LOCAL_STORE": f"{tmp}/store"})
        engine = in_process_orchestrator(settings)
        state = up(Path(tmp) / "stack")
        try:
            with grpc.insecure_channel(state.endpoints["orchestrator"]) as ch:
                stub = orchestrator_pb2_grpc.OrchestratorStub(ch)
                md = [("authorization", f"Bearer {state.token}")]

                def remote(seed: int, request_id: str = ""):
                    req = _request(seed, steps, size, request_id)
                    return list(stub.Generate(req, metadata=md, timeout=600))[-1].result

                def local(seed: int):
                    return engine.generate(_request(seed, steps, size), lambda e: None)

                local(0), remote(0)  # warm: models loaded, connections open
                local_s, remote_s, hops, journaled_s, replay_s = [], [], [], [], []
                for i in range(repeats):
                    t0 = time.perf_counter()
                    local(i)
                    local_s.append(time.perf_counter() - t0)
                    t0 = time.perf_counter()
                    hops.append(_hops(remote(i)))
                    remote_s.append(time.perf_counter() - t0)
                    t0 = time.perf_counter()
                    remote(i, f"bench-{i}")  # the same request, journaled
                    journaled_s.append(time.perf_counter() - t0)
                    t0 = time.perf_counter()
                    remote(i, f"bench-{i}")  # its retry: replayed from the journal
                    replay_s.append(time.perf_counter() - t0)
                seeds = list(range(100, 100 + concurrent))
                t0 = time.perf_counter()
                for s in seeds:
                    local(s)
                sequential_s = time.perf_counter() - t0
                t0 = time.perf_counter()
                with ThreadPoolExecutor(concurrent) as pool:
                    results = list(pool.map(remote, seeds))
                concurrent_s = time.perf_counter() - t0
                assert all(r.images for r in results)
            store = _store_ms(state)
        finally:
            down(state.path.parent)
    lo, re = statistics.median(local_s), statistics.median(remote_s)
    per_hop = {stage: round(statistics.median(h[stage] for h in hops), 2) for stage in hops[0]}
    return {
        "stack_overhead": {
            "request": f"{size}x{size}, {steps} steps, models/diffmesh-shapes (FLUX.1 hidden 256, 2+2 blocks)",
            "in_process_s": round(lo, 3),
            "services_s": round(re, 3),
            "ratio": round(re / lo, 3),
            "per_hop_ms": per_hop,
            "store_put_get_ms": store,
        },
        "journal": {
            "plain_s": round(re, 3),
            "journaled_s": round(statistics.median(journaled_s), 3),
            "ratio": round(statistics.median(journaled_s) / re, 3),
            "replay_s": round(statistics.median(replay_s), 3),
        },
        "concurrency": {
            "requests": concurrent,
            "sequential_in_process_s": round(sequential_s, 3),
            "concurrent_stack_s": round(concurrent_s, 3),
            "throughput_ratio": round(sequential_s / concurrent_s, 3),
        },
    }


if __name__ == "__main__":
    import json

    print(json.dumps(run(), indent=2))
