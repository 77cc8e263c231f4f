"""Session fixtures shared by the whole suite: a real S3 server (SeaweedFS `weed mini`) on loopback."""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from orchestrator.stack.s3server import S3Server, start_s3_server

# Tests never reach a model hub.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("DIFFMESH_OFFLINE", "1")

S3_ACCESS_KEY = "diffmesh-test"
S3_SECRET_KEY = "diffmesh-test-secret"


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[S3Server]:
    """One real S3 server for the session, stopped by its pid at the end."""
    server = start_s3_server(tmp_path_factory.mktemp("weed"), S3_ACCESS_KEY, S3_SECRET_KEY)
    yield server
    server.stop()


@pytest.fixture
def s3_env(s3_server: S3Server) -> dict[str, str]:
    """Environment for a service that uses the session's S3 server with a bucket of its own."""
    return {
        "DIFFMESH_STORE": "s3",
        "DIFFMESH_S3_ENDPOINT": s3_server.endpoint,
        "DIFFMESH_S3_BUCKET": f"t-{uuid.uuid4().hex[:12]}",
        "DIFFMESH_S3_ACCESS_KEY": s3_server.access_key,
        "DIFFMESH_S3_SECRET_KEY": s3_server.secret_key,
    }


@pytest.fixture
def local_store_dir(tmp_path: Path) -> Path:
    return tmp_path / "store"
