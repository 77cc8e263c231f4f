"""Our Wan VAEs (2.1 and 2.2) vs diffusers' AutoencoderKLWan (the oracle), tiny random models, CPU fp32:
both key layouts, both loaders, chunked vs one-pass, sampling, and the frame / size rules."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from diffusers import AutoencoderKL, AutoencoderKLWan
from diffusers.loaders.single_file_utils import convert_wan_vae_to_diffusers
from safetensors.torch import save_file
from tiny_wan_vae import VERSIONS, latents, make_tiny_wan_vae, save_tiny_wan_vae, video

from services.common.errors import InvalidArgument
from services.common.models import Component, read_json
from services.vae.convert.wan import (
    WanLayoutError,
    detect_wan_layout,
    diffusers_to_official,
    infer_wan_params,
    is_wan_vae,
    load_wan_vae,
    official_to_diffusers,
)
from services.vae.models.wan import PRESETS, WAN21_VAE, WAN22_VAE, WanVAE, preset
from services.vae.wan import WanVae, load_hub, load_single_file

TOL = 1e-4
CPU = torch.device("cpu")
FRAMES, LATENT_FRAMES = 9, 3  # 2 chunks of 4 after the first frame; 3 latent frames


def stats(ref: AutoencoderKLWan) -> tuple[torch.Tensor, torch.Tensor]:
    """(1, z, 1, 1, 1) mean and 1/std exactly as diffusers' Wan pipelines build them."""
    z = ref.config.z_dim
    mean = torch.tensor(ref.config.latents_mean).view(1, z, 1, 1, 1)
    return mean, 1.0 / torch.tensor(ref.config.latents_std).view(1, z, 1, 1, 1)


def parity(vae: WanVae, ref: AutoencoderKLWan) -> tuple[float, float]:
    """Max abs diff of encode (mean, normalised) and decode (from normalised latents) against diffusers."""
    f = vae.factor
    x, z = video(1, FRAMES, 4 * f), latents(2, ref.config.z_dim, LATENT_FRAMES, 4)
    mean, inv_std = stats(ref)
    with torch.no_grad():
        want_z = (ref.encode(x).latent_dist.mode() - mean) * inv_std
        want_x = ref.decode(z / inv_std + mean).sample
    inside = (want_x.abs() < 0.999).float().mean().item()
    assert inside > 0.9, f"only {inside:.1%} of reference pixels are unclamped: the comparison would be blind"
    got_z, got_x = vae.encode(x), vae.decode(z)
    assert got_z.shape == want_z.shape and got_x.shape == want_x.shape == (1, 3, FRAMES, 4 * f, 4 * f)
    return (got_z - want_z).abs().max().item(), (got_x - want_x).abs().max().item()


@pytest.fixture(scope="module", params=VERSIONS)
def hub(request, tmp_path_factory) -> tuple[str, Path, AutoencoderKLWan]:
    path = tmp_path_factory.mktemp(f"wan{request.param}") / "vae"
    return request.param, path, save_tiny_wan_vae(path, request.param, seed=3)


def test_hub_folder_matches_diffusers(hub) -> None:
    version, path, ref = hub
    config = read_json(path / "config.json")
    assert config["_class_name"] == "AutoencoderKLWan"
    vae = load_hub(Component(path, "AutoencoderKLWan", config), CPU)
    assert vae.factor == (8 if version == "2.1" else 16) and vae.temporal_factor == 4
    enc, dec = parity(vae, ref)
    print(f"\nWan {version} diffusers layout: encode {enc:.2e}, decode {dec:.2e}")
    assert enc <= TOL and dec <= TOL, (enc, dec)


def test_official_single_file_matches_diffusers(hub, tmp_path: Path) -> None:
    """The official layout (what Wan2.1_VAE.pth / Comfy files hold) with a config beside it for the tiny stats."""
    version, path, ref = hub
    official = diffusers_to_official(ref.state_dict())
    assert detect_wan_layout(official) == "official"
    if (
        version == "2.1"
    ):  # checked against diffusers' own official -> diffusers converter, not only our inverse
        theirs = convert_wan_vae_to_diffusers(dict(official))
        assert theirs.keys() == ref.state_dict().keys()
        assert all(torch.equal(theirs[k], v) for k, v in ref.state_dict().items())
    file = tmp_path / "wan_vae.safetensors"
    save_file({f"vae.{k}": v.contiguous() for k, v in official.items()}, str(file))  # a bundle's prefix too
    (tmp_path / "wan_vae.json").write_text((path / "config.json").read_text())
    vae = load_single_file(file, CPU)
    enc, dec = parity(vae, ref)
    print(f"\nWan {version} official layout: encode {enc:.2e}, decode {dec:.2e}")
    assert enc <= TOL and dec <= TOL, (enc, dec)


def test_single_file_alone_takes_the_release_constants(hub, tmp_path: Path) -> None:
    version, _, ref = hub
    file = tmp_path / "vae.safetensors"
    save_file({k: v.contiguous() for k, v in diffusers_to_official(ref.state_dict()).items()}, str(file))
    vae = load_single_file(Component(file, "single-file", {}), CPU)
    release = WAN21_VAE if version == "2.1" else WAN22_VAE
    assert (vae.params.latents_mean, vae.params.latents_std) == (release.latents_mean, release.latents_std)


def test_layouts_round_trip_exactly(hub) -> None:
    _, _, ref = hub
    sd = ref.state_dict()
    official = diffusers_to_official(sd)
    assert not any(k.startswith(("quant_conv", "post_quant_conv")) or "_blocks" in k for k in official)
    back = official_to_diffusers(official)
    assert back.keys() == sd.keys() and all(torch.equal(back[k], sd[k]) for k in sd)
    with torch.device("meta"):
        ours = WanVAE(infer_wan_params(sd, dict(ref.config)))
    assert {k: v.shape for k, v in ours.state_dict().items()} == {k: v.shape for k, v in official.items()}


def test_infer_params_reads_both_versions(hub) -> None:
    version, _, ref = hub
    config = dict(ref.config)
    p = infer_wan_params(diffusers_to_official(ref.state_dict()), config)
    assert (p.dim, p.z_dim, p.dim_mult, p.num_res_blocks) == (
        config["base_dim"],
        config["z_dim"],
        tuple(config["dim_mult"]),
        config["num_res_blocks"],
    )
    assert p.dec_dim == (config["decoder_base_dim"] or config["base_dim"])
    assert p.residual == (version == "2.2") and p.patch_size == (2 if version == "2.2" else 1)
    assert p.temporal_downsample == (False, True, True) and p.latents_std == tuple(config["latents_std"])
    alone = infer_wan_params(ref.state_dict())  # shapes only: 2.1 vs 2.2 from the channel counts and blocks
    assert (alone.residual, alone.patch_size, alone.in_channels) == (p.residual, p.patch_size, 3)
    with pytest.raises(ValueError, match="base_dim"):
        infer_wan_params(ref.state_dict(), {**config, "base_dim": 96})
    with pytest.raises(ValueError, match="attn_scales"):
        infer_wan_params(ref.state_dict(), {**config, "attn_scales": [0.5]})


def test_key_detection_and_errors_name_keys(hub) -> None:
    _, _, ref = hub
    sd = ref.state_dict()
    official = diffusers_to_official(sd)
    assert detect_wan_layout(sd) == "diffusers"
    assert is_wan_vae(sd) and is_wan_vae(official) and is_wan_vae([f"vae.{k}" for k in official])
    with torch.device("meta"):
        kl = AutoencoderKL(latent_channels=16, block_out_channels=[32, 32], norm_num_groups=8)
    kl_keys = list(kl.state_dict())
    kl_keys += [k.replace("down_blocks", "downsamples") for k in kl_keys]
    assert not is_wan_vae(kl_keys)
    with pytest.raises(WanLayoutError, match=r"encoder\.middle\.0\.residual\.0\.gamma"):
        detect_wan_layout(kl_keys)
    with pytest.raises(WanLayoutError, match="mystery"):
        diffusers_to_official({**sd, "encoder.mid_block.mystery.weight": torch.zeros(1)})
    params = infer_wan_params(official, dict(ref.config))
    del official["decoder.head.2.bias"]
    with pytest.raises(WanLayoutError, match=r"decoder\.head\.2\.bias"):
        load_wan_vae(official, params)


@pytest.mark.parametrize(
    ("name", "config", "official_keys"),
    [
        (
            "WAN21_VAE",
            {},
            {
                "encoder.conv1.weight": (96, 3, 3, 3, 3),
                "encoder.downsamples.5.time_conv.weight": (192, 192, 3, 1, 1),
                "decoder.upsamples.3.time_conv.weight": (768, 384, 3, 1, 1),
                "decoder.upsamples.4.shortcut.weight": (384, 192, 1, 1, 1),
                "decoder.upsamples.11.resample.1.weight": (96, 192, 3, 3),
                "conv1.weight": (32, 32, 1, 1, 1),
            },
        ),
        (
            "WAN22_VAE",
            dict(
                base_dim=160,
                decoder_base_dim=256,
                z_dim=48,
                is_residual=True,
                in_channels=12,
                out_channels=12,
                patch_size=2,
                scale_factor_spatial=16,
                latents_mean=list(WAN22_VAE.latents_mean),
                latents_std=list(WAN22_VAE.latents_std),
            ),
            {
                "encoder.conv1.weight": (160, 12, 3, 3, 3),
                "encoder.downsamples.1.downsamples.2.time_conv.weight": (320, 320, 3, 1, 1),
                "decoder.upsamples.0.upsamples.3.time_conv.weight": (2048, 1024, 3, 1, 1),
                "decoder.upsamples.2.upsamples.0.shortcut.weight": (512, 1024, 1, 1, 1),
                "decoder.head.2.weight": (12, 256, 3, 3, 3),
            },
        ),
    ],
)
def test_presets_on_meta_match_diffusers_full_size(name: str, config: dict, official_keys: dict) -> None:
    with torch.device("meta"):
        ours = WanVAE(preset(name))
        ref = AutoencoderKLWan(**config)  # diffusers' defaults are Wan 2.1's
    mine = {k: tuple(v.shape) for k, v in ours.state_dict().items()}
    assert {k: tuple(v.shape) for k, v in diffusers_to_official(ref.state_dict()).items()} == mine
    assert {k: mine.get(k) for k in official_keys} == official_keys  # names and shapes of the released files
    assert infer_wan_params(ours.state_dict()) == preset(name)
    assert infer_wan_params(ref.state_dict(), dict(ref.config)) == preset(name)
    with pytest.raises(KeyError) as err:
        preset("WAN_NOPE")
    assert all(n in str(err.value) for n in PRESETS)


def test_chunked_equals_one_pass(hub) -> None:
    version, path, _ = hub
    vae = load_hub(Component(path, "AutoencoderKLWan", read_json(path / "config.json")), CPU)
    x, z = video(4, FRAMES, 2 * vae.factor), latents(5, vae.params.z_dim, 4, 2)
    enc = (vae.encode(x) - vae.encode(x, chunked=False)).abs().max().item()
    dec = (vae.decode(z) - vae.decode(z, chunked=False)).abs().max().item()
    print(f"\nWan {version} chunked vs one pass: encode {enc:.2e}, decode {dec:.2e}")
    assert enc <= TOL and dec <= TOL, (enc, dec)


def test_sampling_is_seeded_and_matches_diffusers(hub) -> None:
    _, path, ref = hub
    vae = load_hub(Component(path, "AutoencoderKLWan", read_json(path / "config.json")), CPU)
    x = video(6, 5, 2 * vae.factor)
    a = vae.encode(x, sample=True, generator=torch.Generator().manual_seed(42))
    b = vae.encode(x, sample=True, generator=torch.Generator().manual_seed(42))
    c = vae.encode(x, sample=True, generator=torch.Generator().manual_seed(43))
    mean, inv_std = stats(ref)
    with torch.no_grad():
        want = ref.encode(x).latent_dist.sample(generator=torch.Generator().manual_seed(42))
    assert torch.equal(a, b) and not torch.allclose(a, c)
    assert (a - (want - mean) * inv_std).abs().max().item() <= TOL


def test_an_image_is_a_one_frame_video(hub) -> None:
    _, path, _ = hub
    vae = load_hub(Component(path, "AutoencoderKLWan", read_json(path / "config.json")), CPU)
    x = video(7, 1, 2 * vae.factor)
    z = vae.encode(x[:, :, 0])
    assert z.ndim == 4 and torch.equal(z, vae.encode(x)[:, :, 0])
    assert torch.equal(vae.decode(z), vae.decode(z.unsqueeze(2))[:, :, 0])


def test_frame_and_size_rules_raise_invalid_argument(hub) -> None:
    _, path, _ = hub
    vae = load_hub(Component(path, "AutoencoderKLWan", read_json(path / "config.json")), CPU)
    f = vae.factor
    with pytest.raises(InvalidArgument, match=r"frames=8: .*4k\+1 frames \(e\.g\. 5 or 9\)"):
        vae.encode(torch.zeros(1, 3, 8, f, f))
    with pytest.raises(InvalidArgument, match=rf"'width': {f + f // 2}.*multiples of {f}"):
        vae.encode(torch.zeros(1, 3, 5, f, f + f // 2))  # 2.2: 24, a multiple of 8 but not of 16
    with pytest.raises(InvalidArgument, match=rf"'height': {2 * f - 4}"):
        vae.encode(torch.zeros(1, 3, 1, 2 * f - 4, f))
    with pytest.raises(InvalidArgument, match=r"\(B, 3, F, H, W\)"):
        vae.encode(torch.zeros(1, 4, 5, f, f))
    z_dim = vae.params.z_dim
    with pytest.raises(InvalidArgument, match=rf"\(B, {z_dim}, t, h, w\).*\[1, 4, 2, 2, 2\]"):
        vae.decode(torch.zeros(1, 4, 2, 2, 2))
    with pytest.raises(InvalidArgument, match="tile"):
        vae.decode(torch.zeros(1, z_dim, 1, 2, 2), tiling=type("T", (), {"tile": 64, "overlap": 64})())


def test_single_file_that_is_not_a_wan_vae_is_refused(tmp_path: Path) -> None:
    file = tmp_path / "other.safetensors"
    save_file({"encoder.conv_in.weight": torch.zeros(4, 3, 3, 3)}, str(file))
    with pytest.raises(InvalidArgument, match="not a Wan VAE"):
        load_single_file(file, CPU)
    (tmp_path / "config.json").write_text(json.dumps({"z_dim": 16}))
    ref = make_tiny_wan_vae("2.1")
    bad = {k: v for k, v in ref.state_dict().items() if k != "decoder.conv_out.bias"}
    save_file(bad, str(file))
    with pytest.raises(InvalidArgument, match=r"not a loadable Wan VAE.*decoder\.head\.2\.bias"):
        load_single_file(file, CPU)
