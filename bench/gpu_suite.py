"""The benchmark suite on a GPU (issue 7, item 5): full-size transformer shapes with random weights, bf16.

- `flux_dev_step`: FLUX.1-dev's transformer (hidden 3072, 19 + 38 blocks, 11.9 B parameters), one forward at
  1024x1024 (4096 image + 512 text tokens): ours vs diffusers' FluxTransformer2DModel with the same weights.
  Also true CFG as two forwards vs one batched forward through our adapter.
- `wan14b_step`: Wan 2.1 14B's transformer (dim 5120, 40 blocks), one forward at 480x832, 33 frames
  (9x60x104 latent, 14040 tokens) + 512 text tokens: ours vs diffusers' WanTransformer3DModel.
- `memory_modes`: peak allocated GPU memory of one 2-step request per memory mode on a FLUX-shaped checkpoint
  (hidden 3072, 4 + 8 blocks, bf16, written to disk), and the time of the request; `ratio` = mode / resident.

Median of `repeats` forwards after warm-ups, ours and diffusers' alternating, CUDA-synchronised.

    python -m bench.gpu_suite [--quick]        (on a machine with a CUDA GPU; --quick: tiny shapes, for a smoke test)
"""

from __future__ import annotations

import json
import sys
import tempfile
import time
from pathlib import Path

import torch

from bench.timing import interleaved, sync


def _allocated(device: torch.device, peak: bool = False) -> int:
    """Allocated (or peak allocated) bytes on a CUDA device; 0 elsewhere (the --quick smoke test on a CPU)."""
    if device.type != "cuda":
        return 0
    return torch.cuda.max_memory_allocated(device) if peak else torch.cuda.memory_allocated(device)


def _reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)


def _row(t: dict, out: dict, **info) -> dict:
    diff = (out["ours"] - out["diffusers"]).abs()
    return {
        **info,
        "ours_ms": round(t["ours"] * 1000, 2),
        "diffusers_ms": round(t["diffusers"] * 1000, 2),
        "ratio": round(t["ours"] / t["diffusers"], 3),
        "max_abs_diff": float(f"{diff.max().item():.3g}"),
        "rel_l2": float(f"{(diff.norm() / out['diffusers'].norm()).item():.3g}"),
    }


def flux_dev_step(device: torch.device, quick: bool, repeats: int) -> dict:
    from diffusers import FluxTransformer2DModel

    from services.denoiser.adapters.flux import image_ids
    from services.denoiser.convert.flux import load_flux_state_dict
    from services.denoiser.models.flux import Flux

    hidden, heads, double, single, side, txt = (64, 2, 1, 1, 16, 32) if quick else (3072, 24, 19, 38, 64, 512)
    axes = (8, 12, 12) if quick else (16, 56, 56)
    with torch.device(device):
        torch.manual_seed(0)
        ref = FluxTransformer2DModel(
            patch_size=1,
            in_channels=64,
            num_layers=double,
            num_single_layers=single,
            attention_head_dim=hidden // heads,
            num_attention_heads=heads,
            joint_attention_dim=4096 if not quick else 64,
            pooled_projection_dim=768 if not quick else 64,
            axes_dims_rope=list(axes),
            guidance_embeds=True,
        ).to(torch.bfloat16)
    ref.eval().requires_grad_(False)
    params, sd = load_flux_state_dict(ref.state_dict(), axes_dim=axes)
    with torch.device("meta"):
        ours = Flux(params)
    ours.load_state_dict(sd, assign=True)
    ours.eval().requires_grad_(False)
    del sd
    g = torch.Generator().manual_seed(0)
    n_img = side * side
    img = torch.randn(1, n_img, 64, generator=g).to(device, torch.bfloat16)
    ctx = torch.randn(1, txt, ref.config.joint_attention_dim, generator=g).to(device, torch.bfloat16)
    y = torch.randn(1, ref.config.pooled_projection_dim, generator=g).to(device, torch.bfloat16)
    ids = image_ids(side, side).to(device)
    txt_ids = torch.zeros(txt, 3, device=device)
    t = torch.full((1,), 0.5, device=device, dtype=torch.bfloat16)
    guidance = torch.full((1,), 3.5, device=device)
    pe = ours.position_embedding(ids, txt_ids)

    def reference() -> torch.Tensor:
        return ref(
            hidden_states=img,
            encoder_hidden_states=ctx,
            pooled_projections=y,
            timestep=t,
            img_ids=ids,
            txt_ids=txt_ids,
            guidance=guidance,
            return_dict=False,
        )[0]

    def mine() -> torch.Tensor:
        return ours(
            img=img, img_ids=ids, txt=ctx, txt_ids=txt_ids, timesteps=t, y=y, guidance=guidance, pe=pe
        )

    with torch.inference_mode():
        times, out = interleaved({"diffusers": reference, "ours": mine}, repeats, warmups=2)
        row = _row(
            times,
            out,
            model=f"FLUX.1-dev shape: hidden {hidden}, {double}+{single} blocks, bf16, random weights",
            tokens=f"{n_img}+{txt}",
        )
        # true CFG: two forwards vs one forward of batch 2 (what DIFFMESH_BATCHED_CFG=1 does)
        img2, ctx2, y2 = (torch.cat([a, a]) for a in (img, ctx, y))
        t2, g2 = torch.cat([t, t]), torch.cat([guidance, guidance])

        def two() -> torch.Tensor:
            return torch.cat([mine(), mine()])

        def batched() -> torch.Tensor:
            return ours(
                img=img2, img_ids=ids, txt=ctx2, txt_ids=txt_ids, timesteps=t2, y=y2, guidance=g2, pe=pe
            )

        ct, _ = interleaved({"two": two, "batched": batched}, repeats, warmups=2)
        row["cfg_batched_vs_two_calls"] = round(ct["batched"] / ct["two"], 3)
    return row


def wan14b_step(device: torch.device, quick: bool, repeats: int) -> dict:
    from diffusers import WanTransformer3DModel

    from services.denoiser.convert.wan import load_wan_state_dict
    from services.denoiser.models.wan import WanDiT

    dim, heads, ffn, layers, latent, txt = (
        (128, 2, 256, 2, (3, 8, 8), 16) if quick else (5120, 40, 13824, 40, (9, 60, 104), 512)
    )
    with torch.device(device):
        torch.manual_seed(0)
        ref = WanTransformer3DModel(
            patch_size=(1, 2, 2),
            num_attention_heads=heads,
            attention_head_dim=dim // heads,
            in_channels=16,
            out_channels=16,
            text_dim=4096,
            freq_dim=256,
            ffn_dim=ffn,
            num_layers=layers,
        ).to(torch.bfloat16)
    ref.eval().requires_grad_(False)
    params, sd = load_wan_state_dict(ref.state_dict(), num_heads=heads)
    with torch.device("meta"):
        ours = WanDiT(params)
    ours.load_state_dict(sd, assign=True)  # the same tensors as diffusers' (renamed, not copied)
    ours.eval().requires_grad_(False)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, 16, *latent, generator=g).to(device, torch.bfloat16)
    ctx = torch.randn(1, txt, 4096, generator=g).to(device, torch.bfloat16)
    t = torch.full((1,), 500.0, device=device)

    def reference() -> torch.Tensor:
        return ref(hidden_states=x, timestep=t, encoder_hidden_states=ctx, return_dict=False)[0]

    def mine() -> torch.Tensor:
        return ours(x, t, ctx)

    with torch.inference_mode():
        times, out = interleaved({"diffusers": reference, "ours": mine}, repeats, warmups=2)
    f, h, w = latent
    return _row(
        times,
        out,
        model=f"Wan 2.1 14B shape: dim {dim}, {layers} blocks, ffn {ffn}, bf16, random weights",
        tokens=f"{f * (h // 2) * (w // 2)}+{txt}",
    )


def memory_modes(device: torch.device, quick: bool) -> dict:
    from diffusers import FluxTransformer2DModel

    from services.common.memory import MemoryPlan
    from services.common.models import find_component
    from services.denoiser.inputs import DenoiseInputs
    from services.denoiser.registry import DENOISERS

    hidden, heads, double, single = (64, 2, 2, 2) if quick else (3072, 24, 4, 8)
    axes = (8, 12, 12) if quick else (16, 56, 56)
    ctx_dim, pooled = (64, 64) if quick else (4096, 768)
    out: dict = {}
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "transformer"
        with torch.device(device):
            torch.manual_seed(0)
            FluxTransformer2DModel(
                patch_size=1,
                in_channels=64,
                num_layers=double,
                num_single_layers=single,
                attention_head_dim=hidden // heads,
                num_attention_heads=heads,
                joint_attention_dim=ctx_dim,
                pooled_projection_dim=pooled,
                axes_dims_rope=list(axes),
                guidance_embeds=True,
            ).to(torch.bfloat16).save_pretrained(folder, max_shard_size="5GB")
        size = sum(p.stat().st_size for p in folder.glob("*.safetensors"))
        out["checkpoint"] = (
            f"FLUX-shaped, hidden {hidden}, {double}+{single} blocks, bf16, {size / 2**30:.2f} GiB"
        )
        g = torch.Generator().manual_seed(0)
        positive = {
            "prompt_embeds": torch.randn(1, 512, ctx_dim, generator=g),
            "pooled_prompt_embeds": torch.randn(1, pooled, generator=g),
        }
        side = 256 if quick else 1024
        results = {}
        for mode in ("resident", "offload", "sequential"):
            _reset_peak(device)
            base = _allocated(device)
            component = find_component(folder, ["transformer"])
            adapter = DENOISERS[component.class_name](component, device, MemoryPlan.parse(mode))
            loaded = _allocated(device) - base
            inputs = DenoiseInputs(seed=1, steps=2, width=side, height=side, guidance=3.5, positive=positive)
            adapter.denoise(inputs, lambda s, t: None, lambda: False)  # warm-up
            _reset_peak(device)
            t0 = time.perf_counter()
            latents = adapter.denoise(inputs, lambda s, t: None, lambda: False)["latents"]
            sync()
            seconds = time.perf_counter() - t0
            peak = _allocated(device, peak=True) - base
            idle = _allocated(device) - base
            results[mode] = {
                "peak_allocated_mb": round(peak / 2**20, 1),
                "after_load_mb": round(loaded / 2**20, 1),
                "between_requests_mb": round(idle / 2**20, 1),
                "request_s": round(seconds, 3),
                "latents": latents.cpu(),
            }
            del adapter
            if device.type == "cuda":
                torch.cuda.empty_cache()
        ref = results["resident"]["latents"]
        for r in results.values():
            r["max_abs_diff_vs_resident"] = float((r.pop("latents") - ref).abs().max())
            r["ratio"] = round(
                r["peak_allocated_mb"] / max(results["resident"]["peak_allocated_mb"], 1e-9), 3
            )
        out["request"] = f"2 steps, {side}x{side}, 512 text tokens"
        out.update(results)
    return out


def run(quick: bool = False, repeats: int = 5) -> dict:
    import diffusers

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    props = torch.cuda.get_device_properties(device) if device.type == "cuda" else None
    out: dict = {
        "machine": {
            "gpu": props.name if props else None,
            "memory_gib": round(props.total_memory / 2**30, 1) if props else None,
            "torch": torch.__version__,
            "cuda": torch.version.cuda,
            "diffusers": diffusers.__version__,
        }
    }
    for name, fn in (
        ("flux_dev_step", lambda: flux_dev_step(device, quick, repeats)),
        ("wan14b_step", lambda: wan14b_step(device, quick, repeats)),
        ("memory_modes", lambda: memory_modes(device, quick)),
    ):
        out[name] = fn()
        if device.type == "cuda":
            torch.cuda.empty_cache()  # the models of one part are gone before the next builds its own
        print(name, json.dumps(out[name]), flush=True)
    return out


if __name__ == "__main__":
    print(json.dumps(run(quick="--quick" in sys.argv), indent=2))
