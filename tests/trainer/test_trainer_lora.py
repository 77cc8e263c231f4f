"""LoRA training end to end on a tiny FLUX.1: the loss goes down, the saved file is in the diffusers / peft layout
with our metadata, loads in diffusers' `load_lora_weights`, and changes our engine's image exactly as it changes
diffusers' (PSNR >= 40 dB)."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import FluxPipeline
from google.protobuf import json_format
from PIL import Image
from safetensors import safe_open
from tiny_dataset import spec
from tiny_flux import psnr, to_uint8

from orchestrator.local import in_process_orchestrator
from protos import common_pb2, orchestrator_pb2
from services.common.settings import Settings
from trainer.job import LORA_FILE, train
from trainer.spec import TrainSpec
from trainer.status import STATUS_FILE

PROMPT = "a red circle on a grey background"
STEPS = 60


def as_spec(doc: dict) -> TrainSpec:
    return json_format.ParseDict(doc, TrainSpec())


@pytest.fixture(scope="module")
def trained(tiny_model, dataset, work_env, tmp_path_factory) -> tuple[Path, object]:
    model, _ = tiny_model
    out = tmp_path_factory.mktemp("lora-run")
    doc = spec(model, dataset, out, steps=STEPS, learningRate=5e-3, batchSize=4, lora={"rank": 4, "alpha": 8})
    return out, train(as_spec(doc), env=work_env)


def test_training_lowers_the_loss(trained):
    _, result = trained
    first, last = np.mean(result.losses[:5]), np.mean(result.losses[-5:])
    assert len(result.losses) == STEPS
    assert last < first - 0.1, (first, last)


def test_the_file_is_in_the_diffusers_layout_with_our_metadata(trained, tiny_model):
    out, _ = trained
    with safe_open(out / LORA_FILE, framework="pt") as f:
        keys, meta = list(f.keys()), f.metadata()
    assert keys and all(k.startswith("transformer.") for k in keys)
    assert all(k.endswith((".lora_A.weight", ".lora_B.weight")) and ".default" not in k for k in keys)
    assert "transformer.transformer_blocks.0.attn.to_k.lora_B.weight" in keys
    assert "transformer.single_transformer_blocks.0.proj_mlp.lora_A.weight" in keys
    peft = json.loads(meta["lora_adapter_metadata"])
    assert peft["transformer.r"] == 4 and peft["transformer.lora_alpha"] == 4  # alpha / r folded into lora_B
    assert "transformer_blocks.0.attn.to_q" in peft["transformer.target_modules"]
    ours = json.loads(meta["diffmesh"])
    assert ours["base_model"] == str(tiny_model[0]) and ours["family"] == "flux"
    assert (ours["rank"], ours["alpha"], ours["steps"], ours["seed"]) == (4, 8.0, STEPS, 7)
    status = json.loads((out / STATUS_FILE).read_text())
    assert status["state"] == "succeeded" and status["step"] == STEPS and status["artifacts"] == [LORA_FILE]


def _request(model: Path, lora: Path | None) -> orchestrator_pb2.GenerateRequest:
    loras = [common_pb2.LoraSpec(spec=str(lora), scale=1.0)] if lora else []
    return orchestrator_pb2.GenerateRequest(
        model=str(model), prompt=PROMPT, seed=3, steps=4, width=64, height=64, guidance=3.5, loras=loras
    )


def _ours(engine, req) -> np.ndarray:
    result = engine.generate(req, lambda e: None)
    return np.asarray(Image.open(io.BytesIO(result.images[0])).convert("RGB"))


def test_the_lora_loads_in_diffusers_and_our_engine_and_they_agree(trained, tiny_model, tmp_path):
    out, _ = trained
    model, _ = tiny_model
    settings = Settings.from_env({"DIFFMESH_STORE": "local", "DIFFMESH_LOCAL_STORE": str(tmp_path / "store")})
    engine = in_process_orchestrator(settings)
    base = _ours(engine, _request(model, None))
    with_lora = _ours(engine, _request(model, out / LORA_FILE))

    pipe = FluxPipeline.from_pretrained(model)
    pipe.load_lora_weights(str(out))  # finds pytorch_lora_weights.safetensors in the folder, as saved
    reference = pipe(
        prompt=PROMPT,
        num_inference_steps=4,
        width=64,
        height=64,
        guidance_scale=3.5,
        generator=torch.Generator("cpu").manual_seed(3),
        output_type="np",
    ).images
    expected = to_uint8(reference)[0]
    assert psnr(base, with_lora) < 35.0  # the trained LoRA changes the image
    assert psnr(with_lora, expected) >= 40.0
