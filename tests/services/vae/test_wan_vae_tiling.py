"""Spatial tiling of the Wan VAEs: close to the untiled result, no worse than diffusers' own Wan tiling on the same
weights and tile sizes, and sampling on blended moments stays seeded.

Bounds for tiny RANDOM models (no smoothness; the mid-block attention sees only its tile), measured with the seeds
below on 2 latent frames / 5 pixel frames:
  2.1 (96 px, tiles 64 px overlap 16): decode 26.7 dB (diffusers 24.4), encode 33.9 dB (diffusers 28.3);
  2.2 (128 px, tiles 64 px overlap 32): decode 25.7 dB (diffusers 25.1), encode 31.6 dB.
(diffusers' 2.2 tiled encode places tiles in patchified coordinates, i.e. twice the asked size; not compared.)
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import pytest
import torch
import torch.nn.functional as F
from tiny_wan_vae import latents, make_tiny_wan_vae, video

from services.vae.convert.wan import infer_wan_params, load_wan_vae
from services.vae.wan import WanVae

DECODE_MIN_PSNR, ENCODE_MIN_PSNR = 24.0, 30.0
MARGIN_DB = 1.0  # ours may trail diffusers' tiling by at most this much
CASES = {"2.1": (12, 8, 2), "2.2": (8, 4, 2)}  # latents per side, tile and overlap in latents


@dataclass
class TilingOptions:  # the fields of the proto message the service passes on
    enabled: bool
    tile: int
    overlap: int


def psnr(got: torch.Tensor, ref: torch.Tensor) -> float:
    """10 log10(range^2 / MSE), range = max - min of the reference."""
    mse = F.mse_loss(got, ref).item()
    return math.inf if mse == 0 else 10 * math.log10((ref.max() - ref.min()).item() ** 2 / mse)


@pytest.fixture(scope="module", params=sorted(CASES))
def case(request):
    version = request.param
    ref = make_tiny_wan_vae(version, seed=3)
    vae = WanVae(
        load_wan_vae(ref.state_dict(), infer_wan_params(ref.state_dict(), dict(ref.config))),
        torch.device("cpu"),
        f"tiny-{version}",
    )
    size, tile, overlap = CASES[version]
    f = vae.factor
    ref.enable_tiling(
        tile_sample_min_height=tile * f,
        tile_sample_min_width=tile * f,
        tile_sample_stride_height=(tile - overlap) * f,
        tile_sample_stride_width=(tile - overlap) * f,
    )
    z = ref.config.z_dim
    mean = torch.tensor(ref.config.latents_mean).view(1, z, 1, 1, 1)
    inv_std = 1.0 / torch.tensor(ref.config.latents_std).view(1, z, 1, 1, 1)
    return version, vae, ref, size, TilingOptions(True, tile * f, overlap * f), (mean, inv_std)


def test_tiled_decode_close_to_untiled_and_not_worse_than_diffusers(case) -> None:
    version, vae, ref, size, options, (mean, inv_std) = case
    z = latents(10, vae.params.z_dim, 2, size)
    full = vae.decode(z)
    tiled = vae.decode(z, tiling=options)
    with torch.no_grad():
        theirs = ref.decode(z / inv_std + mean).sample
    ours_db, theirs_db = psnr(tiled, full), psnr(theirs, full)
    print(
        f"\nWan {version} decode tiled vs untiled: ours {ours_db:.2f} dB (max abs "
        f"{(tiled - full).abs().max():.3f}), diffusers {theirs_db:.2f} dB"
    )
    assert tiled.shape == full.shape == (1, 3, 5, size * vae.factor, size * vae.factor)
    assert ours_db >= DECODE_MIN_PSNR
    assert ours_db >= theirs_db - MARGIN_DB
    assert torch.equal(tiled, vae.decode(z, tiling=options, chunked=True))  # deterministic
    one_pass = vae.decode(z, tiling=options, chunked=False)
    assert (one_pass - tiled).abs().max().item() <= 1e-4


def test_tiled_encode_close_to_untiled(case) -> None:
    version, vae, ref, size, options, (mean, inv_std) = case
    x = video(11, 5, size * vae.factor)
    full = vae.encode(x)
    tiled = vae.encode(x, tiling=options)
    ours_db = psnr(tiled, full)
    msg = f"\nWan {version} encode tiled vs untiled: ours {ours_db:.2f} dB"
    if version == "2.1":
        with torch.no_grad():
            theirs = (ref.encode(x).latent_dist.mode() - mean) * inv_std
        theirs_db = psnr(theirs, full)
        msg += f", diffusers {theirs_db:.2f} dB"
        assert ours_db >= theirs_db - MARGIN_DB
    print(msg)
    assert tiled.shape == full.shape
    assert ours_db >= ENCODE_MIN_PSNR
    s1 = vae.encode(x, tiling=options, sample=True, generator=torch.Generator().manual_seed(1))
    s2 = vae.encode(x, tiling=options, sample=True, generator=torch.Generator().manual_seed(1))
    assert torch.equal(s1, s2) and not torch.equal(s1, tiled)


def test_untiled_below_the_threshold_unless_asked(case) -> None:
    _, vae, _, size, options, _ = case
    z = latents(12, vae.params.z_dim, 1, size)
    off = TilingOptions(False, options.tile, options.overlap)
    assert torch.equal(vae.decode(z, tiling=off), vae.decode(z))
    assert torch.equal(vae.decode(z, tiling=None), vae.decode(z))
