"""Checkpoints: `<output>/checkpoints/step-XXXXXXXX/` with a manifest written LAST.

A checkpoint holds `trainable-NNNNN.safetensors` (the weights being trained), `state-NNNNN.safetensors` +
`state.json` (the optimizer, LR scheduler, data position and RNG states: tensors in safetensors shards of at most
2 GiB, the rest as JSON, nothing pickled), and `manifest.json` listing every file with its size and sha256. Only a folder whose manifest exists and
whose files match it is complete; anything else (a run killed mid-write) is ignored. After a new manifest lands,
all but the newest `keep` checkpoints are deleted, manifest first, so a half-deleted one never looks complete.
Works the same on a local folder and on S3 (an S3 PUT is atomic, and the manifest is PUT after the files).
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from safetensors.torch import load as safetensors_load
from safetensors.torch import save as safetensors_save
from torch import Tensor

from trainer.storage import Storage

log = logging.getLogger(__name__)
ROOT = "checkpoints"
MANIFEST = "manifest.json"
FORMAT = "diffmesh-checkpoint/1"
_STEP = re.compile(r"^checkpoints/step-(\d{8})/")
SHARD_BYTES = 2 << 30  # safetensors files of at most ~2 GiB each


def folder(step: int) -> str:
    return f"{ROOT}/step-{step:08d}"


# -- a JSON codec for state dicts: tensors go to safetensors, tuples and non-string keys survive -----------
def encode(obj: Any, tensors: dict[str, Tensor], path: str = "s") -> Any:
    if isinstance(obj, Tensor):
        tensors[path] = obj.detach().cpu().contiguous()
        return {"__tensor__": path}
    if isinstance(obj, tuple):
        return {"__tuple__": [encode(v, tensors, f"{path}.{i}") for i, v in enumerate(obj)]}
    if isinstance(obj, list):
        return [encode(v, tensors, f"{path}.{i}") for i, v in enumerate(obj)]
    if isinstance(obj, dict):
        if all(isinstance(k, str) and not k.startswith("__") for k in obj):
            return {k: encode(v, tensors, f"{path}.{k}") for k, v in obj.items()}
        return {"__items__": [[k, encode(v, tensors, f"{path}.{i}")] for i, (k, v) in enumerate(obj.items())]}
    if obj is None or isinstance(obj, bool | int | float | str):
        return obj
    raise TypeError(f"cannot checkpoint a {type(obj).__name__} at {path}")


def decode(obj: Any, tensors: dict[str, Tensor]) -> Any:
    if isinstance(obj, list):
        return [decode(v, tensors) for v in obj]
    if isinstance(obj, dict):
        if "__tensor__" in obj:
            return tensors[obj["__tensor__"]]
        if "__tuple__" in obj:
            return tuple(decode(v, tensors) for v in obj["__tuple__"])
        if "__items__" in obj:
            return {k: decode(v, tensors) for k, v in obj["__items__"]}
        return {k: decode(v, tensors) for k, v in obj.items()}
    return obj


@dataclass(frozen=True)
class Checkpoint:
    step: int
    trainable: dict[str, Tensor]
    state: dict[str, Any]


@dataclass(frozen=True)
class Written:
    step: int
    bytes: int
    seconds: float


def shards(tensors: dict[str, Tensor], limit: int = SHARD_BYTES) -> Iterator[dict[str, Tensor]]:
    """Groups of tensors of at most `limit` bytes each (a larger tensor is a group of its own)."""
    group: dict[str, Tensor] = {}
    size = 0
    for key, tensor in tensors.items():
        nbytes = tensor.numel() * tensor.element_size()
        if group and size + nbytes > limit:
            yield group
            group, size = {}, 0
        group[key] = tensor
        size += nbytes
    yield group


def save(
    storage: Storage,
    step: int,
    trainable: dict[str, Tensor],
    state: dict[str, Any],
    keep: int = 2,
    shard_bytes: int = SHARD_BYTES,
) -> Written:
    """Write checkpoint `step` (files, then the manifest), then prune to the newest `keep` complete ones.

    Tensors go out in safetensors shards of at most `shard_bytes`, one at a time, so the memory a checkpoint
    takes on the host is about one shard, whatever the model's size."""
    started = time.perf_counter()
    tensors: dict[str, Tensor] = {}
    skeleton = encode(state, tensors)
    base = folder(step)
    files: dict[str, dict[str, Any]] = {}

    def put(name: str, data: bytes) -> None:
        storage.write(f"{base}/{name}", data)
        files[name] = {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}

    for kind, group in (("trainable", trainable), ("state", tensors)):
        for i, shard in enumerate(shards(group, shard_bytes)):
            put(
                f"{kind}-{i:05d}.safetensors",
                safetensors_save({k: v.detach().cpu().contiguous() for k, v in shard.items()}),
            )
    put("state.json", json.dumps({"format": FORMAT, "step": step, "state": skeleton}).encode())
    manifest = {"format": FORMAT, "step": step, "files": files, "created": time.time()}
    storage.write(f"{base}/{MANIFEST}", json.dumps(manifest, indent=2).encode())
    prune(storage, keep)
    return Written(step, sum(f["size"] for f in files.values()), time.perf_counter() - started)


def steps_present(storage: Storage) -> dict[int, list[str]]:
    """step -> the files under its folder (complete or not)."""
    out: dict[int, list[str]] = {}
    for name in storage.list(f"{ROOT}/"):
        match = _STEP.match(name)
        if match:
            out.setdefault(int(match.group(1)), []).append(name)
    return out


def _load_verified(storage: Storage, step: int) -> Checkpoint | None:
    """A complete checkpoint, each file checked against the manifest as it is read; None when incomplete."""
    base = folder(step)
    try:
        manifest = json.loads(storage.read(f"{base}/{MANIFEST}"))
    except (FileNotFoundError, json.JSONDecodeError):
        return None
    files = manifest.get("files", {})
    if "state.json" not in files or not any(n.startswith("trainable-") for n in files):
        log.warning("checkpoint %s: the manifest lists no weights or no state; ignored", base)
        return None
    trainable: dict[str, Tensor] = {}
    tensors: dict[str, Tensor] = {}
    doc: dict[str, Any] = {}
    for name, meta in sorted(files.items()):
        try:
            data = storage.read(f"{base}/{name}")
        except FileNotFoundError:
            log.warning("checkpoint %s: %s is missing; ignored", base, name)
            return None
        if len(data) != meta["size"] or hashlib.sha256(data).hexdigest() != meta["sha256"]:
            log.warning("checkpoint %s: %s does not match its manifest; ignored", base, name)
            return None
        if name == "state.json":
            doc = json.loads(data)
        else:
            (trainable if name.startswith("trainable-") else tensors).update(safetensors_load(data))
        del data
    return Checkpoint(step, trainable, decode(doc["state"], tensors))


def complete_steps(storage: Storage) -> list[int]:
    """Steps whose folder has a manifest (not verified), ascending."""
    return sorted(s for s, names in steps_present(storage).items() if f"{folder(s)}/{MANIFEST}" in names)


def latest(storage: Storage) -> Checkpoint | None:
    """The newest complete checkpoint (manifest present, every file matching it), or None."""
    for step in reversed(complete_steps(storage)):
        found = _load_verified(storage, step)
        if found is not None:
            return found
    return None


def prune(storage: Storage, keep: int = 2) -> list[int]:
    """Delete every checkpoint folder older than the newest `keep` complete ones (manifest first)."""
    present = steps_present(storage)
    complete = complete_steps(storage)
    if len(complete) <= keep:
        return []
    cutoff = complete[-keep]
    removed = []
    for step, names in sorted(present.items()):
        if step >= cutoff:
            continue
        manifest = f"{folder(step)}/{MANIFEST}"
        for name in sorted(names, key=lambda n: n != manifest):  # the manifest goes first
            storage.delete(name)
        removed.append(step)
    return removed
