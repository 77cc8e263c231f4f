"""Model specs, fetching, and the bounded cache of loaded models (DESIGN §4).

A spec names a model as a local directory in the diffusers / hub layout, a single-file original checkpoint,
or `hf://<id>[@rev]` / `modelscope://<id>[@rev]`, fetched once into the cache directory. Services start with
no model and load on demand from the spec a request names; `ModelCache` keeps the last few loaded.
Weights are read with safetensors (memory-mapped); `.pth/.bin` only through `torch.load(weights_only=True)`.
"""

from __future__ import annotations

import json
import pickle
import re
import threading
from collections import OrderedDict
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Generic, TypeVar

import torch
from safetensors import safe_open

from services.common.errors import InvalidArgument, NotFound, Unavailable

V = TypeVar("V")
_HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*$")
_REV = re.compile(r"^[A-Za-z0-9._-]{1,64}$")
WEIGHT_SUFFIXES = (".safetensors", ".pth", ".pt", ".bin", ".ckpt")


@dataclass(frozen=True)
class ModelSpec:
    scheme: str  # "path", "hf" or "modelscope"
    name: str  # a path, or a hub id "org/name"
    revision: str | None = None

    def __str__(self) -> str:
        if self.scheme == "path":
            return self.name
        return f"{self.scheme}://{self.name}" + (f"@{self.revision}" if self.revision else "")


def parse_spec(spec: str) -> ModelSpec:
    spec = spec.strip()
    if not spec:
        raise InvalidArgument("model spec is empty")
    if len(spec) > 1024:
        raise InvalidArgument(f"model spec is {len(spec)} characters long (at most 1024)")
    if any(ord(c) < 32 or ord(c) == 127 for c in spec):
        raise InvalidArgument(f"model spec {spec!r} contains a control character")
    for scheme in ("hf", "modelscope"):
        prefix = f"{scheme}://"
        if spec.startswith(prefix):
            ident, _, rev = spec[len(prefix) :].partition("@")
            if not _HUB_ID.match(ident) or ".." in ident:
                raise InvalidArgument(f"model spec {spec!r}: hub id must look like 'org/name'")
            if rev and not _REV.match(rev):
                raise InvalidArgument(f"model spec {spec!r}: revision {rev!r} is not a plain name")
            return ModelSpec(scheme, ident, rev or None)
    if "://" in spec:
        raise InvalidArgument(f"model spec {spec!r}: unknown scheme; use a path, hf:// or modelscope://")
    return ModelSpec("path", spec)


def cache_path(spec: ModelSpec, cache_dir: Path) -> Path:
    """Where a hub model lives once fetched: `<cache>/<scheme>/<org>--<name>/<revision or 'main'>`."""
    return Path(cache_dir) / spec.scheme / spec.name.replace("/", "--") / (spec.revision or "main")


def _download(spec: ModelSpec, dest: Path) -> None:
    if spec.scheme == "hf":
        from huggingface_hub import snapshot_download

        snapshot_download(repo_id=spec.name, revision=spec.revision, local_dir=str(dest))
    else:
        from modelscope import snapshot_download as ms_snapshot_download

        ms_snapshot_download(spec.name, revision=spec.revision or "master", local_dir=str(dest))


def fetch_model(spec: ModelSpec, cache_dir: Path, offline: bool) -> Path:
    """The local directory of a hub model, downloading it once; offline, a clear error naming the path."""
    dest = cache_path(spec, cache_dir)
    if dest.is_dir() and any(dest.iterdir()):
        return dest
    if offline:
        raise NotFound(f"model {spec} is not in the cache and downloads are off (offline); put it at {dest}")
    try:
        _download(spec, dest)
    except Exception as e:
        raise Unavailable(
            f"model {spec} could not be fetched ({type(e).__name__}: {e}); fill the cache by hand at {dest}"
        ) from None
    return dest


def _within(path: Path, roots: Iterable[Path]) -> bool:
    return any(path == r or r in path.parents for r in roots)


def _exists(path: Path, spec: str) -> bool:
    try:
        return path.exists()
    except OSError as e:  # e.g. a name longer than the filesystem allows
        raise InvalidArgument(f"model {spec!r}: cannot look up {str(path)[:300]!r}: {e.strerror}") from None


def resolve_spec(spec: str, *, roots: tuple[Path, ...] = (), cache_dir: Path, offline: bool = False) -> Path:
    """A spec -> an existing local file or directory.

    With model roots configured, a relative path is looked up under each root in turn and an absolute path
    (or one escaping through '..' or links) must stay inside a root. With none, any local path is allowed.
    """
    parsed = parse_spec(spec)
    if parsed.scheme != "path":
        return fetch_model(parsed, cache_dir, offline)
    try:
        raw = Path(parsed.name).expanduser()
    except RuntimeError as e:  # "~user" of an unknown user
        raise InvalidArgument(f"model {spec!r}: {e}") from None
    if not roots:
        path = raw.resolve()
        if not _exists(path, spec):
            raise NotFound(f"model {spec!r} not found: no such file or directory {path}")
        return path
    resolved_roots = [r.resolve() for r in roots]
    candidates = [raw.resolve()] if raw.is_absolute() else [(r / raw).resolve() for r in resolved_roots]
    for path in candidates:
        if not _within(path, resolved_roots):
            raise InvalidArgument(f"model {spec!r} is outside the model roots {[str(r) for r in roots]}")
        if _exists(path, spec):
            return path
    raise NotFound(f"model {spec!r} not found under the model roots {[str(r) for r in roots]}")


def read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise NotFound(f"missing {path}") from None
    except json.JSONDecodeError as e:
        raise InvalidArgument(f"{path} is not valid JSON: {e}") from None
    if not isinstance(data, dict):
        raise InvalidArgument(f"{path}: expected a JSON object, got {type(data).__name__}")
    return data


def weight_files(directory: Path) -> list[Path]:
    """The weight files of a component directory: safetensors first (sharded ones all), else .bin/.pth."""
    directory = Path(directory)
    found = sorted(directory.glob("*.safetensors"))
    if not found:
        found = sorted(p for p in directory.iterdir() if p.suffix in WEIGHT_SUFFIXES)
    if not found:
        raise NotFound(f"no weight files in {directory} (looked for {', '.join(WEIGHT_SUFFIXES)})")
    return found


def load_state_dict(
    paths: Path | Iterable[Path], device: str | torch.device = "cpu", dtype: torch.dtype | None = None
) -> dict[str, torch.Tensor]:
    """Merge the tensors of weight files. safetensors is memory-mapped; pickles load with weights_only."""
    out: dict[str, torch.Tensor] = {}
    for path in [paths] if isinstance(paths, Path) else list(paths):
        if path.suffix == ".safetensors":
            with safe_open(str(path), framework="pt", device=str(device)) as f:
                for key in f.keys():  # noqa: SIM118 - safe_open is not a mapping
                    out[key] = f.get_tensor(key)
        elif path.suffix in WEIGHT_SUFFIXES:
            try:  # a corrupt file, or one that holds more than tensors (weights_only refuses it)
                sd = torch.load(path, map_location=device, weights_only=True, mmap=True)
            except (pickle.UnpicklingError, RuntimeError, EOFError, ValueError) as e:
                raise InvalidArgument(
                    f"{path}: not a loadable weights file ({type(e).__name__}: {e})"
                ) from None
            out.update(sd.get("state_dict", sd) if isinstance(sd, dict) else {})
        else:
            raise InvalidArgument(f"{path}: unknown weight file type (expected one of {WEIGHT_SUFFIXES})")
    if dtype is not None:
        out = {k: v.to(dtype) if v.is_floating_point() else v for k, v in out.items()}
    return out


class ModelCache(Generic[V]):
    """At most `capacity` loaded models, least recently used evicted; one load per key at a time."""

    def __init__(self, capacity: int, on_evict: Callable[[str, V], None] | None = None) -> None:
        if capacity < 1:
            raise InvalidArgument(f"model cache capacity {capacity} must be >= 1")
        self.capacity = capacity
        self._items: OrderedDict[str, V] = OrderedDict()
        self._lock = threading.Lock()
        self._loading: dict[str, threading.Lock] = {}
        self._on_evict = on_evict

    def get(self, key: str, load: Callable[[], V]) -> V:
        with self._lock:
            if key in self._items:
                self._items.move_to_end(key)
                return self._items[key]
            key_lock = self._loading.setdefault(key, threading.Lock())
        with key_lock:
            with self._lock:
                if key in self._items:
                    self._items.move_to_end(key)
                    return self._items[key]
            value = load()
            evicted: list[tuple[str, V]] = []
            with self._lock:
                self._items[key] = value
                while len(self._items) > self.capacity:
                    evicted.append(self._items.popitem(last=False))
                self._loading.pop(key, None)
        for k, v in evicted:
            if self._on_evict is not None:
                self._on_evict(k, v)
        if evicted and torch.cuda.is_available():
            torch.cuda.empty_cache()
        return value

    def keys(self) -> list[str]:
        with self._lock:
            return list(self._items)

    def clear(self) -> None:
        with self._lock:
            self._items.clear()


@dataclass(frozen=True)
class Component:
    """One component of a model (a transformer, a VAE, a text encoder) and how to recognise it."""

    path: Path  # its directory, or the single weight file
    class_name: str  # diffusers `_class_name` / transformers `architectures[0]` / "single-file"
    config: dict[str, Any]


def find_component(model: Path, subfolders: Iterable[str]) -> Component:
    """The first of `subfolders` present in a hub-layout model (or `model` itself when it is one component
    directory or a single weight file). NotFound names what was looked for and what is there."""
    model = Path(model)
    if model.is_file():
        if model.suffix not in WEIGHT_SUFFIXES:
            raise InvalidArgument(f"{model}: not a weight file (expected one of {WEIGHT_SUFFIXES})")
        return Component(model, "single-file", {})
    subfolders = list(subfolders)
    for sub in [*subfolders, "."]:
        cfg = model / sub / "config.json"
        if cfg.is_file():
            config = read_json(cfg)
            archs = config.get("architectures") or []
            name = config.get("_class_name") or (archs[0] if archs else "") or config.get("model_type", "")
            return Component((model / sub).resolve(), str(name), config)
    present = sorted(p.name for p in model.iterdir()) if model.is_dir() else []
    raise NotFound(f"{model}: no component in {subfolders} (each needs a config.json); found {present}")
