"""`make bench`: run every benchmark, print a table, write bench/results.json with the machine and versions."""

from __future__ import annotations

import json
import os
import platform
import sys
from importlib import metadata
from pathlib import Path

from bench import denoiser_step, memory_modes, stack_overhead, store_throughput, wan_step


def machine() -> dict:
    versions = {}
    for pkg in ("torch", "diffusers", "transformers", "grpcio", "minio", "protobuf", "safetensors"):
        try:
            versions[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            versions[pkg] = None
    return {
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "cpus": os.cpu_count(),
        "versions": versions,
    }


def table(results: dict) -> str:
    """The headline figures, one line each, with the issue's targets."""
    so, cc = results["stack_overhead_ratio"], results["concurrency_throughput_ratio"]
    cs, pr = results["cold_start_s"], results["peak_rss_ratio"]
    hops = ", ".join(f"{k} {v} ms" for k, v in so["per_hop_ms"].items())
    rows = [
        (
            "stack_overhead_ratio",
            f"{so['ratio']}",
            "<= 1.10",
            f"{so['services_s']} s vs {so['in_process_s']} s",
        ),
        ("per-hop latency", hops, "<= 30 ms", f"store put+get {so['store_put_get_ms']}"),
        ("concurrency_throughput_ratio", f"{cc['throughput_ratio']}", "", f"{cc['requests']} requests"),
        (
            "journal_overhead_ratio",
            f"{results['journal_overhead_ratio']['ratio']}",
            "",
            f"replay of a finished id {results['journal_overhead_ratio']['replay_s']} s",
        ),
        ("cold_start_s", f"{cs['to_first_result_s']}", "<= 3 s", cs["checkpoint"]),
    ]
    for mode in ("offload", "sequential"):
        rows.append(
            (f"peak_rss_ratio {mode}", f"{pr[mode]['ratio']}", "<= 0.35" if mode == "sequential" else "", "")
        )
    width = max(len(r[0]) for r in rows)
    return "\n".join(f"{name:<{width}}  {value:<12} {target:<9} {note}" for name, value, target, note in rows)


def main() -> int:
    stack = stack_overhead.run()
    memory = memory_modes.run()
    results = {
        "machine": machine(),
        "denoiser_step_ratio": denoiser_step.run(),
        "wan_step_ratio": wan_step.run(),
        "stack_overhead_ratio": stack["stack_overhead"],
        "concurrency_throughput_ratio": stack["concurrency"],
        "journal_overhead_ratio": stack["journal"],
        "cold_start_s": memory["cold_start"],
        "peak_rss_ratio": memory["peak_rss"],
        "store_throughput": store_throughput.run(),
    }
    out = Path(__file__).with_name("results.json")
    out.write_text(json.dumps(results, indent=2))
    print(json.dumps(results, indent=2))
    print(denoiser_step.table(results["denoiser_step_ratio"]))
    print(wan_step.table(results["wan_step_ratio"]))
    print(table(results))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
