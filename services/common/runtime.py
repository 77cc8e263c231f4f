"""What every stage servicer shares: settings, the store, the device, and a bounded cache of models
loaded on demand through a registry of loaders keyed by the component's class name."""

from __future__ import annotations

import os
import socket
import time
from collections.abc import Callable, Iterable, Mapping
from contextlib import AbstractContextManager, nullcontext
from pathlib import Path
from typing import Any, TypeVar

import torch
from safetensors import SafetensorError
from torch import nn

from protos import common_pb2, tensor_pb2
from services.common import metrics
from services.common.errors import FailedPrecondition, InvalidArgument, NotFound
from services.common.memory import RESIDENT, Residency, is_float8
from services.common.models import Component, ModelCache, find_component, resolve_spec
from services.common.settings import Settings
from services.common.store import TensorStore, run_key

V = TypeVar("V")
Loader = Callable[[Component, torch.device], Any]
# Which replica ran a stage (StageTiming.endpoint of the services' own timings): the pod name on Kubernetes.
REPLICA = os.environ.get("HOSTNAME") or socket.gethostname()


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
        self.memory = settings.memory_for(stage)
        self.store = store
        self.device = pick_device(settings.device)
        self.models: ModelCache[Any] = ModelCache(settings.model_cache_size, on_evict=self._evicted)
        self._loaded: dict[str, tuple[str, int]] = {}  # cache key -> (metrics label, bytes)
        # cache key -> placement, for loaders that take no memory plan (see _place)
        self._residency: dict[str, Residency] = {}

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
        path = self.resolve(spec)
        return self._cached(spec, path, find_component(path, list(subfolders)), registry)

    def load_component(self, spec: str, subfolder: str, registry: Mapping[str, Loader]) -> Any:
        """The component in exactly `subfolder` of a hub-layout model (no fallback to other folders)."""
        if Path(subfolder).name != subfolder or subfolder in ("", ".", ".."):
            raise InvalidArgument(f"{self.stage}: component folder {subfolder!r} is not a plain folder name")
        path = self.resolve(spec)
        if not (path / subfolder / "config.json").is_file():
            raise NotFound(f"{self.stage}: model {spec!r} has no {subfolder}/config.json")
        return self._cached(spec, path, find_component(path, [subfolder]), registry)

    def _cached(self, spec: str, path: Path, component: Component, registry: Mapping[str, Loader]) -> Any:
        loader = registry.get(component.class_name)
        if loader is None:
            raise NotFound(
                f"{self.stage}: model {spec!r} has a {component.class_name or 'unnamed'} component at "
                f"{component.path}; this service loads {sorted(registry) or 'no model classes yet'}"
            )
        key = f"{component.path}|{component.class_name}"

        def load() -> Any:
            try:
                if getattr(loader, "memory_aware", False):
                    model = loader(component, self.device, self.memory)
                else:
                    model = loader(component, self.device)
                    self._place(key, component, model)
            except SafetensorError as e:  # a truncated or corrupt file, wherever a loader opened it
                raise InvalidArgument(
                    f"{self.stage}: model {spec!r}: {component.path} holds an unreadable safetensors file ({e})"
                ) from None
            label = _model_label(spec, path, component.path)
            self._loaded[key] = (label, metrics.model_loaded(self.stage, label, model))
            return model

        return self.models.get(key, load)

    def _place(self, key: str, component: Component, model: Any) -> None:
        """The service's memory plan for a loader that does not take one: its object's `.model` (an nn.Module)
        is cast to the weight dtype (bf16 / fp16 / fp32; its `.dtype`, which inputs are cast to, follows) and
        kept on the host between calls in offload mode (`active()`). Sequential and float8 need a loader of
        their own (the denoiser's)."""
        plan = self.memory
        if plan == RESIDENT:
            return
        module = getattr(model, "model", None)
        dtype = plan.weight_dtype
        if not isinstance(module, nn.Module) or plan.mode == "sequential" or (dtype and is_float8(dtype)):
            raise FailedPrecondition(
                f"{self.stage}: {component.class_name or 'this'} model at {component.path} loads in memory mode "
                f"resident or offload with float32 / bfloat16 / float16 weights; this service is set to "
                f"{plan.describe()} (DIFFMESH_MEMORY_MODE / DIFFMESH_WEIGHT_DTYPE, or per stage "
                f"DIFFMESH_{self.stage.upper()}_MEMORY_MODE / _WEIGHT_DTYPE)"
            )
        if dtype is not None:
            module.to(dtype)
            if hasattr(model, "dtype"):
                model.dtype = dtype
        self._residency[key] = Residency(module, self.device, plan)

    def active(self, model: Any) -> AbstractContextManager:
        """Wrap each use of a loaded model: in offload mode its weights are on the device only meanwhile."""
        module = getattr(model, "model", None)
        for residency in list(self._residency.values()):
            if module is not None and module is residency.module:
                return residency.active()
        return nullcontext()

    def _evicted(self, key: str, _model: Any) -> None:
        self._residency.pop(key, None)
        label, nbytes = self._loaded.pop(key, ("", 0))
        if label:
            metrics.model_evicted(self.stage, label, nbytes)

    def output(
        self, request_id: str, name: str, tensor: torch.Tensor, inline: bool | None = None
    ) -> tensor_pb2.Tensor:
        """Put a result in the store under runs/<request_id>/<stage>/<name> (inline when small, unless
        `inline` says otherwise)."""
        return self.store.put_tensor(run_key(request_id, self.stage, name), tensor, inline=inline)

    def input(self, msg: tensor_pb2.Tensor, field: str) -> torch.Tensor:
        return self.store.load(msg, field)

    def timing(self, started: float, endpoint: str = REPLICA) -> common_pb2.StageTiming:
        """This service's own time for a call since `started` (time.perf_counter()), and which replica ran it."""
        return common_pb2.StageTiming(
            stage=self.stage, seconds=time.perf_counter() - started, endpoint=endpoint
        )


def _model_label(spec: str, resolved: Path, component: Path) -> str:
    """The spec a request named, plus the component's folder when it is one of the model's
    ("models/flux-dev/transformer", "hf://org/name/text_encoder_2"; a single file or component: the spec)."""
    try:
        sub = component.resolve().relative_to(resolved.resolve())
    except ValueError:
        return spec
    return spec if str(sub) == "." else f"{spec.rstrip('/')}/{sub.as_posix()}"
