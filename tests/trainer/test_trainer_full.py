"""Full fine-tuning (`mode: FULL`): a few steps change the weights, and the saved `transformer/` folder (diffusers
keys) loads in diffusers' `FluxTransformer2DModel.from_pretrained` and in our loader, which agree."""

from __future__ import annotations

import pytest
import torch
from diffusers import FluxTransformer2DModel
from google.protobuf import json_format
from tiny_dataset import spec

from services.common.models import find_component
from services.denoiser.adapters.flux import load_hub
from trainer.job import TRANSFORMER_FOLDER, train
from trainer.spec import TrainSpec


@pytest.mark.filterwarnings("ignore:Mismatch dtype between input and weight")
def test_full_fine_tune_saves_a_transformer_both_loaders_read(tiny_model, dataset, work_env, tmp_path):
    model, _ = tiny_model
    out = tmp_path / "full"
    doc = spec(model, dataset, out, mode="FULL", lora={}, steps=3, learningRate=1e-3, mixedPrecision="bf16")
    result = train(json_format.ParseDict(doc, TrainSpec()), env=work_env)
    assert result.artifacts == [TRANSFORMER_FOLDER]

    theirs = FluxTransformer2DModel.from_pretrained(out / TRANSFORMER_FOLDER).eval()
    base = FluxTransformer2DModel.from_pretrained(model / "transformer").eval()
    ours = load_hub(find_component(out, [TRANSFORMER_FOLDER]), torch.device("cpu")).model
    changed = [k for k, v in theirs.state_dict().items() if not torch.equal(v, base.state_dict()[k])]
    assert len(changed) > len(base.state_dict()) // 2

    g = torch.Generator().manual_seed(0)
    img, txt, y = (
        torch.randn(1, 16, 64, generator=g),
        torch.randn(1, 7, 32, generator=g),
        torch.randn(1, 32, generator=g),
    )
    ids = torch.stack(torch.meshgrid(torch.zeros(1), torch.arange(4.0), torch.arange(4.0), indexing="ij"), -1)
    ids, txt_ids, t, guidance = (
        ids.reshape(16, 3),
        torch.zeros(7, 3),
        torch.tensor([0.5]),
        torch.tensor([3.5]),
    )
    with torch.no_grad():
        expected = theirs(
            hidden_states=img,
            encoder_hidden_states=txt,
            pooled_projections=y,
            timestep=t,
            img_ids=ids,
            txt_ids=txt_ids,
            guidance=guidance,
        ).sample
        got = ours(img, ids, txt, txt_ids, t, y, guidance=guidance)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
