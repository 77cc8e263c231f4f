"""The orchestrator's settings from the environment: where the stage services are, the token, timeouts."""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

STAGES = ("text_encoder", "denoiser", "vae", "audio")


def read_secret(env: Mapping[str, str], name: str) -> str | None:
    path = env.get(f"{name}_FILE")
    if path:
        return Path(path).read_text().strip() or None
    return env.get(name) or None


@dataclass(frozen=True)
class OrchestratorSettings:
    endpoints: dict[str, str] = field(default_factory=dict)  # stage -> "host:port"
    token: str | None = field(default=None, repr=False)
    state_dir: Path = Path(".diffmesh")
    stage_timeout_s: float = 3600.0
    retries: int = 3
    model_roots: tuple[Path, ...] = ()

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> OrchestratorSettings:
        env = os.environ if env is None else env
        endpoints = {s: env[f"DIFFMESH_{s.upper()}"] for s in STAGES if env.get(f"DIFFMESH_{s.upper()}")}
        roots = tuple(Path(p) for p in env.get("DIFFMESH_MODEL_ROOTS", "").split(os.pathsep) if p)
        return cls(
            endpoints=endpoints,
            token=read_secret(env, "DIFFMESH_TOKEN"),
            state_dir=Path(env.get("DIFFMESH_STATE_DIR", ".diffmesh")),
            stage_timeout_s=float(env.get("DIFFMESH_STAGE_TIMEOUT_S", 3600)),
            retries=int(env.get("DIFFMESH_RETRIES", 3)),
            model_roots=roots,
        )
