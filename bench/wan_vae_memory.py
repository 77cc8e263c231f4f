"""`wan_vae_memory`: what decoding a Wan video one latent frame at a time saves, against one pass over all frames.

A Wan 2.1-shaped VAE (the real levels, resamplers and residual blocks at a third of the widths: base 32 instead of
96; random weights, seeded) decodes 5 / 9 / 21 latent frames (17 / 33 / 81 video frames) at `SIZE` pixels, two ways:
- `chunked`: the default, one latent frame per pass through the decoder with the causal feature cache carrying
  the last frames of every conv to the next pass (what the reference and the VAE service do);
- `one_pass`: every frame through the causal convs at once (the same pixels, to float rounding: `same_checksum`).
Each row runs in a fresh subprocess: build the model and the latents, read the peak RSS (`ru_maxrss`, the
baseline), decode once (timed: `seconds`), read it again; `peak_mib` = after - baseline, what the decode added (the
decoded video included: `output_mib`). `ratio` = one_pass / chunked peak.
Two allocator settings: `glibc` as a process starts, and `mmap64k` (MALLOC_MMAP_THRESHOLD_=65536: every block of
64 KiB or more is its own mapping, returned to the OS when freed). With the default, glibc raises its mmap threshold
after the first large frees and then serves activations from a heap it does not shrink, so the chunked decode's many
short-lived per-frame buffers show up as retained heap; `mmap64k` shows what is live at once.
CPU only; on a machine shared with other jobs the timings swing, the peaks much less.

    .venv/bin/python -m bench.wan_vae_memory
"""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch

from services.vae.models.wan import WAN21_VAE, WanVAE, WanVAEParams

PARAMS = WanVAEParams(
    dim=32, dec_dim=32, z_dim=16, latents_mean=WAN21_VAE.latents_mean, latents_std=WAN21_VAE.latents_std
)
SIZE = 128  # pixels a side: 16 x 16 latents
FRAMES = (17, 33, 81)
MODES = ("chunked", "one_pass")
ALLOCATORS = {"glibc": {}, "mmap64k": {"MALLOC_MMAP_THRESHOLD_": "65536"}}
REPO = Path(__file__).resolve().parent.parent


def _rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def child(frames: int, mode: str) -> dict[str, Any]:
    """One measurement, in this (fresh) process."""
    torch.manual_seed(0)
    model = WanVAE(PARAMS).eval()
    latent_frames = (frames - 1) // PARAMS.temporal_factor + 1
    side = SIZE // PARAMS.spatial_factor
    z = torch.randn(1, PARAMS.z_dim, latent_frames, side, side, generator=torch.Generator().manual_seed(1))
    chunked = mode == "chunked"
    with torch.inference_mode():
        baseline = _rss_mib()
        t0 = time.perf_counter()
        out = model.decode(z, chunked=chunked)  # (1, 3, frames, SIZE, SIZE)
        seconds = time.perf_counter() - t0
        peak = _rss_mib() - baseline
    if tuple(out.shape) != (1, 3, frames, SIZE, SIZE):
        raise RuntimeError(f"decoded {tuple(out.shape)}, expected {(1, 3, frames, SIZE, SIZE)}")
    return {
        "frames": frames,
        "latent_frames": latent_frames,
        "mode": mode,
        "baseline_mib": round(baseline, 1),
        "peak_mib": round(peak, 1),
        "output_mib": round(out.numel() * out.element_size() / 2**20, 2),
        "seconds": round(seconds, 2),
        "checksum": round(float(out.double().abs().mean()), 6),
    }


def _spawn(frames: int, mode: str, allocator: str) -> dict[str, Any]:
    proc = subprocess.run(
        [sys.executable, "-m", "bench.wan_vae_memory", "--child", str(frames), mode],
        cwd=REPO,
        env=os.environ | ALLOCATORS[allocator],
        capture_output=True,
        text=True,
        check=False,
    )
    if proc.returncode != 0:
        raise RuntimeError(f"child {frames} {mode} failed ({proc.returncode}): {proc.stderr[-2000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1]) | {"allocator": allocator}


def run() -> dict:
    """Every (allocator, frames, mode) in a fresh subprocess. ~4 min on an idle 2-core CPU."""
    t0 = time.perf_counter()
    out: dict[str, Any] = {
        "what": "peak RSS added by one decode of a Wan 2.1-shaped VAE (base width 32, random weights) at "
        f"{SIZE}x{SIZE} px: one latent frame at a time (chunked) vs all frames in one pass; ratio = one_pass / "
        "chunked; each row a fresh subprocess; glibc default vs MALLOC_MMAP_THRESHOLD_=65536",
        "params": {k: v for k, v in PARAMS.__dict__.items() if k not in ("latents_mean", "latents_std")},
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "load_average_before": [round(x, 2) for x in os.getloadavg()],
        "rows": [],
    }
    for allocator in ALLOCATORS:
        for frames in FRAMES:
            rows = {mode: _spawn(frames, mode, allocator) for mode in MODES}
            same = abs(rows["chunked"]["checksum"] - rows["one_pass"]["checksum"]) <= 1e-5
            for mode in MODES:
                out["rows"].append(rows[mode] | {"same_checksum": same})
            ratio = rows["one_pass"]["peak_mib"] / max(rows["chunked"]["peak_mib"], 0.1)
            out["rows"][-1]["ratio"] = round(ratio, 2)
    out["load_average_after"] = [round(x, 2) for x in os.getloadavg()]
    out["bench_s"] = round(time.perf_counter() - t0, 1)
    return out


def table(result: dict) -> str:
    lines = [
        f"torch {result['torch']}, {result['threads']} threads, load average "
        f"{result['load_average_before'][0]} -> {result['load_average_after'][0]}",
        f"{'allocator':>10}{'frames':>7}{'latent':>8}{'mode':>10}{'peak MiB':>10}{'output MiB':>12}"
        f"{'seconds':>9}{'ratio':>7}",
    ]
    for r in result["rows"]:
        ratio = f"{r['ratio']:.2f}" if "ratio" in r else ""
        lines.append(
            f"{r['allocator']:>10}{r['frames']:>7}{r['latent_frames']:>8}{r['mode']:>10}{r['peak_mib']:>10.1f}"
            f"{r['output_mib']:>12.2f}{r['seconds']:>9.2f}{ratio:>7}"
        )
    lines.append(f"bench time {result['bench_s']} s")
    return "\n".join(lines)


if __name__ == "__main__":
    if len(sys.argv) == 4 and sys.argv[1] == "--child":
        print(json.dumps(child(int(sys.argv[2]), sys.argv[3])))
    else:
        result = run()
        print(json.dumps(result, indent=2))
        print(table(result))
