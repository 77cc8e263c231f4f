"""Tiny saved Wan pipelines (diffusers' own `save_pretrained`), the oracles of the Wan end-to-end tests:
Wan 2.1 T2V (one transformer), Wan 2.2 A14B (two experts with `boundary_ratio`), with UniPC or Euler."""

from __future__ import annotations

from pathlib import Path

from diffusers import FlowMatchEulerDiscreteScheduler, UniPCMultistepScheduler, WanPipeline
from tiny_text_encoders import T5_CONFIG, tiny_umt5_encoder, write_t5_tokenizer
from tiny_wan import tiny_wan
from tiny_wan_vae import make_tiny_wan_vae


def scheduler(kind: str, shift: float = 3.0):
    if kind == "unipc":
        return UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=shift)
    if kind == "euler":
        return FlowMatchEulerDiscreteScheduler(shift=shift)
    raise KeyError(kind)


def make_tiny_wan_pipeline(path: Path, *, experts: int = 1, sampler: str = "unipc", seed: int = 0) -> WanPipeline:
    """A tiny WanPipeline saved at `path` and returned (fp32, CPU). `experts=2`: Wan 2.2 A14B's layout
    (`transformer_2`, `boundary_ratio` 0.875 as the released config)."""
    tokenizer = write_t5_tokenizer(path / "tokenizer")
    kw = dict(text_dim=T5_CONFIG["d_model"])
    pipe = WanPipeline(
        tokenizer=tokenizer,
        text_encoder=tiny_umt5_encoder(seed),
        vae=make_tiny_wan_vae("2.1", seed),
        scheduler=scheduler(sampler),
        transformer=tiny_wan("t2v", seed, **kw),
        transformer_2=tiny_wan("t2v", seed + 1, **kw) if experts == 2 else None,
        boundary_ratio=0.875 if experts == 2 else None,
    )
    pipe.save_pretrained(str(path))
    return pipe
