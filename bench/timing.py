"""What the side-by-side benchmarks share: interleaved timing of competing calls, and the figures every row
and result header carries."""

from __future__ import annotations

import os
import statistics
import time
from collections.abc import Callable
from typing import Any

import torch


def sync() -> None:
    """Wait for queued GPU work (a no-op on a CPU), so a timer measures what ran."""
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def interleaved(
    fns: dict[str, Callable[[], torch.Tensor]], repeats: int, warmups: int = 1
) -> tuple[dict[str, float], dict[str, torch.Tensor]]:
    """Median seconds of each fn, called in turn `repeats` times after `warmups` calls each (so machine noise
    hits all alike); and each fn's first output, as float32."""
    outputs = {name: fn().float() for name, fn in fns.items()}
    for _ in range(warmups - 1):
        for fn in fns.values():
            fn()
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            sync()
            t0 = time.perf_counter()
            fn()
            sync()
            times[name].append(time.perf_counter() - t0)
    return {name: statistics.median(t) for name, t in times.items()}, outputs


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def max_abs_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(f"{(a - b).abs().max().item():.3g}")


def cpu_header() -> dict[str, Any]:
    """torch, threads, CPU capability and the load average before a run (add `load_average_after`)."""
    return {
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "load_average_before": [round(x, 2) for x in os.getloadavg()],
    }


def header_line(result: dict) -> str:
    return (
        f"torch {result['torch']}, {result['threads']} threads, {result['cpu_capability']}, load average "
        f"{result['load_average_before'][0]} -> {result['load_average_after'][0]}"
    )
