"""Tiled encode / decode: exact on pointwise maps, close to untiled on a tiny random FLUX-geometry VAE, and
no worse than diffusers' own tiling on the same weights and tile sizes."""

from __future__ import annotations

import itertools
import math

import pytest
import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL
from tiny_flux_vae import SCALE, SHIFT, TINY_CONFIG

from services.vae.convert.flux import infer_vae_params, load_autoencoder
from services.vae.tiling import tile_starts, tiled_decode, tiled_encode

# Bounds for a tiny RANDOM model (no smoothness, GroupNorm/attention statistics differ per tile), measured
# with the seeds below: decode 35.5 dB (diffusers 31.2), encode 26.7 dB (diffusers 21.9).
DECODE_MIN_PSNR, ENCODE_MIN_PSNR = 30.0, 24.0
MARGIN_DB = 1.0  # ours may trail diffusers' tiling by at most this much


def psnr(got: torch.Tensor, ref: torch.Tensor) -> float:
    """10 log10(range^2 / MSE), range = max - min of the reference."""
    rng = (ref.max() - ref.min()).item()
    mse = F.mse_loss(got, ref).item()
    return math.inf if mse == 0 else 10 * math.log10(rng**2 / mse)


@pytest.fixture(scope="module")
def models() -> tuple[AutoencoderKL, torch.nn.Module]:
    ref = AutoencoderKL(**TINY_CONFIG)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in ref.named_parameters():
            noise = torch.randn(p.shape, generator=g)
            if p.ndim == 1 and "norm" in name and name.endswith("weight"):
                p.copy_(1.0 + 0.2 * noise)
            elif p.ndim == 1:
                p.copy_(0.05 * noise)
            else:
                p.copy_(noise * p[0].numel() ** -0.5)
    ref.eval()
    ours = load_autoencoder(ref.state_dict(), infer_vae_params(ref.state_dict(), dict(ref.config)))
    return ref, ours


def test_tile_starts_cover_with_full_tiles() -> None:
    assert tile_starts(16, 8, 2) == [0, 4, 8]
    assert tile_starts(8, 8, 2) == [0]
    assert tile_starts(5, 8, 2) == [0]
    for size, tile, ov in [(16, 8, 2), (100, 32, 8), (33, 16, 4), (128, 64, 16)]:
        starts = tile_starts(size, tile, ov)
        assert starts[0] == 0 and starts[-1] == size - tile
        assert all(b - a <= tile - ov for a, b in itertools.pairwise(starts))


def test_blend_weights_are_a_partition_of_unity() -> None:
    """With a pointwise 'VAE' the tiled result must equal the untiled one exactly."""
    g = torch.Generator().manual_seed(0)
    z = torch.randn(2, 4, 20, 28, generator=g)  # (B, C, h, w), not square, not a tile multiple

    def up8(t: torch.Tensor) -> torch.Tensor:
        return t.repeat_interleave(8, dim=-2).repeat_interleave(8, dim=-1)

    torch.testing.assert_close(tiled_decode(up8, z, tile_latent=8, overlap_latent=3), up8(z))
    x = up8(z)  # (B, C, 160, 224)

    def pool(t: torch.Tensor) -> torch.Tensor:
        return F.avg_pool2d(t, 8)

    torch.testing.assert_close(tiled_encode(pool, x, tile=64, overlap=16), pool(x))
    assert tiled_decode(up8, z[..., :8, :8], tile_latent=8, overlap_latent=2).shape == (2, 4, 64, 64)


def test_bad_tile_arguments_raise() -> None:
    z = torch.zeros(1, 16, 16, 16)
    with pytest.raises(ValueError, match="overlap"):
        tiled_decode(lambda t: t, z, tile_latent=4, overlap_latent=4)
    with pytest.raises(ValueError, match="multiples of factor=8"):
        tiled_encode(lambda t: t, torch.zeros(1, 3, 128, 128), tile=60, overlap=16)
    with pytest.raises(ValueError, match="multiples of factor=8"):
        tiled_encode(lambda t: t, torch.zeros(1, 3, 124, 128), tile=64, overlap=16)


def test_tiled_decode_close_to_untiled_and_not_worse_than_diffusers(models) -> None:
    ref, ours = models
    z = torch.randn(1, 16, 16, 16, generator=torch.Generator().manual_seed(10))  # 128x128 image
    with torch.no_grad():
        full = ours.decode(z)
        tiled = tiled_decode(ours.decode, z, tile_latent=8, overlap_latent=2)
        ref.enable_tiling()
        theirs = ref.decode(z / SCALE + SHIFT).sample
        ref.disable_tiling()
    ours_db, theirs_db = psnr(tiled, full), psnr(theirs, full)
    print(
        f"\ndecode tiled vs untiled: ours {ours_db:.2f} dB (max abs {(tiled - full).abs().max():.3f}), "
        f"diffusers {theirs_db:.2f} dB (max abs {(theirs - full).abs().max():.3f})"
    )
    assert tiled.shape == full.shape == (1, 3, 128, 128)
    assert ours_db >= DECODE_MIN_PSNR
    assert ours_db >= theirs_db - MARGIN_DB


def test_tiled_encode_close_to_untiled_and_not_worse_than_diffusers(models) -> None:
    ref, ours = models
    g = torch.Generator().manual_seed(11)
    # a smooth 128x128 image in [-1, 1] (bilinear upsampling of 16x16 noise)
    x = F.interpolate(torch.rand(1, 3, 16, 16, generator=g) * 2 - 1, size=(128, 128), mode="bilinear")
    with torch.no_grad():
        full = ours.encode(x)
        tiled = tiled_encode(ours.encode, x, tile=64, overlap=16)
        ref.enable_tiling()
        theirs = (ref.encode(x).latent_dist.mode() - SHIFT) * SCALE
        ref.disable_tiling()
        # sampling on blended moments is seeded and consistent with the blended mean
        moments = tiled_encode(ours.encode_moments, x, tile=64, overlap=16)
    ours_db, theirs_db = psnr(tiled, full), psnr(theirs, full)
    print(
        f"\nencode tiled vs untiled: ours {ours_db:.2f} dB (max abs {(tiled - full).abs().max():.3f}), "
        f"diffusers {theirs_db:.2f} dB (max abs {(theirs - full).abs().max():.3f})"
    )
    assert tiled.shape == full.shape == (1, 16, 16, 16)
    assert ours_db >= ENCODE_MIN_PSNR
    assert ours_db >= theirs_db - MARGIN_DB
    torch.testing.assert_close(ours.normalize(ours.moments_to_raw(moments)), tiled)
    s1 = ours.moments_to_raw(moments, sample=True, generator=torch.Generator().manual_seed(1))
    s2 = ours.moments_to_raw(moments, sample=True, generator=torch.Generator().manual_seed(1))
    assert torch.equal(s1, s2)
