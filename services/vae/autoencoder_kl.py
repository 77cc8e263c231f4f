"""The KL autoencoder as the VAE service runs it: loaded from a hub `vae/` folder (diffusers keys) or a single
original file (BFL `ae.safetensors` keys), normalisation owned by the model, tiled for large images.

FLUX.1 (16 channels, 8x), SD 1.5 / SDXL (4 channels, quant convs) are the same module with other params.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from services.common.errors import InvalidArgument
from services.common.models import Component, load_state_dict, read_json, weight_files
from services.vae.convert.flux import CheckpointLayoutError, infer_vae_params, load_autoencoder
from services.vae.models.flux import FLUX_AE, AutoEncoder
from services.vae.tiling import tiled_decode, tiled_encode

AUTO_TILE_ABOVE = 1024  # pixels per side: larger images are tiled when the request leaves it to us
DEFAULT_TILE = 512
DEFAULT_OVERLAP = 128


@dataclass(frozen=True)
class Tiling:
    enabled: bool
    tile: int  # pixels
    overlap: int  # pixels

    @classmethod
    def from_request(cls, options: Any, height: int, width: int, factor: int) -> Tiling:
        """TilingOptions (or None) -> what to do for an image of this size. Tile and overlap are rounded to
        the VAE's factor; an overlap that is not smaller than the tile is INVALID_ARGUMENT."""
        tile = (getattr(options, "tile", 0) or DEFAULT_TILE) // factor * factor
        overlap = (getattr(options, "overlap", 0) or DEFAULT_OVERLAP) // factor * factor
        if tile < factor or overlap >= tile:
            raise InvalidArgument(
                f"tiling: need {factor} <= tile and overlap < tile (multiples of {factor}), "
                f"got tile={getattr(options, 'tile', 0)}, overlap={getattr(options, 'overlap', 0)}"
            )
        enabled = bool(getattr(options, "enabled", False)) or max(height, width) > AUTO_TILE_ABOVE
        return cls(enabled, tile, overlap)


class KLVae:
    """encode/decode on normalised latents, in the weights' dtype, on one device."""

    def __init__(self, model: AutoEncoder, device: torch.device, source: str) -> None:
        self.model = model.to(device)
        self.device = device
        self.dtype = next(model.parameters()).dtype
        self.factor = model.params.downscale
        self.source = source

    @torch.inference_mode()
    def encode(
        self,
        pixels: Tensor,
        *,
        sample: bool = False,
        generator: torch.Generator | None = None,
        tiling: Any = None,
    ) -> Tensor:
        """(B, 3, H, W) in [-1, 1] -> normalised latents (B, z, H/f, W/f) float32."""
        if pixels.ndim != 4:
            raise InvalidArgument(
                f"{self.source}: this VAE encodes images (B, 3, H, W), got {list(pixels.shape)}"
            )
        h, w = pixels.shape[-2:]
        if h % self.factor or w % self.factor:
            raise InvalidArgument(f"image size {w}x{h}: width and height must be multiples of {self.factor}")
        x = pixels.to(self.device, self.dtype)
        tl = Tiling.from_request(tiling, h, w, self.factor)

        def encode_fn(t: Tensor) -> Tensor:
            return self.model.encode(t, sample=sample, generator=generator)

        z = tiled_encode(encode_fn, x, tl.tile, tl.overlap, self.factor) if tl.enabled else encode_fn(x)
        return z.float()

    @torch.inference_mode()
    def decode(self, latents: Tensor, *, tiling: Any = None) -> Tensor:
        """Normalised latents (B, z, h, w) -> pixels (B, 3, h*f, w*f) float32, nominally in [-1, 1]."""
        z_channels = self.model.params.z_channels
        if latents.ndim != 4 or latents.shape[1] != z_channels:
            raise InvalidArgument(
                f"latents: {self.source} decodes (B, {z_channels}, h, w), got {list(latents.shape)}"
            )
        z = latents.to(self.device, self.dtype)
        h, w = z.shape[-2] * self.factor, z.shape[-1] * self.factor
        tl = Tiling.from_request(tiling, h, w, self.factor)
        if tl.enabled:
            pixels = tiled_decode(self.model.decode, z, tl.tile // self.factor, tl.overlap // self.factor)
        else:
            pixels = self.model.decode(z)
        return pixels.float()


def _build(
    state_dict: dict[str, Tensor], config: dict[str, Any] | None, source: str, **constants
) -> AutoEncoder:
    try:
        params = infer_vae_params(state_dict, config, **constants)
        return load_autoencoder(state_dict, params)
    except (CheckpointLayoutError, KeyError, ValueError) as e:
        raise InvalidArgument(f"{source}: not a loadable KL autoencoder: {e}") from None


def load_hub(component: Component, device: torch.device) -> KLVae:
    """A diffusers `vae/` folder (`AutoencoderKL`): config.json gives groups, scaling and shift."""
    sd = load_state_dict(weight_files(component.path))
    return KLVae(_build(sd, component.config, str(component.path)), device, str(component.path))


def load_single_file(component: Component, device: torch.device) -> KLVae:
    """An original single file (BFL `ae.safetensors`, or diffusers keys): FLUX.1's constants unless a
    `config.json` sits beside it (`<stem>.json` or `config.json`)."""
    path = Path(component.path)
    sd = load_state_dict(path)
    sd = {k.removeprefix("vae.").removeprefix("first_stage_model."): v for k, v in sd.items()}
    for cfg in (path.with_suffix(".json"), path.parent / "config.json"):
        if cfg.is_file():
            return KLVae(_build(sd, read_json(cfg), str(path)), device, str(path))
    model = _build(sd, None, str(path), scale_factor=FLUX_AE.scale_factor, shift_factor=FLUX_AE.shift_factor)
    return KLVae(model, device, str(path))
