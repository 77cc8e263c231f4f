"""FLUX.1 end to end: our engine on a tiny saved FluxPipeline gives diffusers' image for the same inputs,
in-process and through `diffmesh up`'s services (a real S3 server, real gRPC servers)."""

from __future__ import annotations

import io
import json
import shutil
import threading
from pathlib import Path

import grpc
import numpy as np
import pytest
import torch
from diffusers import FluxImg2ImgPipeline
from diffusers.pipelines.flux import pipeline_flux_img2img
from PIL import Image
from tiny_flux import psnr, to_uint8

from orchestrator.errors import StageError
from orchestrator.local import in_process_orchestrator
from orchestrator.pngtext import PARAMETERS_KEY, read_text
from protos import common_pb2, orchestrator_pb2, orchestrator_pb2_grpc
from services.common.settings import Settings

PROMPT = "a red circle on a white background"
NEGATIVE = "blurry, low quality"
MIN_PSNR = 40.0


def request(model: Path | str, **kw) -> orchestrator_pb2.GenerateRequest:
    base = dict(model=str(model), prompt=PROMPT, seed=42, steps=3, width=64, height=48, guidance=3.5)
    base.update(kw)
    return orchestrator_pb2.GenerateRequest(**base)


def png_array(png: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(png)).convert("RGB"))


def run(engine, req) -> tuple[orchestrator_pb2.GenerateResult, list]:
    events: list = []
    return engine.generate(req, events.append), events


def reference(pipe, **kw) -> np.ndarray:
    args = dict(prompt=PROMPT, num_inference_steps=3, width=64, height=48, guidance_scale=3.5, seed=42)
    args.update(kw)
    seed = args.pop("seed")
    out = pipe(**args, generator=torch.Generator("cpu").manual_seed(seed), output_type="np").images
    return to_uint8(out)


def test_t2i_matches_diffusers_in_process(flux_dir, engine):
    path, pipe = flux_dir
    result, events = run(engine, request(path))
    ours = png_array(result.images[0])
    ref = reference(pipe)[0]
    assert ours.shape == (48, 64, 3)
    assert psnr(ours, ref) >= MIN_PSNR
    kinds = [e.WhichOneof("event") for e in events]
    assert [e.progress.step for e in events if e.HasField("progress")] == [1, 2, 3]
    assert kinds.count("stage") == 6  # started + finished for encode_prompt, denoise, decode
    params = json.loads(read_text(result.images[0])[PARAMETERS_KEY])
    assert params["seed"] == 42 and params["steps"] == 3 and params["prompt"] == PROMPT
    assert result.seed == 42 and len(result.outputs) == 1  # the decoded pixels' ref


@pytest.mark.parametrize("negative", [NEGATIVE, ""])
def test_true_cfg_and_batch_match_diffusers(flux_dir, engine, negative):
    path, pipe = flux_dir
    result, _ = run(engine, request(path, negative_prompt=negative, cfg_scale=4.0, batch_size=2))
    ref = reference(pipe, negative_prompt=negative, true_cfg_scale=4.0, num_images_per_prompt=2)
    assert len(result.images) == 2
    for png, expected in zip(result.images, ref, strict=True):
        assert psnr(png_array(png), expected) >= MIN_PSNR


def test_img2img_matches_diffusers(flux_dir, engine, monkeypatch):
    path, pipe = flux_dir
    rng = np.random.default_rng(0)
    init = Image.fromarray(rng.integers(0, 256, (48, 64, 3), dtype=np.uint8))
    buf = io.BytesIO()
    init.save(buf, format="PNG")
    req = request(path, input_images=[common_pb2.Media(data=buf.getvalue())], strength=0.7, steps=4)
    result, _ = run(engine, req)
    # We encode the init image by the posterior mean; diffusers samples it with the request's generator.
    original = pipeline_flux_img2img.retrieve_latents
    monkeypatch.setattr(
        pipeline_flux_img2img,
        "retrieve_latents",
        lambda enc, generator=None, sample_mode="sample": original(enc, generator, "argmax"),
    )
    i2i = FluxImg2ImgPipeline(**pipe.components)
    ref = reference(i2i, image=init, strength=0.7, num_inference_steps=4)[0]
    assert psnr(png_array(result.images[0]), ref) >= MIN_PSNR


@pytest.mark.parametrize(
    ("kw", "code", "needle"),
    [
        ({"width": 100}, grpc.StatusCode.INVALID_ARGUMENT, "width=100"),
        ({"steps": 0}, grpc.StatusCode.INVALID_ARGUMENT, "steps=0"),
        ({"steps": 100000}, grpc.StatusCode.INVALID_ARGUMENT, "steps=100000"),
        ({"guidance": 1000.0}, grpc.StatusCode.INVALID_ARGUMENT, "guidance=1000"),
        ({"prompt": "x" * 20001}, grpc.StatusCode.INVALID_ARGUMENT, "20001 characters"),
        ({"strength": 0.5}, grpc.StatusCode.INVALID_ARGUMENT, "strength"),
        ({"task": "t2v"}, grpc.StatusCode.INVALID_ARGUMENT, "t2v"),
    ],
)
def test_bad_requests_name_the_value(flux_dir, engine, kw, code, needle):
    path, _ = flux_dir
    with pytest.raises(StageError) as err:
        run(engine, request(path, **kw))
    assert err.value.code == code
    assert needle in str(err.value)


def test_missing_and_partial_models_are_not_found(flux_dir, engine, tmp_path):
    path, _ = flux_dir
    with pytest.raises(StageError) as err:
        run(engine, request(tmp_path / "nope", family="flux"))
    assert err.value.code == grpc.StatusCode.NOT_FOUND
    partial = tmp_path / "partial"
    partial.mkdir()
    (partial / "model_index.json").write_text((path / "model_index.json").read_text())
    for sub in ("text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2"):
        (partial / sub).symlink_to(path / sub)
    with pytest.raises(StageError) as err:
        run(engine, request(partial))
    assert err.value.code == grpc.StatusCode.NOT_FOUND
    assert "transformer" in str(err.value)


def test_cancel_stops_within_one_step(flux_dir, engine):
    path, _ = flux_dir
    cancelled = threading.Event()
    steps: list[int] = []

    def emit(event):
        if event.HasField("progress"):
            steps.append(event.progress.step)
            cancelled.set()

    with pytest.raises(StageError) as err:
        engine.generate(request(path, steps=50), emit, cancelled)
    assert err.value.code == grpc.StatusCode.CANCELLED
    assert len(steps) <= 2


def test_through_services_equals_in_process(flux_dir, engine, stack):
    path, _ = flux_dir
    local, _ = run(engine, request(path))
    with grpc.insecure_channel(stack.endpoints["orchestrator"]) as channel:
        stub = orchestrator_pb2_grpc.OrchestratorStub(channel)
        md = [("authorization", f"Bearer {stack.data['token']}")]
        events = list(stub.Generate(request(path), metadata=md, timeout=120))
    result = events[-1].result
    assert np.array_equal(png_array(result.images[0]), png_array(local.images[0]))
    assert result.outputs[0].uri.startswith("s3://")
    assert [e.progress.step for e in events if e.HasField("progress")] == [1, 2, 3]


def test_hub_spec_from_a_prefilled_cache(flux_dir, tmp_path):
    path, _ = flux_dir
    cache = tmp_path / "cache"
    shutil.copytree(path, cache / "hf" / "test--tiny-flux" / "main")
    env = {
        "DIFFMESH_STORE": "local",
        "DIFFMESH_LOCAL_STORE": str(tmp_path / "store"),
        "DIFFMESH_CACHE_DIR": str(cache),
        "DIFFMESH_OFFLINE": "1",
    }
    hub_engine = in_process_orchestrator(Settings.from_env(env))
    result, _ = run(hub_engine, request("hf://test/tiny-flux"))
    local, _ = run(hub_engine, request(path))
    assert np.array_equal(png_array(result.images[0]), png_array(local.images[0]))
    with pytest.raises(StageError) as err:
        run(hub_engine, request("modelscope://test/absent@v1", family="flux"))
    assert err.value.code == grpc.StatusCode.NOT_FOUND
    assert str(cache / "modelscope" / "test--absent" / "v1") in str(err.value)
