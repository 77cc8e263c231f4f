"""Fixtures of the end-to-end tests: a tiny saved FLUX.1 pipeline, the in-process engine, and `diffmesh up`'s
real services (S3 + gRPC) started once for the session and stopped by their pids."""

from __future__ import annotations

from pathlib import Path

import pytest
from tiny_flux import make_tiny_flux

from orchestrator.local import in_process_orchestrator
from orchestrator.stack.local_stack import down, up
from services.common.settings import Settings


@pytest.fixture(scope="session")
def flux_dir(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, object]:
    path = tmp_path_factory.mktemp("flux") / "tiny-flux-dev"
    pipe = make_tiny_flux(path, seed=0)
    return path, pipe


@pytest.fixture(scope="session")
def engine(tmp_path_factory: pytest.TempPathFactory):
    store = tmp_path_factory.mktemp("store")
    settings = Settings.from_env({"DIFFMESH_STORE": "local", "DIFFMESH_LOCAL_STORE": str(store)})
    return in_process_orchestrator(settings)


@pytest.fixture(scope="session")
def stack(tmp_path_factory: pytest.TempPathFactory):
    state = up(tmp_path_factory.mktemp("stack"), timeout=120)
    yield state
    down(state.path.parent)
