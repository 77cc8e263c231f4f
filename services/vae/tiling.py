"""Tiled VAE encode / decode as pure functions over an encode or decode callable.

Tiles are always full-size (the grid is spread evenly so the last tile ends at the border instead of being a
short remainder, as diffusers' last tiles are) and neighbours overlap by AT LEAST the requested overlap. Each
tile's output is weighted by a separable linear ramp that rises from ~0 at an interior tile edge to 1 across
the actual overlap (image borders are not ramped), and the weighted sum is divided by the summed weights, so
the effective weights sum to 1 at every pixel (diffusers' `blend_v` / `blend_h` is a similar linear
cross-fade, applied sequentially over a fixed extent, with a short remainder tile at the far border).

Seam bound (measured; tests/services/vae/test_vae_tiling.py): the result differs from the untiled call
because GroupNorm statistics and the mid-block attention are computed per tile, not because of the blend.
On a tiny random FLUX-geometry AutoencoderKL (a worst case: no smoothness), 128x128 image, tiles of
8 latents / 64 px with overlap 2 latents / 16 px:
  decode: ours 35.5 dB PSNR vs untiled (max abs 0.79), diffusers' tiled decode 31.2 dB (max abs 1.16);
  encode: ours 26.7 dB (max abs 0.30), diffusers' tiled encode 21.9 dB (max abs 0.62).
The tests assert decode >= 30 dB, encode >= 24 dB, and never more than 1 dB below diffusers. PSNR is
10 log10(range^2 / MSE), range = max - min of the untiled output. With a pointwise encode/decode the tiled
result equals the untiled one to float rounding (the weights are a partition of unity).
Of the ramps tried (linear / smoothstep, with 0 / 1/8 / 1/4 of the overlap held at weight 0), linear over
the whole overlap scored best on both encode and decode.

Normalisation in encode/decode is a per-element affine map, so tiling `AutoEncoder.encode` (mean) equals
tiling `encode_moments` and normalising. To sample, tile `encode_moments` and draw once on the blended
moments (`AutoEncoder.moments_to_raw`), as diffusers does.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor

TensorFn = Callable[[Tensor], Tensor]


def tile_starts(size: int, tile: int, overlap: int) -> list[int]:
    """Evenly spread starts of full tiles covering [0, size) with neighbours overlapping >= `overlap`."""
    if size <= tile:
        return [0]
    n = math.ceil((size - overlap) / (tile - overlap))  # fewest tiles with overlap >= requested
    span = size - tile
    return [round(i * span / (n - 1)) for i in range(n)]


def _ramp_weights(starts: list[int], tile: int, scale: int, device: torch.device) -> list[Tensor]:
    """Per-tile 1-D weights (length tile*scale), linear over the actual overlap with each neighbour."""
    weights = []
    length = tile * scale
    for idx, start in enumerate(starts):
        w = torch.ones(length, dtype=torch.float32, device=device)
        if idx > 0:
            ov = (starts[idx - 1] + tile - start) * scale
            if ov > 0:
                ramp = (torch.arange(ov, dtype=torch.float32, device=device) + 0.5) / ov
                w[:ov] = torch.minimum(w[:ov], ramp)
        if idx < len(starts) - 1:
            ov = (start + tile - starts[idx + 1]) * scale
            if ov > 0:
                ramp = (torch.arange(ov, dtype=torch.float32, device=device) + 0.5) / ov
                w[length - ov :] = torch.minimum(w[length - ov :], ramp.flip(0))
        weights.append(w)
    return weights


def _blend_tiles(fn: TensorFn, inp: Tensor, tile: int, overlap: int, step: int) -> Tensor:
    """Run `fn` on tiles of `inp` (B, C, H, W) placed on a grid of `step` input pixels; blend the outputs.

    The output pixels per grid unit (8 for a FLUX decode, 1 for an encode with step 8) are read from the
    first tile's output.
    """
    h_units, w_units = inp.shape[-2] // step, inp.shape[-1] // step
    th = tw = tile // step
    ov = overlap // step
    rows, cols = tile_starts(h_units, th, ov), tile_starts(w_units, tw, ov)
    th, tw = min(th, h_units), min(tw, w_units)
    out: Tensor | None = None
    wsum: Tensor | None = None
    wy: list[Tensor] = []
    wx: list[Tensor] = []
    unit = 0  # output pixels per step-unit of input
    for i, r in enumerate(rows):
        for j, c in enumerate(cols):
            piece = inp[..., r * step : (r + th) * step, c * step : (c + tw) * step]
            res = fn(piece)  # (B, C_out, th*unit, tw*unit)
            if out is None:
                unit = res.shape[-1] // tw
                if res.shape[-2:] != (th * unit, tw * unit) or unit < 1:
                    raise ValueError(
                        f"tile of {tuple(piece.shape[-2:])} gave {tuple(res.shape[-2:])}: not an integer scale"
                    )
                out = res.new_zeros(*res.shape[:2], h_units * unit, w_units * unit)
                wsum = torch.zeros(h_units * unit, w_units * unit, dtype=torch.float32, device=res.device)
                wy = _ramp_weights(rows, th, unit, res.device)
                wx = _ramp_weights(cols, tw, unit, res.device)
            w = wy[i][:, None] * wx[j][None, :]  # (th*unit, tw*unit)
            ys, xs = slice(r * unit, (r + th) * unit), slice(c * unit, (c + tw) * unit)
            out[..., ys, xs] += res * w.to(res.dtype)
            wsum[ys, xs] += w
    return out / wsum.to(out.dtype)


def _check_sizes(tile: int, overlap: int, what: str) -> None:
    if overlap < 0 or tile < 1 or overlap >= tile:
        raise ValueError(f"{what}: need 0 <= overlap < tile, got tile={tile}, overlap={overlap}")


def tiled_decode(decode_fn: TensorFn, z: Tensor, tile_latent: int = 64, overlap_latent: int = 16) -> Tensor:
    """Decode latents (B, C, h, w) tile by tile: tiles of `tile_latent`^2, overlapping >= `overlap_latent`.

    The upscale factor is read from the first tile's output. Returns (B, C_out, h*f, w*f).
    """
    _check_sizes(tile_latent, overlap_latent, "tiled_decode")
    if z.ndim != 4:
        raise ValueError(f"expected latents (B, C, h, w), got shape {tuple(z.shape)}")
    if z.shape[-2] <= tile_latent and z.shape[-1] <= tile_latent:
        return decode_fn(z)
    return _blend_tiles(decode_fn, z, tile_latent, overlap_latent, step=1)


def tiled_encode(
    encode_fn: TensorFn, x: Tensor, tile: int = 512, overlap: int = 128, factor: int = 8
) -> Tensor:
    """Encode images (B, C, H, W) tile by tile: `tile`^2 pixel tiles, overlapping >= `overlap` pixels.

    `factor` is the VAE's downscale (8 for FLUX); tile, overlap, H and W must be multiples of it so each tile
    maps onto whole latents. Returns what `encode_fn` returns per tile, blended: (B, C_lat, H/f, W/f).
    """
    _check_sizes(tile, overlap, "tiled_encode")
    if x.ndim != 4:
        raise ValueError(f"expected images (B, C, H, W), got shape {tuple(x.shape)}")
    sizes = {"tile": tile, "overlap": overlap, "H": x.shape[-2], "W": x.shape[-1]}
    bad = {k: v for k, v in sizes.items() if v % factor}
    if bad:
        raise ValueError(f"tiled_encode: values must be multiples of factor={factor}, got {bad}")
    if x.shape[-2] <= tile and x.shape[-1] <= tile:
        return encode_fn(x)
    return _blend_tiles(encode_fn, x, tile, overlap, step=factor)
