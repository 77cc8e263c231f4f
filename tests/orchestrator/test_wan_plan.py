"""The Wan family's plan: defaults (2.1 and the TI2V 5B geometry), tasks told from the inputs and checked
against the model, the 4k+1 frame and size rules, CFG on both experts, and clear refusals, all before any
stage runs."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from orchestrator.errors import StageError
from orchestrator.families import detect, wan
from protos import orchestrator_pb2


def request(**kw) -> orchestrator_pb2.GenerateRequest:
    return orchestrator_pb2.GenerateRequest(model="m", prompt="a cat surfing", seed=1, **kw)


def model_dir(tmp_path: Path, in_channels: int = 16) -> Path:
    (tmp_path / "transformer").mkdir(parents=True)
    (tmp_path / "transformer" / "config.json").write_text(json.dumps({"in_channels": in_channels}))
    (tmp_path / "model_index.json").write_text(json.dumps({"_class_name": "WanPipeline"}))
    return tmp_path


def test_defaults_and_graph(tmp_path: Path):
    path = model_dir(tmp_path)
    assert detect(path).name == "wan"
    plan = wan.plan(request(), path)
    p = plan.params
    assert (p.width, p.height, p.num_frames, p.steps, p.cfg_scale, p.fps) == (832, 480, 81, 50, 5.0, 16.0)
    assert [s.name for s in plan.graph.stages] == ["encode_prompt", "encode_negative", "denoise", "decode"]
    assert plan.values["negative_prompt"] == ""  # the unconditional pass encodes the empty prompt
    unguided = wan.plan(request(cfg_scale=1.0), path)
    assert [s.name for s in unguided.graph.stages] == ["encode_prompt", "denoise", "decode"]
    assert wan.plan(
        request(cfg_scale=4.0, cfg_scale_2=1.0), path
    ).params.guided  # the low-noise expert unguided


def test_ti2v_geometry(tmp_path: Path):
    p = wan.plan(request(), model_dir(tmp_path, in_channels=48)).params
    assert (p.width, p.height, p.num_frames, p.fps) == (1280, 704, 121, 24.0)
    with pytest.raises(StageError, match="width=1264 must be a multiple of 32"):
        wan.plan(request(width=1264), tmp_path)


@pytest.mark.parametrize(
    ("kw", "needle"),
    [
        ({"num_frames": 80}, r"num_frames=80: Wan takes 4k\+1 frames \(e.g. 77 or 81\)"),
        ({"width": 840}, "width=840 must be a multiple of 16"),
        ({"task": "i2v"}, "task i2v needs exactly one input image"),
        ({"input_images": [{"data": b"x"}]}, "task i2v: the model's transformer takes 16 input channels"),
        ({"task": "flf2v", "input_images": [{"data": b"x"}]}, "task flf2v needs a last image"),
        ({"task": "v2v"}, "task v2v needs an input video"),
        ({"strength": 0.5}, "strength is for task v2v"),
        ({"input_video": {"data": b"not a video"}}, "input_video: not a readable video"),
        ({"task": "t2i"}, "Wan runs"),
        ({"prompt": " "}, "prompt is empty"),
        ({"sampler": {"solver": "ddim"}}, "sampler.solver 'ddim'"),
        ({"max_sequence_length": 600}, "max_sequence_length=600"),
        ({"cfg_scale": 1.0, "cfg_scale_2": 3.0}, "cfg_scale_2=3.0 needs cfg_scale > 1"),
        ({"guidance": 3.5}, "guidance is set, but Wan does not use it"),
        ({"sampler": {"sigmas": [1.0, 0.5]}}, "sampler.sigmas is set, but Wan does not use it"),
        ({"batch_size": 2}, "batch_size=2: Wan makes one video per request"),
    ],
)
def test_bad_requests_are_invalid_argument(tmp_path: Path, kw, needle):
    req = request(**{k: v for k, v in kw.items() if k != "prompt"})
    if "prompt" in kw:
        req.prompt = kw["prompt"]
    with pytest.raises(StageError, match=needle) as err:
        wan.plan(req, model_dir(tmp_path))
    assert err.value.code.name == "INVALID_ARGUMENT"


def test_tasks_from_inputs_and_model(tmp_path: Path):
    i2v = model_dir(tmp_path / "i2v", in_channels=36)
    image = {"data": b"png"}
    p = wan.plan(request(input_images=[image]), i2v)
    assert p.params.task == "i2v" and [s.name for s in p.graph.stages][-3:] == [
        "encode_condition",
        "denoise",
        "decode",
    ]
    flf = wan.plan(request(input_images=[image], last_image=image), i2v)
    assert flf.params.task == "flf2v" and "last_image" in flf.values
    ti2v = model_dir(tmp_path / "ti2v", in_channels=48)
    assert wan.plan(request(input_images=[image]), ti2v).params.task == "ti2v"
    assert wan.plan(request(task="i2v", input_images=[image]), ti2v).params.task == "ti2v"
    assert wan.plan(request(), ti2v).params.task == "t2v"
    with pytest.raises(StageError, match="task t2v: the model's transformer takes 36 input channels"):
        wan.plan(request(), i2v)
