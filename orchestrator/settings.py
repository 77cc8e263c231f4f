"""The orchestrator's settings from the environment: where the stage services are, the token, timeouts."""

from __future__ import annotations

import os
import ssl
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from orchestrator.channel_tls import ChannelTls, TlsFilePaths, TlsSource

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
    journal_lease_s: float = 30.0  # DIFFMESH_JOURNAL_LEASE_S: a request's owner silent this long is dead
    stage_tls: ChannelTls | None = None  # DIFFMESH_STAGE_TLS_*: how the orchestrator calls the stages

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
            journal_lease_s=_env_float(env, "DIFFMESH_JOURNAL_LEASE_S", 30.0),
            stage_tls=stage_tls(env),
        )


def stage_tls(env: Mapping[str, str]) -> ChannelTls | None:
    """TLS to the stage services: DIFFMESH_STAGE_TLS_CA (PEM file) verifies their certificates;
    DIFFMESH_STAGE_TLS_CERT + _KEY (PEM files) are the orchestrator's client certificate, for stages that
    require one (mutual TLS); DIFFMESH_STAGE_TLS_SERVER_NAME, the name their certificates carry when it is not
    the endpoint's host. The files are read again when they change (orchestrator/channel_tls.py). None
    (plaintext) without a CA; ValueError names a variable set wrong."""
    names = ("DIFFMESH_STAGE_TLS_CA", "DIFFMESH_STAGE_TLS_CERT", "DIFFMESH_STAGE_TLS_KEY")
    ca, cert, key = (Path(env[n]) if env.get(n) else None for n in names)
    server_name = env.get("DIFFMESH_STAGE_TLS_SERVER_NAME") or None
    if ca is None:
        if cert is not None or key is not None or server_name:
            raise ValueError("DIFFMESH_STAGE_TLS_CERT, _KEY and _SERVER_NAME need DIFFMESH_STAGE_TLS_CA")
        return None
    if (cert is None) != (key is None):
        raise ValueError("DIFFMESH_STAGE_TLS_CERT and DIFFMESH_STAGE_TLS_KEY go together")
    paths = TlsFilePaths(ca, cert, key)
    try:
        return TlsSource(paths, server_name).current
    except (ssl.SSLError, ValueError) as e:  # ssl.SSLError is an OSError: first
        raise ValueError(
            f"DIFFMESH_STAGE_TLS_CA={str(ca)!r}, _CERT={str(cert)!r}, _KEY={str(key)!r}: the CA does not "
            f"parse, or the key is not the certificate's: {e}"
        ) from None
    except OSError as e:
        name = next(
            (n for n, p in zip(names, (ca, cert, key), strict=True) if str(p) == e.filename), names[0]
        )
        raise ValueError(f"{name}={e.filename!r} cannot be read: {e.strerror or e}") from None


# Non-secret object-store settings a training pod inherits from the orchestrator's own environment.
STORE_ENV = (
    "DIFFMESH_STORE",
    "DIFFMESH_S3_ENDPOINT",
    "DIFFMESH_S3_BUCKET",
    "DIFFMESH_S3_SECURE",
    "DIFFMESH_S3_REGION",
)
LAUNCHERS = ("local", "kubernetes")


def _env_float(env: Mapping[str, str], name: str, default: float) -> float:
    raw = env.get(name, "")
    if not raw:
        return default
    try:
        value = float(raw)
    except ValueError:
        raise ValueError(f"{name}={raw!r} is not a number") from None
    if not value > 0:
        raise ValueError(f"{name}={value} must be > 0")
    return value


def _env_int(env: Mapping[str, str], name: str, default: int) -> int:
    raw = env.get(name, "")
    if not raw:
        return default
    try:
        value = int(raw)
    except ValueError:
        raise ValueError(f"{name}={raw!r} is not an integer") from None
    if value < 0:
        raise ValueError(f"{name}={value} must be >= 0")
    return value


@dataclass(frozen=True)
class JobSettings:
    """Training-job launching (`diffmesh train`, the job RPCs). Every field has a DIFFMESH_* variable."""

    state_dir: Path = Path(".diffmesh")  # local job index: <state_dir>/jobs/<id>/
    launcher: str = "local"  # DIFFMESH_LAUNCHER: the default launcher
    train_command: tuple[str, ...] = ()  # DIFFMESH_TRAIN_COMMAND (local); () = this python -m trainer
    cancel_grace_s: float = 10.0  # SIGTERM -> SIGKILL (local)
    image: str = "diffmesh:0.1.0"  # DIFFMESH_TRAIN_IMAGE (kubernetes)
    namespace: str = ""  # DIFFMESH_NAMESPACE; "" = in-cluster namespace / kubeconfig context / default
    kubeconfig: str = ""  # KUBECONFIG (first file)
    s3_secret: str = "diffmesh-s3"  # DIFFMESH_S3_SECRET: keys DIFFMESH_S3_ACCESS_KEY, DIFFMESH_S3_SECRET_KEY
    cpu: str = "4"  # DIFFMESH_TRAIN_CPU: request and limit
    memory: str = "32Gi"  # DIFFMESH_TRAIN_MEMORY: request and limit
    backoff_limit: int = 2  # DIFFMESH_TRAIN_BACKOFF_LIMIT
    ttl_seconds: int = 7 * 24 * 3600  # DIFFMESH_TRAIN_TTL_S: ttlSecondsAfterFinished
    deadline_seconds: int = 0  # DIFFMESH_TRAIN_DEADLINE_S: activeDeadlineSeconds, 0 = none
    cache_pvc: str = ""  # DIFFMESH_TRAIN_CACHE_PVC: model cache claim; "" = an emptyDir
    store_env: tuple[tuple[str, str], ...] = ()  # STORE_ENV values passed on to training pods

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> JobSettings:
        """ValueError naming the variable for a bad value."""
        import shlex

        env = os.environ if env is None else env
        launcher = env.get("DIFFMESH_LAUNCHER", "") or cls.launcher
        if launcher not in LAUNCHERS:
            raise ValueError(f"DIFFMESH_LAUNCHER={launcher!r}; one of {list(LAUNCHERS)}")
        kubeconfig = env.get("KUBECONFIG", "").split(os.pathsep)[0]
        return cls(
            state_dir=Path(env.get("DIFFMESH_STATE_DIR", "") or ".diffmesh"),
            launcher=launcher,
            train_command=tuple(shlex.split(env.get("DIFFMESH_TRAIN_COMMAND", ""))),
            cancel_grace_s=float(_env_int(env, "DIFFMESH_TRAIN_CANCEL_GRACE_S", 10)),
            image=env.get("DIFFMESH_TRAIN_IMAGE", "") or cls.image,
            namespace=env.get("DIFFMESH_NAMESPACE", ""),
            kubeconfig=kubeconfig,
            s3_secret=env.get("DIFFMESH_S3_SECRET", "") or cls.s3_secret,
            cpu=env.get("DIFFMESH_TRAIN_CPU", "") or cls.cpu,
            memory=env.get("DIFFMESH_TRAIN_MEMORY", "") or cls.memory,
            backoff_limit=_env_int(env, "DIFFMESH_TRAIN_BACKOFF_LIMIT", cls.backoff_limit),
            ttl_seconds=_env_int(env, "DIFFMESH_TRAIN_TTL_S", cls.ttl_seconds),
            deadline_seconds=_env_int(env, "DIFFMESH_TRAIN_DEADLINE_S", 0),
            cache_pvc=env.get("DIFFMESH_TRAIN_CACHE_PVC", ""),
            store_env=tuple((k, env[k]) for k in STORE_ENV if env.get(k)),
        )
