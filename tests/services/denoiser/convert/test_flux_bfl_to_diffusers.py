"""BFL -> diffusers FLUX.1 keys (`bfl_to_diffusers`), the inverse of `diffusers_to_bfl`: an exact round trip both
ways, a result diffusers' `FluxTransformer2DModel` loads strictly and runs like ours, and unknown keys refused."""

from __future__ import annotations

import pytest
import torch
from diffusers import FluxTransformer2DModel

from services.denoiser.convert.flux import CheckpointLayoutError, bfl_to_diffusers, diffusers_to_bfl
from services.denoiser.models.flux import Flux, FluxParams

CONFIG = dict(
    patch_size=1,
    in_channels=64,
    num_layers=2,
    num_single_layers=2,
    attention_head_dim=16,
    num_attention_heads=2,
    joint_attention_dim=40,
    pooled_projection_dim=24,
    axes_dims_rope=[4, 4, 8],
)
PARAMS = FluxParams(
    in_channels=64,
    out_channels=64,
    vec_in_dim=24,
    context_in_dim=40,
    hidden_size=32,
    mlp_ratio=4.0,
    num_heads=2,
    depth=2,
    depth_single_blocks=2,
    axes_dim=(4, 4, 8),
    theta=10_000,
    qkv_bias=True,
    guidance_embed=True,
)


def _equal(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


@pytest.mark.parametrize("guidance", [True, False])
def test_round_trip_from_diffusers_is_exact(guidance):
    torch.manual_seed(0)
    sd = FluxTransformer2DModel(**CONFIG, guidance_embeds=guidance).state_dict()
    _equal(bfl_to_diffusers(diffusers_to_bfl(sd)), sd)


def test_round_trip_from_bfl_is_exact():
    torch.manual_seed(1)
    sd = Flux(PARAMS).state_dict()
    _equal(diffusers_to_bfl(bfl_to_diffusers(sd)), sd)


def test_diffusers_loads_the_result_and_runs_like_ours():
    torch.manual_seed(2)
    ours = Flux(PARAMS).eval()
    for (
        p
    ) in ours.parameters():  # adaLN / output layers start at zero in neither model; make every weight count
        p.data.normal_(0, 0.2)
    theirs = FluxTransformer2DModel(**CONFIG, guidance_embeds=True).eval()
    theirs.load_state_dict(bfl_to_diffusers(ours.state_dict()), strict=True)
    g = torch.Generator().manual_seed(3)
    img, txt = torch.randn(1, 16, 64, generator=g), torch.randn(1, 5, 40, generator=g)
    y, t = torch.randn(1, 24, generator=g), torch.tensor([0.7])
    img_ids = torch.stack(
        torch.meshgrid(torch.zeros(1), torch.arange(4.0), torch.arange(4.0), indexing="ij"), -1
    )
    img_ids = img_ids.reshape(16, 3)
    txt_ids = torch.zeros(5, 3)
    with torch.no_grad():
        expected = ours(img, img_ids, txt, txt_ids, t, y, guidance=torch.tensor([3.5]))
        got = theirs(
            hidden_states=img,
            encoder_hidden_states=txt,
            pooled_projections=y,
            timestep=t,
            img_ids=img_ids,
            txt_ids=txt_ids,
            guidance=torch.tensor([3.5]),
        ).sample
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


def test_unknown_bfl_keys_are_refused():
    sd = Flux(PARAMS).state_dict()
    sd["double_blocks.0.img_attn.mystery.weight"] = torch.zeros(1)
    with pytest.raises(CheckpointLayoutError, match=r"mystery"):
        bfl_to_diffusers(sd, source="x.safetensors")
    with pytest.raises(CheckpointLayoutError, match=r"img_in\.weight"):
        bfl_to_diffusers({"txt_in.weight": torch.zeros(2, 2)})
