"""Checkpoints and resume: a trainer process killed (SIGKILL) right after a checkpoint's manifest lands resumes
from it and ends with the weights of an uninterrupted run; partial checkpoints are ignored; old ones pruned."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from google.protobuf import json_format
from safetensors.torch import load_file
from tiny_dataset import spec

from trainer import checkpoint
from trainer.job import LORA_FILE, train
from trainer.spec import TrainSpec
from trainer.storage import LocalStorage

ROOT = Path(__file__).resolve().parents[2]
STEPS, EVERY = 12, 4


def run_spec(model: Path, dataset: Path, out: Path) -> dict:
    return spec(
        model, dataset, out, steps=STEPS, checkpointEvery=EVERY, lora={"rank": 4, "alpha": 4, "dropout": 0.1}
    )


def trainer_process(spec_file: Path, env: dict[str, str], *extra: str) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "trainer", "--spec", str(spec_file), *extra],
        cwd=ROOT,
        env={**os.environ, **env},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def wait_for(path: Path, proc: subprocess.Popen, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not path.is_file():
        if proc.poll() is not None:
            pytest.fail(f"trainer exited ({proc.returncode}) before {path} appeared:\n{proc.stdout.read()}")
        if time.monotonic() > deadline:
            proc.kill()
            pytest.fail(f"no {path} after {timeout} s")
        time.sleep(0.02)


def test_killed_after_a_checkpoint_resumes_and_matches_an_uninterrupted_run(
    tiny_model, dataset, work_env, tmp_path
):
    model, _ = tiny_model
    straight = tmp_path / "straight"
    train(json_format.ParseDict(run_spec(model, dataset, straight), TrainSpec()), env=work_env)

    out = tmp_path / "killed"
    spec_file = tmp_path / "spec.json"
    spec_file.write_text(json.dumps(run_spec(model, dataset, out)))
    proc = trainer_process(spec_file, work_env, "--hold-after-checkpoint", "60")
    wait_for(out / checkpoint.folder(EVERY) / checkpoint.MANIFEST, proc)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL
    assert not (out / LORA_FILE).exists()
    assert json.loads((out / "status.json").read_text())["state"] == "running"  # what a kill leaves

    proc = trainer_process(spec_file, work_env)
    log, _ = proc.communicate(timeout=120)
    assert proc.returncode == 0, log
    assert f"resumed from checkpoint step {EVERY}" in log
    assert f"step {EVERY + 1}/{STEPS}" in log and f"step {EVERY}/{STEPS}" not in log

    expected, got = load_file(straight / LORA_FILE), load_file(out / LORA_FILE)
    assert expected.keys() == got.keys()
    for key in expected:
        torch.testing.assert_close(got[key], expected[key], atol=1e-5, rtol=0)
    # only the newest two complete checkpoints are kept
    assert checkpoint.complete_steps(LocalStorage(out)) == [STEPS - EVERY, STEPS]


def _state() -> dict:
    return {"loop": {"step": 3, "t": (1, 2.5, None), "ids": {0: torch.arange(3)}}, "s": "x"}


def test_partial_or_damaged_checkpoints_are_ignored(tmp_path):
    storage = LocalStorage(tmp_path)
    weights = {"a.lora_A.weight": torch.ones(2, 3)}
    checkpoint.save(storage, 4, weights, _state())
    # a newer folder without a manifest: a run killed while writing it
    (tmp_path / checkpoint.folder(8)).mkdir(parents=True)
    (tmp_path / checkpoint.folder(8) / "trainable-00000.safetensors").write_bytes(b"partial")
    found = checkpoint.latest(storage)
    assert found is not None and found.step == 4
    torch.testing.assert_close(found.trainable["a.lora_A.weight"], weights["a.lora_A.weight"])
    assert found.state["loop"]["t"] == (1, 2.5, None)
    assert torch.equal(found.state["loop"]["ids"][0], torch.arange(3))
    # a newer checkpoint whose file no longer matches its manifest is not taken either
    checkpoint.save(storage, 12, weights, _state())
    (tmp_path / checkpoint.folder(12) / "state.json").write_text("{}")
    assert checkpoint.latest(storage).step == 4


def test_only_the_last_two_complete_checkpoints_are_kept(tmp_path):
    storage = LocalStorage(tmp_path)
    for step in (2, 4, 6, 8):
        checkpoint.save(storage, step, {"w": torch.zeros(1)}, {})
    assert checkpoint.complete_steps(storage) == [6, 8]
    assert sorted(checkpoint.steps_present(storage)) == [6, 8]


def test_large_checkpoints_are_written_in_shards_and_read_back_whole(tmp_path):
    storage = LocalStorage(tmp_path)
    weights = {f"w{i}": torch.full((256,), float(i)) for i in range(5)}  # 1 KiB each
    written = checkpoint.save(storage, 3, weights, _state(), shard_bytes=2048)
    names = [n.rsplit("/", 1)[1] for n in storage.list(checkpoint.folder(3))]
    assert [n for n in names if n.startswith("trainable-")] == [
        f"trainable-{i:05d}.safetensors" for i in range(3)
    ]
    assert written.bytes == sum(
        storage.size(f"{checkpoint.folder(3)}/{n}") for n in names if n != "manifest.json"
    )
    found = checkpoint.latest(storage)
    assert found.trainable.keys() == weights.keys()
    for key, value in weights.items():
        assert torch.equal(found.trainable[key], value)
