"""Tiny random diffusers `AutoencoderKLWan`s of both Wan VAE architectures, seeded, for parity tests.

- "2.1": 4 levels (3 resamplers: 2-D, then two 3-D), 8x space / 4x time, z 16, the released multipliers and two residual
  blocks per level (diffusers' own official-layout converter handles only that geometry), widths 4..16.
- "2.2": the residual levels with avg / dup shortcuts, 2x2 patchify (12 channels in and out), 16x space / 4x time,
  z 48, the released multipliers, one residual block per level (the converters must not assume two), decoder
  wider than the encoder (widths 4..16 / 6..24).

Every parameter is random (RMS gammas ~1 +- 0.2, biases ~0.05, weights ~N(0, 1/fan_in)); the decoder head is
scaled down so most decoded pixels lie inside [-1, 1] and diffusers' clamp does not hide differences. The
normalisation constants are random too (mean ~N(0, 0.5), std in [0.5, 2]), so a missing or inverted scale shows.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from diffusers import AutoencoderKLWan

VERSIONS = ("2.1", "2.2")
HEAD_SCALE = 0.5  # decoder.conv_out weights x this: keeps most tiny-model pixels inside [-1, 1]


def stats(z_dim: int, seed: int) -> tuple[list[float], list[float]]:
    g = torch.Generator().manual_seed(1000 + seed)
    mean = (0.5 * torch.randn(z_dim, generator=g)).tolist()
    std = (0.5 + 1.5 * torch.rand(z_dim, generator=g)).tolist()
    return [round(m, 4) for m in mean], [round(s, 4) for s in std]


def tiny_config(version: str, seed: int = 0) -> dict[str, Any]:
    if version == "2.1":
        mean, std = stats(16, seed)
        return dict(
            base_dim=4,
            z_dim=16,
            dim_mult=[
                1,
                2,
                4,
                4,
            ],  # the released multipliers: one decoder shortcut, where the real VAE has it
            num_res_blocks=2,
            temperal_downsample=[False, True, True],
            latents_mean=mean,
            latents_std=std,
        )
    if version == "2.2":
        mean, std = stats(48, seed)
        return dict(
            base_dim=4,
            decoder_base_dim=6,
            z_dim=48,
            dim_mult=[1, 2, 4, 4],  # the released multipliers
            num_res_blocks=1,
            temperal_downsample=[False, True, True],
            is_residual=True,
            in_channels=12,
            out_channels=12,
            patch_size=2,
            scale_factor_spatial=16,
            scale_factor_temporal=4,
            latents_mean=mean,
            latents_std=std,
        )
    raise KeyError(f"unknown tiny Wan VAE version {version!r}; known: {list(VERSIONS)}")


def randomize_(module: torch.nn.Module, seed: int) -> torch.nn.Module:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            noise = torch.randn(p.shape, generator=g)
            if name.endswith("gamma"):
                p.copy_(1.0 + 0.2 * noise)
            elif p.ndim == 1:
                p.copy_(0.05 * noise)
            else:
                p.copy_(noise * p[0].numel() ** -0.5)
            if name == "decoder.conv_out.weight":
                p.mul_(HEAD_SCALE)
    return module.eval()


def make_tiny_wan_vae(version: str, seed: int = 0) -> AutoencoderKLWan:
    """A tiny random diffusers AutoencoderKLWan of the given version ("2.1" or "2.2"), in eval mode."""
    return randomize_(AutoencoderKLWan(**tiny_config(version, seed)), seed)


def save_tiny_wan_vae(path: Path, version: str, seed: int = 0) -> AutoencoderKLWan:
    """Write it as a hub `vae/` folder (config.json + diffusion_pytorch_model.safetensors) at `path`."""
    vae = make_tiny_wan_vae(version, seed)
    vae.save_pretrained(path)
    return vae


def video(seed: int, frames: int, size: int, smooth: bool = True) -> torch.Tensor:
    """(1, 3, F, size, size) in [-1, 1]; smooth: bilinear upsampling of a size/8 grid (image-like)."""
    g = torch.Generator().manual_seed(seed)
    if not smooth:
        return torch.rand(1, 3, frames, size, size, generator=g) * 2 - 1
    coarse = torch.rand(frames, 3, size // 8, size // 8, generator=g) * 2 - 1
    fine = torch.nn.functional.interpolate(coarse, size=(size, size), mode="bilinear", align_corners=False)
    return fine.permute(1, 0, 2, 3).unsqueeze(0).contiguous()  # (1, 3, F, H, W)


def latents(seed: int, z_dim: int, frames: int, size: int) -> torch.Tensor:
    """(1, z, t, size, size) standard normal: normalised latents as the denoiser hands them over."""
    g = torch.Generator().manual_seed(seed)
    return torch.randn(1, z_dim, frames, size, size, generator=g)
