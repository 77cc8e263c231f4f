"""Where the trainer reads its dataset and writes its output: a local folder or an `s3://bucket/prefix/`.

One small interface (`Storage`) with two backends. S3 goes through the `minio` client with the endpoint and
credentials of `services.common.settings.S3Settings` (env `DIFFMESH_S3_*`); the bucket and prefix come from
the uri. Writes are all-or-nothing: an S3 PUT is visible only once complete, the local backend writes a
temporary file and renames it. Names are relative, '/'-separated paths under the root.
"""

from __future__ import annotations

import io
import json
import os
import tempfile
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping
from dataclasses import replace
from pathlib import Path
from typing import TypeVar

import torch
import urllib3
from minio import Minio
from minio.error import MinioException, S3Error
from safetensors.torch import save as safetensors_bytes

from services.common.settings import S3Settings, Settings

T = TypeVar("T")
_MISSING = {"NoSuchKey", "NoSuchBucket", "NoSuchObject"}


class StorageError(OSError):
    """A read or write that failed; names the uri."""


class Storage(ABC):
    """Files by relative name under one root (a folder or an S3 prefix)."""

    root_uri: str

    def uri(self, name: str) -> str:
        return self.root_uri.rstrip("/") + "/" + name.lstrip("/")

    @abstractmethod
    def read(self, name: str) -> bytes:
        """The whole file; FileNotFoundError when it is missing."""

    @abstractmethod
    def write(self, name: str, data: bytes) -> None: ...

    @abstractmethod
    def exists(self, name: str) -> bool: ...

    @abstractmethod
    def size(self, name: str) -> int | None:
        """Size in bytes, None when missing."""

    @abstractmethod
    def list(self, prefix: str = "") -> list[str]:
        """Names (relative to the root) of every file under `prefix`, sorted."""

    @abstractmethod
    def delete(self, name: str) -> None: ...

    def local_path(self, name: str) -> Path | None:
        """The file's path when the storage is a local folder (None for S3)."""
        return None


class LocalStorage(Storage):
    def __init__(self, root: Path) -> None:
        self.root = Path(root).expanduser().resolve()
        self.root_uri = str(self.root)

    def _path(self, name: str) -> Path:
        path = (self.root / name).resolve()
        if path != self.root and self.root not in path.parents:
            raise StorageError(f"{name!r} escapes {self.root}")
        return path

    def local_path(self, name: str) -> Path:
        return self._path(name)

    def read(self, name: str) -> bytes:
        return self._path(name).read_bytes()

    def write(self, name: str, data: bytes) -> None:
        path = self._path(name)
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise

    def exists(self, name: str) -> bool:
        return self._path(name).is_file()

    def size(self, name: str) -> int | None:
        path = self._path(name)
        return path.stat().st_size if path.is_file() else None

    def list(self, prefix: str = "") -> list[str]:
        start = self._path(prefix.rpartition("/")[0])  # walk only the folder the prefix names
        if not start.is_dir():
            return []
        names = (
            p.relative_to(self.root).as_posix()
            for p in start.rglob("*")
            if p.is_file() and not p.name.startswith(".")
        )
        return sorted(n for n in names if n.startswith(prefix))

    def delete(self, name: str) -> None:
        path = self._path(name)
        path.unlink(missing_ok=True)
        parent = path.parent
        while parent != self.root and parent.is_dir() and not any(parent.iterdir()):
            parent.rmdir()
            parent = parent.parent


class S3Storage(Storage):
    """A prefix of a bucket, through `minio`, with bounded timeouts and retries with backoff."""

    def __init__(self, s3: S3Settings, bucket: str, prefix: str, create_bucket: bool = False) -> None:
        self.s3 = replace(s3, bucket=bucket)
        self.bucket = bucket
        self.prefix = prefix.strip("/") + "/" if prefix.strip("/") else ""
        self.root_uri = f"s3://{bucket}/{self.prefix}"
        http = urllib3.PoolManager(
            timeout=urllib3.Timeout(connect=s3.timeout_s, read=s3.timeout_s), retries=False, maxsize=8
        )
        self.client = Minio(
            s3.endpoint,
            access_key=s3.access_key,
            secret_key=s3.secret_key,
            secure=s3.secure,
            region=s3.region,
            http_client=http,
        )
        if create_bucket:
            self._call("create bucket", self._ensure_bucket)

    def _ensure_bucket(self) -> None:
        if not self.client.bucket_exists(self.bucket):
            try:
                self.client.make_bucket(self.bucket)
            except S3Error as e:
                if e.code not in ("BucketAlreadyOwnedByYou", "BucketAlreadyExists"):
                    raise

    def _call(self, what: str, fn: Callable[[], T]) -> T:
        delay = 0.2
        for attempt in range(self.s3.retries + 1):
            try:
                return fn()
            except S3Error as e:
                if e.code in _MISSING:
                    raise FileNotFoundError(f"{what}: not found ({e.code})") from None
                if attempt == self.s3.retries or e.code not in (
                    "SlowDown",
                    "InternalError",
                    "RequestTimeout",
                ):
                    raise StorageError(f"{what}: {self.s3.endpoint} answered {e.code}: {e.message}") from None
            except (urllib3.exceptions.HTTPError, MinioException, OSError) as e:
                if attempt == self.s3.retries:
                    raise StorageError(
                        f"{what}: object store at {self.s3.endpoint} unreachable after {attempt + 1} "
                        f"attempts ({type(e).__name__})"
                    ) from None
            time.sleep(delay)
            delay *= 2
        raise AssertionError("unreachable")

    def read(self, name: str) -> bytes:
        def get() -> bytes:
            resp = self.client.get_object(self.bucket, self.prefix + name)
            try:
                return resp.read()
            finally:
                resp.close()
                resp.release_conn()

        return self._call(f"read {self.uri(name)}", get)

    def write(self, name: str, data: bytes) -> None:
        def put() -> None:
            self.client.put_object(
                self.bucket,
                self.prefix + name,
                io.BytesIO(data),
                length=len(data),
                part_size=max(16 << 20, -(-len(data) // 9000)),
            )

        self._call(f"write {self.uri(name)}", put)

    def size(self, name: str) -> int | None:
        try:
            stat = self._call(
                f"stat {self.uri(name)}", lambda: self.client.stat_object(self.bucket, self.prefix + name)
            )
        except FileNotFoundError:
            return None
        return int(stat.size or 0)

    def exists(self, name: str) -> bool:
        return self.size(name) is not None

    def list(self, prefix: str = "") -> list[str]:
        def ls() -> list[str]:
            objects = self.client.list_objects(self.bucket, self.prefix + prefix, recursive=True)
            return sorted(o.object_name[len(self.prefix) :] for o in objects if not o.is_dir)

        try:
            return self._call(f"list {self.uri(prefix)}", ls)
        except FileNotFoundError:  # no bucket yet
            return []

    def delete(self, name: str) -> None:
        self._call(
            f"delete {self.uri(name)}", lambda: self.client.remove_object(self.bucket, self.prefix + name)
        )


def open_storage(uri: str, env: Mapping[str, str] | None = None, *, for_output: bool = False) -> Storage:
    """A local folder or `s3://bucket/prefix/` (S3 endpoint and credentials from `DIFFMESH_S3_*`). An output
    bucket is created when missing."""
    if uri.startswith("s3://"):
        bucket, _, prefix = uri.removeprefix("s3://").partition("/")
        s3 = Settings.from_env(env).s3
        return S3Storage(s3, bucket, prefix, create_bucket=for_output)
    root = Path(uri).expanduser()
    if for_output:
        root.mkdir(parents=True, exist_ok=True)
    return LocalStorage(root)


WEIGHTS_NAME = "diffusion_pytorch_model.safetensors"
MAX_SHARD_BYTES = 10 << 20  # keeps every file of a shipped model small enough for a git repository


def write_weights(
    storage: Storage, folder: str, weights: dict[str, torch.Tensor], max_shard_bytes: int = MAX_SHARD_BYTES
) -> list[str]:
    """A diffusers weights file in `folder`: one `diffusion_pytorch_model.safetensors`, or, above
    `max_shard_bytes`, shards `diffusion_pytorch_model-0000i-of-0000n.safetensors` plus the
    `.safetensors.index.json` weight map diffusers' `from_pretrained` reads. Returns the names written."""
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for key, tensor in weights.items():
        nbytes = tensor.numel() * tensor.element_size()
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][key] = tensor
        size += nbytes
    if len(shards) == 1:
        storage.write(f"{folder}/{WEIGHTS_NAME}", safetensors_bytes(weights, metadata={"format": "pt"}))
        return [f"{folder}/{WEIGHTS_NAME}"]
    stem = WEIGHTS_NAME.removesuffix(".safetensors")
    names, weight_map = [], {}
    for i, shard in enumerate(shards, 1):
        name = f"{stem}-{i:05d}-of-{len(shards):05d}.safetensors"
        storage.write(f"{folder}/{name}", safetensors_bytes(shard, metadata={"format": "pt"}))
        names.append(f"{folder}/{name}")
        weight_map.update(dict.fromkeys(shard, name))
    total = sum(t.numel() * t.element_size() for t in weights.values())
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    storage.write(f"{folder}/{WEIGHTS_NAME}.index.json", json.dumps(index, indent=2).encode())
    return [*names, f"{folder}/{WEIGHTS_NAME}.index.json"]
