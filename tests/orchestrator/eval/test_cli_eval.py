"""`diffmesh eval shapes`: argument checks (exit 2, naming the flag), a run through the real Orchestrator
servicer on port 0 (the test family of tests/orchestrator/conftest.py draws flat images: no shape), and an
in-process (--local) run on a tiny random FLUX.1 directory. No trained model exists in the tests, so the
accuracies are not asserted, only what is written and printed."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from PIL import Image

from orchestrator.cli import main
from orchestrator.cli_eval import DEFAULT_MODEL

ENV_VARS = ("DIFFMESH_ORCHESTRATOR", "DIFFMESH_TOKEN", "DIFFMESH_TOKEN_FILE", "DIFFMESH_TLS_CA")


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    for name in ENV_VARS:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("DIFFMESH_STATE_DIR", str(tmp_path / "no-stack"))


def eval_shapes(*args: str) -> int:
    return main(["eval", "shapes", *args])


@pytest.mark.parametrize(
    ("argv", "needle"),
    [
        (["--n", "0"], "argument --n: 0 is out of range [1, 1000]"),
        (["--prompts", "all"], "argument --prompts: invalid choice: 'all'"),
        (["--lora", "x.safetensors:0"], "scale 0"),
        (["--steps", "two"], "argument --steps: 'two' is not an integer"),
        (["--guidance", "-1"], "argument --guidance: -1 is out of range"),
        (["--local", "--endpoint", "h:1"], "not allowed with argument"),
    ],
)
def test_argparse_rejects_bad_flags(capsys, argv, needle):
    with pytest.raises(SystemExit) as exc:
        eval_shapes(*argv)
    assert exc.value.code == 2
    assert needle in capsys.readouterr().err


def test_checks_before_any_generation(tmp_path: Path, capsys):
    afile = tmp_path / "file"
    afile.write_text("x")
    assert eval_shapes("--local", "--token", "t", "--out-dir", str(tmp_path / "o")) == 2
    assert "--token is for a remote orchestrator" in capsys.readouterr().err
    assert eval_shapes("--endpoint", "127.0.0.1:1", "--out-dir", str(afile)) == 2
    assert f"--out-dir {afile} is not a directory" in capsys.readouterr().err
    # no --endpoint, no stack: says how to get one, exit 1
    assert eval_shapes("--out-dir", str(tmp_path / "o")) == 1
    err = capsys.readouterr().err
    assert err.startswith("diffmesh eval shapes: no orchestrator to talk to") and "diffmesh up" in err
    assert not (tmp_path / "o").exists()


def test_the_default_model_is_the_shipped_one():
    from orchestrator.cli import build_parser

    args = build_parser().parse_args(["eval", "shapes"])
    assert (args.model, args.n, args.prompts, args.seed, args.out_dir) == (
        DEFAULT_MODEL,
        8,
        "base",
        0,
        "outputs/eval",
    )


def test_eval_through_the_orchestrator_writes_the_report(served, model_dir: Path, tmp_path: Path, capsys):
    out = tmp_path / "eval"
    code = eval_shapes(
        "--model", str(model_dir), "--endpoint", served.endpoint, "--token", served.token,
        "--n", "2", "--limit-prompts", "3", "--seed", "40", "--width", "48", "--height", "48",
        "--steps", "1", "--out-dir", str(out),
    )  # fmt: skip
    cap = capsys.readouterr()
    assert code == 0, cap.err
    got = served.family.requests
    assert [(r.prompt, r.seed, r.width, r.steps) for r in got] == [
        (p, s, 48, 1)
        for p in (
            "a red circle on a white background",
            "a green circle on a black background",
            "a blue circle on a grey background",
        )
        for s in (40, 41)
    ]
    assert all(r.model == str(model_dir.resolve()) for r in got)
    assert "shape class      0.0%  (0/6)" in cap.out  # flat images: no shape
    assert cap.out.rstrip().splitlines()[-2:] == [str(out / "contact_sheet.png"), str(out / "report.json")]
    assert cap.err.count("seed 4") == 6
    report = json.loads((out / "report.json").read_text())
    assert (report["n_per_prompt"], report["seed"], report["prompt_set"]) == (2, 40, "base")
    assert report["overrides"] == {"steps": 1, "width": 48, "height": 48} and len(report["samples"]) == 6
    assert Image.open(out / "contact_sheet.png").width >= 2 * 128


def test_server_errors_exit_1(served, model_dir: Path, tmp_path: Path, capsys):
    code = eval_shapes(
        "--model", str(model_dir), "--endpoint", served.endpoint, "--token", served.token,
        "--steps", "999", "--out-dir", str(tmp_path / "o"), "--quiet",
    )  # fmt: skip
    err = capsys.readouterr().err
    assert code == 1 and "INVALID_ARGUMENT" in err and "steps=999" in err
    assert not (tmp_path / "o").exists()


def test_local_eval_on_a_tiny_random_flux(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys):
    from tiny_flux import make_tiny_flux

    monkeypatch.setenv("DIFFMESH_STORE", "local")
    monkeypatch.setenv("DIFFMESH_LOCAL_STORE", str(tmp_path / "store"))
    monkeypatch.setenv("DIFFMESH_CACHE_DIR", str(tmp_path / "cache"))
    model = tmp_path / "tiny-flux"
    make_tiny_flux(model, seed=0)
    out = tmp_path / "eval"
    code = eval_shapes(
        "--model", str(model), "--local", "--n", "1", "--limit-prompts", "2", "--steps", "2",
        "--width", "64", "--height", "64", "--out-dir", str(out), "--quiet",
    )  # fmt: skip
    cap = capsys.readouterr()
    assert code == 0, cap.err
    assert "a red circle on a white background" in cap.out and "all three" in cap.out
    report = json.loads((out / "report.json").read_text())
    assert len(report["samples"]) == 2 and set(report["accuracy"]) == {"colour", "background", "shape", "all"}
    assert Image.open(out / "contact_sheet.png").size[0] >= 128
