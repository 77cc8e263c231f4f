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
from collections.abc import Iterable, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

from services.common.errors import InvalidArgument
from services.common.memory import storage_dtype_for
from services.common.wire import DTYPES  # safetensors dtype names

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

    def dtype(self, key: str) -> torch.dtype:
        return self._entries[key].dtype

    def shape(self, key: str) -> tuple[int, ...]:
        return self._entries[key].shape

    def nbytes(self, key: str) -> int:
        e = self._entries[key]
        return e.end - e.start

    def read_into(self, key: str, out: torch.Tensor) -> torch.Tensor:
        """Read one tensor into `out` (a contiguous CPU tensor: the tensor's own shape and dtype, or a uint8
        buffer at least its size); returns the tensor as a view of `out`."""
        e = self._entries[key]
        n = e.end - e.start
        if out.device.type != "cpu" or not out.is_contiguous() or out.numel() * out.element_size() < n:
            raise ValueError(f"read_into {key!r}: needs a contiguous CPU buffer of {n} bytes")
        flat = out.reshape(-1).view(torch.uint8)[:n]
        if n:
            got = os.preadv(e.fd, [memoryview(flat.numpy())], e.start)
            if got != n:
                raise InvalidArgument(f"tensor {key!r}: short read ({got} of {n} bytes)")
        return flat.view(e.dtype).reshape(e.shape)

    def meta(self) -> dict[str, torch.Tensor]:
        """Every tensor as a meta tensor (shape and dtype, no data): enough to infer and check a layout."""
        return {k: torch.empty(e.shape, dtype=e.dtype, device="meta") for k, e in self._entries.items()}


# A block's weights: block-relative name -> (shape, the checkpoint keys concatenated along dim 0 to make it).
BlockLayout = dict[str, tuple[tuple[int, ...], list[str]]]
ALIGN = 64


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
    """Hooks that give each block its weights just before it runs and drop them after.

    A block's weights are read from the checkpoint (`index`) straight into one of two slot buffers allocated
    once (the size of the largest block in the storage dtype): fused tensors are filled part by part at their
    rows, conversions to the storage dtype go through one staging buffer. Reads alternate between the slots: the
    next block is read into the other slot in a background thread while the current one computes, so memory
    holds two blocks and nothing is allocated per step. Blocks must run in order, one forward at a time (see Residency)."""

    def __init__(
        self,
        blocks: Sequence[nn.Module],
        layouts: Sequence[BlockLayout],
        index: SafetensorsIndex,
        device: torch.device,
        storage: torch.dtype,
        compute: torch.dtype,
        *,
        prefetch: bool = True,
    ) -> None:
        if len(blocks) != len(layouts):
            raise ValueError(f"{len(blocks)} blocks but {len(layouts)} layouts")
        self.blocks, self.layouts, self.index = list(blocks), list(layouts), index
        self.device = torch.device(device)
        self.storage, self.compute = storage, compute
        self._plans = [self._plan(layout) for layout in self.layouts]
        slot_bytes = max(size for _, size in self._plans)
        self._slots = [torch.empty(slot_bytes, dtype=torch.uint8, device=self.device) for _ in range(2)]
        staging = max(index.nbytes(k) for layout in self.layouts for _, keys in layout.values() for k in keys)
        self._staging = torch.empty(staging, dtype=torch.uint8, pin_memory=self.device.type == "cuda")
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="stream") if prefetch else None
        self._pending: dict[int, Future] = {}
        self._lock = threading.Lock()
        self.loads = 0  # blocks read so far (for tests and metrics)
        self._reads = 0
        self._handles: list[RemovableHandle] = []
        for i, block in enumerate(self.blocks):
            _drop(block)
            self._handles.append(block.register_forward_pre_hook(self._before(i)))
            self._handles.append(block.register_forward_hook(self._after))

    def _plan(self, layout: BlockLayout) -> tuple[list[tuple[str, tuple[int, ...], torch.dtype, int]], int]:
        """(name, shape, dtype, byte offset in the slot) per tensor, and the slot bytes the block needs."""
        out, offset = [], 0
        for name, (shape, keys) in layout.items():
            src = self.index.dtype(keys[0])
            dtype = storage_dtype_for(name, len(shape), src, self.storage, self.compute)
            out.append((name, shape, dtype, offset))
            n = torch.Size(shape).numel() * torch.empty((), dtype=dtype).element_size()
            offset += -(-n // ALIGN) * ALIGN
        return out, offset

    def _read(self, i: int) -> dict[str, torch.Tensor]:
        slot = self._slots[self._reads % 2]  # reads alternate, strictly one after the other
        self._reads += 1
        tensors = {}
        for name, shape, dtype, offset in self._plans[i][0]:
            n = torch.Size(shape).numel() * torch.empty((), dtype=dtype).element_size()
            target = slot[offset : offset + n].view(dtype).reshape(shape)
            row = 0
            for key in self.layouts[i][name][1]:
                piece_shape = self.index.shape(key)
                rows = piece_shape[0] if piece_shape else 1
                if self.index.dtype(key) == dtype and self.device.type == "cpu":
                    self.index.read_into(key, target[row : row + rows])  # in place, no copy
                else:
                    staged = self.index.read_into(key, self._staging)
                    target[row : row + rows].copy_(staged.reshape(target[row : row + rows].shape))
                row += rows
            tensors[name] = target
        return tensors

    def _take(self, i: int) -> dict[str, torch.Tensor]:
        with self._lock:
            future = self._pending.pop(i, None)
        sd = future.result() if future is not None else self._read(i)
        self.loads += 1
        if self._pool is not None and len(self.blocks) > 1:
            nxt = (i + 1) % len(self.blocks)
            with self._lock:
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
        """Wait for a prefetch still running (after a request: the next one starts from block 0 anyway)."""
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
