"""`wan_step_ratio`: one Wan DiT forward, our `WanDiT` vs diffusers' `WanTransformer3DModel` with the same
weights, side by side in one process.

One forward (a denoising step without CFG) per config and dtype: diffusers as WanPipeline calls it, ours with
the converted weights (`model.to(dtype)` on both sides: every parameter in that dtype). Median of `repeats`
calls after a warm-up, ours and diffusers' alternating so machine noise hits both alike, under
`torch.inference_mode`; `ratio` = ours / diffusers (< 1: ours is faster). The load average before and after is
recorded: on a machine shared with other jobs, 2-thread timings swing by 2x or more.

- `t2v`: Wan 2.1 T2V geometry (16 channels), one timestep per sample.
- `ti2v`: Wan 2.2 TI2V geometry (48 channels) with per-token timesteps as WanPipeline's `expand_timesteps`
  makes them for an image-conditioned run (0 on the first latent frame, t elsewhere): diffusers embeds and
  projects the timestep of every token, we embed each distinct value once.

    .venv/bin/python -m bench.wan_step
"""

from __future__ import annotations

import json
import os
import time
from typing import Any

import torch
from diffusers import WanTransformer3DModel

from bench.timing import cpu_header, dtype_name, header_line, interleaved, max_abs_diff
from services.denoiser.convert.wan import load_wan_state_dict
from services.denoiser.models.wan import WanDiT

# dim 1024 (8 heads x 128), 4 blocks, a 5x16x16 latent (320 tokens), 128 umT5 tokens.
BASE = dict(dim=1024, heads=8, ffn_dim=4096, layers=4, text_dim=4096, latent=(5, 16, 16), txt=128)
CONFIGS = {
    "t2v": dict(BASE, channels=16, per_token=False),
    "ti2v": dict(BASE, channels=48, per_token=True),
}
DTYPES = (torch.float32, torch.bfloat16)
TIMESTEP = 700.0


def _pair(cfg: dict, dtype: torch.dtype) -> tuple[WanTransformer3DModel, WanDiT]:
    """diffusers' model with seeded default init, and ours with the same weights (converted), in `dtype`."""
    torch.manual_seed(0)
    ref = WanTransformer3DModel(
        patch_size=(1, 2, 2),
        num_attention_heads=cfg["heads"],
        attention_head_dim=cfg["dim"] // cfg["heads"],
        in_channels=cfg["channels"],
        out_channels=cfg["channels"],
        text_dim=cfg["text_dim"],
        freq_dim=256,
        ffn_dim=cfg["ffn_dim"],
        num_layers=cfg["layers"],
    ).eval()
    params, sd = load_wan_state_dict(ref.state_dict(), num_heads=cfg["heads"])
    with torch.device("meta"):
        ours = WanDiT(params)
    ours.load_state_dict(sd, assign=True)
    return ref.to(dtype), ours.eval().to(dtype)


def _inputs(cfg: dict, dtype: torch.dtype, batch: int = 1, seed: int = 0) -> dict[str, torch.Tensor]:
    """diffusers' forward kwargs (timestep (B,) or per token (B, L))."""
    g = torch.Generator().manual_seed(seed)
    f, h, w = cfg["latent"]
    if cfg["per_token"]:
        mask = torch.ones(f, h // 2, w // 2)
        mask[0] = 0  # the clean first frame
        timestep = (mask * TIMESTEP).flatten()[None].expand(batch, -1)
    else:
        timestep = torch.full((batch,), TIMESTEP)
    return dict(
        hidden_states=torch.randn(batch, cfg["channels"], f, h, w, generator=g).to(dtype),
        timestep=timestep,
        encoder_hidden_states=torch.randn(batch, cfg["txt"], cfg["text_dim"], generator=g).to(dtype),
    )


def step_row(name: str, cfg: dict, ref: WanTransformer3DModel, ours: WanDiT, repeats: int) -> dict:
    dtype = ours.patch_embedding.weight.dtype
    x = _inputs(cfg, dtype)

    def reference() -> torch.Tensor:
        return ref(**x, return_dict=False)[0]

    def mine() -> torch.Tensor:
        return ours(x["hidden_states"], x["timestep"], x["encoder_hidden_states"])

    with torch.inference_mode():
        t, out = interleaved({"diffusers": reference, "ours": mine}, repeats)
    f, h, w = cfg["latent"]
    return {
        "config": name,
        "dtype": dtype_name(dtype),
        "model": f"dim {cfg['dim']} ({cfg['heads']} heads), ffn {cfg['ffn_dim']}, {cfg['layers']} blocks, "
        f"{cfg['channels']} channels",
        "latent": f"{f}x{h}x{w}",
        "tokens": f"{f * (h // 2) * (w // 2)}+{cfg['txt']}",
        "timestep": "per token" if cfg["per_token"] else "per sample",
        "ours_ms": round(t["ours"] * 1000, 2),
        "diffusers_ms": round(t["diffusers"] * 1000, 2),
        "ratio": round(t["ours"] / t["diffusers"], 3),
        "repeats": repeats,
        "max_abs_diff": max_abs_diff(out["ours"], out["diffusers"]),
        "output_abs_mean": float(f"{out['diffusers'].abs().mean().item():.3g}"),
    }


def run(repeats: int = 5) -> dict:
    """Every config in every dtype. About a minute on an idle 2-core CPU."""
    t0 = time.perf_counter()
    out: dict[str, Any] = {
        "what": "one Wan DiT forward, ours / diffusers WanTransformer3DModel, same weights; median of "
        f"{repeats} interleaved calls after a warm-up; ratio < 1: ours is faster",
        **cpu_header(),
        "step": [],
    }
    for name, cfg in CONFIGS.items():
        for dtype in DTYPES:
            ref, ours = _pair(cfg, dtype)
            out["step"].append(step_row(name, cfg, ref, ours, repeats))
            del ref, ours
    out["load_average_after"] = [round(x, 2) for x in os.getloadavg()]
    out["bench_s"] = round(time.perf_counter() - t0, 1)
    return out


def table(result: dict) -> str:
    lines = [header_line(result)]
    lines.append(
        f"{'config':<8}{'dtype':<10}{'tokens':<10}{'timestep':<12}{'ours ms':>10}{'diffusers ms':>14}"
        f"{'ratio':>8}{'max diff':>10}"
    )
    for r in result["step"]:
        lines.append(
            f"{r['config']:<8}{r['dtype']:<10}{r['tokens']:<10}{r['timestep']:<12}{r['ours_ms']:>10.1f}"
            f"{r['diffusers_ms']:>14.1f}{r['ratio']:>8.3f}{r['max_abs_diff']:>10.3g}"
        )
    lines.append(f"bench time {result['bench_s']} s")
    return "\n".join(lines)


if __name__ == "__main__":
    result = run()
    print(json.dumps(result, indent=2))
    print(table(result))
