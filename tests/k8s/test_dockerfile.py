"""The Dockerfile (no Docker daemon here, so read, not built) agrees with the Makefile and the manifests: the
same pinned torch, the same protoc invocation as `make protos`, the runtime engine without dev extras, and
the non-root user the pods run as."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
DOCKERFILE = (ROOT / "Dockerfile").read_text()
MAKEFILE = (ROOT / "Makefile").read_text()


def test_torch_is_pinned_as_in_the_makefile() -> None:
    (spec,) = re.findall(r"^TORCH_SPEC \?= torch==(\S+)$", MAKEFILE, re.M)
    assert f"ARG TORCH_VERSION={spec}" in DOCKERFILE
    assert "ARG TORCH_VARIANT=cpu" in DOCKERFILE
    assert (
        '"torch==${TORCH_VERSION}" --index-url "https://download.pytorch.org/whl/${TORCH_VARIANT}"'
        in DOCKERFILE
    )


def test_protos_are_generated_as_make_protos_does() -> None:
    (make_flags,) = re.findall(r"grpc_tools\.protoc (.+) \$<$", MAKEFILE, re.M)
    assert f"python -m grpc_tools.protoc {make_flags} protos/*.proto" in DOCKERFILE
    # ... before the non-editable install packages them, and without the dev / local extras.
    assert DOCKERFILE.index("grpc_tools.protoc") < DOCKERFILE.index("pip install .")
    assert "pip install .[" not in DOCKERFILE and "-e ." not in DOCKERFILE


def test_runs_as_the_pods_user_with_the_cli_entrypoint() -> None:
    assert "useradd --uid 10001 --gid 10001" in DOCKERFILE
    assert DOCKERFILE.rstrip().splitlines()[-2:] == [
        'ENTRYPOINT ["diffmesh"]',
        'CMD ["serve", "orchestrator", "--host", "0.0.0.0"]',
    ]
    assert re.search(r"^USER 10001:10001$", DOCKERFILE, re.M)
    froms = re.findall(r"^FROM (\S+)", DOCKERFILE, re.M)
    assert froms and all(f == "python:3.11-slim" for f in froms)


def test_build_context_leaves_out_local_state() -> None:
    ignored = set((ROOT / ".dockerignore").read_text().split())
    assert {".git", ".venv", ".diffmesh", "outputs", ".pytest_cache", "tests"} <= ignored
