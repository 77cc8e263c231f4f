"""MemoryPlan parsing (names the bad value), storage casts (float8 only for Linear weight matrices), and
settings from the environment."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from services.common.errors import InvalidArgument
from services.common.memory import MemoryPlan, Residency, cast_state_dict
from services.common.settings import Settings


def test_parse_and_dtypes():
    assert MemoryPlan.parse() == MemoryPlan("resident", None)
    plan = MemoryPlan.parse("Sequential", "fp8")
    assert plan.mode == "sequential" and plan.weight_dtype == torch.float8_e4m3fn
    assert plan.compute_dtype(torch.float32) == torch.bfloat16
    assert MemoryPlan.parse("offload", "float16").compute_dtype(torch.float32) == torch.float16
    assert MemoryPlan().compute_dtype(torch.bfloat16) == torch.bfloat16
    with pytest.raises(InvalidArgument, match="'swap'"):
        MemoryPlan.parse("swap")
    with pytest.raises(InvalidArgument, match="'int4'"):
        MemoryPlan.parse("resident", "int4")


def test_float8_storage_keeps_vectors_in_the_compute_dtype():
    sd = {
        "a.weight": torch.randn(4, 4),
        "a.bias": torch.randn(4),
        "norm.scale": torch.randn(4),
        "ids": torch.arange(3),
    }
    out = cast_state_dict(sd, torch.float8_e4m3fn, torch.bfloat16)
    assert out["a.weight"].dtype == torch.float8_e4m3fn
    assert out["a.bias"].dtype == out["norm.scale"].dtype == torch.bfloat16
    assert out["ids"].dtype == torch.int64


def test_settings_from_env():
    s = Settings.from_env({"DIFFMESH_MEMORY_MODE": "offload", "DIFFMESH_WEIGHT_DTYPE": "bf16"})
    assert s.memory == MemoryPlan("offload", torch.bfloat16)
    with pytest.raises(InvalidArgument, match="'lots'"):
        Settings.from_env({"DIFFMESH_MEMORY_MODE": "lots"})


def test_offload_on_a_cpu_keeps_weights_in_place():
    model = nn.Linear(3, 3)
    before = model.weight.data_ptr()
    residency = Residency(model, torch.device("cpu"), MemoryPlan("offload"))
    with residency.active():
        assert model.weight.data_ptr() == before
    with pytest.raises(ValueError, match="needs a streamer"):
        Residency(model, torch.device("cpu"), MemoryPlan("sequential"))


def test_per_stage_overrides():
    s = Settings.from_env({"DIFFMESH_WEIGHT_DTYPE": "bf16", "DIFFMESH_DENOISER_MEMORY_MODE": "sequential"})
    assert s.memory_for("denoiser") == MemoryPlan("sequential", torch.bfloat16)
    assert s.memory_for("vae") == MemoryPlan("resident", torch.bfloat16)
    with pytest.raises(InvalidArgument, match="'f4'"):
        Settings.from_env({"DIFFMESH_VAE_WEIGHT_DTYPE": "f4"})
