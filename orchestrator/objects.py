"""The orchestrator's own small-object access to the store (its request journal, orchestrator/journal.py).

The orchestrator imports no `services` (DESIGN §2), so it reads and writes whole small objects here: S3
through the `minio` client (the bucket and credentials the stages use), or a local directory (the in-process
mode, the same root as the stages' local store). Every failure is a StageError: the store down is
UNAVAILABLE naming the endpoint, refused credentials FAILED_PRECONDITION. Writes are all-or-nothing (an S3
PUT; a temporary file renamed).
"""

from __future__ import annotations

import io
import os
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Protocol, TypeVar

import grpc
import urllib3
from minio import Minio
from minio.error import MinioException, S3Error

from orchestrator.errors import StageError

T = TypeVar("T")
WHERE = "journal"  # the StageError stage of store failures
_MISSING = {"NoSuchKey", "NoSuchObject"}
_AUTH = {"AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch"}
_TRANSIENT = {"SlowDown", "InternalError", "ServiceUnavailable", "RequestTimeout", "ServiceNotReady"}


class Objects(Protocol):
    """Whole objects by key; `deadline` (time.monotonic()) bounds the retries of a store that is down."""

    def read(self, key: str, deadline: float | None = None) -> bytes | None: ...  # None: no such object
    def write(self, key: str, data: bytes, deadline: float | None = None) -> None: ...
    def where(self, key: str) -> str: ...  # the object's address, for messages


class DirObjects:
    """Objects as files under `root` (keys are paths below it; nothing escapes it)."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)

    def _path(self, key: str) -> Path:
        if key.startswith("/") or ".." in key.split("/"):
            raise StageError(grpc.StatusCode.INVALID_ARGUMENT, f"object key {key!r} leaves the store", WHERE)
        return self.root / key

    def where(self, key: str) -> str:
        return str(self._path(key))

    def read(self, key: str, deadline: float | None = None) -> bytes | None:
        try:
            return self._path(key).read_bytes()
        except FileNotFoundError:
            return None
        except OSError as e:
            raise StageError(
                grpc.StatusCode.UNAVAILABLE, f"cannot read {self.where(key)}: {e}", WHERE
            ) from None

    def write(self, key: str, data: bytes, deadline: float | None = None) -> None:
        path = self._path(key)
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
            try:
                with os.fdopen(fd, "wb") as f:
                    f.write(data)
                os.replace(tmp, path)
            except BaseException:
                Path(tmp).unlink(missing_ok=True)
                raise
        except OSError as e:
            raise StageError(grpc.StatusCode.UNAVAILABLE, f"cannot write {path}: {e}", WHERE) from None


class S3Objects:
    """Objects in an S3 bucket: bounded timeouts, retries with backoff while the deadline allows, the bucket
    made when missing (the stages set its `runs/` expiry rule when they start)."""

    def __init__(
        self,
        endpoint: str,
        bucket: str,
        access_key: str | None,
        secret_key: str | None,
        *,
        secure: bool = False,
        region: str | None = None,
        timeout_s: float = 5.0,
        retries: int = 3,
    ) -> None:
        self.endpoint = endpoint
        self.bucket = bucket
        self.retries = retries
        http = urllib3.PoolManager(
            timeout=urllib3.Timeout(connect=timeout_s, read=timeout_s), retries=False, maxsize=8
        )
        self._client = Minio(
            endpoint,
            access_key=access_key,
            secret_key=secret_key,
            secure=secure,
            region=region,
            http_client=http,
        )

    def where(self, key: str) -> str:
        return f"s3://{self.bucket}/{key}"

    def _call(self, what: str, fn: Callable[[], T], deadline: float | None) -> T:
        delay = 0.2
        for attempt in range(self.retries + 1):
            last = attempt == self.retries or (deadline is not None and time.monotonic() + delay >= deadline)
            try:
                return fn()
            except S3Error as e:
                if e.code in _AUTH:
                    raise StageError(
                        grpc.StatusCode.FAILED_PRECONDITION,
                        f"{what}: the store at {self.endpoint} refused our credentials ({e.code})",
                        WHERE,
                    ) from None
                if e.code not in _TRANSIENT:
                    raise StageError(
                        grpc.StatusCode.FAILED_PRECONDITION,
                        f"{what}: the store at {self.endpoint} refused: {e.code}: {e.message}",
                        WHERE,
                    ) from None
                if last:
                    raise StageError(
                        grpc.StatusCode.UNAVAILABLE,
                        f"{what}: the store at {self.endpoint} answered {e.code}",
                        WHERE,
                    ) from None
            except (urllib3.exceptions.HTTPError, MinioException, OSError) as e:
                if last:
                    raise StageError(
                        grpc.StatusCode.UNAVAILABLE,
                        f"{what}: the object store at {self.endpoint} is unreachable after {attempt + 1} "
                        f"attempts: {type(e).__name__}",
                        WHERE,
                    ) from None
            time.sleep(delay)
            delay *= 2
        raise AssertionError("unreachable")

    def read(self, key: str, deadline: float | None = None) -> bytes | None:
        def get() -> bytes | None:
            try:
                resp = self._client.get_object(self.bucket, key)
            except S3Error as e:
                if e.code in _MISSING or e.code == "NoSuchBucket":
                    return None
                raise
            try:
                return resp.read()
            finally:
                resp.close()
                resp.release_conn()

        return self._call(f"get {self.where(key)}", get, deadline)

    def write(self, key: str, data: bytes, deadline: float | None = None) -> None:
        def put() -> None:
            try:
                self._put(key, data)
            except S3Error as e:
                if e.code != "NoSuchBucket":
                    raise
                try:
                    self._client.make_bucket(self.bucket)
                except S3Error as made:
                    if made.code not in ("BucketAlreadyOwnedByYou", "BucketAlreadyExists"):
                        raise
                self._put(key, data)

        self._call(f"put {self.where(key)}", put, deadline)

    def _put(self, key: str, data: bytes) -> None:
        self._client.put_object(
            self.bucket, key, io.BytesIO(data), length=len(data), content_type="application/octet-stream"
        )
