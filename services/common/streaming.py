"""Layer-by-layer weight streaming (memory mode `sequential`, see services.common.memory).

`SafetensorsIndex` reads the headers of safetensors files and gives each tensor on demand: the bytes are read
with `pread` into a fresh buffer, so nothing of the file stays mapped or counted in the process's memory once
the tensor is dropped (pages of a mapping would stay in the resident set until the kernel reclaims them).
`BlockStreamer` gives the repeated blocks of a model their weights just before each runs and drops them after;
the next block's weights are read in the background while the current one computes.
"""

from __future__ import annotations

import json
import os
import struct
import threading
import weakref
from collections.abc import Callable, Iterable, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

from services.common.errors import InvalidArgument
from services.common.memory import cast_state_dict

DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}
MAX_HEADER_BYTES = 100 * 2**20


def _close(fds: list[int]) -> None:
    while fds:
        os.close(fds.pop())


class _Entry:
    __slots__ = ("dtype", "end", "fd", "shape", "start")

    def __init__(self, fd: int, dtype: torch.dtype, shape: tuple[int, ...], start: int, end: int) -> None:
        self.fd, self.dtype, self.shape, self.start, self.end = fd, dtype, shape, start, end


class SafetensorsIndex(Mapping[str, torch.Tensor]):
    """The tensors of one or more safetensors files by key, read when asked for (`index[key]` reads)."""

    def __init__(self, paths: Path | Iterable[Path]) -> None:
        self.paths = [paths] if isinstance(paths, Path) else [Path(p) for p in paths]
        self._entries: dict[str, _Entry] = {}
        self._fds: list[int] = []
        weakref.finalize(self, _close, self._fds)  # the list, so close() and the finalizer agree
        try:
            for path in self.paths:
                self._read_header(path)
        except BaseException:
            self.close()
            raise

    def _read_header(self, path: Path) -> None:
        if path.suffix != ".safetensors":
            raise InvalidArgument(f"{path}: layer streaming needs .safetensors weights (got {path.suffix!r})")
        fd = os.open(path, os.O_RDONLY)
        self._fds.append(fd)
        size = os.fstat(fd).st_size
        raw = os.pread(fd, 8, 0)
        (n,) = struct.unpack("<Q", raw) if len(raw) == 8 else (-1,)
        if n < 2 or n > min(MAX_HEADER_BYTES, size - 8):
            raise InvalidArgument(f"{path}: not a safetensors file (header length {n}, file size {size})")
        try:
            header = json.loads(os.pread(fd, n, 8))
        except ValueError as e:
            raise InvalidArgument(f"{path}: unreadable safetensors header ({e})") from None
        base = 8 + n
        for key, info in header.items():
            if key == "__metadata__":
                continue
            dtype = DTYPES.get(info.get("dtype"))
            start, end = (base + int(o) for o in info["data_offsets"])
            shape = tuple(int(d) for d in info["shape"])
            if dtype is None or end > size or start > end:
                raise InvalidArgument(f"{path}: tensor {key!r} has dtype {info.get('dtype')!r} / bad offsets")
            nbytes = torch.Size(shape).numel() * torch.empty((), dtype=dtype).element_size()
            if nbytes != end - start:
                raise InvalidArgument(
                    f"{path}: tensor {key!r} holds {end - start} bytes, its shape needs {nbytes}"
                )
            if key in self._entries:
                raise InvalidArgument(f"{path}: tensor {key!r} is also in another file")
            self._entries[key] = _Entry(fd, dtype, shape, start, end)

    def close(self) -> None:
        _close(self._fds)

    def __len__(self) -> int:
        return len(self._entries)

    def __iter__(self):
        return iter(self._entries)

    def __contains__(self, key: object) -> bool:
        return key in self._entries

    def __getitem__(self, key: str) -> torch.Tensor:
        e = self._entries[key]
        buf = bytearray(e.end - e.start)
        if buf:
            got = os.preadv(e.fd, [buf], e.start)
            if got != len(buf):
                raise InvalidArgument(f"tensor {key!r}: short read ({got} of {len(buf)} bytes)")
            flat = torch.frombuffer(buf, dtype=torch.uint8)
        else:
            flat = torch.empty(0, dtype=torch.uint8)
        return flat.view(e.dtype).reshape(e.shape)

    def meta(self) -> dict[str, torch.Tensor]:
        """Every tensor as a meta tensor (shape and dtype, no data): enough to infer and check a layout."""
        return {k: torch.empty(e.shape, dtype=e.dtype, device="meta") for k, e in self._entries.items()}

    def read(self, keys: Iterable[str]) -> dict[str, torch.Tensor]:
        return {k: self[k] for k in keys}


BlockLoader = Callable[[], dict[str, torch.Tensor]]


def _drop(module: nn.Module) -> None:
    """Replace the module's own weights by meta tensors of the same shape and dtype (frees them)."""
    for m in module.modules():
        for name, p in list(m._parameters.items()):
            if p is not None and p.device.type != "meta":
                m._parameters[name] = nn.Parameter(torch.empty_like(p, device="meta"), requires_grad=False)


def _assign(module: nn.Module, state_dict: Mapping[str, torch.Tensor]) -> None:
    """Give the module's parameters these tensors (block-relative names; every parameter, nothing else)."""
    params = dict(module.named_parameters())
    if set(params) != set(state_dict):
        missing, extra = sorted(set(params) - set(state_dict)), sorted(set(state_dict) - set(params))
        raise InvalidArgument(
            f"streamed block weights do not fit: missing {missing[:4]}, unexpected {extra[:4]}"
        )
    for name, tensor in state_dict.items():
        owner_name, _, leaf = name.rpartition(".")
        owner = module.get_submodule(owner_name) if owner_name else module
        old = owner._parameters[leaf]
        if tuple(tensor.shape) != tuple(old.shape):
            raise InvalidArgument(
                f"streamed weight {name}: shape {tuple(tensor.shape)}, expected {tuple(old.shape)}"
            )
        owner._parameters[leaf] = nn.Parameter(tensor, requires_grad=False)


class BlockStreamer:
    """Hooks that load each block's weights (`loaders[i]()`, block-relative names) before it runs, in the
    storage dtype on the device, and drop them after. The next block is read in a background thread meanwhile,
    so at most two blocks are in memory. Blocks must run in order; one forward at a time (see Residency)."""

    def __init__(
        self,
        blocks: Sequence[nn.Module],
        loaders: Sequence[BlockLoader],
        device: torch.device,
        storage: torch.dtype,
        compute: torch.dtype,
        *,
        prefetch: bool = True,
    ) -> None:
        if len(blocks) != len(loaders):
            raise ValueError(f"{len(blocks)} blocks but {len(loaders)} loaders")
        self.blocks = list(blocks)
        self.loaders = list(loaders)
        self.device = torch.device(device)
        self.storage, self.compute = storage, compute
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="stream") if prefetch else None
        self._pending: dict[int, Future] = {}
        self._lock = threading.Lock()
        self.loads = 0  # blocks read so far (for tests and metrics)
        self._handles: list[RemovableHandle] = []
        for i, block in enumerate(self.blocks):
            _drop(block)
            self._handles.append(block.register_forward_pre_hook(self._before(i)))
            self._handles.append(block.register_forward_hook(self._after))

    def _read(self, i: int) -> dict[str, torch.Tensor]:
        sd = cast_state_dict(self.loaders[i](), self.storage, self.compute)
        pin = self.device.type == "cuda"
        return {k: (v.pin_memory() if pin else v).to(self.device, non_blocking=pin) for k, v in sd.items()}

    def _take(self, i: int) -> dict[str, torch.Tensor]:
        with self._lock:
            future = self._pending.pop(i, None)
        sd = future.result() if future is not None else self._read(i)
        self.loads += 1
        if self._pool is not None:
            nxt = (i + 1) % len(self.blocks)
            with self._lock:
                if nxt not in self._pending and nxt != i:
                    self._pending[nxt] = self._pool.submit(self._read, nxt)
        return sd

    def _before(self, i: int):
        def hook(module: nn.Module, _args: tuple) -> None:
            _assign(module, self._take(i))

        return hook

    @staticmethod
    def _after(module: nn.Module, _args: tuple, _output: object) -> None:
        _drop(module)

    def settle(self) -> None:
        """Wait for and drop a prefetched block (after a forward, so nothing stays in memory between requests)."""
        with self._lock:
            pending, self._pending = self._pending, {}
        for future in pending.values():
            future.result()

    def close(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []
        self.settle()
        if self._pool is not None:
            self._pool.shutdown(wait=True)
