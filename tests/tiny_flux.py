"""A tiny FLUX.1 pipeline of the real geometry (16 latent channels, 8x VAE, in_channels 64), built with
diffusers and saved in the hub layout: the reference our engine is compared with (DESIGN §5)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel
from tiny_text_encoders import write_flux_text_encoders
from transformers import CLIPTextModel, CLIPTokenizer, T5EncoderModel, T5TokenizerFast

TRANSFORMER = dict(
    patch_size=1,
    in_channels=64,
    num_layers=1,
    num_single_layers=1,
    attention_head_dim=16,
    num_attention_heads=2,
    joint_attention_dim=32,
    pooled_projection_dim=32,
    axes_dims_rope=[4, 4, 8],
)
VAE = dict(
    down_block_types=["DownEncoderBlock2D"] * 4,
    up_block_types=["UpDecoderBlock2D"] * 4,
    block_out_channels=[8, 8, 16, 16],
    layers_per_block=1,
    latent_channels=16,
    norm_num_groups=4,
    scaling_factor=0.3611,
    shift_factor=0.1159,
    use_quant_conv=False,
    use_post_quant_conv=False,
)
SCHEDULER = dict(
    shift=3.0,
    use_dynamic_shifting=True,
    base_shift=0.5,
    max_shift=1.15,
    base_image_seq_len=256,
    max_image_seq_len=4096,
)


def make_tiny_flux(model_dir: Path, seed: int = 0, guidance_embeds: bool = True) -> FluxPipeline:
    """Random tiny FLUX.1-dev (or schnell, without guidance embedding) saved at `model_dir`; returns it."""
    write_flux_text_encoders(model_dir, seed=seed)
    torch.manual_seed(seed)
    transformer = FluxTransformer2DModel(**TRANSFORMER, guidance_embeds=guidance_embeds).eval()
    vae = AutoencoderKL(**VAE).eval()
    scheduler = FlowMatchEulerDiscreteScheduler(
        **(SCHEDULER if guidance_embeds else {**SCHEDULER, "shift": 1.0, "use_dynamic_shifting": False})
    )
    pipe = FluxPipeline(
        scheduler=scheduler,
        vae=vae,
        text_encoder=CLIPTextModel.from_pretrained(model_dir / "text_encoder").eval(),
        tokenizer=CLIPTokenizer.from_pretrained(model_dir / "tokenizer"),
        text_encoder_2=T5EncoderModel.from_pretrained(model_dir / "text_encoder_2").eval(),
        tokenizer_2=T5TokenizerFast.from_pretrained(model_dir / "tokenizer_2"),
        transformer=transformer,
    )
    pipe.save_pretrained(model_dir)
    return pipe


def to_uint8(images: np.ndarray) -> np.ndarray:
    """diffusers' `output_type="np"` images (B, H, W, 3) in [0, 1] -> uint8, as its numpy_to_pil rounds."""
    return (images * 255).round().astype("uint8")


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    """Peak signal-to-noise ratio of two uint8 images in dB (inf when equal)."""
    mse = np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2)
    return float("inf") if mse == 0 else float(10 * np.log10(255.0**2 / mse))
