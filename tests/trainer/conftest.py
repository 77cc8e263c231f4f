"""Fixtures of the trainer tests: one tiny FLUX.1 model and one generated dataset for the session, and a feature
cache shared by every run (its entries are keyed by content)."""

from __future__ import annotations

from pathlib import Path

import pytest
from tiny_dataset import make_dataset
from tiny_flux import make_tiny_flux


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, object]:
    path = tmp_path_factory.mktemp("trainer-model") / "tiny-flux-dev"
    return path, make_tiny_flux(path, seed=0)


@pytest.fixture(scope="session")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("trainer-data") / "shapes"
    make_dataset(folder)
    return folder


@pytest.fixture(scope="session")
def work_env(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """Environment of in-process and subprocess runs: offline, CPU, a shared feature cache."""
    return {
        "DIFFMESH_TRAIN_WORK_DIR": str(tmp_path_factory.mktemp("trainer-work")),
        "DIFFMESH_OFFLINE": "1",
        "DIFFMESH_DEVICE": "cpu",
        "HF_HUB_OFFLINE": "1",
    }
