"""Memory modes of a stage's models, chosen per service (`DIFFMESH_MEMORY_MODE`, `DIFFMESH_WEIGHT_DTYPE`).

- `resident`: the weights live on the compute device (the default).
- `offload`: the weights live in host memory (pinned when the device is a GPU) and move to the compute device
  per model while a request runs it, back when the last running request is done. On a CPU-only machine it is
  the same as `resident`.
- `sequential`: the repeated blocks are not kept at all: each block's weights are read from the memory-mapped
  safetensors file(s) just before the block runs and dropped after (`services.common.streaming`), so peak
  memory is about the non-block weights, one block and the activations. Requests run one at a time.

The weight-storage dtype (`float32`, `bfloat16`, `float16`, `float8_e4m3fn`, `float8_e5m2`; default: the
checkpoint's) is the dtype the weights are kept in; compute runs in that dtype, except float8, which stores the
Linear weights in 8 bits and computes in bfloat16 (each Linear upcasts its weight as it runs).
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, TypeVar

import torch
from torch import nn

from services.common.errors import InvalidArgument

MODES = ("resident", "offload", "sequential")
WEIGHT_DTYPES: dict[str, torch.dtype | None] = {
    "auto": None,
    "float32": torch.float32,
    "fp32": torch.float32,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
    "float8_e4m3fn": torch.float8_e4m3fn,
    "fp8": torch.float8_e4m3fn,
    "float8_e5m2": torch.float8_e5m2,
}
FLOAT8 = (torch.float8_e4m3fn, torch.float8_e5m2)


def is_float8(dtype: torch.dtype) -> bool:
    return dtype in FLOAT8


@dataclass(frozen=True)
class MemoryPlan:
    """How a service keeps its models: `mode` (one of MODES) and the weight-storage dtype (None: as stored)."""

    mode: str = "resident"
    weight_dtype: torch.dtype | None = None

    @classmethod
    def parse(cls, mode: str = "resident", weight_dtype: str = "auto") -> MemoryPlan:
        mode_key = mode.strip().lower()
        if mode_key not in MODES:
            raise InvalidArgument(f"memory mode {mode!r}: expected one of {', '.join(MODES)}")
        dtype_key = weight_dtype.strip().lower()
        if dtype_key not in WEIGHT_DTYPES:
            raise InvalidArgument(
                f"weight dtype {weight_dtype!r}: expected one of {', '.join(sorted(WEIGHT_DTYPES))}"
            )
        return cls(mode_key, WEIGHT_DTYPES[dtype_key])

    def compute_dtype(self, checkpoint_dtype: torch.dtype) -> torch.dtype:
        """The dtype activations run in for weights stored as `checkpoint_dtype` in the file."""
        stored = self.weight_dtype or checkpoint_dtype
        return torch.bfloat16 if is_float8(stored) else stored

    def storage_dtype(self, checkpoint_dtype: torch.dtype) -> torch.dtype:
        return self.weight_dtype or checkpoint_dtype

    def describe(self) -> str:
        dtype = str(self.weight_dtype).removeprefix("torch.") if self.weight_dtype else "checkpoint dtype"
        return f"{self.mode}, weights in {dtype}"


RESIDENT = MemoryPlan()
F = TypeVar("F", bound=Callable[..., Any])


def memory_aware(loader: F) -> F:
    """Mark a model loader that takes the service's MemoryPlan as a third argument `memory` (the runtime passes
    it); other loaders only run on services whose plan is RESIDENT."""
    loader.memory_aware = True  # type: ignore[attr-defined]
    return loader


def storage_dtype_for(
    name: str, ndim: int, dtype: torch.dtype, storage: torch.dtype, compute: torch.dtype
) -> torch.dtype:
    """The dtype a weight is kept in: float8 only for 2-D `*.weight` matrices (Linear weights), the other
    floating tensors in the compute dtype; integer tensors unchanged."""
    if not dtype.is_floating_point:
        return dtype
    if is_float8(storage):
        return storage if ndim == 2 and name.endswith("weight") else compute
    return storage


def cast_tensor(name: str, tensor: torch.Tensor, storage: torch.dtype, compute: torch.dtype) -> torch.Tensor:
    target = storage_dtype_for(name, tensor.ndim, tensor.dtype, storage, compute)
    return tensor if tensor.dtype == target else tensor.to(target)


def cast_state_dict(
    state_dict: dict[str, torch.Tensor], storage: torch.dtype, compute: torch.dtype
) -> dict[str, torch.Tensor]:
    return {k: cast_tensor(k, v, storage, compute) for k, v in state_dict.items()}


def to_device(module: nn.Module, device: torch.device) -> None:
    """Move the tensors a module holds to `device`, leaving meta tensors (streamed weights) where they are."""
    for t in (*module.parameters(), *module.buffers()):
        if t.device.type != "meta" and t.device != device:
            t.data = t.data.to(device)


class Residency:
    """Where one model's weights are while requests run it. `resident`: always on the device. `offload`: on the
    host between requests; `active()` moves them to the device for the first running request and back after
    the last. `sequential`: `active()` serialises requests (the block streamer owns the block weights)."""

    def __init__(
        self, module: nn.Module, device: torch.device, plan: MemoryPlan, *, streamer: Any = None
    ) -> None:
        if (plan.mode == "sequential") != (streamer is not None):
            raise ValueError(
                f"memory mode {plan.mode!r} {'needs' if streamer is None else 'takes no'} a streamer"
            )
        self.module = module
        self.streamer = streamer
        self.device = torch.device(device)
        self.plan = plan
        self._lock = threading.Condition()
        self._running = 0
        self._serial = threading.Lock()
        self._host: dict[int, torch.Tensor] = {}  # id(param) -> its host copy (offload mode on a GPU)
        if self.offloads:
            self._keep_on_host()
        elif plan.mode != "sequential":
            module.to(self.device)

    def _tensors(self) -> list[torch.Tensor]:
        return [t for t in (*self.module.parameters(), *self.module.buffers()) if t.device.type != "meta"]

    def _keep_on_host(self) -> None:
        """Host copies (pinned: asynchronous uploads) become the tensors' data; the device holds none."""
        for t in self._tensors():
            host = t.data.to("cpu")
            self._host[id(t)] = host.pin_memory() if torch.cuda.is_available() else host
            t.data = self._host[id(t)]

    def _upload(self) -> None:
        for t in self._tensors():
            t.data = t.data.to(self.device, non_blocking=True)

    def _release(self) -> None:
        """Back to the host copies: weights are unchanged by requests (fused LoRAs restore theirs before the
        request ends), so nothing is copied back."""
        torch.cuda.synchronize(self.device)
        for t in self._tensors():
            t.data = self._host[id(t)]

    @property
    def offloads(self) -> bool:
        return self.plan.mode == "offload" and self.device.type != "cpu"

    @contextmanager
    def active(self) -> Iterator[None]:
        if self.plan.mode == "sequential":
            with self._serial:
                try:
                    yield
                finally:
                    self.streamer.settle()
            return
        if not self.offloads:
            yield
            return
        with self._lock:
            if self._running == 0:
                self._upload()
            self._running += 1
        try:
            yield
        finally:
            with self._lock:
                self._running -= 1
                if self._running == 0:
                    self._release()
