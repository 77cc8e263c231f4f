"""FLUX.1 in the sampling loop: packing, ids, noise and schedule as FluxPipeline makes them; both checkpoint
layouts (hub `transformer/` and one BFL file) give the same latents; fp32 and bf16 load."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from diffusers import FluxPipeline, FluxTransformer2DModel
from safetensors.torch import save_file
from tiny_flux import TRANSFORMER

from services.common.errors import Cancelled, InvalidArgument
from services.common.models import find_component
from services.denoiser.adapters.flux import image_ids, pack, unpack
from services.denoiser.inputs import DenoiseInputs
from services.denoiser.registry import DENOISERS

CPU = torch.device("cpu")


def inputs(**kw) -> DenoiseInputs:
    g = torch.Generator().manual_seed(1)
    base = dict(
        seed=7,
        steps=3,
        width=64,
        height=48,
        num_frames=0,
        batch_size=1,
        guidance=3.5,
        cfg_scale=None,
        positive={
            "prompt_embeds": torch.randn(1, 5, 32, generator=g),
            "pooled_prompt_embeds": torch.randn(1, 32, generator=g),
        },
    )
    base.update(kw)
    return DenoiseInputs(**base)


@pytest.fixture(scope="module")
def transformer_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    torch.manual_seed(0)
    model = FluxTransformer2DModel(**TRANSFORMER, guidance_embeds=True)
    path = tmp_path_factory.mktemp("flux") / "transformer"
    model.save_pretrained(path)
    return path


def load(path: Path):
    component = find_component(path, ["transformer"])
    return DENOISERS[component.class_name](component, CPU)


def test_pack_unpack_and_ids_match_diffusers():
    latents = torch.randn(2, 16, 6, 8)
    packed = pack(latents)
    assert torch.equal(packed, FluxPipeline._pack_latents(latents, 2, 16, 6, 8))
    assert torch.equal(unpack(packed, 6, 8), latents)
    ids = FluxPipeline._prepare_latent_image_ids(2, 3, 4, CPU, torch.float32)
    assert torch.equal(image_ids(3, 4), ids)


def test_hub_and_single_file_layouts_give_the_same_latents(transformer_dir: Path, tmp_path: Path):
    hub = load(transformer_dir)
    out = hub.denoise(inputs(), lambda s, t: None, lambda: False)["latents"]
    assert out.shape == (1, 16, 6, 8)
    sd = {k: v.contiguous() for k, v in hub.model.state_dict().items()}  # our model: BFL names
    save_file({f"model.diffusion_model.{k}": v for k, v in sd.items()}, tmp_path / "flux1-tiny.safetensors")
    (tmp_path / "flux1-tiny.json").write_text('{"axes_dims_rope": [4, 4, 8]}')
    single = load(tmp_path / "flux1-tiny.safetensors")
    again = single.denoise(inputs(), lambda s, t: None, lambda: False)["latents"]
    torch.testing.assert_close(again, out, atol=1e-5, rtol=0)


def test_bf16_weights_run_in_bf16(transformer_dir: Path, tmp_path: Path):
    model = FluxTransformer2DModel.from_pretrained(transformer_dir, torch_dtype=torch.bfloat16)
    model.save_pretrained(tmp_path / "transformer")
    adapter = load(tmp_path / "transformer")
    assert adapter.dtype == torch.bfloat16
    fp32 = load(transformer_dir).denoise(inputs(), lambda s, t: None, lambda: False)["latents"]
    bf16 = adapter.denoise(inputs(), lambda s, t: None, lambda: False)["latents"]
    assert bf16.dtype == torch.float32 and (bf16 - fp32).abs().max() < 0.1


def test_steps_are_reported_and_cancel_stops_at_a_step_boundary(transformer_dir: Path):
    adapter = load(transformer_dir)
    seen: list[tuple[int, int]] = []
    adapter.denoise(inputs(), lambda s, t: seen.append((s, t)), lambda: False)
    assert seen == [(1, 3), (2, 3), (3, 3)]
    seen.clear()
    with pytest.raises(Cancelled, match="step 2 of 3"):
        adapter.denoise(inputs(), lambda s, t: seen.append((s, t)), lambda: len(seen) >= 2)
    assert len(seen) == 2


@pytest.mark.parametrize(
    ("kw", "needle"),
    [
        ({"width": 72}, "width=72"),
        ({"positive": {"prompt_embeds": torch.zeros(1, 4, 32)}}, "pooled_prompt_embeds"),
        (
            {"positive": {"prompt_embeds": torch.zeros(1, 4, 8), "pooled_prompt_embeds": torch.zeros(1, 32)}},
            "(B, L, 32)",
        ),
        ({"solver": "dpm++"}, "dpm++"),
        ({"sigmas": [1.0, 0.5]}, "2 values for steps=3"),
    ],
)
def test_bad_inputs_are_invalid_argument(transformer_dir: Path, kw, needle):
    with pytest.raises(InvalidArgument) as err:
        load(transformer_dir).denoise(inputs(**kw), lambda s, t: None, lambda: False)
    assert needle in str(err.value)


def test_unknown_single_file_names_the_keys(tmp_path: Path):
    save_file({"foo.weight": torch.zeros(2)}, tmp_path / "mystery.safetensors")
    with pytest.raises(InvalidArgument, match=r"foo\.weight"):
        load(tmp_path / "mystery.safetensors")
