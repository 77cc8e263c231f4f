"""`python -m trainer` with bad specs: exit code 2 and a message naming the field, before any training starts
(a spec that fails validation never even imports torch); the spec can come from the environment, as in a pod."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from tiny_dataset import make_dataset, spec

ROOT = Path(__file__).resolve().parents[2]


def run(
    args: list[str], env: dict[str, str] | None = None, stdin: str | None = None
) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "trainer", *args],
        cwd=ROOT,
        env={**os.environ, **(env or {})},
        input=stdin,
        capture_output=True,
        text=True,
        timeout=120,
    )


@pytest.mark.parametrize(
    ("change", "field"),
    [
        ({"dataset": {"uri": "/no/such/folder"}}, "dataset.uri"),
        ({"family": "sd9"}, "family"),
        ({"lora": {"rank": 0}}, "lora.rank"),
        ({"learningRate": 2.0}, "learningRate"),
        ({"component": "vae"}, "mode"),  # the VAE trains in FULL mode, not as a LoRA
        ({"init": "random"}, "init"),  # from scratch needs FULL
        ({"init": "zeros", "mode": "FULL"}, "init"),
        ({"captionDropout": 1.0}, "captionDropout"),
    ],
)
def test_bad_specs_exit_2_naming_the_field_before_loading_torch(tmp_path, dataset, change, field):
    doc = {**spec(tmp_path / "model", dataset, tmp_path / "out"), **change}
    code = (
        "import sys; from trainer.__main__ import main; rc = main(['--spec', '-']); "
        "print('torch loaded' if 'torch' in sys.modules else 'no torch'); sys.exit(rc)"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code],
        cwd=ROOT,
        input=json.dumps(doc),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 2, proc.stderr
    assert f"bad spec: {field}:" in proc.stderr
    assert "no torch" in proc.stdout
    assert not (tmp_path / "out").exists()


def test_an_unreadable_image_fails_before_training_naming_the_file(tiny_model, work_env, tmp_path):
    data = tmp_path / "data"
    make_dataset(data, n=4)
    (data / "img_02.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really a png")
    out = tmp_path / "out"
    proc = run(["--spec", "-"], work_env, stdin=json.dumps(spec(tiny_model[0], data, out)))
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "bad spec: dataset.uri:" in proc.stderr and "img_02.png" in proc.stderr
    status = json.loads((out / "status.json").read_text())
    assert status["state"] == "failed" and "img_02.png" in status["message"] and status["step"] == 0
    assert not (out / "checkpoints").exists()


def test_a_missing_image_and_a_missing_column_name_the_problem(tiny_model, work_env, tmp_path):
    from trainer.__main__ import main

    data = tmp_path / "data"
    make_dataset(data, n=3, metadata="jsonl")
    (data / "img_01.png").unlink()
    doc = spec(tiny_model[0], data, tmp_path / "out")
    assert main([], env={**work_env, "DIFFMESH_TRAIN_SPEC": json.dumps(doc)}) == 2
    assert (
        "img_01.png does not exist" in json.loads((tmp_path / "out" / "status.json").read_text())["message"]
    )
    doc["dataset"]["captionColumn"] = "text"
    (tmp_path / "spec.json").write_text(json.dumps(doc))
    assert main([], env={**work_env, "DIFFMESH_TRAIN_SPEC_FILE": str(tmp_path / "spec.json")}) == 2
    assert "'text'" in json.loads((tmp_path / "out" / "status.json").read_text())["message"]


def test_no_spec_at_all_is_a_usage_error(tmp_path):
    proc = run([], {"DIFFMESH_TRAIN_SPEC": "", "DIFFMESH_TRAIN_SPEC_FILE": ""})
    assert proc.returncode == 2 and "bad spec: spec: no spec" in proc.stderr
    proc = run(["--spec", "-"], stdin="{not json")
    assert proc.returncode == 2 and "bad spec: spec: not a valid training spec" in proc.stderr


def test_a_base_model_without_a_component_the_family_needs_is_named(tiny_model, dataset, work_env, tmp_path):
    from trainer.__main__ import main

    model = tmp_path / "model"
    shutil.copytree(tiny_model[0], model, ignore=shutil.ignore_patterns("vae"))
    doc = spec(model, dataset, tmp_path / "out")
    assert main([], env={**work_env, "DIFFMESH_TRAIN_SPEC": json.dumps(doc)}) == 2
    message = json.loads((tmp_path / "out" / "status.json").read_text())["message"]
    assert message.startswith("baseModel: ") and "'vae'" in message
