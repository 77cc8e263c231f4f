"""The sweep: a known-good request with one field at a time set to each value of a deterministic pool (the seeds
and mangled refs for tensors, every media file, the interesting strings and numbers), nested messages two deep.
Hypothesis draws some values rarely; the sweep sends every one of them to every field, the same in every run.
"""

from __future__ import annotations

import math
from typing import Any

from fuzz_messages import (
    BOUNDED_INTS,
    DTYPE_NAMES,
    HUGE_SHAPES,
    INT_LIMITS,
    INTERESTING_FLOATS,
    INTERESTING_INTS,
    INTERESTING_STRINGS,
    SHAPES,
    F,
    Pools,
    bad_uris,
    is_map,
    seeded_bytes,
    set_field,
    string_pool,
)
from google.protobuf import message_factory
from google.protobuf.descriptor import FieldDescriptor
from google.protobuf.message import Message

from protos import common_pb2, tensor_pb2
from services.common import wire


def tensor_sweep(pools: Pools) -> list[tensor_pb2.Tensor]:
    """Every seed, inline and as a ref; a ref with each of its fields mangled; inline tensors of every dtype,
    with consistent and inconsistent sizes."""
    out = [*pools.seeds.values(), tensor_pb2.Tensor()]
    base = pools.seeds["pooled_prompt_embeds@ref"].ref
    key = base.uri[len(pools.store_prefix) :]

    def ref(**changes: Any) -> tensor_pb2.Tensor:
        r = tensor_pb2.TensorRef()
        r.CopyFrom(base)
        for name, value in changes.items():
            if name == "shape":
                del r.shape[:]
                r.shape.extend(value)
            else:
                setattr(r, name, value)
        return tensor_pb2.Tensor(ref=r)

    uris = bad_uris(pools, key)
    out += [ref(uri=u) for u in uris]
    out += [ref(sha256=h) for h in ("", "0" * 64, base.sha256.upper(), base.sha256[:-1])]
    out += [ref(byte_size=n) for n in (0, -1, base.byte_size + 1, 2**62, -(2**63), 2**63 - 1)]
    out += [ref(dtype=d) for d in DTYPE_NAMES]
    for shape in SHAPES + HUGE_SHAPES:
        numel = math.prod(shape) if all(d >= 0 for d in shape) else -1
        size = numel * wire.itemsize(base.dtype) if numel >= 0 else 0
        out.append(ref(shape=shape, byte_size=min(size, 2**63 - 1)))
    for i, dtype in enumerate(DTYPE_NAMES):
        shape = [1, 16, 2, 2]
        n = math.prod(shape) * wire.itemsize(dtype) if dtype in wire.DTYPES else 64
        data = seeded_bytes(i, n)
        out.append(tensor_pb2.Tensor(inline=tensor_pb2.InlineTensor(dtype=dtype, shape=shape, data=data)))
        out.append(
            tensor_pb2.Tensor(inline=tensor_pb2.InlineTensor(dtype=dtype, shape=shape, data=data[:-1]))
        )
    for shape in [*HUGE_SHAPES, [1] * 70, [0, 32], [1, 0, 32], [2**40, 0]]:
        out.append(tensor_pb2.Tensor(inline=tensor_pb2.InlineTensor(dtype="F32", shape=shape, data=b"")))
    return out


def media_sweep(pools: Pools) -> list[Message]:
    out = [common_pb2.Media(data=m) for m in pools.media]
    out += [common_pb2.Media(data=pools.media[0], mime_type=t) for t in string_pool("mime_type")]
    out += [common_pb2.Media(data=m, mime_type="video/mp4") for m in pools.media[:2]]
    out += [common_pb2.Media(uri=u) for u in [*pools.uris, "", "/etc/passwd"]]
    out += [common_pb2.Media(), common_pb2.Media(tensor=tensor_pb2.Tensor())]
    for name in ("image", "images", "video", "waveform", "latents", "scalar", "empty", "bools"):
        out += [
            common_pb2.Media(tensor=pools.seeds[name]),
            common_pb2.Media(tensor=pools.seeds[f"{name}@ref"]),
        ]
    return out


def scalar_sweep(f: FieldDescriptor, pools: Pools) -> list[Any]:
    """Deterministic values of one non-message field."""
    cpp = f.cpp_type
    if cpp in INT_LIMITS:
        lo, hi = INT_LIMITS[cpp]
        values = BOUNDED_INTS.get(f.name, INTERESTING_INTS)
        return [v for v in values if lo <= v <= hi]
    if cpp in (F.CPPTYPE_FLOAT, F.CPPTYPE_DOUBLE):
        return list(INTERESTING_FLOATS)
    if cpp == F.CPPTYPE_BOOL:
        return [True, False]
    if cpp == F.CPPTYPE_ENUM:
        return [v.number for v in f.enum_type.values] + [-1, 99, 2**31 - 1]
    if f.type == F.TYPE_BYTES:
        return [*pools.media, b"", bytes(10)]
    known = string_pool(f.name) + pools.strings.get(f.name, [])
    if f.name in ("model", "spec", "base_model", "value"):
        known += pools.model_specs
    if f.name == "uri":
        known += pools.uris
    return list(dict.fromkeys(known + INTERESTING_STRINGS))


def _copy(msg: Message) -> Message:
    out = type(msg)()
    out.CopyFrom(msg)
    return out


def _values(f: FieldDescriptor, good: Message, pools: Pools, depth: int) -> list[Any]:
    """Values to try in field `f` of `good`, each a whole field value (a list, a dict, a message)."""
    if is_map(f):
        value_field = f.message_type.fields_by_name["value"]
        current = dict(getattr(good, f.name).items())
        if value_field.cpp_type == F.CPPTYPE_STRING:  # components: every spec under each known key
            keys = ["transformer", "vae", "text_encoder", "text_encoder_2"]
            return [{k: s} for k in keys for s in pools.model_specs] + [{"unet": "x"}, {"": "x"}, {}]
        first = next(iter(current), "prompt_embeds")
        out = [{**current, first: t} for t in tensor_sweep(pools)]
        out += [dict.fromkeys(current or [first], t) for t in pools.seeds.values()]  # every entry alike
        out += [{}, {**current, "": tensor_pb2.Tensor()}, {**current, "x" * 300: pools.seeds["latents"]}]
        return out + [{k: v for k, v in current.items() if k != name} for name in current]
    if f.cpp_type == F.CPPTYPE_MESSAGE:
        name = f.message_type.full_name
        if name == "diffmesh.v1.Tensor":
            singles: list[Any] = tensor_sweep(pools)
        elif name == "diffmesh.v1.Media":
            singles = media_sweep(pools)
        else:
            base = getattr(good, f.name)[0] if f.is_repeated and getattr(good, f.name) else None
            if base is None:
                base = (
                    message_factory.GetMessageClass(f.message_type)()
                    if f.is_repeated
                    else getattr(good, f.name)
                )
            singles = list(sweep(base, pools, depth + 1)) if depth < 2 else []
        if not f.is_repeated:
            return singles
        current = list(getattr(good, f.name))
        out = [[v] for v in singles] + [[]]
        one = current[:1] or singles[:1]
        return out + [one * n for n in (2, 9, 17, 65)]
    singles = scalar_sweep(f, pools)
    if not f.is_repeated:
        return singles
    if f.name == "sigmas":
        extra = [[1.0, 0.5], [0.5, 1.0], [1.0, 1.0], [2.0, 1.0], [1.0, 0.0], [math.nan], [math.inf, 0.5]]
        extra.append([1 - i / 1001 for i in range(1000)])
    else:
        extra = [singles[:1] * n for n in (2, 65, 1000)]
    return [[v] for v in singles] + [[]] + extra


def sweep(good: Message, pools: Pools, depth: int = 0) -> list[Message]:
    """`good` with one field at a time set to each of its sweep values (nested messages two levels deep), and
    with each field cleared."""
    out = []
    for f in good.DESCRIPTOR.fields:
        cleared = _copy(good)
        cleared.ClearField(f.name)
        out.append(cleared)
        for value in _values(f, good, pools, depth):
            msg = _copy(good)
            set_field(msg, f, value)
            out.append(msg)
    return out
