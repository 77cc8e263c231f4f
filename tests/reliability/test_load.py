"""Load: waves of 50 concurrent Generate requests on a tiny model through `diffmesh up` (a longer run: `make
test-reliability`), half of them with request ids (journaled). Every request completes or gets
RESOURCE_EXHAUSTED (admission control); none is lost or hangs; the services' memory stays bounded and stops
growing after the first wave. Latencies, counts and RSS per wave are printed."""

from __future__ import annotations

import statistics
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from tiny_flux import make_tiny_flux

from orchestrator.client import Client, ClientError
from orchestrator.stack.local_stack import down, up
from protos import orchestrator_pb2

CONCURRENT = 50
WAVES = 5
STEADY_GROWTH_MB = 64  # from the end of wave 1 to the last: per-thread malloc arenas are warm by then


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


@pytest.mark.slow
def test_fifty_concurrent_requests(tmp_path: Path):
    make_tiny_flux(tmp_path / "flux", seed=0)
    state = up(
        tmp_path / "stack",
        timeout=120,
        extra_env={"DIFFMESH_MAX_CONCURRENCY": "2", "DIFFMESH_MAX_QUEUE": "8"},
    )
    try:
        stages = {k: v["pid"] for k, v in state.data["services"].items()}
        with Client(state.endpoints["orchestrator"], state.token, timeout_s=300) as client:

            def one(wave: int, seed: int) -> tuple[str, float]:
                req = orchestrator_pb2.GenerateRequest(
                    model=str(tmp_path / "flux"),
                    prompt="a red circle",
                    seed=seed,
                    steps=4,
                    width=64,
                    height=64,
                    request_id=f"load-{wave}-{seed}" if seed % 2 else "",  # half go through the journal
                )
                t0 = time.monotonic()
                try:
                    client.run(req)
                    return "OK", time.monotonic() - t0
                except ClientError as e:
                    return e.code.name, time.monotonic() - t0

            one(0, 0)  # models loaded
            before = {k: rss_mb(p) for k, p in stages.items()}
            after: list[dict[str, float]] = []
            for wave in range(WAVES):
                with ThreadPoolExecutor(CONCURRENT) as pool:
                    outcomes = list(pool.map(one, [wave] * CONCURRENT, range(1, CONCURRENT + 1)))
                after.append({k: rss_mb(p) for k, p in stages.items()})
                codes = [c for c, _ in outcomes]
                ok = sorted(t for c, t in outcomes if c == "OK")
                print(
                    f"\nwave {wave}: {CONCURRENT} concurrent: {codes.count('OK')} completed, "
                    f"{codes.count('RESOURCE_EXHAUSTED')} RESOURCE_EXHAUSTED; p50 {statistics.median(ok):.2f} s, "
                    f"p95 {ok[int(0.95 * (len(ok) - 1))]:.2f} s; RSS MB {after[-1]}"
                )
                assert len(outcomes) == CONCURRENT
                assert set(codes) <= {"OK", "RESOURCE_EXHAUSTED"}, codes
                assert codes.count("OK") >= 10  # the running + queued slots of the busiest stage at least
            print(f"RSS MB before the waves {before}")
            for stage in stages:
                assert after[-1][stage] < before[stage] + 512, (
                    f"{stage}: RSS {before[stage]:.0f} -> {after[-1]}"
                )
                # bounded, not creeping: once two waves have warmed every pool and arena, more waves add little
                grew = after[-1][stage] - after[1][stage]
                assert grew < STEADY_GROWTH_MB, f"{stage}: RSS grew {grew:.0f} MB over waves 2-{WAVES}"
            assert client.run(
                orchestrator_pb2.GenerateRequest(
                    model=str(tmp_path / "flux"), prompt="x", seed=1, steps=2, width=64, height=64
                )
            ).result.images  # still serving
    finally:
        down(state.path.parent)
