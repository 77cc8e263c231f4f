"""Training from nothing: the VAE component from random init (a folder diffusers and our loader both read, with
equal decodes), the denoiser with `init: random` and caption dropout, and the shapes recipe's skeleton folder."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from diffusers import AutoencoderKL, FluxPipeline
from google.protobuf import json_format
from tiny_dataset import spec

from services.common.models import find_component
from services.vae.autoencoder_kl import load_hub as load_vae
from trainer.job import TRANSFORMER_FOLDER, VAE_FOLDER, train
from trainer.recipes.skeleton import Sizes, write_skeleton
from trainer.spec import TrainSpec


def _spec(doc: dict) -> TrainSpec:
    return json_format.ParseDict(doc, TrainSpec())


def test_vae_trains_from_random_init_and_both_loaders_decode_alike(tiny_model, dataset, work_env, tmp_path):
    model, _ = tiny_model
    out = tmp_path / "vae"
    doc = spec(model, dataset, out, mode="FULL", lora={}, steps=3, learningRate=1e-3)
    doc.update(component="vae", init="random", checkpointEvery=2, resolution=64)
    result = train(_spec(doc), env=work_env)
    assert result.artifacts == [VAE_FOLDER] and result.steps == 3
    config = json.loads((out / VAE_FOLDER / "config.json").read_text())
    assert config["_class_name"] == "AutoencoderKL" and config["latent_channels"] == 16
    assert config["use_quant_conv"] is False and config["scaling_factor"] > 0

    theirs = AutoencoderKL.from_pretrained(out / VAE_FOLDER).eval()
    ours = load_vae(find_component(out, [VAE_FOLDER]), torch.device("cpu"))
    assert ours.model.params.scale_factor == pytest.approx(config["scaling_factor"])
    z = torch.randn(1, 16, 4, 4, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = theirs.decode(z / theirs.config.scaling_factor + theirs.config.shift_factor).sample
    torch.testing.assert_close(ours.decode(z), expected, atol=1e-5, rtol=1e-5)


def test_denoiser_from_random_init_with_caption_dropout(tiny_model, dataset, work_env, tmp_path):
    model, _ = tiny_model
    base = tmp_path / "base"
    shutil.copytree(model, base, ignore=shutil.ignore_patterns("diffusion_pytorch_model.safetensors"))
    shutil.copytree(model / "vae", base / "vae", dirs_exist_ok=True)  # the VAE keeps its weights
    out = tmp_path / "dit"
    doc = spec(base, dataset, out, mode="FULL", lora={}, steps=3, learningRate=1e-3)
    doc.update(init="random", captionDropout=0.5)
    result = train(_spec(doc), env=work_env)
    assert result.artifacts == [TRANSFORMER_FOLDER]
    assert all(torch.isfinite(torch.tensor(result.losses)))
    weights = out / TRANSFORMER_FOLDER / "diffusion_pytorch_model.safetensors"
    assert weights.is_file()


def test_skeleton_is_a_folder_flux_pipeline_accepts(tmp_path):
    sizes = Sizes(vae_widths=(32, 32, 32, 32), heads=2, head_dim=16, axes_dims_rope=(4, 6, 6))
    folder = write_skeleton(tmp_path / "skeleton", sizes=sizes)
    # fill the two trained components with random weights, as the trainer would
    from diffusers import FluxTransformer2DModel

    cfg = json.loads((folder / "transformer" / "config.json").read_text())
    FluxTransformer2DModel.from_config(cfg).save_pretrained(folder / "transformer")
    AutoencoderKL.from_config(json.loads((folder / "vae" / "config.json").read_text())).save_pretrained(
        folder / "vae"
    )
    pipe = FluxPipeline.from_pretrained(folder)
    assert pipe.transformer.config.joint_attention_dim == pipe.text_encoder_2.config.d_model
    assert pipe.transformer.config.pooled_projection_dim == pipe.text_encoder.config.hidden_size
    assert pipe.tokenizer_2("a pink cross on a grey background").input_ids[:-1] == [
        pipe.tokenizer_2.convert_tokens_to_ids(f"▁{w}")
        for w in ["a", "pink", "cross", "on", "a", "grey", "background"]
    ]
    defaults = json.loads((folder / "diffmesh.json").read_text())["defaults"]
    assert defaults["width"] == defaults["height"] == 64
