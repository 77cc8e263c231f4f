"""Tensor <-> bytes: the ONLY place that turns tensors into bytes and back (DESIGN §3).

Bytes are raw row-major, little-endian, with dtype and shape carried beside them (TensorRef / InlineTensor).
Decoding checks that the byte count matches dtype x shape, so a truncated object is never reshaped into a
plausible-looking tensor.
"""

from __future__ import annotations

import hashlib
import math
import sys

import torch

from protos import tensor_pb2
from services.common.errors import DataLoss, InvalidArgument

# safetensors dtype names, the names on the wire.
DTYPES: dict[str, torch.dtype] = {
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
NAMES: dict[torch.dtype, str] = {dt: name for name, dt in DTYPES.items()}

if sys.byteorder != "little":  # pragma: no cover - every platform we run on is little-endian
    raise RuntimeError("diffmesh's wire format is little-endian; this host is big-endian")


def dtype_name(dtype: torch.dtype) -> str:
    try:
        return NAMES[dtype]
    except KeyError:
        raise InvalidArgument(f"dtype {dtype} cannot go on the wire; supported: {sorted(DTYPES)}") from None


def torch_dtype(name: str) -> torch.dtype:
    try:
        return DTYPES[name]
    except KeyError:
        raise InvalidArgument(f"unknown dtype {name!r}; supported: {sorted(DTYPES)}") from None


def itemsize(name: str) -> int:
    return torch.empty((), dtype=torch_dtype(name)).element_size()


def expected_size(name: str, shape: list[int] | tuple[int, ...]) -> int:
    if any(d < 0 for d in shape):
        raise InvalidArgument(f"shape {list(shape)} has a negative dimension")
    return math.prod(shape) * itemsize(name)


def to_bytes(tensor: torch.Tensor) -> tuple[str, list[int], bytes]:
    """(dtype name, shape, raw bytes) of a tensor; moves it to the CPU and makes it contiguous."""
    name = dtype_name(tensor.dtype)
    shape = list(tensor.shape)
    flat = tensor.detach().to("cpu").contiguous().reshape(-1)  # (N,)
    if flat.numel() == 0:
        return name, shape, b""
    return name, shape, flat.view(torch.uint8).numpy().tobytes()


def from_bytes(
    data: bytes | bytearray | memoryview, name: str, shape: list[int] | tuple[int, ...]
) -> torch.Tensor:
    """Rebuild a tensor from raw bytes; the byte count must equal dtype x shape exactly."""
    dtype = torch_dtype(name)
    want = expected_size(name, shape)
    if len(data) != want:
        raise DataLoss(f"tensor bytes: expected {want} bytes for {name}{list(shape)}, got {len(data)}")
    if want == 0:
        return torch.empty(tuple(shape), dtype=dtype)
    buf = data if isinstance(data, bytearray) else bytearray(data)
    raw = torch.frombuffer(buf, dtype=torch.uint8)  # shares buf's memory, no copy
    return raw.view(dtype).reshape(tuple(shape))


def sha256_hex(data: bytes | bytearray | memoryview) -> str:
    return hashlib.sha256(data).hexdigest()


def to_inline(tensor: torch.Tensor) -> tensor_pb2.Tensor:
    name, shape, data = to_bytes(tensor)
    return tensor_pb2.Tensor(inline=tensor_pb2.InlineTensor(dtype=name, shape=shape, data=data))


def from_inline(msg: tensor_pb2.InlineTensor) -> torch.Tensor:
    return from_bytes(msg.data, msg.dtype, list(msg.shape))


def check_shape(
    tensor: torch.Tensor, field: str, ndim: int | None = None, dtype: torch.dtype | None = None
) -> torch.Tensor:
    """Fail loudly at the edge when a decoded tensor is not what a field needs."""
    if ndim is not None and tensor.ndim != ndim:
        raise InvalidArgument(f"{field}: expected {ndim} dimensions, got shape {list(tensor.shape)}")
    if dtype is not None and tensor.dtype != dtype:
        raise InvalidArgument(f"{field}: expected dtype {dtype_name(dtype)}, got {dtype_name(tensor.dtype)}")
    return tensor
