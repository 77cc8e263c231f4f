"""Tiny saved Wan pipelines (diffusers' own `save_pretrained`), the oracles of the Wan end-to-end tests:
Wan 2.1 T2V (one transformer), Wan 2.2 A14B (two experts with `boundary_ratio`), with UniPC or Euler; Wan 2.1
I2V / FLF2V (CLIP vision image encoder, 36-channel DiT), Wan 2.2 TI2V (48-channel VAE and DiT, per-token
timesteps) and video-to-video."""

from __future__ import annotations

from pathlib import Path

from diffusers import (
    FlowMatchEulerDiscreteScheduler,
    UniPCMultistepScheduler,
    WanImageToVideoPipeline,
    WanPipeline,
    WanVideoToVideoPipeline,
)
from tiny_text_encoders import T5_CONFIG, tiny_clip_vision_model, tiny_umt5_encoder, write_t5_tokenizer
from tiny_wan import IMAGE_DIM, tiny_wan
from tiny_wan_vae import make_tiny_wan_vae
from transformers import CLIPImageProcessorPil


def scheduler(kind: str, shift: float = 3.0):
    if kind == "unipc":
        return UniPCMultistepScheduler(
            prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=shift
        )
    if kind == "euler":
        return FlowMatchEulerDiscreteScheduler(shift=shift)
    raise KeyError(kind)


def make_tiny_wan_pipeline(
    path: Path, *, experts: int = 1, sampler: str = "unipc", seed: int = 0
) -> WanPipeline:
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


CLIP_SIZE, CLIP_PATCH = 56, 14
CLIP_TOKENS = (CLIP_SIZE // CLIP_PATCH) ** 2 + 1  # patches + the class token


def make_tiny_wan_i2v(path: Path, *, last_frame: bool = False, seed: int = 0) -> WanImageToVideoPipeline:
    """Wan 2.1 I2V (or FLF2V: the learned position embedding of the first and last frames' image tokens)."""
    processor = CLIPImageProcessorPil(
        size={"shortest_edge": CLIP_SIZE}, crop_size={"height": CLIP_SIZE, "width": CLIP_SIZE}
    )
    extra = {"pos_embed_seq_len": 2 * CLIP_TOKENS} if last_frame else {}
    pipe = WanImageToVideoPipeline(
        tokenizer=write_t5_tokenizer(path / "tokenizer"),
        text_encoder=tiny_umt5_encoder(seed),
        vae=make_tiny_wan_vae("2.1", seed),
        scheduler=scheduler("unipc"),
        image_processor=processor,
        image_encoder=tiny_clip_vision_model(
            seed, hidden_size=IMAGE_DIM, num_attention_heads=4, image_size=CLIP_SIZE, patch_size=CLIP_PATCH
        ),
        transformer=tiny_wan("flf2v" if last_frame else "i2v", seed, text_dim=T5_CONFIG["d_model"], **extra),
    )
    pipe.save_pretrained(str(path))
    return pipe


def make_tiny_wan_ti2v(path: Path, seed: int = 0) -> WanImageToVideoPipeline:
    """Wan 2.2 TI2V 5B's geometry: the 48-channel 2.2 VAE, `expand_timesteps` (its image-to-video mode)."""
    pipe = WanImageToVideoPipeline(
        tokenizer=write_t5_tokenizer(path / "tokenizer"),
        text_encoder=tiny_umt5_encoder(seed),
        vae=make_tiny_wan_vae("2.2", seed),
        scheduler=scheduler("unipc", shift=5.0),
        transformer=tiny_wan("ti2v", seed, text_dim=T5_CONFIG["d_model"]),
        expand_timesteps=True,
    )
    pipe.save_pretrained(str(path))
    return pipe


def make_tiny_wan_v2v(path: Path, seed: int = 0) -> WanVideoToVideoPipeline:
    pipe = WanVideoToVideoPipeline(
        tokenizer=write_t5_tokenizer(path / "tokenizer"),
        text_encoder=tiny_umt5_encoder(seed),
        vae=make_tiny_wan_vae("2.1", seed),
        scheduler=scheduler("unipc"),
        transformer=tiny_wan("t2v", seed, text_dim=T5_CONFIG["d_model"]),
    )
    pipe.save_pretrained(str(path))
    return pipe
