"""What every stage servicer shares: settings, the store, the device, and a bounded cache of models
loaded on demand through a registry of loaders keyed by the component's class name."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any, TypeVar

import torch

from protos import common_pb2, tensor_pb2
from services.common.errors import InvalidArgument, NotFound
from services.common.models import Component, ModelCache, find_component, resolve_spec
from services.common.settings import Settings
from services.common.store import TensorStore, run_key

V = TypeVar("V")
Loader = Callable[[Component, torch.device], Any]


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        return torch.device(name)
    except RuntimeError:
        raise InvalidArgument(f"DIFFMESH_DEVICE={name!r} is not a torch device") from None


class StageRuntime:
    def __init__(self, stage: str, settings: Settings, store: TensorStore) -> None:
        self.stage = stage
        self.settings = settings
        self.store = store
        self.device = pick_device(settings.device)
        self.models: ModelCache[Any] = ModelCache(settings.model_cache_size)

    def resolve(self, spec: str) -> Path:
        """The local file or directory a model spec names (fetched into the cache when remote)."""
        return resolve_spec(
            spec,
            roots=self.settings.model_roots,
            cache_dir=self.settings.cache_dir,
            offline=self.settings.offline,
        )

    def load(self, spec: str, subfolders: Iterable[str], registry: Mapping[str, Loader]) -> Any:
        """The model component a request names, loaded once and cached (least recently used evicted)."""
        component = find_component(self.resolve(spec), list(subfolders))
        return self._cached(spec, component, registry)

    def load_component(self, spec: str, subfolder: str, registry: Mapping[str, Loader]) -> Any:
        """The component in exactly `subfolder` of a hub-layout model (no fallback to other folders)."""
        if Path(subfolder).name != subfolder or subfolder in ("", ".", ".."):
            raise InvalidArgument(f"{self.stage}: component folder {subfolder!r} is not a plain folder name")
        path = self.resolve(spec)
        if not (path / subfolder / "config.json").is_file():
            raise NotFound(f"{self.stage}: model {spec!r} has no {subfolder}/config.json")
        return self._cached(spec, find_component(path, [subfolder]), registry)

    def _cached(self, spec: str, component: Component, registry: Mapping[str, Loader]) -> Any:
        loader = registry.get(component.class_name)
        if loader is None:
            raise NotFound(
                f"{self.stage}: model {spec!r} has a {component.class_name or 'unnamed'} component at "
                f"{component.path}; this service loads {sorted(registry) or 'no model classes yet'}"
            )
        key = f"{component.path}|{component.class_name}"
        return self.models.get(key, lambda: loader(component, self.device))

    def output(
        self, request_id: str, name: str, tensor: torch.Tensor, inline: bool | None = None
    ) -> tensor_pb2.Tensor:
        """Put a result in the store under runs/<request_id>/<stage>/<name> (inline when small, unless
        `inline` says otherwise)."""
        return self.store.put_tensor(run_key(request_id, self.stage, name), tensor, inline=inline)

    def input(self, msg: tensor_pb2.Tensor, field: str) -> torch.Tensor:
        return self.store.load(msg, field)

    def timing(self, started: float, endpoint: str = "") -> common_pb2.StageTiming:
        return common_pb2.StageTiming(
            stage=self.stage, seconds=time.perf_counter() - started, endpoint=endpoint
        )
