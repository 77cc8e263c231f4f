"""Service settings, read once from the environment (12-factor; the k8s manifests set these).

Secrets come from the environment or from mounted files (`<NAME>_FILE`), and never appear in a repr or a log.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from services.common.errors import InvalidArgument
from services.common.memory import MemoryPlan

MIB = 1 << 20


def _secret(env: Mapping[str, str], name: str) -> str | None:
    """`NAME` or the contents of the file at `NAME_FILE` (a mounted Kubernetes Secret)."""
    path = env.get(f"{name}_FILE")
    if path:
        try:
            return Path(path).read_text().strip() or None
        except OSError as e:
            raise InvalidArgument(f"{name}_FILE={path!r} cannot be read: {e.strerror}") from None
    return env.get(name) or None


def _int(env: Mapping[str, str], name: str, default: int, lo: int = 0) -> int:
    raw = env.get(name)
    if raw is None or raw == "":
        return default
    try:
        value = int(raw)
    except ValueError:
        raise InvalidArgument(f"{name}={raw!r} is not an integer") from None
    if value < lo:
        raise InvalidArgument(f"{name}={value} must be >= {lo}")
    return value


def _float(env: Mapping[str, str], name: str, default: float, lo: float) -> float:
    raw = env.get(name)
    if raw is None or raw == "":
        return default
    try:
        value = float(raw)
    except ValueError:
        raise InvalidArgument(f"{name}={raw!r} is not a number") from None
    if not math.isfinite(value) or value < lo:
        raise InvalidArgument(f"{name}={raw} must be a finite number >= {lo}")
    return value


def _bool(env: Mapping[str, str], name: str, default: bool) -> bool:
    raw = env.get(name, "").strip().lower()
    if raw == "":
        return default
    if raw in ("1", "true", "yes", "on"):
        return True
    if raw in ("0", "false", "no", "off"):
        return False
    raise InvalidArgument(f"{name}={raw!r} is not a boolean (1/0, true/false)")


STAGES = ("text_encoder", "denoiser", "vae", "audio")


def _stage_memory(env: Mapping[str, str], mode: str, dtype: str) -> tuple[tuple[str, MemoryPlan], ...]:
    out = []
    for stage in STAGES:
        prefix = f"DIFFMESH_{stage.upper()}_"
        if f"{prefix}MEMORY_MODE" in env or f"{prefix}WEIGHT_DTYPE" in env:
            plan = MemoryPlan.parse(
                env.get(f"{prefix}MEMORY_MODE", mode), env.get(f"{prefix}WEIGHT_DTYPE", dtype)
            )
            out.append((stage, plan))
    return tuple(out)


@dataclass(frozen=True)
class S3Settings:
    endpoint: str = "127.0.0.1:8333"  # host:port
    bucket: str = "diffmesh"
    access_key: str | None = field(default=None, repr=False)
    secret_key: str | None = field(default=None, repr=False)
    secure: bool = False
    region: str | None = None
    runs_ttl_days: int = 1  # lifecycle rule on runs/
    timeout_s: float = 10.0  # connect + read timeout of one HTTP attempt
    retries: int = 3


@dataclass(frozen=True)
class Settings:
    store: str = "local"  # "s3" or "local"
    s3: S3Settings = field(default_factory=S3Settings)
    local_store_dir: Path = Path(".diffmesh/store")
    token: str | None = field(default=None, repr=False)
    model_roots: tuple[Path, ...] = ()
    cache_dir: Path = Path.home() / ".cache" / "diffmesh"
    model_cache_size: int = 2  # models kept loaded per service
    max_message_bytes: int = 64 * MIB
    inline_limit: int = 1 * MIB  # tensors up to this travel inline instead of through the store
    max_concurrency: int = 4  # RPCs running at once per service
    max_queue: int = 16  # RPCs waiting beyond those; more get RESOURCE_EXHAUSTED
    device: str = "auto"
    offline: bool = False  # no downloads from model hubs
    memory: MemoryPlan = field(default_factory=MemoryPlan)  # resident / offload / sequential, weight dtype
    stage_memory: tuple[tuple[str, MemoryPlan], ...] = ()  # per-stage overrides (one process running all)

    def memory_for(self, stage: str) -> MemoryPlan:
        """`DIFFMESH_<STAGE>_MEMORY_MODE` / `_WEIGHT_DTYPE` where set, else the service-wide plan."""
        return dict(self.stage_memory).get(stage, self.memory)

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> Settings:
        env = os.environ if env is None else env
        store = env.get("DIFFMESH_STORE", "local").strip().lower()
        if store not in ("s3", "local"):
            raise InvalidArgument(f"DIFFMESH_STORE={store!r}: expected 's3' or 'local'")
        s3 = S3Settings(
            endpoint=env.get("DIFFMESH_S3_ENDPOINT", S3Settings.endpoint),
            bucket=env.get("DIFFMESH_S3_BUCKET", S3Settings.bucket),
            access_key=_secret(env, "DIFFMESH_S3_ACCESS_KEY"),
            secret_key=_secret(env, "DIFFMESH_S3_SECRET_KEY"),
            secure=_bool(env, "DIFFMESH_S3_SECURE", False),
            region=env.get("DIFFMESH_S3_REGION") or None,
            runs_ttl_days=_int(env, "DIFFMESH_RUNS_TTL_DAYS", 1, lo=1),
            timeout_s=_float(env, "DIFFMESH_S3_TIMEOUT_S", S3Settings.timeout_s, lo=0.001),
            retries=_int(env, "DIFFMESH_S3_RETRIES", S3Settings.retries),
        )
        dtype = env.get("DIFFMESH_WEIGHT_DTYPE", "auto")
        memory = MemoryPlan.parse(env.get("DIFFMESH_MEMORY_MODE", "resident"), dtype)
        roots = tuple(
            Path(p).expanduser() for p in env.get("DIFFMESH_MODEL_ROOTS", "").split(os.pathsep) if p
        )
        return cls(
            store=store,
            s3=s3,
            local_store_dir=Path(env.get("DIFFMESH_LOCAL_STORE", str(cls.local_store_dir))).expanduser(),
            token=_secret(env, "DIFFMESH_TOKEN"),
            model_roots=roots,
            cache_dir=Path(env.get("DIFFMESH_CACHE_DIR", str(cls.cache_dir))).expanduser(),
            model_cache_size=_int(env, "DIFFMESH_MODEL_CACHE_SIZE", 2, lo=1),
            max_message_bytes=_int(env, "DIFFMESH_MAX_MESSAGE_MB", 64, lo=1) * MIB,
            inline_limit=_int(env, "DIFFMESH_INLINE_LIMIT_BYTES", MIB),
            max_concurrency=_int(env, "DIFFMESH_MAX_CONCURRENCY", 4, lo=1),
            max_queue=_int(env, "DIFFMESH_MAX_QUEUE", 16),
            device=env.get("DIFFMESH_DEVICE", "auto"),
            offline=_bool(env, "DIFFMESH_OFFLINE", False),
            memory=memory,
            stage_memory=_stage_memory(env, memory.mode, dtype),
        )
