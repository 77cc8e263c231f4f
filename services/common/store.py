"""TensorStore: where every tensor that crosses a process goes (DESIGN §3).

One interface, two backends: S3 through the `minio` client (MinIO in production, SeaweedFS locally and in
tests) and a local directory for the in-process mode. Objects are raw tensor bytes (see `wire`); the
TensorRef beside them carries dtype, shape, size and sha256, and every read checks size and checksum.
Writes are all-or-nothing: an S3 PUT (or multipart upload) is visible only once complete, and the local
backend writes a temporary file and renames it.
"""

from __future__ import annotations

import io
import os
import re
import tempfile
import time
from abc import ABC, abstractmethod
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

import torch
import urllib3
from minio import Minio
from minio.commonconfig import ENABLED, Filter
from minio.error import MinioException, S3Error
from minio.helpers import check_bucket_name
from minio.lifecycleconfig import AbortIncompleteMultipartUpload, Expiration, LifecycleConfig, Rule

from protos import tensor_pb2
from services.common import metrics, wire
from services.common.errors import (
    DataLoss,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    Unavailable,
)
from services.common.settings import S3Settings, Settings

T = TypeVar("T")
RUNS_PREFIX = "runs/"
_KEY_PART = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")
_KEY = re.compile(r"[A-Za-z0-9][A-Za-z0-9._/-]{0,1000}")
_NOT_FOUND_CODES = {"NoSuchKey", "NoSuchBucket", "NoSuchObject"}
_AUTH_CODES = {"AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch"}
_TRANSIENT_CODES = {"SlowDown", "InternalError", "ServiceUnavailable", "RequestTimeout", "ServiceNotReady"}


def check_key_part(label: str, part: str) -> str:
    """A plain name for one part of a key: 1-128 chars of [A-Za-z0-9._-], first a letter or digit, no '..'."""
    if not _KEY_PART.fullmatch(part) or ".." in part:
        raise InvalidArgument(
            f"{label} {part[:200]!r} is not a valid key part "
            "(1-128 chars of [A-Za-z0-9._-], starting with a letter or digit, no '..')"
        )
    return part


def run_key(request_id: str, stage: str, name: str) -> str:
    """`runs/<request_id>/<stage>/<name>`; each part a plain name (no '/', no '..')."""
    for label, part in (("request_id", request_id), ("stage", stage), ("name", name)):
        check_key_part(label, part)
    return f"{RUNS_PREFIX}{request_id}/{stage}/{name}"


def check_key(key: str) -> str:
    if not _KEY.fullmatch(key) or not all(_KEY_PART.fullmatch(p) and ".." not in p for p in key.split("/")):
        raise InvalidArgument(
            f"store key {key!r} is not valid (parts of [A-Za-z0-9._-], each starting with a letter or digit)"
        )
    return key


class TensorStore(ABC):
    """Bytes by key, and tensors as TensorRefs on top of them."""

    def __init__(self, inline_limit: int = 1 << 20) -> None:
        self.inline_limit = inline_limit

    # -- backend: bytes by key -----------------------------------------------------------------------
    @abstractmethod
    def uri(self, key: str) -> str: ...

    @abstractmethod
    def key_of(self, uri: str) -> str:
        """The key of a uri of this store; InvalidArgument for a uri of another store."""

    @abstractmethod
    def put_bytes(self, key: str, data: bytes | bytearray | memoryview) -> str:
        """Write one object whole; return its uri."""

    @abstractmethod
    def get_bytes(self, key: str, size: int) -> bytearray:
        """Read one object that must be exactly `size` bytes (DataLoss otherwise)."""

    @abstractmethod
    def exists(self, key: str) -> bool: ...

    @abstractmethod
    def delete(self, key: str) -> None: ...

    @abstractmethod
    def list(self, prefix: str) -> list[str]: ...

    # -- tensors -----------------------------------------------------------------------------------------
    def put(self, key: str, tensor: torch.Tensor) -> tensor_pb2.TensorRef:
        name, shape, data = wire.to_bytes(tensor)
        started = time.perf_counter()
        uri = self.put_bytes(check_key(key), data)
        metrics.observe_store("put", len(data), time.perf_counter() - started)
        return tensor_pb2.TensorRef(
            uri=uri, dtype=name, shape=shape, byte_size=len(data), sha256=wire.sha256_hex(data)
        )

    def get(self, ref: tensor_pb2.TensorRef) -> torch.Tensor:
        want = wire.expected_size(ref.dtype, list(ref.shape))
        if ref.byte_size != want:
            raise DataLoss(f"{ref.uri}: byte_size {ref.byte_size} != {want} for {ref.dtype}{list(ref.shape)}")
        started = time.perf_counter()
        data = self.get_bytes(self.key_of(ref.uri), want)
        metrics.observe_store("get", len(data), time.perf_counter() - started)
        got = wire.sha256_hex(data)
        if got != ref.sha256:
            raise DataLoss(f"{ref.uri}: sha256 mismatch, expected {ref.sha256}, got {got}")
        return wire.from_bytes(data, ref.dtype, list(ref.shape))

    def put_tensor(self, key: str, tensor: torch.Tensor, inline: bool | None = None) -> tensor_pb2.Tensor:
        """A Tensor message: inline under `inline_limit` bytes, else a ref to a stored object."""
        nbytes = tensor.numel() * tensor.element_size()
        if inline if inline is not None else nbytes <= self.inline_limit:
            return wire.to_inline(tensor)
        return tensor_pb2.Tensor(ref=self.put(key, tensor))

    def load(self, msg: tensor_pb2.Tensor, field: str = "tensor") -> torch.Tensor:
        kind = msg.WhichOneof("value")
        if kind == "ref":
            return self.get(msg.ref)
        if kind == "inline":
            return wire.from_inline(msg.inline)
        raise InvalidArgument(f"{field}: empty Tensor (neither ref nor inline)")

    def delete_prefix(self, prefix: str) -> int:
        keys = self.list(prefix)
        for key in keys:
            self.delete(key)
        return len(keys)


class LocalTensorStore(TensorStore):
    """A directory: `file://` uris, atomic writes by rename. For the in-process mode and tests."""

    def __init__(self, root: Path, inline_limit: int = 1 << 20) -> None:
        super().__init__(inline_limit)
        self.root = Path(root).resolve()
        self.root.mkdir(parents=True, exist_ok=True)

    def _path(self, key: str) -> Path:
        return self.root / check_key(key)

    def uri(self, key: str) -> str:
        return self._path(key).as_uri()

    def key_of(self, uri: str) -> str:
        prefix = self.root.as_uri() + "/"
        if not uri.startswith(prefix):
            raise InvalidArgument(f"uri {uri!r} is not in this store ({prefix})")
        return check_key(uri[len(prefix) :])

    def put_bytes(self, key: str, data: bytes | bytearray | memoryview) -> str:
        path = self._path(key)
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        except (FileExistsError, NotADirectoryError) as e:
            raise FailedPrecondition(f"key {key!r} lies under an existing object ({e.filename})") from None
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(data)
            os.replace(tmp, path)
        except IsADirectoryError:
            Path(tmp).unlink(missing_ok=True)
            raise FailedPrecondition(f"key {key!r} is a prefix of other objects in this store") from None
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        return path.as_uri()

    def get_bytes(self, key: str, size: int) -> bytearray:
        path = self._path(key)
        try:
            with path.open("rb") as f:
                # the size on disk first: a ref's byte_size is the caller's word, not a buffer to allocate
                found = os.fstat(f.fileno()).st_size
                if found != size:
                    raise DataLoss(
                        f"{path.as_uri()}: expected {size} bytes, found {'more' if found > size else found}"
                    )
                data = bytearray(f.read(size + 1))
        except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
            raise NotFound(f"no object {path.as_uri()}") from None
        if len(data) != size:
            raise DataLoss(
                f"{path.as_uri()}: expected {size} bytes, found {'more' if len(data) > size else len(data)}"
            )
        return data

    def exists(self, key: str) -> bool:
        return self._path(key).is_file()

    def delete(self, key: str) -> None:
        self._path(key).unlink(missing_ok=True)

    def list(self, prefix: str) -> list[str]:
        base = self.root
        return sorted(
            str(p.relative_to(base))
            for p in base.rglob("*")
            if p.is_file() and not p.name.startswith(".") and str(p.relative_to(base)).startswith(prefix)
        )


class S3TensorStore(TensorStore):
    """S3 through the `minio` client: bounded timeouts, retries with backoff, UNAVAILABLE when down."""

    def __init__(self, s3: S3Settings, inline_limit: int = 1 << 20, ensure_bucket: bool = True) -> None:
        super().__init__(inline_limit)
        try:
            check_bucket_name(s3.bucket, strict=True)
        except ValueError as e:
            raise InvalidArgument(f"bucket name {s3.bucket!r}: {e}") from None
        self.s3 = s3
        self.bucket = s3.bucket
        http = urllib3.PoolManager(
            timeout=urllib3.Timeout(connect=s3.timeout_s, read=s3.timeout_s),
            retries=False,  # we retry ourselves, with a bound we control
            maxsize=16,
        )
        self._client = Minio(
            s3.endpoint,
            access_key=s3.access_key,
            secret_key=s3.secret_key,
            secure=s3.secure,
            region=s3.region,
            http_client=http,
        )
        if ensure_bucket:
            self.ensure_bucket()

    def _call(self, what: str, fn: Callable[[], T]) -> T:
        delay = 0.2
        for attempt in range(self.s3.retries + 1):
            try:
                return fn()
            except S3Error as e:
                if e.code in _NOT_FOUND_CODES:
                    raise NotFound(f"{what}: no such object in s3://{self.bucket} ({e.code})") from None
                if e.code in _TRANSIENT_CODES and attempt < self.s3.retries:
                    time.sleep(delay)
                    delay *= 2
                    continue
                if e.code in _AUTH_CODES:
                    raise FailedPrecondition(
                        f"{what}: the store at {self.s3.endpoint} refused our credentials ({e.code})"
                    ) from None
                if e.code in _TRANSIENT_CODES:
                    raise Unavailable(
                        f"{what}: store at {self.s3.endpoint} answered {e.code}: {e.message}"
                    ) from None
                raise FailedPrecondition(
                    f"{what}: store at {self.s3.endpoint} refused: {e.code}: {e.message}"
                ) from None
            except (urllib3.exceptions.HTTPError, MinioException, OSError) as e:
                if attempt == self.s3.retries:
                    raise Unavailable(
                        f"{what}: object store at {self.s3.endpoint} unreachable after {attempt + 1} attempts: "
                        f"{type(e).__name__}"
                    ) from None
                time.sleep(delay)
                delay *= 2
        raise AssertionError("unreachable")

    def ensure_bucket(self) -> None:
        """Create the bucket if missing, with a lifecycle rule that expires `runs/` after the TTL."""

        def make() -> None:
            if not self._client.bucket_exists(self.bucket):
                try:
                    self._client.make_bucket(self.bucket)
                except S3Error as e:
                    if e.code not in ("BucketAlreadyOwnedByYou", "BucketAlreadyExists"):
                        raise
            rule = Rule(
                ENABLED,
                rule_filter=Filter(prefix=RUNS_PREFIX),
                rule_id="expire-runs",
                expiration=Expiration(days=self.s3.runs_ttl_days),
                abort_incomplete_multipart_upload=AbortIncompleteMultipartUpload(days_after_initiation=1),
            )
            self._client.set_bucket_lifecycle(self.bucket, LifecycleConfig([rule]))

        self._call(f"create bucket {self.bucket}", make)

    def lifecycle(self) -> LifecycleConfig | None:
        return self._call("get lifecycle", lambda: self._client.get_bucket_lifecycle(self.bucket))

    def uri(self, key: str) -> str:
        return f"s3://{self.bucket}/{check_key(key)}"

    def key_of(self, uri: str) -> str:
        prefix = f"s3://{self.bucket}/"
        if not uri.startswith(prefix):
            raise InvalidArgument(f"uri {uri!r} is not in this store's bucket ({prefix})")
        return check_key(uri[len(prefix) :])

    def put_bytes(self, key: str, data: bytes | bytearray | memoryview) -> str:
        check_key(key)
        size = len(data)

        def put() -> None:
            self._client.put_object(
                self.bucket,
                key,
                io.BytesIO(data),
                length=size,
                part_size=max(16 << 20, -(-size // 9000)),
                content_type="application/octet-stream",
            )

        self._call(f"put {self.uri(key)}", put)
        return self.uri(key)

    def get_bytes(self, key: str, size: int) -> bytearray:
        uri = self.uri(key)

        def get() -> bytearray:
            resp = self._client.get_object(self.bucket, key)
            try:
                length = resp.headers.get("Content-Length")
                found = int(length) if length is not None and length.isdigit() else size
                if found != size:  # before allocating: a ref's size is the caller's word
                    raise DataLoss(f"{uri}: expected {size} bytes, found {'more' if found > size else found}")
                buf = bytearray(size)
                view = memoryview(buf)
                pos = 0
                while pos < size:
                    n = resp.readinto(view[pos:])
                    if not n:
                        break
                    pos += n
                extra = resp.read(1)
            finally:
                resp.close()
                resp.release_conn()
            if pos != size or extra:
                raise DataLoss(f"{uri}: expected {size} bytes, found {'more' if extra else pos}")
            return buf

        return self._call(f"get {uri}", get)

    def exists(self, key: str) -> bool:
        try:
            self._call(f"stat {self.uri(key)}", lambda: self._client.stat_object(self.bucket, key))
        except NotFound:
            return False
        return True

    def delete(self, key: str) -> None:
        self._call(f"delete {self.uri(key)}", lambda: self._client.remove_object(self.bucket, check_key(key)))

    def list(self, prefix: str) -> list[str]:
        def ls() -> list[str]:
            return sorted(
                o.object_name for o in self._client.list_objects(self.bucket, prefix, recursive=True)
            )

        return self._call(f"list s3://{self.bucket}/{prefix}", ls)


def open_store(settings: Settings) -> TensorStore:
    """The store the settings name (DIFFMESH_STORE=s3|local)."""
    if settings.store == "s3":
        return S3TensorStore(settings.s3, settings.inline_limit)
    return LocalTensorStore(settings.local_store_dir, settings.inline_limit)
