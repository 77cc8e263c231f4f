"""`make bench`: run every benchmark, print a table, write bench/results.json with the machine and versions."""

from __future__ import annotations

import json
import os
import platform
import sys
from importlib import metadata
from pathlib import Path

from bench import denoiser_step, flux_denoiser, store_throughput


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


def main() -> int:
    results = {
        "machine": machine(),
        "store_throughput": store_throughput.run(),
        "flux_denoiser": flux_denoiser.run(),
        "denoiser_step_ratio": denoiser_step.run(),
    }
    out = Path(__file__).with_name("results.json")
    out.write_text(json.dumps(results, indent=2))
    print(json.dumps(results, indent=2))
    print(denoiser_step.table(results["denoiser_step_ratio"]))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
