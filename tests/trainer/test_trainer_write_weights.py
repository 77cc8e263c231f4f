"""Weights folders the trainer writes: one file when small, diffusers-style shards with an index above the limit."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file

from trainer.storage import open_storage, write_weights


def test_small_weights_are_one_file_large_ones_are_sharded(tmp_path: Path):
    weights = {f"w{i}": torch.full((256,), float(i)) for i in range(10)}  # 1 KiB each
    storage = open_storage(str(tmp_path))
    assert write_weights(storage, "one", weights) == ["one/diffusion_pytorch_model.safetensors"]
    names = write_weights(storage, "many", weights, max_shard_bytes=3 * 1024)
    assert len(names) == 5 and names[-1].endswith(".safetensors.index.json")
    index = json.loads((tmp_path / names[-1]).read_text())
    merged = {}
    for name in names[:-1]:
        shard = load_file(tmp_path / name)
        assert all(index["weight_map"][k] == Path(name).name for k in shard)
        merged |= shard
    assert merged.keys() == weights.keys() and all(torch.equal(merged[k], weights[k]) for k in weights)
    assert index["metadata"]["total_size"] == 10 * 1024
