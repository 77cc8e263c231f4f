"""Hypothesis strategies for random and malformed diffmesh requests, built from the message descriptors.

`messages(descriptor, pools)` draws any valid protobuf message of a type: every field of every proto type
(strings with '..', absolute paths, NULs and huge lengths; integers at their limits and wrapped around; NaN and
infinite floats; unknown enum values; empty and long repeated fields and maps), with the messages that carry
data drawn by hand: a `Tensor` is a stored seed, a mangled ref (wrong dtype / shape / byte_size / sha256, a uri
outside the store or to a missing key), or an inline tensor with consistent or mismatched dtype, shape and
bytes; a `Media` is a real or broken PNG / WAV / MP4, a tensor or a uri. `mutated(good, pools)` changes one to
three fields of a known-good request, to get past the first check. (fuzz_wire.py: bytes that are not a
message; fuzz_sweep.py: every pooled value in every field.)

Sizes that would run (width, height, steps, frames, batch, tiles) come from pools of cheap valid values and
invalid ones, so a request the services accept stays tiny.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass, field
from typing import Any

from google.protobuf import message_factory
from google.protobuf.descriptor import Descriptor, FieldDescriptor
from google.protobuf.message import Message
from hypothesis import strategies as st

from protos import common_pb2, tensor_pb2
from services.common import wire

F = FieldDescriptor
INT_LIMITS = {
    F.CPPTYPE_INT32: (-(2**31), 2**31 - 1),
    F.CPPTYPE_INT64: (-(2**63), 2**63 - 1),
    F.CPPTYPE_UINT32: (0, 2**32 - 1),
    F.CPPTYPE_UINT64: (0, 2**64 - 1),
}
U32_MAX = 2**32 - 1
# Fields whose valid values cost compute: cheap valid values and invalid ones only.
BOUNDED_INTS: dict[str, list[int]] = {
    "width": [0, 1, 8, 15, 16, 17, 24, 32, 48, 4097, 8193, 2**31, U32_MAX],
    "height": [0, 1, 8, 15, 16, 17, 24, 32, 48, 4097, 8193, 2**31, U32_MAX],
    "steps": [0, 1, 2, 3, 501, 1001, 10_000_001, U32_MAX],
    "num_frames": [0, 1, 2, 3, 5, 9, 258, 1026, U32_MAX],
    "batch_size": [0, 1, 2, 3, 9, 17, 1025, U32_MAX],
    "max_sequence_length": [0, 1, 7, 77, 256, 512, 513, 4096, 4097, U32_MAX],
    "tile": [0, 1, 7, 8, 16, 24, 64, 512, U32_MAX],
    "overlap": [0, 1, 7, 8, 16, 24, 64, 512, U32_MAX],
    "frame_chunk": [0, 1, 2, 3, U32_MAX],
    "preview_every": [0, 1, 2, U32_MAX],
    "tail_lines": [0, 1, 10, U32_MAX],
    "repeats": [0, 1, 2, U32_MAX],
}
INTERESTING_INTS = [0, 1, -1, 2, 3, 7, 8, 16, 255, 256, 1000, 2**15, 2**16, 2**31 - 1, -(2**31), 2**31]
INTERESTING_INTS += [2**32 - 1, 2**32, 2**53 + 1, 2**63 - 1, -(2**63), 2**64 - 1]
INTERESTING_FLOATS = [0.0, -0.0, 1.0, -1.0, 0.5, 1.5, 3.5, 100.0, 100.5, 1e-45, 1e30, 3.4e38, -3.4e38]
INTERESTING_FLOATS += [math.nan, math.inf, -math.inf]
INTERESTING_STRINGS = [
    "",
    " ",
    ".",
    "..",
    "../..",
    "../../../../etc/passwd",
    "/",
    "/etc",
    "/etc/passwd",
    "/proc/self/environ",
    "~",
    "~/x",
    "~nosuchuser/x",
    "\x00",
    "a\x00b",
    "\n",
    "\u202e",
    "é",
    "💥",
    "%2e%2e%2f",
    "\\..\\..\\",
    "${HOME}",
    "s3://",
    "file:///",
    "hf://",
    "hf://org/name",
    "hf://../../x",
    "modelscope://a/b@..",
    "x" * 129,
    "a" * 300,
    "a/" * 300,
    "x" * 20_001,
]
DTYPE_NAMES = [*wire.DTYPES, "", "f32", "F32 ", "F128", "U16", "U32", "complex64", "object"]
SHAPES = [
    [],
    [0],
    [1],
    [2, 3],
    [1, 32],
    [1, 16, 2, 2],
    [1, 16, 4, 4],
    [2, 16, 2, 2],
    [1, 16, 1, 2, 2],
    [1, 16, 2, 3],
    [1, 8, 32],
    [1, 512, 32],
    [3, 16, 16],
    [1, 3, 16, 16],
    [3, 5, 16, 16],
    [4, 16, 16],
    [1, 1600],
    [0, 32],
    [1, 0, 32],
    [0, 16, 2, 2],
    [1] * 30,
    [1] * 70,
]
HUGE_SHAPES = [[2**31, 2**31], [2**62, 4], [-1, 4], [4, -4], [2**63 - 1], [2**40, 0], [0, 2**62]]
TENSOR_NAMES = [
    "prompt_embeds",
    "pooled_prompt_embeds",
    "attention_mask",
    "image_embeds",
    "",
    "x",
    "..",
    "a/b",
]


@dataclass(repr=False)
class Pools:
    """Values that mean something to this stack: model specs, store uris, seed tensors, media files."""

    model_specs: list[str]
    uris: list[str]  # of Media and DatasetSpec (encoded files, datasets)
    seeds: dict[str, tensor_pb2.Tensor]
    media: list[bytes]
    store_prefix: str  # the store's uri prefix, "file:///.../store/"
    dataset: str  # a local training dataset folder (with a metadata.csv)
    strings: dict[str, list[str]] = field(default_factory=dict)  # by field name

    def __repr__(self) -> str:  # Hypothesis shows strategies' arguments: not megabytes of media
        return f"Pools({len(self.model_specs)} specs, {len(self.seeds)} seeds, {len(self.media)} media)"


def string_pool(name: str) -> list[str]:
    """Meaningful values of string fields, by field name (plus the interesting strings for every field)."""
    return {
        "family": ["flux", "wan", "FLUX", "sdxl", "flux "],
        "task": ["t2i", "img2img", "t2v", "i2v", "flf2v", "v2v", "ti2v", "s2v", "edit", "T2I"],
        "prompt": ["a cat", "a red cat on a table " * 40, "\x00cat"],
        "negative_prompt": ["blurry", "a"],
        "prompts": ["a cat", "a red cat on a table " * 40],
        "prompts_2": ["a cat", "a dog"],
        "encoders": [
            "text_encoder",
            "text_encoder_2",
            "text_encoder_3",
            "image_encoder",
            "transformer",
            "vae",
        ],
        "outputs": ["prompt_embeds", "pooled_prompt_embeds", "attention_mask", "text_embeds"],
        "solver": ["euler", "flow_euler", "unipc", "dpmpp_2m", "ddim"],
        "name": ["positive", "negative", "init", "reference_0", "my-lora", "a" * 50, "a" * 51, "-a", "a-"],
        "request_id": ["req-1", "a.b_c-d", "x" * 128, "x" * 129],
        "id": ["abc", "my-lora-abcdef", "a" * 63, "a" * 64, "-a", "A", "a_b", "job/../x"],
        "launcher": ["local", "kubernetes", "docker"],
        "namespace": ["default", "kube-system", "NS"],
        "mime_type": ["image/png", "image/jpeg", "video/mp4", "audio/wav", "application/x-python-pickle"],
        "component": ["denoiser", "vae", "text_encoder"],
        "mixed_precision": ["no", "bf16", "fp16", "fp8"],
        "init": ["pretrained", "random"],
        "output": ["s3://bucket/out/", "s3://b/", "out", "/tmp", "../out", "file:///tmp/x"],
        "sha256": ["0" * 64, "zz", "A" * 64],
    }.get(name, [])


# -- scalars ----------------------------------------------------------------------------------------------
def integers(cpp_type: int, name: str) -> st.SearchStrategy[int]:
    lo, hi = INT_LIMITS[cpp_type]
    if name in BOUNDED_INTS:
        return st.sampled_from([v for v in BOUNDED_INTS[name] if lo <= v <= hi])
    edges = [v for v in INTERESTING_INTS if lo <= v <= hi]
    return st.one_of(st.sampled_from(edges), st.integers(lo, hi), st.integers(max(lo, -300), min(hi, 300)))


def floats(cpp_type: int) -> st.SearchStrategy[float]:
    width = 32 if cpp_type == F.CPPTYPE_FLOAT else 64
    special = [v for v in INTERESTING_FLOATS if width == 64 or abs(v) < 3.5e38 or not math.isfinite(v)]
    return st.one_of(st.sampled_from(special), st.floats(width=width), st.floats(-10, 10, width=width))


def strings(name: str, pools: Pools) -> st.SearchStrategy[str]:
    known = string_pool(name) + pools.strings.get(name, [])
    if name in ("model", "spec", "base_model"):
        known += pools.model_specs
    if name == "uri":
        known += pools.uris
    options = [st.sampled_from(INTERESTING_STRINGS), st.text(max_size=24)]
    if known:
        options.insert(0, st.sampled_from(known))
    return st.one_of(*options)


def blobs(name: str, pools: Pools) -> st.SearchStrategy[bytes]:
    if name == "data":
        return st.one_of(st.sampled_from(pools.media), st.binary(max_size=64))
    return st.binary(max_size=64)


# -- tensors ----------------------------------------------------------------------------------------------
def seeded_bytes(seed: int, n: int) -> bytes:
    return random.Random(seed).randbytes(n)


@st.composite
def inline_tensors(draw: st.DrawFn) -> tensor_pb2.Tensor:
    """Inline tensors: consistent (any dtype, a small shape, the right byte count) or not."""
    dtype = draw(st.sampled_from(DTYPE_NAMES))
    shape = draw(
        st.one_of(
            st.sampled_from(SHAPES), st.sampled_from(HUGE_SHAPES), st.lists(st.integers(0, 5), max_size=5)
        )
    )
    seed = draw(st.integers(0, 2**32 - 1))
    numel = math.prod(shape) if all(d >= 0 for d in shape) else -1
    right = numel * wire.itemsize(dtype) if dtype in wire.DTYPES and 0 <= numel <= 1 << 16 else None
    size = draw(
        st.one_of(st.just(right), st.integers(0, 64), st.sampled_from([1, 3, 4095, 4097]))
        if right is not None
        else st.one_of(st.integers(0, 64), st.just(4096))
    )
    data = seeded_bytes(seed, size if size is not None else 0)
    return tensor_pb2.Tensor(inline=tensor_pb2.InlineTensor(dtype=dtype, shape=shape, data=data))


def bad_uris(pools: Pools, key: str) -> list[str]:
    """Uris of a ref that must not load: missing keys, folders, '..', other stores, other files."""
    prefix = pools.store_prefix
    return [
        prefix + "runs/fuzz-seed/s/missing",
        prefix + "runs/fuzz-seed/s",
        prefix + "runs/fuzz-seed/s/../s/latents",
        prefix + "../" + key,
        prefix + "/" + key,
        prefix + key + "/",
        prefix + key.upper(),
        prefix + "runs/.hidden",
        prefix.removesuffix("/") + "x/" + key,
        "file:///etc/passwd",
        "file:///proc/self/mem",
        "s3://diffmesh/" + key,
        key,
        "",
    ]


@st.composite
def mangled_refs(draw: st.DrawFn, pools: Pools) -> tensor_pb2.Tensor:
    """A seed's ref with one to three fields changed."""
    refs = [t.ref for t in pools.seeds.values() if t.WhichOneof("value") == "ref"]
    ref = tensor_pb2.TensorRef()
    ref.CopyFrom(draw(st.sampled_from(refs)))
    key = ref.uri[len(pools.store_prefix) :]
    for what in draw(
        st.lists(st.sampled_from(["uri", "dtype", "shape", "size", "sha"]), min_size=1, max_size=3)
    ):
        if what == "uri":
            ref.uri = draw(st.one_of(st.sampled_from(bad_uris(pools, key)), strings("uri", pools)))
        elif what == "dtype":
            ref.dtype = draw(st.sampled_from(DTYPE_NAMES))
        elif what == "shape":
            del ref.shape[:]
            ref.shape.extend(
                draw(
                    st.one_of(st.sampled_from(SHAPES + HUGE_SHAPES), st.lists(st.integers(0, 5), max_size=4))
                )
            )
            if draw(st.booleans()) and ref.dtype in wire.DTYPES and all(d >= 0 for d in ref.shape):
                # a byte_size consistent with the new shape: then the stored object is what does not fit
                ref.byte_size = min(math.prod(ref.shape) * wire.itemsize(ref.dtype), 2**63 - 1)
        elif what == "size":
            ref.byte_size = draw(
                st.one_of(st.sampled_from([0, -1, 1, 2**62, -(2**63), 2**63 - 1]), st.integers(-5, 5000))
            )
        else:
            ref.sha256 = draw(st.sampled_from(["", "0" * 64, ref.sha256.upper(), ref.sha256[:-1], "zz" * 32]))
    return tensor_pb2.Tensor(ref=ref)


def tensors(pools: Pools) -> st.SearchStrategy[tensor_pb2.Tensor]:
    return st.one_of(
        st.sampled_from(list(pools.seeds.values())),
        mangled_refs(pools),
        inline_tensors(),
        st.just(tensor_pb2.Tensor()),
        st.builds(
            lambda ref: tensor_pb2.Tensor(ref=ref),
            _generic(tensor_pb2.TensorRef.DESCRIPTOR, pools, 1),
        ),
    )


@st.composite
def media(draw: st.DrawFn, pools: Pools) -> Message:
    msg = common_pb2.Media()
    kind = draw(st.sampled_from(["data", "data", "data", "tensor", "uri", None]))
    if kind == "data":
        msg.data = draw(blobs("data", pools))
    elif kind == "tensor":
        msg.tensor.CopyFrom(draw(tensors(pools)))
    elif kind == "uri":
        msg.uri = draw(strings("uri", pools))
    if draw(st.booleans()):
        msg.mime_type = draw(strings("mime_type", pools))
    return msg


# -- messages ---------------------------------------------------------------------------------------------
def is_map(f: FieldDescriptor) -> bool:
    return f.type == F.TYPE_MESSAGE and f.message_type.GetOptions().map_entry


def _real_oneofs(desc: Descriptor) -> list[Any]:
    return [o for o in desc.oneofs if not (len(o.fields) == 1 and o.name == "_" + o.fields[0].name)]


def scalar(f: FieldDescriptor, pools: Pools, depth: int) -> st.SearchStrategy[Any]:
    """Values of one (non-repeated) field."""
    name = f.name
    cpp = f.cpp_type
    if cpp in INT_LIMITS:
        return integers(cpp, name)
    if cpp in (F.CPPTYPE_FLOAT, F.CPPTYPE_DOUBLE):
        return floats(cpp)
    if cpp == F.CPPTYPE_BOOL:
        return st.booleans()
    if cpp == F.CPPTYPE_ENUM:
        known = [v.number for v in f.enum_type.values]
        return st.one_of(st.sampled_from(known), st.sampled_from([-1, 3, 99, 2**31 - 1, -(2**31)]))
    if cpp == F.CPPTYPE_STRING:
        return blobs(name, pools) if f.type == F.TYPE_BYTES else strings(name, pools)
    return _generic(f.message_type, pools, depth + 1)


def map_keys(map_field: FieldDescriptor, pools: Pools) -> st.SearchStrategy[Any]:
    key = map_field.message_type.fields_by_name["key"]
    if key.cpp_type != F.CPPTYPE_STRING:
        return scalar(key, pools, 0)
    names = {"components": ["text_encoder", "text_encoder_2", "vae", "transformer", "unet", "image_encoder"]}
    pool = names.get(map_field.name, TENSOR_NAMES)
    return st.one_of(st.sampled_from(pool), st.sampled_from(INTERESTING_STRINGS), st.text(max_size=12))


def field_values(f: FieldDescriptor, pools: Pools, depth: int) -> st.SearchStrategy[Any]:
    """What to put in a field: a value, a list (repeated) or a dict (map)."""
    if is_map(f):
        value = f.message_type.fields_by_name["value"]
        values = (
            scalar(value, pools, depth) if value.cpp_type != F.CPPTYPE_STRING else strings("model", pools)
        )
        return st.dictionaries(map_keys(f, pools), values, max_size=4)
    if f.is_repeated:
        one = scalar(f, pools, depth)
        lists = [st.lists(one, max_size=4)]
        if (
            f.cpp_type != F.CPPTYPE_MESSAGE
        ):  # an occasional huge list of one (short) value: 20000 x 64 B at most
            lists.append(
                st.builds(lambda v, n: [v[:64]] * n, one, st.sampled_from([65, 1000, 20_000]))
                if f.cpp_type == F.CPPTYPE_STRING
                else st.builds(lambda v, n: [v] * n, one, st.sampled_from([65, 1000, 20_000]))
            )
        else:
            lists.append(st.builds(lambda v, n: [v] * n, one, st.sampled_from([9, 17, 65, 300])))
        return st.one_of(*lists)
    return scalar(f, pools, depth)


def set_field(msg: Message, f: FieldDescriptor, value: Any) -> None:
    target = getattr(msg, f.name)
    if is_map(f):
        target.clear()
        for k, v in value.items():
            if f.message_type.fields_by_name["value"].cpp_type == F.CPPTYPE_MESSAGE:
                target[k].CopyFrom(v)
            else:
                target[k] = v
    elif f.is_repeated:
        del target[:]
        if f.cpp_type == F.CPPTYPE_MESSAGE:
            for v in value:
                target.add().CopyFrom(v)
        else:
            target.extend(value)
    elif f.cpp_type == F.CPPTYPE_MESSAGE:
        target.CopyFrom(value)
    else:
        setattr(msg, f.name, value)


OVERRIDES = {"diffmesh.v1.Tensor": tensors, "diffmesh.v1.Media": media}


def _generic(desc: Descriptor, pools: Pools, depth: int) -> st.SearchStrategy[Message]:
    if desc.full_name in OVERRIDES:
        return OVERRIDES[desc.full_name](pools)
    return _message(desc, pools, depth)


@st.composite
def _message(draw: st.DrawFn, desc: Descriptor, pools: Pools, depth: int) -> Message:
    msg = message_factory.GetMessageClass(desc)()
    if depth > 4:
        return msg
    chosen = {o.name: draw(st.sampled_from([None, *o.fields])) for o in _real_oneofs(desc)}
    for f in desc.fields:
        oneof = f.containing_oneof
        if oneof is not None and oneof.name in chosen:
            if chosen[oneof.name] is not f:
                continue
        elif not draw(st.booleans()):
            continue
        set_field(msg, f, draw(field_values(f, pools, depth)))
    return msg


def messages(desc: Descriptor, pools: Pools) -> st.SearchStrategy[Message]:
    """Any message of a type, every field drawn from the pools above."""
    return _generic(desc, pools, 0)


@st.composite
def mutated(draw: st.DrawFn, good: Message, pools: Pools) -> Message:
    """A known-good request with one to three fields replaced (or cleared)."""
    msg = type(good)()
    msg.CopyFrom(good)
    fields = list(good.DESCRIPTOR.fields)
    if not fields:
        return msg
    for f in draw(st.lists(st.sampled_from(fields), min_size=1, max_size=3, unique_by=lambda f: f.name)):
        if draw(st.integers(0, 5)) == 0:
            msg.ClearField(f.name)
        else:
            set_field(msg, f, draw(field_values(f, pools, 0)))
    return msg
