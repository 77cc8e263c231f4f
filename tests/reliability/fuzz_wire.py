"""Bytes that are not a message of the request type: random bytes, wire-format edge cases (bad wire types,
over-long varints, lengths that lie, invalid UTF-8, deep groups), and valid encodings truncated, bit-flipped
or spliced. Sent through an identity serializer, so nothing on the client checks them."""

from __future__ import annotations

import struct

from google.protobuf.message import Message
from hypothesis import strategies as st


def _varint(n: int) -> bytes:
    out = bytearray()
    n &= (1 << 64) - 1
    while True:
        b = n & 0x7F
        n >>= 7
        out.append(b | (0x80 if n else 0))
        if not n:
            return bytes(out)


WIRE_EDGES = [
    b"\x0a\x02\xff\xfe",  # field 1, a string of invalid UTF-8
    b"\x0a\xff\xff\xff\xff\x0f",  # field 1, length 2**32-1 with no data
    b"\x0a\x80\x80\x80\x80\x80\x80\x80\x80\x80\x01",  # a varint length of 2**63
    b"\x08" + b"\xff" * 11,  # an over-long varint
    b"\x00",  # field number 0
    b"\x0e\x00",  # wire type 6
    b"\x0f\x00",  # wire type 7
    b"\x0b" * 200,  # start-group 200 deep
    b"\x0c",  # end-group with no start
    b"\x12\x05\x0a\x03\x0a\x01",  # nested lengths that overrun
    b"\x09\x00\x00",  # a truncated fixed64
    b"\x0d\x00",  # a truncated fixed32
    b"\x92\x01" * 50 + b"\x00",  # a tensor-map field 18 nested, truncated
    b"\x0a\x01" * 100,
]


@st.composite
def garbage(draw: st.DrawFn, sample: st.SearchStrategy[Message]) -> bytes:
    """Random bytes, wire-format edge cases, or a valid encoding truncated / bit-flipped / spliced."""
    kind = draw(st.sampled_from(["random", "edge", "mutate", "mutate", "nested"]))
    if kind == "random":
        return draw(st.binary(max_size=256))
    if kind == "edge":
        return draw(st.sampled_from(WIRE_EDGES)) + draw(st.binary(max_size=8))
    if kind == "nested":  # a message field wrapping a length that lies
        inner = draw(st.binary(max_size=32))
        tag = draw(st.integers(1, 40)) << 3 | 2
        length = draw(
            st.sampled_from([len(inner) + 1, len(inner) + 100, 2**31, len(inner) - 1 if inner else 1])
        )
        return _varint(tag) + _varint(length) + inner
    data = bytearray(draw(sample).SerializeToString())
    for _ in range(draw(st.integers(1, 4))):
        op = draw(st.sampled_from(["truncate", "flip", "insert", "set"]))
        pos = draw(st.integers(0, max(len(data) - 1, 0)))
        if op == "truncate":
            del data[pos:]
        elif op == "flip" and data:
            data[pos] ^= 1 << draw(st.integers(0, 7))
        elif op == "insert":
            data[pos:pos] = draw(
                st.sampled_from([b"\xff", b"\x80", b"\x0b", b"\x0f", struct.pack("<I", 2**31)])
            )
        elif data:
            data[pos] = draw(st.integers(0, 255))
    return bytes(data)
