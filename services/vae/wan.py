"""The Wan video VAEs (2.1 and 2.2) as the VAE service runs them: loaded from a hub `vae/` folder
(`AutoencoderKLWan`, diffusers keys) or a single official file (`Wan2.1_VAE` converted to safetensors, ComfyUI's
`wan_2.1_vae.safetensors` / `wan2.2_vae.safetensors`), normalisation owned by the model, chunked in time and tiled
in space.

Same API as `autoencoder_kl.KLVae`: `encode(pixels, *, sample, generator, tiling)` and `decode(latents, *, tiling)`,
pixels in [-1, 1], latents normalised as the Wan denoiser expects ((z - mean) * (1 / std) per channel). A video is
(B, 3, F, H, W) with F = 4k + 1 and H, W multiples of `factor` (8 for 2.1, 16 for 2.2); latents (B, z, 1 + k, H/f,
W/f). An image (B, 3, H, W) is a one-frame video: 4-D in, 4-D out, both ways.

Memory: decoding runs one latent frame at a time by construction (the causal feature cache; `chunked=False` runs
all frames in one pass, the same result to float rounding, for measuring what chunking saves:
bench/wan_vae_memory.py). Tiling (`TilingOptions`, or automatically above `AUTO_TILE_ABOVE` pixels a side) splits
H x W into overlapping tiles, each run through the whole chunked pass, blended linearly by `services.vae.tiling`
(time folded into channels, so every frame of a tile uses the same blend), so peak memory follows the tile, not
the frame.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from services.common.errors import InvalidArgument
from services.common.models import Component, load_state_dict, read_json, weight_files
from services.vae.autoencoder_kl import Tiling
from services.vae.convert.wan import WanLayoutError, infer_wan_params, is_wan_vae, load_wan_vae, strip_prefix
from services.vae.models.wan import WanVAE
from services.vae.tiling import tiled_decode, tiled_encode

__all__ = ["WanVae", "is_wan_vae", "load_hub", "load_single_file"]


def _fold(x: Tensor) -> Tensor:
    b, c, t, h, w = x.shape
    return x.reshape(b, c * t, h, w)  # (B, C*T, H, W): time rides along the channels through the 2-D tiler


def _unfold(x: Tensor, channels: int) -> Tensor:
    b, ct, h, w = x.shape
    return x.reshape(b, channels, ct // channels, h, w)  # (B, C, T, H, W)


class WanVae:
    """encode/decode on normalised latents, in the weights' dtype, on one device."""

    def __init__(self, model: WanVAE, device: torch.device, source: str) -> None:
        self.model = model.to(device)
        self.device = device
        self.dtype = next(model.parameters()).dtype
        self.params = model.params
        self.factor = model.params.spatial_factor
        self.temporal_factor = model.params.temporal_factor
        self.source = source

    def _check_pixels(self, pixels: Tensor) -> Tensor:
        """(B, 3, H, W) or (B, 3, F, H, W) -> (B, 3, F, H, W); raise naming the offending value."""
        c = self.params.in_channels
        if pixels.ndim not in (4, 5) or pixels.shape[1] != c:
            raise InvalidArgument(
                f"{self.source}: this Wan VAE encodes videos (B, {c}, F, H, W) or images (B, {c}, H, W), "
                f"got {list(pixels.shape)}"
            )
        video = pixels if pixels.ndim == 5 else pixels.unsqueeze(2)
        frames, (h, w) = video.shape[2], video.shape[-2:]
        if (frames - 1) % self.temporal_factor:
            k = (frames - 1) // self.temporal_factor
            raise InvalidArgument(
                f"frames={frames}: a Wan video has {self.temporal_factor}k+1 frames "
                f"(e.g. {self.temporal_factor * k + 1} or {self.temporal_factor * (k + 1) + 1})"
            )
        bad = {name: v for name, v in (("height", h), ("width", w)) if v % self.factor}
        if bad:
            raise InvalidArgument(
                f"{bad}: width and height must be multiples of {self.factor} for this Wan VAE"
            )
        return video

    @torch.inference_mode()
    def encode(
        self,
        pixels: Tensor,
        *,
        sample: bool = False,
        generator: torch.Generator | None = None,
        tiling: Any = None,
        chunked: bool = True,
    ) -> Tensor:
        """(B, 3, 4k+1, H, W) in [-1, 1] -> normalised latents (B, z, k+1, H/f, W/f) float32 (4-D for an image)."""
        video = self._check_pixels(pixels)
        x = video.to(self.device, self.dtype)
        h, w = x.shape[-2:]
        tl = Tiling.from_request(tiling, h, w, self.factor)
        model = self.model

        def moments_fn(t: Tensor) -> Tensor:
            return model.encode_moments(t, chunked=chunked)

        if tl.enabled:
            moments = tiled_encode(
                lambda t: _fold(moments_fn(_unfold(t, x.shape[1]))),
                _fold(x),
                tl.tile,
                tl.overlap,
                self.factor,
            )
            moments = _unfold(moments, 2 * self.params.z_dim)
        else:
            moments = moments_fn(x)  # (B, 2z, t, h, w): blended before drawing, as diffusers does
        z = model.normalize(model.moments_to_raw(moments, sample=sample, generator=generator)).float()
        return z if pixels.ndim == 5 else z[:, :, 0]

    @torch.inference_mode()
    def decode(self, latents: Tensor, *, tiling: Any = None, chunked: bool = True) -> Tensor:
        """Normalised latents (B, z, t, h, w) -> pixels (B, 3, 4(t-1)+1, h*f, w*f) float32 in [-1, 1]
        ((B, z, h, w) -> (B, 3, H, W))."""
        z_dim = self.params.z_dim
        if latents.ndim not in (4, 5) or latents.shape[1] != z_dim:
            raise InvalidArgument(
                f"latents: {self.source} decodes (B, {z_dim}, t, h, w) or (B, {z_dim}, h, w), "
                f"got {list(latents.shape)}"
            )
        z = (latents if latents.ndim == 5 else latents.unsqueeze(2)).to(self.device, self.dtype)
        h, w = z.shape[-2] * self.factor, z.shape[-1] * self.factor
        tl = Tiling.from_request(tiling, h, w, self.factor)
        model = self.model
        z_raw = model.denormalize(z)

        def decode_fn(t: Tensor) -> Tensor:
            return model.decode_raw(t, chunked=chunked)

        if tl.enabled:
            folded = tiled_decode(
                lambda t: _fold(decode_fn(_unfold(t, z_dim))),
                _fold(z_raw),
                tl.tile // self.factor,
                tl.overlap // self.factor,
            )
            pixels = _unfold(folded, self.params.out_channels)
        else:
            pixels = decode_fn(z_raw)
        pixels = pixels.clamp(-1.0, 1.0).float()
        return pixels if latents.ndim == 5 else pixels[:, :, 0]


def _build(state_dict: dict[str, Tensor], config: dict[str, Any] | None, source: str) -> WanVAE:
    try:
        return load_wan_vae(state_dict, infer_wan_params(state_dict, config))
    except (WanLayoutError, KeyError, ValueError) as e:
        raise InvalidArgument(f"{source}: not a loadable Wan VAE: {e}") from None


def load_hub(component: Component, device: torch.device) -> WanVae:
    """A diffusers `vae/` folder (`AutoencoderKLWan`): config.json gives latents_mean / latents_std, and every
    architecture field it states must agree with the weights."""
    sd = load_state_dict(weight_files(component.path))
    return WanVae(_build(sd, component.config, str(component.path)), device, str(component.path))


def load_single_file(component: Component | Path | str, device: torch.device) -> WanVae:
    """An original single file (official or diffusers keys, `vae.` / `first_stage_model.` prefixes stripped).

    Normalisation from a diffusers config beside it (`<stem>.json` or `config.json`), else the released constants
    of its z_dim (16: Wan 2.1, 48: Wan 2.2).
    """
    path = Path(component.path if isinstance(component, Component) else component)
    sd = strip_prefix(load_state_dict(path))
    if not is_wan_vae(sd):
        raise InvalidArgument(f"{path}: not a Wan VAE (neither the official nor the diffusers key layout)")
    for cfg in (path.with_suffix(".json"), path.parent / "config.json"):
        if cfg.is_file():
            return WanVae(_build(sd, read_json(cfg), str(path)), device, str(path))
    return WanVae(_build(sd, None, str(path)), device, str(path))
