"""The base and every overlay of k8s/, rendered once per test module."""

from __future__ import annotations

import pytest
from k8s_render import TREES, render


@pytest.fixture(scope="module", params=TREES)
def rendered(request: pytest.FixtureRequest) -> tuple[str, list[dict]]:
    """(tree, objects) for k8s/base and each k8s/overlays/<name>."""
    return request.param, render(request.param)
