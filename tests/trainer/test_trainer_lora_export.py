"""The trained LoRA's export is exact: a LoRA on every Linear of our FLUX DiT (fused qkv / linear1, the swapped
final adaLN, alpha != rank) saved in the diffusers layout gives the training forward's output through our
LoraManager (hot and fused) and through diffusers / peft's `load_lora_adapter`."""

from __future__ import annotations

import pytest
import torch
from diffusers import FluxTransformer2DModel
from safetensors.torch import save_file

from services.denoiser.convert.flux import diffusers_to_bfl, load_flux_state_dict
from services.denoiser.convert.flux_lora import flux_lora_deltas
from services.denoiser.lora import LoraManager
from services.denoiser.models.flux import Flux
from trainer.lora import DEFAULT_TARGETS, TrainableLora, lora_metadata, select_targets, to_diffusers
from trainer.spec import SpecError

CONFIG = dict(
    patch_size=1,
    in_channels=64,
    num_layers=1,
    num_single_layers=1,
    attention_head_dim=16,
    num_attention_heads=2,
    joint_attention_dim=40,
    pooled_projection_dim=24,
    axes_dims_rope=[4, 4, 8],
    guidance_embeds=True,
)


@pytest.fixture(scope="module")
def models() -> tuple[FluxTransformer2DModel, Flux]:
    torch.manual_seed(0)
    theirs = FluxTransformer2DModel(**CONFIG).eval()
    for p in theirs.parameters():
        p.data.normal_(0, 0.2)
    params, sd = load_flux_state_dict(diffusers_to_bfl(theirs.state_dict()), axes_dim=(4, 4, 8))
    ours = Flux(params).eval()
    ours.load_state_dict(sd)
    return theirs, ours


def inputs() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    ids = torch.stack(torch.meshgrid(torch.zeros(1), torch.arange(4.0), torch.arange(4.0), indexing="ij"), -1)
    return {
        "img": torch.randn(1, 16, 64, generator=g),
        "txt": torch.randn(1, 6, 40, generator=g),
        "y": torch.randn(1, 24, generator=g),
        "img_ids": ids.reshape(16, 3),
        "txt_ids": torch.zeros(6, 3),
        "t": torch.tensor([0.6]),
        "guidance": torch.tensor([2.0]),
    }


def run_ours(model: Flux, x: dict[str, torch.Tensor]) -> torch.Tensor:
    with torch.no_grad():
        return model(x["img"], x["img_ids"], x["txt"], x["txt_ids"], x["t"], x["y"], guidance=x["guidance"])


def run_theirs(model: FluxTransformer2DModel, x: dict[str, torch.Tensor]) -> torch.Tensor:
    with torch.no_grad():
        return model(
            hidden_states=x["img"],
            encoder_hidden_states=x["txt"],
            pooled_projections=x["y"],
            timestep=x["t"],
            img_ids=x["img_ids"],
            txt_ids=x["txt_ids"],
            guidance=x["guidance"],
        ).sample


def test_export_of_a_lora_on_every_linear_is_exact(models, tmp_path):
    theirs, ours = models
    x = inputs()
    targets = select_targets(ours, [".*"])
    assert "final_layer.adaLN_modulation.1" in targets and "single_blocks.0.linear1" in targets
    lora = TrainableLora(ours, targets, rank=3, alpha=6.0, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        for up in lora.up:
            up.normal_(0, 0.3)
    base = run_ours(ours, x)
    lora.attach()
    expected = run_ours(ours, x)
    lora.detach()
    assert (expected - base).abs().max() > 1e-2

    state = to_diffusers(lora)
    assert "transformer.norm_out.linear.lora_B.weight" in state
    path = tmp_path / "lora.safetensors"
    save_file(state, path, metadata=lora_metadata(lora, state, {"steps": 1}))

    manager = LoraManager(ours, convert=flux_lora_deltas)
    try:
        for mode in ("hot", "fused"):
            with manager.apply([(path, 1.0)], mode):
                torch.testing.assert_close(run_ours(ours, x), expected, atol=1e-5, rtol=1e-5)
    finally:
        manager.close()
    torch.testing.assert_close(run_ours(ours, x), base)

    theirs.load_lora_adapter(str(tmp_path), weight_name=path.name, prefix="transformer", adapter_name="t")
    try:
        torch.testing.assert_close(run_theirs(theirs, x), expected, atol=1e-5, rtol=1e-5)
    finally:
        theirs.delete_adapters("t")


def test_target_selection(models):
    _, ours = models
    default = select_targets(ours, [])
    assert default == select_targets(ours, list(DEFAULT_TARGETS))
    assert "double_blocks.0.img_attn.qkv" in default and "single_blocks.0.linear2" in default
    assert "double_blocks.0.img_mod.lin" not in default
    # a diffusers projection selects the fused module that holds it
    assert select_targets(ours, ["attn.to_q"]) == ["double_blocks.0.img_attn.qkv", "single_blocks.0.linear1"]
    assert select_targets(ours, ["img_attn.proj"]) == ["double_blocks.0.img_attn.proj"]
    with pytest.raises(SpecError, match=r"lora.targetModules: 'nothing_here' matches no Linear"):
        select_targets(ours, ["nothing_here"])
    with pytest.raises(SpecError, match=r"lora.targetModules: '\(' is not a valid regular expression"):
        select_targets(ours, ["("])
