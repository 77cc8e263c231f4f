"""Memory modes through the whole in-process engine (every service set by the same environment): offload and
sequential give resident's image pixel for pixel; bfloat16 weights stay close to it; a mode a loader cannot
honour is refused with FAILED_PRECONDITION naming the setting."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image
from tiny_flux import psnr

from orchestrator.errors import StageError
from orchestrator.local import in_process_orchestrator
from protos import orchestrator_pb2
from services.common.settings import Settings


def generate(path, tmp_path, **env) -> np.ndarray:
    settings = Settings.from_env({"DIFFMESH_STORE": "local", "DIFFMESH_LOCAL_STORE": str(tmp_path), **env})
    engine = in_process_orchestrator(settings)
    req = orchestrator_pb2.GenerateRequest(
        model=str(path), prompt="a red circle", seed=5, steps=3, width=64, height=48, guidance=3.5
    )
    result = engine.generate(req, lambda e: None)
    return np.asarray(Image.open(io.BytesIO(result.images[0])).convert("RGB"))


@pytest.fixture(scope="module")
def resident(flux_dir, tmp_path_factory) -> np.ndarray:
    return generate(flux_dir[0], tmp_path_factory.mktemp("store"))


@pytest.mark.parametrize(
    "env",
    [
        {"DIFFMESH_MEMORY_MODE": "offload"},
        {"DIFFMESH_DENOISER_MEMORY_MODE": "sequential"},
        {"DIFFMESH_MEMORY_MODE": "offload", "DIFFMESH_DENOISER_MEMORY_MODE": "sequential"},
    ],
)
def test_modes_give_the_resident_image(flux_dir, resident, tmp_path, env):
    assert np.array_equal(generate(flux_dir[0], tmp_path, **env), resident)


def test_sequential_is_the_denoisers_alone(flux_dir, tmp_path):
    with pytest.raises(StageError, match="DIFFMESH_TEXT_ENCODER_MEMORY_MODE") as err:
        generate(flux_dir[0], tmp_path, DIFFMESH_MEMORY_MODE="sequential")
    assert err.value.code.name == "FAILED_PRECONDITION"


def test_bfloat16_weights_everywhere(flux_dir, resident, tmp_path):
    image = generate(flux_dir[0], tmp_path, DIFFMESH_MEMORY_MODE="offload", DIFFMESH_WEIGHT_DTYPE="bf16")
    assert image.shape == resident.shape
    assert psnr(image, resident) > 30.0
