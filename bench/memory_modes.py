"""Peak memory per memory mode, and the cold start of a denoiser service.

- `peak_rss`: a FLUX-shaped transformer of ~2 GB (float32, random weights, hidden 1024, 8 double + 12 single
  blocks) saved as a diffusers `transformer/` folder; for each memory mode a fresh process loads it and runs
  one 2-step denoise at 256x256 (256 image + 64 text tokens), and reports its peak RSS (VmHWM). Also the
  RSS of a process that imported the same modules but loaded nothing (`baseline`). `ratio` = mode / resident
  (whole-process figures), `net_ratio` the same above the baseline.
- `cold_start`: a ~1 GB checkpoint (the same shape, 4 + 6 blocks); the time from launching
  `diffmesh serve denoiser` to the first Denoise result (1 step, 64x64) over gRPC, split into process start
  to SERVING (imports, server) and the first request (load: memory-mapped safetensors, then the step).

    .venv/bin/python -m bench.memory_modes
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).parents[1]
CONFIG = dict(
    patch_size=1,
    in_channels=64,
    num_attention_heads=8,
    attention_head_dim=128,
    joint_attention_dim=1024,
    pooled_projection_dim=256,
    guidance_embeds=True,
    axes_dims_rope=[16, 56, 56],
)
MODES = ("resident", "offload", "sequential")


def write_checkpoint(folder: Path, layers: int, single_layers: int) -> int:
    """A random diffusers FluxTransformer2DModel folder; returns its size in bytes."""
    import torch
    from diffusers import FluxTransformer2DModel

    torch.manual_seed(0)
    model = FluxTransformer2DModel(**CONFIG, num_layers=layers, num_single_layers=single_layers)
    model.save_pretrained(folder, max_shard_size="500MB")
    return sum(p.stat().st_size for p in folder.glob("*.safetensors"))


_CHILD = r"""
import json, sys, torch
from services.common.memory import MemoryPlan
from services.common.models import find_component
from services.denoiser.registry import DENOISERS
from services.denoiser.inputs import DenoiseInputs
torch.set_num_threads(2)
folder, mode = sys.argv[1], sys.argv[2]
if mode != "baseline":
    component = find_component(__import__("pathlib").Path(folder), ["transformer"])
    adapter = DENOISERS[component.class_name](component, torch.device("cpu"), MemoryPlan.parse(mode))
    g = torch.Generator().manual_seed(0)
    inputs = DenoiseInputs(seed=1, steps=2, width=256, height=256, guidance=3.5,
        positive={"prompt_embeds": torch.randn(1, 64, 1024, generator=g),
                  "pooled_prompt_embeds": torch.randn(1, 256, generator=g)})
    import time
    t0 = time.perf_counter()
    out = adapter.denoise(inputs, lambda s, t: None, lambda: False)["latents"]
    seconds = time.perf_counter() - t0
else:
    seconds = 0.0
# VmHWM: this process image's peak (ru_maxrss would carry the parent's peak across fork + exec)
hwm = next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith("VmHWM:"))
print(json.dumps({"peak_rss_mb": hwm / 1024, "seconds": seconds}))
"""


def _child(folder: Path, mode: str) -> dict:
    out = subprocess.run(
        [sys.executable, "-c", _CHILD, str(folder), mode],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    if out.returncode:
        raise RuntimeError(f"memory mode {mode}: the child failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def peak_rss(tmp: Path) -> dict:
    folder = tmp / "flux-2gb" / "transformer"
    size = write_checkpoint(folder, 8, 12)
    rows = {mode: _child(folder, mode) for mode in ("baseline", *MODES)}
    base = rows["baseline"]["peak_rss_mb"]
    resident = rows["resident"]["peak_rss_mb"]
    out = {
        "checkpoint": f"FLUX-shaped, hidden 1024, 8+12 blocks, float32, {size / 2**30:.2f} GiB",
        "request": "2 steps, 256x256 (256 image + 64 text tokens), CPU",
        "baseline_mb": round(base, 1),
    }
    for mode in MODES:
        mb = rows[mode]["peak_rss_mb"]
        out[mode] = {
            "peak_rss_mb": round(mb, 1),
            "ratio": round(mb / resident, 3),
            "net_ratio": round((mb - base) / (resident - base), 3),
            "denoise_s": round(rows[mode]["seconds"], 2),
        }
    return out


def cold_start(tmp: Path) -> dict:
    import grpc
    import torch

    from protos import denoiser_pb2, denoiser_pb2_grpc

    folder = tmp / "flux-1gb"
    size = write_checkpoint(folder / "transformer", 4, 6)
    port_file = tmp / "port"
    env = {
        **os.environ,
        "DIFFMESH_STORE": "local",
        "DIFFMESH_LOCAL_STORE": str(tmp / "store"),
        "DIFFMESH_MODEL_ROOTS": str(tmp),
        "DIFFMESH_DEVICE": "cpu",
    }
    env.pop("DIFFMESH_TOKEN", None)
    t0 = time.perf_counter()
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "orchestrator.cli",
            "serve",
            "denoiser",
            "--port",
            "0",
            "--port-file",
            str(port_file),
        ],
        cwd=ROOT,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    try:
        while not port_file.exists() or not port_file.read_text().strip():
            if proc.poll() is not None:
                raise RuntimeError(f"denoiser exited: {proc.stderr.read().decode()[-2000:]}")
            time.sleep(0.01)
        serving = time.perf_counter() - t0
        g = torch.Generator().manual_seed(0)
        from services.common.wire import to_inline

        req = denoiser_pb2.DenoiseRequest(model=str(folder), seed=1, steps=1, width=64, height=64)
        req.positive["prompt_embeds"].CopyFrom(to_inline(torch.randn(1, 16, 1024, generator=g)))
        req.positive["pooled_prompt_embeds"].CopyFrom(to_inline(torch.randn(1, 256, generator=g)))
        with grpc.insecure_channel(f"127.0.0.1:{port_file.read_text().strip()}") as channel:
            stub = denoiser_pb2_grpc.DenoiserStub(channel)
            events = list(stub.Denoise(req, timeout=300))
        first = time.perf_counter() - t0
        assert events[-1].HasField("result"), events[-1]
    finally:
        proc.terminate()
        proc.wait(timeout=60)
    return {
        "checkpoint": f"FLUX-shaped, hidden 1024, 4+6 blocks, float32, diffusers layout, {size / 2**30:.2f} GiB",
        "to_serving_s": round(serving, 2),
        "to_first_result_s": round(first, 2),
        "first_request_s": round(first - serving, 2),
    }


def run() -> dict:
    with tempfile.TemporaryDirectory(prefix="diffmesh-bench-") as tmp:
        return {"peak_rss": peak_rss(Path(tmp)), "cold_start": cold_start(Path(tmp))}


if __name__ == "__main__":
    print(json.dumps(run(), indent=2))
