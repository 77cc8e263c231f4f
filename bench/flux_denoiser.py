"""One whole FLUX.1 request through `diffmesh up`'s services vs the same graph in-process. (The denoiser step
against diffusers is `bench/denoiser_step.py`.)

- `stack`: wall time of one Generate request on a tiny FLUX.1 model directory through the services (S3 store,
  gRPC) vs in-process (local store); `ratio` = services / in-process. Median of `repeats` requests.

    .venv/bin/python -m bench.flux_denoiser
"""

from __future__ import annotations

import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import grpc


def _median_s(fn: Callable[[], object], repeats: int) -> float:
    fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def stack_ratio(repeats: int = 3, steps: int = 8, size: int = 128) -> dict:
    """One request through the local stack (S3 + gRPC) vs in-process, on a tiny FLUX.1 directory."""
    sys.path.insert(0, str(Path(__file__).parents[1] / "tests"))
    from tiny_flux import make_tiny_flux  # the test suite's tiny pipeline builder

    from orchestrator.local import in_process_orchestrator
    from orchestrator.stack.local_stack import down, up
    from protos import orchestrator_pb2, orchestrator_pb2_grpc
    from services.common.settings import Settings

    with tempfile.TemporaryDirectory() as tmp:
        model = Path(tmp) / "flux"
        make_tiny_flux(model)
        req = orchestrator_pb2.GenerateRequest(
            model=str(model), prompt="a red circle", seed=1, steps=steps, width=size, height=size
        )
        settings = Settings.from_env({"DIFFMESH_STORE": "local", "DIFFMESH_LOCAL_STORE": f"{tmp}/store"})
        engine = in_process_orchestrator(settings)
        local_s = _median_s(lambda: engine.generate(req, lambda e: None), repeats)
        state = up(Path(tmp) / "stack")
        try:
            with grpc.insecure_channel(state.endpoints["orchestrator"]) as ch:
                stub = orchestrator_pb2_grpc.OrchestratorStub(ch)
                md = [("authorization", f"Bearer {state.data['token']}")]
                remote_s = _median_s(lambda: list(stub.Generate(req, metadata=md, timeout=300)), repeats)
        finally:
            down(state.path.parent)
    return {
        "request": f"{size}x{size}, {steps} steps, tiny FLUX.1",
        "in_process_s": round(local_s, 3),
        "services_s": round(remote_s, 3),
        "ratio": round(remote_s / local_s, 3),
    }


def run() -> dict:
    return {"stack": stack_ratio()}


if __name__ == "__main__":
    import json

    print(json.dumps(run(), indent=2))
