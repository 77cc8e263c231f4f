"""BFL -> diffusers VAE keys: the inverse of diffusers_to_bfl, checked against diffusers' own AutoencoderKL."""

from __future__ import annotations

import torch
from diffusers import AutoencoderKL

from services.vae.convert.flux import bfl_to_diffusers, diffusers_to_bfl

VAE = dict(
    down_block_types=["DownEncoderBlock2D"] * 4,
    up_block_types=["UpDecoderBlock2D"] * 4,
    block_out_channels=[8, 8, 16, 16],
    layers_per_block=1,
    latent_channels=16,
    norm_num_groups=4,
    use_quant_conv=False,
    use_post_quant_conv=False,
)


def test_bfl_to_diffusers_inverts_diffusers_to_bfl_exactly():
    torch.manual_seed(0)
    reference = AutoencoderKL(**VAE).state_dict()
    back = bfl_to_diffusers(diffusers_to_bfl(reference))
    assert back.keys() == reference.keys()
    for key, value in reference.items():
        assert back[key].shape == value.shape, key
        assert torch.equal(back[key], value), key
