"""Latent normalisation: our Wan VAE's latents are what diffusers' Wan pipelines hand to / take from the DiT.

Decode: WanPipeline runs its own `latents / latents_std + latents_mean` (latents_std = 1 / std) before
`vae.decode`; a step callback replaces the denoised latents with ours, so the video it returns is exactly the decode
of those normalised latents. Encode: WanImageToVideoPipeline.prepare_latents normalises the encoded condition video
with `(z - latents_mean) * latents_std`.
"""

from __future__ import annotations

import pytest
import torch
from diffusers import (
    FlowMatchEulerDiscreteScheduler,
    WanImageToVideoPipeline,
    WanPipeline,
    WanTransformer3DModel,
)
from tiny_wan_vae import VERSIONS, latents, make_tiny_wan_vae, video

from services.vae.convert.wan import infer_wan_params, load_wan_vae
from services.vae.wan import WanVae

TOL = 1e-4
TEXT_DIM, TEXT_TOKENS = 16, 4


def pair(version: str) -> tuple[WanVae, object]:
    ref = make_tiny_wan_vae(version, seed=5)
    ours = load_wan_vae(ref.state_dict(), infer_wan_params(ref.state_dict(), dict(ref.config)))
    return WanVae(ours, torch.device("cpu"), f"tiny-{version}"), ref


@pytest.mark.parametrize("version", VERSIONS)
def test_decode_matches_wan_pipeline(version: str) -> None:
    vae, ref = pair(version)
    z_dim = vae.params.z_dim
    torch.manual_seed(0)
    transformer = WanTransformer3DModel(
        patch_size=(1, 2, 2),
        num_attention_heads=2,
        attention_head_dim=8,
        in_channels=z_dim,
        out_channels=z_dim,
        text_dim=TEXT_DIM,
        freq_dim=16,
        ffn_dim=16,
        num_layers=1,
    ).eval()
    pipe = WanPipeline(
        tokenizer=None,
        text_encoder=None,
        vae=ref,
        scheduler=FlowMatchEulerDiscreteScheduler(),
        transformer=transformer,
    )
    pipe.set_progress_bar_config(disable=True)
    z = latents(8, z_dim, 2, 2)  # normalised, as the denoiser leaves them

    def use_ours(_pipe, _step, _t, kwargs):
        return {"latents": z.clone()}

    side = 2 * vae.factor
    out = pipe(
        prompt_embeds=torch.randn(1, TEXT_TOKENS, TEXT_DIM, generator=torch.Generator().manual_seed(1)),
        height=side,
        width=side,
        num_frames=5,
        num_inference_steps=1,
        guidance_scale=1.0,
        output_type="pt",
        callback_on_step_end=use_ours,
    ).frames  # (B, F, 3, H, W) in [0, 1]
    ours = (vae.decode(z) / 2 + 0.5).clamp(0, 1).permute(0, 2, 1, 3, 4)
    assert ours.shape == out.shape == (1, 5, 3, side, side)
    diff = (ours - out).abs().max().item()
    print(f"\nWan {version} decode vs WanPipeline: {diff:.2e}")
    assert diff <= TOL
    assert out.std() > 0.05  # a real picture, not a constant the clamp produced


@pytest.mark.parametrize("version", VERSIONS)
def test_encode_matches_wan_i2v_condition(version: str) -> None:
    vae, ref = pair(version)
    pipe = WanImageToVideoPipeline(
        tokenizer=None,
        text_encoder=None,
        vae=ref,
        scheduler=FlowMatchEulerDiscreteScheduler(),
        expand_timesteps=version == "2.2",  # TI2V 5B encodes the first frame alone
    )
    side, frames = 2 * vae.factor, 5
    image = video(9, 1, side)[:, :, 0]  # (1, 3, H, W)
    with torch.no_grad():
        prepared = pipe.prepare_latents(
            image, 1, vae.params.z_dim, side, side, frames, torch.float32, torch.device("cpu"), None, None
        )
    if version == "2.2":
        want = prepared[1]  # (1, z, 1, h, w)
        ours = vae.encode(image.unsqueeze(2))
    else:
        want = prepared[1][:, 4:]  # after the 4 mask channels: the encoded [image, zeros...] video
        condition = torch.cat([image.unsqueeze(2), image.new_zeros(1, 3, frames - 1, side, side)], dim=2)
        ours = vae.encode(condition)
    assert ours.shape == want.shape
    diff = (ours - want).abs().max().item()
    print(f"\nWan {version} encode vs WanImageToVideoPipeline condition: {diff:.2e}")
    assert diff <= TOL
