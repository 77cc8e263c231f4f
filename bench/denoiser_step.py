"""`denoiser_step_ratio`: one FLUX.1 denoiser step, our `Flux` vs diffusers' `FluxTransformer2DModel` with the same
weights, side by side in one process; and true CFG as two calls vs one batched forward.

- `step`: one forward (a denoising step without CFG) per config and dtype: ours as the service runs it (inside
  its adapter, so with the LoRA hooks on every Linear; RoPE computed once per request and passed in), diffusers
  as FluxPipeline calls it. Median of `repeats` calls after a warm-up, ours and diffusers' alternating so machine
  noise hits both alike; `ratio` = ours / diffusers (< 1: ours is faster). The load average before and after is
  recorded: on a machine shared with other jobs, 2-thread timings swing by 2x or more.
- `cfg`: one guided step (true CFG, batch 1) through our adapter: two `velocity` calls combined by `cfg`, as
  FluxPipeline does it, vs `guided_velocity` (cond and uncond as one forward of batch 2); `ratio` = batched /
  two calls.
- `compile` (only with `DIFFMESH_COMPILE=1`): `torch.compile` of every block, its compile time and step time
  against the same model eager.

    .venv/bin/python -m bench.denoiser_step
"""

from __future__ import annotations

import json
import os
import time
from typing import Any

import torch
from diffusers import FluxTransformer2DModel

from bench.timing import cpu_header, dtype_name, header_line, interleaved, max_abs_diff
from services.denoiser.adapters.flux import FluxAdapter, env_flag, image_ids
from services.denoiser.convert.flux import load_flux_state_dict
from services.denoiser.models.flux import Flux
from services.denoiser.sampling.guidance import cfg as cfg_combine
from services.denoiser.sampling.scheduler_config import FLUX_DEV_SCHEDULER

# The config: hidden 1024 (8 heads x 128), 4 double + 4 single blocks, 1024 image + 512 text tokens.
CONFIGS = {
    "hidden1024-4+4": dict(
        hidden=1024, heads=8, double=4, single=4, axes=(16, 56, 56), img=1024, txt=512, repeat_factor=1
    ),
    # milliseconds a call: more repeats for a stable median
    "tiny": dict(hidden=32, heads=2, double=1, single=1, axes=(4, 4, 8), img=256, txt=128, repeat_factor=5),
}
DTYPES = (torch.float32, torch.bfloat16)
CFG_CONFIG = "hidden1024-4+4"
CFG_SCALE = 4.0


def _pair(cfg: dict, dtype: torch.dtype) -> tuple[FluxTransformer2DModel, Flux]:
    """diffusers' model with seeded default init, and ours with the same weights (converted), in `dtype`."""
    torch.manual_seed(0)
    ref = FluxTransformer2DModel(
        patch_size=1,
        in_channels=64,
        num_layers=cfg["double"],
        num_single_layers=cfg["single"],
        attention_head_dim=cfg["hidden"] // cfg["heads"],
        num_attention_heads=cfg["heads"],
        joint_attention_dim=cfg["hidden"],
        pooled_projection_dim=cfg["hidden"],
        axes_dims_rope=list(cfg["axes"]),
        guidance_embeds=True,
    ).eval()
    params, sd = load_flux_state_dict(ref.state_dict(), axes_dim=cfg["axes"])
    with torch.device("meta"):
        ours = Flux(params)
    ours.load_state_dict(sd, assign=True)
    return ref.to(dtype), ours.eval().to(dtype)


def _inputs(cfg: dict, dtype: torch.dtype, batch: int = 1, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    side = int(cfg["img"] ** 0.5)
    return dict(
        img=torch.randn(batch, cfg["img"], 64, generator=g).to(dtype),
        txt=torch.randn(batch, cfg["txt"], cfg["hidden"], generator=g).to(dtype),
        y=torch.randn(batch, cfg["hidden"], generator=g).to(dtype),
        img_ids=image_ids(side, side),
        txt_ids=torch.zeros(cfg["txt"], 3),
        timesteps=torch.full((batch,), 0.5, dtype=dtype),
        guidance=torch.full((batch,), 3.5),
    )


def _adapter(ours: Flux) -> FluxAdapter:
    """The adapter the service builds around the model: it also puts the LoRA hooks on every Linear."""
    return FluxAdapter(
        ours, FLUX_DEV_SCHEDULER, torch.device("cpu"), "bench", batched_cfg=False, compile_blocks=False
    )


def step_row(name: str, cfg: dict, ref: FluxTransformer2DModel, ours: Flux, repeats: int) -> dict:
    dtype = ours.img_in.weight.dtype
    x = _inputs(cfg, dtype)
    pe = ours.position_embedding(x["img_ids"], x["txt_ids"])  # once per request, as the adapter does

    def reference() -> torch.Tensor:
        return ref(
            hidden_states=x["img"],
            encoder_hidden_states=x["txt"],
            pooled_projections=x["y"],
            timestep=x["timesteps"],
            img_ids=x["img_ids"],
            txt_ids=x["txt_ids"],
            guidance=x["guidance"],
        ).sample

    with torch.inference_mode():
        t, out = interleaved({"diffusers": reference, "ours": lambda: ours(**x, pe=pe)}, repeats)
    return {
        "config": name,
        "dtype": dtype_name(dtype),
        "tokens": f"{cfg['img']}+{cfg['txt']}",
        "ours_ms": round(t["ours"] * 1000, 2),
        "diffusers_ms": round(t["diffusers"] * 1000, 2),
        "ratio": round(t["ours"] / t["diffusers"], 3),
        "repeats": repeats,
        "max_abs_diff": max_abs_diff(out["ours"], out["diffusers"]),
    }


def cfg_row(name: str, cfg: dict, adapter: FluxAdapter, repeats: int) -> dict:
    """One true-CFG step (batch 1): two `velocity` calls + `cfg` (FluxPipeline's way) vs `guided_velocity`."""
    dtype = adapter.dtype

    def cond(x: dict) -> dict[str, Any]:
        pe = adapter.model.position_embedding(x["img_ids"], x["txt_ids"])
        return {k: x[k] for k in ("txt", "y", "img_ids", "txt_ids", "guidance")} | {"pe": pe}

    positive, negative = _inputs(cfg, dtype, seed=1), _inputs(cfg, dtype, seed=2)
    pos, neg, x, sigma = cond(positive), cond(negative), positive["img"], torch.tensor(0.5)

    def two_calls() -> torch.Tensor:
        return cfg_combine(adapter.velocity(x, sigma, pos), adapter.velocity(x, sigma, neg), CFG_SCALE)

    def batched() -> torch.Tensor:
        return adapter.guided_velocity(x, sigma, pos, neg, CFG_SCALE)

    with torch.inference_mode():
        t, out = interleaved({"two_calls": two_calls, "batched": batched}, repeats)
    return {
        "config": name,
        "dtype": dtype_name(dtype),
        "tokens": f"{cfg['img']}+{cfg['txt']}",
        "two_calls_ms": round(t["two_calls"] * 1000, 2),
        "batched_ms": round(t["batched"] * 1000, 2),
        "ratio": round(t["batched"] / t["two_calls"], 3),
        "max_abs_diff": max_abs_diff(out["batched"], out["two_calls"]),
    }


def compile_row(name: str, cfg: dict, dtype: torch.dtype, repeats: int) -> dict:
    """`torch.compile` of every block (what `DIFFMESH_COMPILE=1` does) vs the same model eager."""
    _, eager = _pair(cfg, dtype)
    _, compiled = _pair(cfg, dtype)
    for block in (*compiled.double_blocks, *compiled.single_blocks):
        block.compile(dynamic=False)
    x = _inputs(cfg, dtype)
    pe = eager.position_embedding(x["img_ids"], x["txt_ids"])
    with torch.inference_mode():
        t0 = time.perf_counter()
        compiled(**x, pe=pe)
        compile_s = time.perf_counter() - t0
        t, out = interleaved(
            {"eager": lambda: eager(**x, pe=pe), "compiled": lambda: compiled(**x, pe=pe)}, repeats
        )
    return {
        "config": name,
        "dtype": dtype_name(dtype),
        "compile_s": round(compile_s, 1),
        "eager_ms": round(t["eager"] * 1000, 2),
        "compiled_ms": round(t["compiled"] * 1000, 2),
        "ratio": round(t["compiled"] / t["eager"], 3),
        "max_abs_diff": max_abs_diff(out["compiled"], out["eager"]),
    }


def run(repeats: int = 5) -> dict:
    """Every step row, then the CFG rows on the issue's config (same models); compile rows only when
    `DIFFMESH_COMPILE=1` (minutes of compiling). ~2.5 min on an idle 2-core CPU."""
    t0 = time.perf_counter()
    out: dict[str, Any] = {
        "what": "one FLUX.1 DiT forward, ours / diffusers FluxTransformer2DModel, same weights; median of "
        f"{repeats} interleaved calls after a warm-up; ratio < 1: ours is faster",
        **cpu_header(),
        "step": [],
        "cfg": [],
    }
    for name, cfg in CONFIGS.items():
        for dtype in DTYPES:
            ref, ours = _pair(cfg, dtype)
            adapter = _adapter(ours)  # as served: the LoRA hooks on every Linear
            out["step"].append(step_row(name, cfg, ref, adapter.model, repeats * cfg["repeat_factor"]))
            del ref
            if name == CFG_CONFIG:
                out["cfg"].append(cfg_row(name, cfg, adapter, repeats))
    if env_flag("DIFFMESH_COMPILE"):
        out["compile"] = [compile_row(CFG_CONFIG, CONFIGS[CFG_CONFIG], d, repeats) for d in DTYPES]
    out["load_average_after"] = [round(x, 2) for x in os.getloadavg()]
    out["bench_s"] = round(time.perf_counter() - t0, 1)
    return out


def table(result: dict) -> str:
    lines = [header_line(result)]
    lines.append(f"{'config':<16}{'dtype':<10}{'tokens':<10}{'ours ms':>10}{'diffusers ms':>14}{'ratio':>8}")
    for r in result["step"]:
        lines.append(
            f"{r['config']:<16}{r['dtype']:<10}{r['tokens']:<10}{r['ours_ms']:>10.1f}"
            f"{r['diffusers_ms']:>14.1f}{r['ratio']:>8.3f}"
        )
    lines.append(
        f"{'true CFG step':<16}{'dtype':<10}{'tokens':<10}{'2 calls ms':>10}{'batched ms':>14}{'ratio':>8}"
    )
    for r in result["cfg"]:
        lines.append(
            f"{r['config']:<16}{r['dtype']:<10}{r['tokens']:<10}{r['two_calls_ms']:>10.1f}"
            f"{r['batched_ms']:>14.1f}{r['ratio']:>8.3f}"
        )
    for r in result.get("compile", []):
        lines.append(
            f"compile {r['config']} {r['dtype']}: {r['compile_s']} s to compile, {r['eager_ms']:.1f} ms eager, "
            f"{r['compiled_ms']:.1f} ms compiled, ratio {r['ratio']:.3f}"
        )
    lines.append(f"bench time {result['bench_s']} s")
    return "\n".join(lines)


if __name__ == "__main__":
    result = run()
    print(json.dumps(result, indent=2))
    print(table(result))
