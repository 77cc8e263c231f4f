"""SafetensorsIndex reads what safetensors wrote, for every dtype, key by key; broken files get InvalidArgument;
BlockStreamer gives blocks their weights only while they run."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from services.common.errors import InvalidArgument
from services.common.streaming import BlockStreamer, SafetensorsIndex

DTYPES = [
    torch.float32,
    torch.float16,
    torch.bfloat16,
    torch.float8_e4m3fn,
    torch.int64,
    torch.uint8,
    torch.bool,
]


def test_reads_every_tensor_as_written(tmp_path: Path):
    g = torch.Generator().manual_seed(0)
    tensors = {f"t.{i}": (torch.randn(3, 5, generator=g) * 4).to(dt) for i, dt in enumerate(DTYPES)}
    tensors["empty"] = torch.zeros(0, 4)
    tensors["scalar"] = torch.tensor(2.5)
    save_file(dict(list(tensors.items())[:4]), tmp_path / "a.safetensors")
    save_file(dict(list(tensors.items())[4:]), tmp_path / "b.safetensors")
    index = SafetensorsIndex([tmp_path / "a.safetensors", tmp_path / "b.safetensors"])
    assert sorted(index) == sorted(tensors) and len(index) == len(tensors)
    for key, want in tensors.items():
        got = index[key]
        assert got.dtype == want.dtype and got.shape == want.shape
        assert torch.equal(got.reshape(-1).view(torch.uint8), want.reshape(-1).contiguous().view(torch.uint8))
    meta = index.meta()
    assert meta["t.0"].device.type == "meta" and meta["t.0"].shape == (3, 5)
    ref = load_file(tmp_path / "a.safetensors")
    assert all(torch.equal(index[k].float(), ref[k].float()) for k in ref)
    index.close()


def test_broken_files_are_invalid_argument(tmp_path: Path):
    with pytest.raises(InvalidArgument, match="safetensors"):
        SafetensorsIndex(tmp_path / "w.bin")
    (tmp_path / "short.safetensors").write_bytes(b"\x01")
    with pytest.raises(InvalidArgument, match="header length"):
        SafetensorsIndex(tmp_path / "short.safetensors")
    header = json.dumps({"w": {"dtype": "F32", "shape": [4], "data_offsets": [0, 12]}}).encode()
    (tmp_path / "bad.safetensors").write_bytes(struct.pack("<Q", len(header)) + header + bytes(12))
    with pytest.raises(InvalidArgument, match="holds 12 bytes"):
        SafetensorsIndex(tmp_path / "bad.safetensors")
    header = json.dumps({"w": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]}}).encode()
    (tmp_path / "cut.safetensors").write_bytes(struct.pack("<Q", len(header)) + header + bytes(8))
    with pytest.raises(InvalidArgument, match="bad offsets"):
        SafetensorsIndex(tmp_path / "cut.safetensors")


def test_block_streamer_materialises_blocks_only_while_they_run(tmp_path: Path):
    torch.manual_seed(0)
    reference = nn.Sequential(nn.Linear(4, 8), nn.Linear(8, 8), nn.Linear(8, 2))
    save_file({k: v.contiguous() for k, v in reference.state_dict().items()}, tmp_path / "m.safetensors")
    index = SafetensorsIndex(tmp_path / "m.safetensors")
    with torch.device("meta"):
        model = nn.Sequential(nn.Linear(4, 8), nn.Linear(8, 8), nn.Linear(8, 2)).requires_grad_(False)
    seen = []
    layouts = [
        {n: (tuple(p.shape), [f"{i}.{n}"]) for n, p in block.named_parameters()}
        for i, block in enumerate(model)
    ]
    streamer = BlockStreamer(list(model), layouts, index, torch.device("cpu"), torch.float32, torch.float32)
    model[1].register_forward_pre_hook(lambda m, a: seen.append(m.weight.device.type))
    x = torch.randn(5, 4)
    with torch.inference_mode():
        out = model(x)
    torch.testing.assert_close(out, reference(x).detach(), atol=0, rtol=0)
    assert seen == ["cpu"] and streamer.loads == 3
    with torch.inference_mode():  # again: the slots are reused, the result is the same
        torch.testing.assert_close(model(x), out, atol=0, rtol=0)
    streamer.settle()
    assert all(p.device.type == "meta" for p in model.parameters())
    streamer.close()


def test_fused_pieces_and_storage_casts(tmp_path: Path):
    """A tensor made of several checkpoint tensors (diffusers' q, k, v -> our qkv) is filled row by row, and a
    float32 file streams into bfloat16 storage through the staging buffer."""
    g = torch.Generator().manual_seed(1)
    parts = {f"p{i}": torch.randn(i + 2, 3, generator=g) for i in range(3)}
    save_file(parts, tmp_path / "p.safetensors")
    index = SafetensorsIndex(tmp_path / "p.safetensors")
    with torch.device("meta"):
        block = nn.Linear(3, 9, bias=False).requires_grad_(False)
    got: list[torch.Tensor] = []

    def seen(module: nn.Module, _args: tuple) -> None:
        got.append(module.weight.clone())

    for storage in (torch.float32, torch.bfloat16):
        layout = {"weight": ((9, 3), ["p0", "p1", "p2"])}
        streamer = BlockStreamer([block], [layout], index, torch.device("cpu"), storage, storage)
        handle = block.register_forward_pre_hook(seen)  # runs after the streamer's own
        with torch.inference_mode():
            block(torch.zeros(1, 3, dtype=storage))
        want = torch.cat(list(parts.values())).to(storage)
        assert got[-1].dtype == storage and torch.equal(got[-1], want)
        handle.remove()
        streamer.close()
