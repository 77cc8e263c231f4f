"""The request journal: durable stage resume and request-id idempotency (DESIGN §1: no request starts over
because one stage died).

For a Generate that carries a client request id, the orchestrator keeps, in the store beside the request's
tensors (so the bucket's `runs/` expiry removes both together):

- `runs/<id>/orchestrator/journal.json`, the head: the request's fingerprint (sha256 of the request without its
  id), the seed it resolved to, its status (running / done / failed), the orchestrator that owns it and the
  wall-clock time of its last heartbeat, and for each finished stage the key, size and sha256 of its record;
- `runs/<id>/orchestrator/stage-<stage>.json`: one finished stage's outputs (protobuf refs, PNG / MP4 bytes),
  written before the head names it.

A submission whose id the journal knows is:
- a different request under that id: ALREADY_EXISTS;
- done: the recorded outputs give the result again, nothing is computed twice;
- running under another owner with a fresh heartbeat: it waits for that run (to its deadline), then as above;
- failed, or running under an owner whose heartbeat is older than the lease (that orchestrator died): taken
  over; the finished stages are not run again, the others run from the refs those left in the store.
  Heartbeats are wall-clock times, so the orchestrators' clocks must agree to well within the lease (NTP, as
  on any Kubernetes node); a clock further behind makes its runs look dead early: they are taken over and
  computed twice, never mixed (see below).

A stage record whose size or sha256 does not match the head is never used, nor one that names a tensor gone
from the store (deleted, expired): that stage runs again if a stage still to run needs its outputs (the
runner). Values are JSON with base64 bytes; nothing is unpickled.

Every write of a head is a compare-and-swap (orchestrator/objects.py): it is created only if absent and
replaced only if it is still the version its owner last wrote. So of two replicas given the same new id at the
same instant, or taking over the same dead owner, one wins and the other waits for it; and an owner whose
heartbeat lapsed (a store down for longer than the lease) and was taken over finds out at its next write: it
stops writing the journal, finishes the run for its own client and leaves the entry to the new owner. A
store without conditional writes gets plain ones; then two replicas racing on one id may both run it (they
write the same objects).
"""

from __future__ import annotations

import base64
import hashlib
import json
import logging
import os
import socket
import threading
import time
import uuid
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import grpc
from google.protobuf import descriptor_pool, message_factory
from google.protobuf.message import DecodeError, Message

from orchestrator.errors import StageError
from orchestrator.objects import Conflict, Objects
from protos import orchestrator_pb2

log = logging.getLogger(__name__)
VERSION = 1
RUNNING, DONE, FAILED = "running", "done", "failed"
TENSOR_REF = "diffmesh.v1.TensorRef"


def fingerprint(request: orchestrator_pb2.GenerateRequest) -> str:
    """sha256 of the request without its id (deterministic serialization: map fields sorted)."""
    copy = orchestrator_pb2.GenerateRequest()
    copy.CopyFrom(request)
    copy.request_id = ""
    return hashlib.sha256(copy.SerializeToString(deterministic=True)).hexdigest()


def encode_value(value: Any) -> Any:
    """A stage output (protobuf message, bytes, list, dict, JSON scalar) as JSON."""
    if isinstance(value, Message):
        data = value.SerializeToString(deterministic=True)
        return {"message": value.DESCRIPTOR.full_name, "b64": base64.b64encode(data).decode()}
    if isinstance(value, bytes | bytearray | memoryview):
        return {"bytes": base64.b64encode(bytes(value)).decode()}
    if value is None or isinstance(value, str | int | float | bool):
        return {"json": value}
    if isinstance(value, Sequence):  # lists, tuples, repeated protobuf fields
        return {"list": [encode_value(v) for v in value]}
    if isinstance(value, Mapping):
        if not all(isinstance(k, str) for k in value):
            raise TypeError(f"journal: dict keys must be strings, got {sorted(map(repr, value))[:5]}")
        return {"dict": {k: encode_value(v) for k, v in value.items()}}
    raise TypeError(f"journal: cannot record a {type(value).__name__}")


def decode_value(doc: Any) -> Any:
    """The inverse of encode_value; ValueError for anything else."""
    if not isinstance(doc, dict) or len(doc) not in (1, 2):
        raise ValueError(f"not a journal value: {str(doc)[:80]}")
    if "message" in doc:
        try:
            cls = message_factory.GetMessageClass(
                descriptor_pool.Default().FindMessageTypeByName(doc["message"])
            )
            return cls.FromString(base64.b64decode(doc["b64"], validate=True))
        except (KeyError, TypeError, DecodeError, ValueError) as e:
            raise ValueError(f"journal message {doc.get('message')!r}: {e}") from None
    if "bytes" in doc:
        return base64.b64decode(doc["bytes"], validate=True)
    if "list" in doc and isinstance(doc["list"], list):
        return [decode_value(v) for v in doc["list"]]
    if "dict" in doc and isinstance(doc["dict"], dict):
        return {str(k): decode_value(v) for k, v in doc["dict"].items()}
    if "json" in doc:
        return doc["json"]
    raise ValueError(f"not a journal value: {str(doc)[:80]}")


def tensor_uris(value: Any) -> list[str]:
    """The uris of every TensorRef in a stage's outputs (messages, lists and dicts of them)."""
    if isinstance(value, Message):
        if value.DESCRIPTOR.full_name == TENSOR_REF:
            return [value.uri] if value.uri else []
        uris: list[str] = []
        for fd, field_value in value.ListFields():
            if fd.message_type is None:
                continue
            if fd.message_type.GetOptions().map_entry:
                field_value = list(field_value.values())
            uris += (
                tensor_uris(field_value)
                if isinstance(field_value, Message)
                else tensor_uris(list(field_value))
            )
        return uris
    if isinstance(value, Mapping):
        value = list(value.values())
    if isinstance(value, list | tuple):
        return [uri for v in value for uri in tensor_uris(v)]
    return []


@dataclass
class Entry:
    """One request's journal head, as this orchestrator holds it (`lock` guards it and its writes)."""

    request_id: str
    head: dict[str, Any]
    owned: bool  # this orchestrator runs it (False: a finished run, only read; or lost to another owner)
    version: str = ""  # the head's version in the store, as this orchestrator last read or wrote it
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    @property
    def status(self) -> str:
        return self.head["status"]

    @property
    def seed(self) -> int | None:
        return self.head.get("seed")

    @property
    def stages(self) -> dict[str, dict[str, Any]]:
        return self.head["stages"]


class Journal:
    """Journal heads and stage records in `objects`; `lease_s`: a running entry whose heartbeat is older
    belongs to a dead orchestrator and may be taken over (heartbeats every lease / 3)."""

    def __init__(self, objects: Objects, lease_s: float = 30.0, poll_s: float = 0.25) -> None:
        if lease_s <= 0:
            raise ValueError(f"journal lease {lease_s} s must be > 0")
        self.objects = objects
        self.lease_s = lease_s
        self.poll_s = poll_s
        self.owner = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"

    @staticmethod
    def head_key(request_id: str) -> str:
        return f"runs/{request_id}/orchestrator/journal.json"

    @staticmethod
    def stage_key(request_id: str, stage: str) -> str:
        return f"runs/{request_id}/orchestrator/stage-{stage}.json"

    # -- reading ------------------------------------------------------------------------------------------

    def _read_head(self, request_id: str, deadline: float | None) -> tuple[dict[str, Any], str] | None:
        key = self.head_key(request_id)
        got = self.objects.read_versioned(key, deadline)
        if got is None:
            return None
        raw, version = got
        try:
            head = json.loads(raw)
            if not isinstance(head, dict) or head.get("version") != VERSION:
                raise ValueError(f"version {head.get('version') if isinstance(head, dict) else None}")
            if head.get("status") not in (RUNNING, DONE, FAILED) or not isinstance(head.get("stages"), dict):
                raise ValueError("no status or stages")
        except ValueError as e:
            raise StageError(
                grpc.StatusCode.DATA_LOSS,
                f"the journal of request {request_id!r} ({self.objects.where(key)}) is unreadable: {e}; "
                "send the request under a new id",
                "journal",
            ) from None
        return head, version

    def load_stages(self, entry: Entry, deadline: float | None = None) -> dict[str, dict[str, Any]]:
        """The outputs of each finished stage whose record is intact; a missing or damaged record is logged
        and left out (that stage runs again)."""
        out: dict[str, dict[str, Any]] = {}
        for stage, meta in entry.stages.items():
            where = self.objects.where(meta.get("key", "?"))
            raw = self.objects.read(meta["key"], deadline)
            if raw is None:
                log.warning(
                    "request %s: stage record %s is gone; %s runs again", entry.request_id, where, stage
                )
                continue
            digest = hashlib.sha256(raw).hexdigest()
            if len(raw) != meta.get("size") or digest != meta.get("sha256"):
                log.warning(
                    "request %s: stage record %s is damaged (%d bytes, sha256 %s; expected %s, %s); %s runs again",
                    entry.request_id,
                    where,
                    len(raw),
                    digest,
                    meta.get("size"),
                    meta.get("sha256"),
                    stage,
                )
                continue
            try:
                outputs = decode_value(json.loads(raw))
                if not isinstance(outputs, dict):
                    raise ValueError("not a dict of outputs")
            except ValueError as e:
                log.warning(
                    "request %s: stage record %s: %s; %s runs again", entry.request_id, where, e, stage
                )
                continue
            gone = [uri for uri in tensor_uris(outputs) if not self._ref_exists(uri, deadline)]
            if gone:
                log.warning(
                    "request %s: %d tensor(s) of stage %s are gone from the store (%s); it runs again if needed",
                    entry.request_id,
                    len(gone),
                    stage,
                    gone[0],
                )
                continue
            out[stage] = outputs
        return out

    def _ref_exists(self, uri: str, deadline: float | None) -> bool:
        key = self.objects.key_of(uri)
        return True if key is None else self.objects.exists(key, deadline)  # elsewhere: the stage's check

    # -- claiming -----------------------------------------------------------------------------------------

    def claim(
        self,
        request_id: str,
        fp: str,
        deadline: float | None = None,
        cancelled: threading.Event | None = None,
        on_wait: Any = None,
        seed: int | None = None,
    ) -> Entry:
        """The entry of this submission: a new one (recording `seed`, the one this submission's plan drew), a
        finished one to replay, or a failed / abandoned one taken over. While another live orchestrator runs
        the id, wait (`on_wait(owner)` once)."""
        waited = False
        while True:
            got = self._read_head(request_id, deadline)
            now = time.time()
            if got is None:
                head = {
                    "version": VERSION,
                    "request_id": request_id,
                    "fingerprint": fp,
                    "seed": seed,
                    "status": RUNNING,
                    "owner": self.owner,
                    "heartbeat": now,
                    "stages": {},
                    "error": None,
                }
                entry = Entry(request_id, head, owned=True)
                try:
                    self._write_head(entry, deadline, if_absent=True)
                except Conflict:
                    continue  # another orchestrator created it just now: read what it wrote
                return entry
            head, version = got
            if head.get("fingerprint") != fp:
                raise StageError(
                    grpc.StatusCode.ALREADY_EXISTS,
                    f"request_id {request_id!r} was already used for a different request (journal "
                    f"{self.objects.where(self.head_key(request_id))}); a retry sends the same request, a new "
                    "request a new id",
                )
            if head["status"] == DONE:
                return Entry(request_id, head, owned=False, version=version)
            age = now - float(head.get("heartbeat") or 0)
            if head["status"] == RUNNING and head.get("owner") != self.owner and age < self.lease_s:
                if not waited and on_wait is not None:
                    on_wait(str(head.get("owner")))
                waited = True
                if cancelled is not None and cancelled.is_set():
                    raise StageError(grpc.StatusCode.CANCELLED, f"request {request_id} cancelled", "journal")
                if deadline is not None and time.monotonic() + self.poll_s >= deadline:
                    raise StageError(
                        grpc.StatusCode.DEADLINE_EXCEEDED,
                        f"request {request_id} is still running on orchestrator {head.get('owner')}",
                        "journal",
                    )
                time.sleep(self.poll_s)
                continue
            if head["status"] == RUNNING and head.get("owner") != self.owner:
                log.warning(
                    "request %s: taking over from orchestrator %s (no heartbeat for %.1f s)",
                    request_id,
                    head.get("owner"),
                    age,
                )
            head.update(status=RUNNING, owner=self.owner, heartbeat=now, error=None)
            entry = Entry(request_id, head, owned=True, version=version)
            try:
                self._write_head(entry, deadline)
            except Conflict:
                continue  # another orchestrator took it over first, or its owner moved on: read again
            return entry

    # -- writing ------------------------------------------------------------------------------------------

    def _write_head(self, entry: Entry, deadline: float | None, *, if_absent: bool = False) -> None:
        """Write the head if the store still holds the version this orchestrator last saw (Conflict if not)."""
        data = json.dumps(entry.head, sort_keys=True).encode()
        key = self.head_key(entry.request_id)
        if if_absent:
            entry.version = self.objects.write(key, data, deadline, if_absent=True)
        else:
            entry.version = self.objects.write(key, data, deadline, if_version=entry.version)

    def _update_head(self, entry: Entry, deadline: float | None) -> None:
        """An owner's write of its head (entry.lock held). Lost to another owner: stop writing, log it."""
        if not entry.owned:
            return
        try:
            self._write_head(entry, deadline)
        except Conflict:
            got = self._read_head(entry.request_id, deadline)
            owner = got[0].get("owner") if got is not None else None
            entry.owned = False
            log.warning(
                "request %s: orchestrator %s took it over (our heartbeat lapsed); this run finishes for its "
                "client without writing the journal",
                entry.request_id,
                owner,
            )

    def set_seed(self, entry: Entry, seed: int, deadline: float | None = None) -> None:
        with entry.lock:
            entry.head["seed"] = seed
            self._update_head(entry, deadline)

    def stage_done(
        self,
        entry: Entry,
        stage: str,
        outputs: Mapping[str, Any],
        seconds: float,
        endpoint: str,
        deadline: float | None = None,
    ) -> None:
        """Record a finished stage: its outputs' record first, then the head that names it (nothing once the
        entry was lost to another owner)."""
        if not entry.owned:
            return
        data = json.dumps(encode_value(dict(outputs)), separators=(",", ":")).encode()
        key = self.stage_key(entry.request_id, stage)
        self.objects.write(key, data, deadline)
        with entry.lock:
            entry.stages[stage] = {
                "key": key,
                "size": len(data),
                "sha256": hashlib.sha256(data).hexdigest(),
                "seconds": round(seconds, 6),
                "endpoint": endpoint,
            }
            entry.head["heartbeat"] = time.time()
            self._update_head(entry, deadline)

    def finish(self, entry: Entry, error: StageError | None = None) -> None:
        """Mark the run done, or failed with the error's code and message. Best effort: a store that is
        down leaves the entry running, and its lease lets the next submission take it over."""
        with entry.lock:
            entry.head["status"] = FAILED if error else DONE
            entry.head["error"] = {"code": error.code.name, "message": str(error)[:2000]} if error else None
            entry.head["heartbeat"] = time.time()
            try:
                self._update_head(entry, None)
            except StageError as e:
                log.warning("request %s: cannot record its end in the journal: %s", entry.request_id, e)

    @contextmanager
    def heartbeat(self, entry: Entry) -> Iterator[None]:
        """While the body runs, refresh the entry's heartbeat every lease / 3 (failures only logged)."""
        stop = threading.Event()

        def beat() -> None:
            while not stop.wait(self.lease_s / 3):
                with entry.lock:
                    if stop.is_set():
                        return
                    entry.head["heartbeat"] = time.time()
                    try:
                        self._update_head(entry, time.monotonic() + self.lease_s / 3)
                    except StageError as e:
                        log.warning("request %s: heartbeat not recorded: %s", entry.request_id, e)

        thread = threading.Thread(target=beat, name=f"journal-{entry.request_id[:16]}", daemon=True)
        thread.start()
        try:
            yield
        finally:
            stop.set()
            thread.join()
