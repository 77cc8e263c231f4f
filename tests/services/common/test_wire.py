"""wire: tensor <-> raw bytes, exact for every wire dtype, strict about byte counts (DESIGN §3)."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from protos import tensor_pb2
from services.common import wire
from services.common.errors import DataLoss, InvalidArgument

ALL_DTYPES = sorted(wire.DTYPES)
ITEMSIZE = {
    "F64": 8,
    "F32": 4,
    "F16": 2,
    "BF16": 2,
    "F8_E4M3": 1,
    "F8_E5M2": 1,
    "I64": 8,
    "I32": 4,
    "I16": 2,
    "I8": 1,
    "U8": 1,
    "BOOL": 1,
}


def sample(name: str, shape: tuple[int, ...], seed: int = 0) -> torch.Tensor:
    """A tensor of `name` whose bit patterns cover the dtype: random bytes (NaNs and infs included for floats),
    0/1 for BOOL, extreme values for I64."""
    dtype = wire.DTYPES[name]
    n = math.prod(shape)
    g = torch.Generator().manual_seed(seed)
    if dtype == torch.bool:
        return torch.randint(0, 2, shape, generator=g).bool()
    raw = torch.randint(0, 256, (n * ITEMSIZE[name],), generator=g, dtype=torch.uint8)  # (n * itemsize,)
    t = raw.view(dtype).reshape(shape)
    if dtype == torch.int64 and n >= 2:
        t.view(-1)[:2] = torch.tensor([torch.iinfo(torch.int64).min, torch.iinfo(torch.int64).max])
    return t


def bits(t: torch.Tensor) -> bytes:
    """The exact bytes of a tensor (bitwise comparison: NaN payloads, -0.0 and F8 codes all count)."""
    return t.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()


def assert_same(a: torch.Tensor, b: torch.Tensor) -> None:
    assert a.dtype == b.dtype
    assert a.shape == b.shape
    assert bits(a) == bits(b)


def test_dtype_table_is_the_safetensors_names() -> None:
    assert set(wire.DTYPES) == set(ITEMSIZE)
    for name, size in ITEMSIZE.items():
        assert wire.itemsize(name) == size, name
        assert wire.dtype_name(wire.torch_dtype(name)) == name
    assert wire.DTYPES["BF16"] is torch.bfloat16
    assert wire.DTYPES["F8_E4M3"] is torch.float8_e4m3fn
    assert wire.DTYPES["F8_E5M2"] is torch.float8_e5m2


@pytest.mark.parametrize("name", ALL_DTYPES)
def test_round_trip_every_dtype(name: str) -> None:
    t = sample(name, (3, 5, 2))
    got_name, shape, data = wire.to_bytes(t)
    assert (got_name, shape) == (name, [3, 5, 2])
    assert isinstance(data, bytes)
    assert len(data) == 30 * ITEMSIZE[name] == wire.expected_size(name, shape)
    assert data == bits(t)  # raw row-major little-endian, nothing else
    assert_same(wire.from_bytes(data, name, shape), t)


def test_known_byte_layout_is_little_endian_row_major() -> None:
    t = torch.tensor([[1, 2], [3, 258]], dtype=torch.int16)
    _, _, data = wire.to_bytes(t)
    assert data == bytes([1, 0, 2, 0, 3, 0, 2, 1])
    _, _, data = wire.to_bytes(torch.tensor([1.0], dtype=torch.bfloat16))
    assert data == bytes([0x80, 0x3F])
    _, _, data = wire.to_bytes(torch.tensor([True, False, True]))
    assert data == bytes([1, 0, 1])


def test_special_float_values_survive() -> None:
    vals = [0.0, -0.0, float("inf"), float("-inf"), float("nan"), 1e-30, 65504.0]
    for name in ("F64", "F32", "F16", "BF16"):
        t = torch.tensor(vals, dtype=wire.DTYPES[name])
        n, s, d = wire.to_bytes(t)
        assert_same(wire.from_bytes(d, n, s), t)
    for name in ("F8_E4M3", "F8_E5M2"):
        t = torch.arange(256, dtype=torch.uint8).view(wire.DTYPES[name])  # every F8 code, NaNs included
        n, s, d = wire.to_bytes(t)
        assert d == bytes(range(256))
        assert_same(wire.from_bytes(d, n, s), t)


@pytest.mark.parametrize("name", ALL_DTYPES)
def test_scalar(name: str) -> None:
    t = sample(name, (1,), seed=3).reshape(())
    got_name, shape, data = wire.to_bytes(t)
    assert shape == []
    assert len(data) == ITEMSIZE[name]
    back = wire.from_bytes(data, got_name, shape)
    assert back.ndim == 0
    assert_same(back, t)


@pytest.mark.parametrize("name", ALL_DTYPES)
@pytest.mark.parametrize("shape", [(0, 4), (0,), (3, 0, 2)])
def test_empty(name: str, shape: tuple[int, ...]) -> None:
    t = torch.empty(shape, dtype=wire.DTYPES[name])
    got_name, got_shape, data = wire.to_bytes(t)
    assert (got_name, got_shape, data) == (name, list(shape), b"")
    back = wire.from_bytes(b"", name, list(shape))
    assert back.shape == shape and back.dtype == t.dtype


@pytest.mark.parametrize("name", ["F32", "BF16", "F8_E4M3", "I64", "BOOL"])
def test_non_contiguous_inputs(name: str) -> None:
    base = sample(name, (4, 6, 5), seed=7)
    views = {
        "transpose": base.transpose(0, 2),
        "slice_step": base[:, ::2, 1:],
        "expand": base[:1, :1, :1].expand(3, 4, 2),
        "permute": base.permute(1, 2, 0),
    }
    for what, v in views.items():
        assert not v.is_contiguous(), what
        n, s, d = wire.to_bytes(v)
        assert s == list(v.shape), what
        assert d == bits(v), what  # the logical row-major order, not the storage order
        assert_same(wire.from_bytes(d, n, s), v.contiguous())


def test_requires_grad_tensor_is_detached() -> None:
    t = torch.randn(3, 2, requires_grad=True) * 2
    n, s, d = wire.to_bytes(t)
    back = wire.from_bytes(d, n, s)
    assert not back.requires_grad
    assert torch.equal(back, t.detach())


@pytest.mark.parametrize("data", [bytes(4), bytearray(4), memoryview(bytes(4))])
def test_from_bytes_accepts_bytes_like(data: bytes | bytearray | memoryview) -> None:
    assert torch.equal(wire.from_bytes(data, "F32", [1]), torch.zeros(1))


@pytest.mark.parametrize(
    ("name", "shape", "nbytes"),
    [("F32", [2, 3], 23), ("F32", [2, 3], 25), ("BF16", [4], 0), ("I64", [], 4), ("U8", [0, 4], 1)],
)
def test_byte_count_mismatch_is_data_loss(name: str, shape: list[int], nbytes: int) -> None:
    want = wire.expected_size(name, shape)
    with pytest.raises(DataLoss) as e:
        wire.from_bytes(bytes(nbytes), name, shape)
    msg = str(e.value)
    assert f"expected {want} bytes" in msg
    assert f"got {nbytes}" in msg
    assert name in msg


def test_unknown_dtype_is_invalid_argument_listing_supported() -> None:
    for call in (
        lambda: wire.from_bytes(b"", "F4", [0]),
        lambda: wire.torch_dtype("float32"),
        lambda: wire.expected_size("Q8", [1]),
    ):
        with pytest.raises(InvalidArgument) as e:
            call()
        msg = str(e.value)
        assert "supported" in msg
        for name in ALL_DTYPES:
            assert name in msg


@pytest.mark.parametrize("dtype", [torch.complex64, torch.uint16, torch.float8_e4m3fnuz])
def test_dtype_not_on_the_wire_is_invalid_argument(dtype: torch.dtype) -> None:
    with pytest.raises(InvalidArgument, match="supported") as e:
        wire.to_bytes(torch.zeros(2, dtype=dtype))
    assert str(dtype) in str(e.value)


def test_negative_dimension_is_invalid_argument() -> None:
    with pytest.raises(InvalidArgument, match="negative"):
        wire.from_bytes(b"", "F32", [2, -1])


@pytest.mark.parametrize("name", ALL_DTYPES)
def test_inline_messages(name: str) -> None:
    t = sample(name, (2, 3), seed=11)
    msg = wire.to_inline(t)
    assert msg.WhichOneof("value") == "inline"
    assert msg.inline.dtype == name
    assert list(msg.inline.shape) == [2, 3]
    assert msg.inline.data == bits(t)
    # survives protobuf serialization, as it does on the wire
    parsed = tensor_pb2.Tensor.FromString(msg.SerializeToString())
    assert_same(wire.from_inline(parsed.inline), t)


def test_inline_scalar_and_empty() -> None:
    for t in (torch.tensor(2.5), torch.empty(0, 4, dtype=torch.bfloat16)):
        msg = tensor_pb2.Tensor.FromString(wire.to_inline(t).SerializeToString())
        assert list(msg.inline.shape) == list(t.shape)
        assert_same(wire.from_inline(msg.inline), t)


def test_inline_truncated_is_data_loss() -> None:
    msg = wire.to_inline(torch.arange(6, dtype=torch.float32))
    msg.inline.data = msg.inline.data[:-1]
    with pytest.raises(DataLoss, match=r"expected 24 bytes.*got 23"):
        wire.from_inline(msg.inline)


def test_sha256_hex() -> None:
    assert wire.sha256_hex(b"") == "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
    data = bytearray(b"abc")
    assert wire.sha256_hex(data) == wire.sha256_hex(memoryview(data)) == wire.sha256_hex(b"abc")


def test_check_shape() -> None:
    t = torch.zeros(2, 3)
    assert wire.check_shape(t, "latents", ndim=2, dtype=torch.float32) is t
    with pytest.raises(InvalidArgument, match=r"latents: expected 4 dimensions, got shape \[2, 3\]"):
        wire.check_shape(t, "latents", ndim=4)
    with pytest.raises(InvalidArgument, match="latents: expected dtype BF16, got F32"):
        wire.check_shape(t, "latents", dtype=torch.bfloat16)


@settings(
    max_examples=250,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.too_slow],
)
@given(
    name=st.sampled_from(ALL_DTYPES),
    shape=st.lists(st.integers(min_value=0, max_value=5), min_size=0, max_size=4),
    seed=st.integers(min_value=0, max_value=2**31 - 1),
    layout=st.sampled_from(["contiguous", "transposed", "inline"]),
)
def test_round_trip_property(name: str, shape: list[int], seed: int, layout: str) -> None:
    t = sample(name, tuple(shape), seed=seed)
    if layout == "transposed" and t.ndim >= 2:
        t = t.transpose(0, -1)
    if layout == "inline":
        msg = tensor_pb2.Tensor.FromString(wire.to_inline(t).SerializeToString())
        back = wire.from_inline(msg.inline)
    else:
        n, s, d = wire.to_bytes(t)
        assert n == name
        assert len(d) == wire.expected_size(n, s) == t.numel() * ITEMSIZE[name]
        back = wire.from_bytes(d, n, s)
        if d:  # one byte too many or too few is never accepted
            with pytest.raises(DataLoss):
                wire.from_bytes(d[:-1], n, s)
            with pytest.raises(DataLoss):
                wire.from_bytes(d + b"\0", n, s)
    assert_same(back, t.contiguous())
