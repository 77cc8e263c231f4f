"""Our FLUX.1 AutoEncoder vs diffusers' AutoencoderKL (the oracle), tiny FLUX geometry, CPU fp32."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from diffusers import AutoencoderKL
from diffusers.loaders.single_file_utils import convert_ldm_vae_checkpoint
from safetensors.torch import load_file, save_file
from tiny_flux_vae import SCALE, SHIFT, TINY_CONFIG

from services.vae.convert.flux import (
    CheckpointLayoutError,
    detect_vae_layout,
    diffusers_to_bfl,
    infer_vae_params,
    load_autoencoder,
)
from services.vae.models.flux import FLUX_AE, PRESETS, AutoEncoder, AutoEncoderParams, preset

TOL = 1e-4
TINY_PARAMS = AutoEncoderParams(
    resolution=64,
    in_channels=3,
    ch=8,
    out_ch=3,
    ch_mult=(1, 1, 2, 2),
    num_res_blocks=1,
    z_channels=16,
    scale_factor=SCALE,
    shift_factor=SHIFT,
    norm_groups=4,
)


def randomize_(module: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Every parameter random: norm scales ~1 +- 0.2, biases ~0.05, weights ~N(0, 1/fan_in)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            noise = torch.randn(p.shape, generator=g)
            if p.ndim == 1 and "norm" in name and name.endswith("weight"):
                p.copy_(1.0 + 0.2 * noise)
            elif p.ndim == 1:
                p.copy_(0.05 * noise)
            else:
                p.copy_(noise * p[0].numel() ** -0.5)
    return module.eval()


def tiny_diffusers(seed: int = 0, **overrides: object) -> AutoencoderKL:
    return randomize_(AutoencoderKL(**{**TINY_CONFIG, **overrides}), seed)


def image(seed: int, size: int = 64) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(1, 3, size, size, generator=g) * 2 - 1  # (B, 3, H, W) in [-1, 1]


def latent(seed: int, size: int = 8) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(1, 16, size, size, generator=g)  # (B, 16, h, w), normalised


def max_diffs(ours: AutoEncoder, ref: AutoencoderKL, scale: float, shift: float) -> tuple[float, float]:
    x, z = image(1), latent(2)
    with torch.no_grad():
        mean = ref.encode(x).latent_dist.mode()  # (B, 16, 8, 8) raw
        enc = (ours.encode(x) - (mean - shift) * scale).abs().max().item()
        dec = (ours.decode(z) - ref.decode(z / scale + shift).sample).abs().max().item()
    return enc, dec


def test_diffusers_layout_matches_diffusers(tmp_path: Path) -> None:
    ref = tiny_diffusers()
    ref.save_pretrained(tmp_path / "vae")  # the hub layout: config.json + diffusion_pytorch_model.safetensors
    config = json.loads((tmp_path / "vae" / "config.json").read_text())
    sd = load_file(tmp_path / "vae" / "diffusion_pytorch_model.safetensors")
    assert detect_vae_layout(sd) == "diffusers"
    ours = load_autoencoder(sd, infer_vae_params(sd, config))
    enc, dec = max_diffs(ours, ref, SCALE, SHIFT)
    assert enc <= TOL and dec <= TOL, (enc, dec)


def test_diffusers_layout_with_quant_convs_matches() -> None:
    ref = tiny_diffusers(3, use_quant_conv=True, use_post_quant_conv=True, shift_factor=None)
    sd = ref.state_dict()
    params = infer_vae_params(sd, dict(ref.config))
    assert params.use_quant_conv and params.use_post_quant_conv and params.shift_factor == 0.0
    enc, dec = max_diffs(load_autoencoder(sd, params), ref, SCALE, 0.0)
    assert enc <= TOL and dec <= TOL, (enc, dec)


def test_bfl_layout_via_diffusers_converter(tmp_path: Path) -> None:
    """Official layout checked against diffusers' own converter, not our inverse."""
    ours_src = randomize_(AutoEncoder(TINY_PARAMS), seed=7)
    path = tmp_path / "ae.safetensors"
    save_file({k: v.contiguous() for k, v in ours_src.state_dict().items()}, str(path))
    sd = load_file(path)
    assert detect_vae_layout(sd) == "bfl"
    assert "encoder.mid.attn_1.q.weight" in sd and sd["encoder.mid.attn_1.q.weight"].ndim == 4
    assert not any("quant_conv" in k for k in sd)

    ref = AutoencoderKL(**TINY_CONFIG).eval()
    ref.load_state_dict(convert_ldm_vae_checkpoint(dict(sd), dict(ref.config)), strict=True)
    ours = load_autoencoder(sd, TINY_PARAMS)
    enc, dec = max_diffs(ours, ref, SCALE, SHIFT)
    assert enc <= TOL and dec <= TOL, (enc, dec)
    # and our diffusers -> bfl map is the inverse of diffusers' bfl -> diffusers map
    back = diffusers_to_bfl(ref.state_dict())
    assert back.keys() == sd.keys()
    assert all(torch.equal(back[k], sd[k]) for k in sd)


def test_infer_vae_params_recovers_tiny() -> None:
    ref = tiny_diffusers()
    config = dict(ref.config)
    assert infer_vae_params(ref.state_dict(), config) == TINY_PARAMS
    bfl = diffusers_to_bfl(ref.state_dict())
    assert infer_vae_params(bfl, config) == TINY_PARAMS
    got = infer_vae_params(bfl, None, scale_factor=SCALE, shift_factor=SHIFT, norm_groups=4)
    assert got == AutoEncoderParams(**{**TINY_PARAMS.__dict__, "resolution": 256})
    with pytest.raises(ValueError, match="norm_groups=32"):  # a BFL file alone cannot say 4 groups
        infer_vae_params(bfl, None, scale_factor=SCALE, shift_factor=SHIFT)
    with pytest.raises(ValueError, match="scale"):
        infer_vae_params(bfl, None)
    with pytest.raises(ValueError, match="latent_channels"):
        infer_vae_params(bfl, {**config, "latent_channels": 4})


def test_layout_errors_name_missing_keys() -> None:
    with pytest.raises(CheckpointLayoutError, match=r"encoder\.down\.0\.block\.0\.conv1\.weight"):
        detect_vae_layout(["model.foo.weight"])
    sd = tiny_diffusers().state_dict()
    sd["encoder.mid_block.mystery.weight"] = torch.zeros(1)
    with pytest.raises(CheckpointLayoutError, match="mystery"):
        diffusers_to_bfl(sd)
    bfl = diffusers_to_bfl(tiny_diffusers().state_dict())
    del bfl["decoder.conv_out.bias"]
    with pytest.raises(CheckpointLayoutError, match=r"decoder\.conv_out\.bias"):
        load_autoencoder(bfl, TINY_PARAMS)


def test_flux_preset_on_meta_matches_diffusers_full_size() -> None:
    with torch.device("meta"):
        ours = AutoEncoder(preset("FLUX_AE"))
        ref = AutoencoderKL(
            down_block_types=["DownEncoderBlock2D"] * 4,
            up_block_types=["UpDecoderBlock2D"] * 4,
            block_out_channels=[128, 256, 512, 512],
            layers_per_block=2,
            latent_channels=16,
            use_quant_conv=False,
            use_post_quant_conv=False,
        )
    assert FLUX_AE.downscale == 8 and FLUX_AE.z_channels == 16
    assert (FLUX_AE.scale_factor, FLUX_AE.shift_factor) == (SCALE, SHIFT)
    mapped = {k: tuple(v.shape) for k, v in diffusers_to_bfl(ref.state_dict()).items()}
    assert mapped == {k: tuple(v.shape) for k, v in ours.state_dict().items()}
    n_params = sum(p.numel() for p in ours.parameters())
    assert n_params == sum(p.numel() for p in ref.parameters())
    assert infer_vae_params(ours.state_dict(), scale_factor=SCALE, shift_factor=SHIFT) == FLUX_AE


def test_unknown_preset_lists_names() -> None:
    with pytest.raises(KeyError) as err:
        preset("FLUX_NOPE")
    assert all(name in str(err.value) for name in PRESETS)


def test_sampling_is_seeded_and_matches_diffusers() -> None:
    ref = tiny_diffusers()
    ours = load_autoencoder(ref.state_dict(), infer_vae_params(ref.state_dict(), dict(ref.config)))
    x = image(4)
    with torch.no_grad():
        a = ours.encode(x, sample=True, generator=torch.Generator().manual_seed(42))
        b = ours.encode(x, sample=True, generator=torch.Generator().manual_seed(42))
        c = ours.encode(x, sample=True, generator=torch.Generator().manual_seed(43))
        want = ref.encode(x).latent_dist.sample(generator=torch.Generator().manual_seed(42))
    assert torch.equal(a, b)
    assert not torch.allclose(a, c)
    assert (a - (want - SHIFT) * SCALE).abs().max().item() <= TOL


def test_bad_shapes_raise_value_error() -> None:
    ours = AutoEncoder(TINY_PARAMS).eval()
    with pytest.raises(ValueError, match="multiples of 8"):
        ours.encode(torch.zeros(1, 3, 60, 64))
    with pytest.raises(ValueError, match=r"\(B, 3, H, W\)"):
        ours.encode(torch.zeros(1, 4, 64, 64))
    with pytest.raises(ValueError, match=r"\(B, 16, h, w\)"):
        ours.decode(torch.zeros(1, 4, 8, 8))
    with pytest.raises(ValueError, match="norm_groups"):
        AutoEncoderParams(**{**TINY_PARAMS.__dict__, "norm_groups": 3})
