"""The orchestrator's own small-object access to the store (its request journal, orchestrator/journal.py).

The orchestrator imports no `services` (DESIGN §2), so it reads and writes whole small objects here: S3
through the `minio` client (the bucket and credentials the stages use), or a local directory (the in-process
mode, the same root as the stages' local store). Every failure is a StageError: the store down is
UNAVAILABLE naming the endpoint, refused credentials FAILED_PRECONDITION. Writes are all-or-nothing (an S3
PUT; a temporary file renamed).

A write may be conditional, which makes the journal head a compare-and-swap: `if_absent` (only when no object
has the key) or `if_version` (only when the object is still the version `read_versioned` gave). S3 does it with
`If-None-Match: *` / `If-Match: <etag>` (AWS S3, MinIO, SeaweedFS); a directory with a lock file beside the
object. A failed condition is `Conflict`, never retried. A store that answers conditional writes with
NotImplemented gets plain ones from then on (logged once): the journal then works as before, except that two
orchestrators racing on one request id may both run it.
"""

from __future__ import annotations

import fcntl
import hashlib
import logging
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

log = logging.getLogger(__name__)
T = TypeVar("T")
WHERE = "journal"  # the StageError stage of store failures
_MISSING = {"NoSuchKey", "NoSuchObject"}
_AUTH = {"AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch"}
_TRANSIENT = {"SlowDown", "InternalError", "ServiceUnavailable", "RequestTimeout", "ServiceNotReady"}


class Conflict(Exception):
    """A conditional write found the object created or changed since it was read."""


class Objects(Protocol):
    """Whole objects by key; `deadline` (time.monotonic()) bounds the retries of a store that is down."""

    def read(self, key: str, deadline: float | None = None) -> bytes | None: ...  # None: no such object

    def read_versioned(self, key: str, deadline: float | None = None) -> tuple[bytes, str] | None:
        """The object and its version tag (for `write(if_version=)`); None: no such object."""
        ...

    def write(
        self,
        key: str,
        data: bytes,
        deadline: float | None = None,
        *,
        if_absent: bool = False,
        if_version: str | None = None,
    ) -> str:
        """Store `data` and give its version tag; Conflict when a condition fails."""
        ...

    def where(self, key: str) -> str: ...  # the object's address, for messages

    def key_of(self, uri: str) -> str | None:
        """The key of a TensorRef uri in this store; None for a uri elsewhere."""
        ...

    def exists(self, key: str, deadline: float | None = None) -> bool: ...


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

    def key_of(self, uri: str) -> str | None:
        prefix = self.root.resolve().as_uri() + "/"
        return uri[len(prefix) :] if uri.startswith(prefix) else None

    def exists(self, key: str, deadline: float | None = None) -> bool:
        return self._path(key).is_file()

    def read(self, key: str, deadline: float | None = None) -> bytes | None:
        try:
            return self._path(key).read_bytes()
        except FileNotFoundError:
            return None
        except OSError as e:
            raise StageError(
                grpc.StatusCode.UNAVAILABLE, f"cannot read {self.where(key)}: {e}", WHERE
            ) from None

    def read_versioned(self, key: str, deadline: float | None = None) -> tuple[bytes, str] | None:
        data = self.read(key, deadline)
        return None if data is None else (data, _digest(data))

    def write(
        self,
        key: str,
        data: bytes,
        deadline: float | None = None,
        *,
        if_absent: bool = False,
        if_version: str | None = None,
    ) -> str:
        path = self._path(key)
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            if not if_absent and if_version is None:
                self._replace(path, data)
                return _digest(data)
            # compare-and-swap: the check and the rename under a lock beside the object (any process here)
            with open(path.parent / f".{path.name}.lock", "a+b") as lock:
                fcntl.flock(lock, fcntl.LOCK_EX)
                try:
                    current = path.read_bytes()
                except FileNotFoundError:
                    current = None
                if if_absent and current is not None:
                    raise Conflict(f"{path} exists")
                if if_version is not None and (current is None or _digest(current) != if_version):
                    raise Conflict(f"{path} changed since it was read")
                self._replace(path, data)
                return _digest(data)
        except OSError as e:
            raise StageError(grpc.StatusCode.UNAVAILABLE, f"cannot write {path}: {e}", WHERE) from None

    @staticmethod
    def _replace(path: Path, data: bytes) -> None:
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(data)
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise


def _digest(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


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
        self.conditional = True  # False once the store answered a conditional write with NotImplemented
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

    def key_of(self, uri: str) -> str | None:
        prefix = f"s3://{self.bucket}/"
        return uri[len(prefix) :] if uri.startswith(prefix) else None

    def exists(self, key: str, deadline: float | None = None) -> bool:
        def stat() -> bool:
            try:
                self._client.stat_object(self.bucket, key)
            except S3Error as e:
                if e.code in _MISSING or e.code in ("NoSuchBucket", "NotFound"):
                    return False
                raise
            return True

        return self._call(f"stat {self.where(key)}", stat, deadline)

    def _call(self, what: str, fn: Callable[[], T], deadline: float | None) -> T:
        delay = 0.2
        for attempt in range(self.retries + 1):
            last = attempt == self.retries or (deadline is not None and time.monotonic() + delay >= deadline)
            try:
                return fn()
            except Conflict:
                raise
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
        got = self.read_versioned(key, deadline)
        return None if got is None else got[0]

    def read_versioned(self, key: str, deadline: float | None = None) -> tuple[bytes, str] | None:
        def get() -> tuple[bytes, str] | None:
            try:
                resp = self._client.get_object(self.bucket, key)
            except S3Error as e:
                if e.code in _MISSING or e.code == "NoSuchBucket":
                    return None
                raise
            try:
                return resp.read(), resp.headers.get("ETag", "")
            finally:
                resp.close()
                resp.release_conn()

        return self._call(f"get {self.where(key)}", get, deadline)

    def write(
        self,
        key: str,
        data: bytes,
        deadline: float | None = None,
        *,
        if_absent: bool = False,
        if_version: str | None = None,
    ) -> str:
        headers = {"Content-Type": "application/octet-stream"}
        if if_absent:
            headers["If-None-Match"] = "*"
        elif if_version is not None:
            headers["If-Match"] = if_version
        tries = 0

        def put() -> str:
            nonlocal tries
            tries += 1
            try:
                return self._put(key, data, headers)
            except S3Error as e:
                if e.code == "NoSuchBucket":
                    try:
                        self._client.make_bucket(self.bucket)
                    except S3Error as made:
                        if made.code not in ("BucketAlreadyOwnedByYou", "BucketAlreadyExists"):
                            raise
                    return put()
                if e.code != "PreconditionFailed":
                    raise
            # the condition failed; after a retry that may be our own earlier attempt, which did land
            if tries > 1:
                got = self.read_versioned(key, deadline)
                if got is not None and got[0] == data:
                    return got[1]
            raise Conflict(f"{self.where(key)} was created or changed since it was read")

        return self._call(f"put {self.where(key)}", put, deadline)

    def _put(self, key: str, data: bytes, headers: dict[str, str]) -> str:
        if not self.conditional:
            headers = {k: v for k, v in headers.items() if not k.startswith("If-")}
        try:
            # the public put_object takes no request headers; _put_object is its single-part PUT (minio 7.2)
            result = self._client._put_object(self.bucket, key, data, headers=headers)
        except S3Error as e:
            if e.code != "NotImplemented" or not any(k.startswith("If-") for k in headers):
                raise
            log.warning(
                "the store at %s does not take conditional writes (%s); the journal falls back to plain ones",
                self.endpoint,
                e.message,
            )
            self.conditional = False
            return self._put(key, data, headers)
        return f'"{result.etag}"'
