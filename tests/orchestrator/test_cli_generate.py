"""`diffmesh generate` end to end against the real Orchestrator servicer on port 0 (and in-process with
--local), with the test-only family `testfam` of conftest.py: what it writes, prints and exits with."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from orchestrator.cli import main
from orchestrator.cli_generate import CommandError, ProgressDisplay, write_outputs
from protos import common_pb2, orchestrator_pb2

ENV_VARS = (
    "DIFFMESH_ORCHESTRATOR",
    "DIFFMESH_TOKEN",
    "DIFFMESH_TOKEN_FILE",
    "DIFFMESH_STATE_DIR",
    "DIFFMESH_TLS_CA",
)


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """No orchestrator, token or stack from the machine's environment leaks into a test."""
    for name in ENV_VARS:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("DIFFMESH_STATE_DIR", str(tmp_path / "no-stack"))


def generate(*args: str) -> int:
    return main(["generate", "--model", "tiny", "--family", "testfam", "--prompt", "a cat", *args])


def remote(served) -> list[str]:
    return ["--endpoint", served.endpoint, "--token", served.token]


def test_generate_writes_the_png_as_received(served, tmp_path: Path, capsys):
    out = tmp_path / "cat.png"
    code = generate(
        "--steps", "3", "--width", "40", "--height", "24", "--seed", "7", "--out", str(out), *remote(served)
    )
    cap = capsys.readouterr()
    assert code == 0, cap.err
    assert out.read_bytes() == served.family.pngs[-1]
    assert Image.open(out).size == (40, 24)
    assert cap.out.splitlines()[0] == str(out) and "seed 7" in cap.out
    # stderr is no TTY here: plain lines, no carriage returns
    assert "\r" not in cap.err
    lines = cap.err.splitlines()
    assert lines[0] == "denoise ..." and lines[-1].startswith("denoise ... ") and lines[-1].endswith("s")
    assert "denoise [####################] 3/3 0.3s ETA 0.0s" in lines
    assert served.token not in cap.out + cap.err


def test_unset_flags_stay_unset_and_given_ones_arrive(served, tmp_path: Path, capsys):
    init = tmp_path / "init.png"
    Image.new("RGB", (8, 8)).save(init)
    assert generate("--out", str(tmp_path / "a.png"), "--quiet", *remote(served)) == 0
    got = served.family.requests[-1]
    assert not any(
        got.HasField(f) for f in ("seed", "steps", "width", "height", "guidance", "strength", "fps")
    )
    args = ["--lora", "/l/a.safetensors:0.5", "--lora", "hf://org/b.safetensors", "--lora-mode", "hot"]
    args += ["--input-image", str(init), "--strength", "0.3", "--vae", "/m/vae", "--text-encoder-2", "/m/t5"]
    args += ["--guidance", "0", "--num-frames", "5", "--fps", "8", "--request-id", "cli-1", "--task", "t2i"]
    assert generate(*args, "--out", str(tmp_path / "b.png"), "--quiet", *remote(served)) == 0
    got = served.family.requests[-1]
    assert [(lo.spec, lo.scale) for lo in got.loras] == [
        ("/l/a.safetensors", 0.5),
        ("hf://org/b.safetensors", 1.0),
    ]
    assert got.lora_mode == common_pb2.LORA_MODE_HOT and got.input_images[0].data == init.read_bytes()
    assert got.HasField("guidance") and got.guidance == 0 and got.strength == pytest.approx(0.3)
    assert dict(got.components) == {"vae": "/m/vae", "text_encoder_2": "/m/t5"}
    assert (got.num_frames, got.fps, got.request_id, got.task) == (5, 8.0, "cli-1", "t2i")
    assert capsys.readouterr().err == ""  # --quiet


def test_several_images_are_numbered(served, tmp_path: Path, capsys):
    out = tmp_path / "batch.png"
    assert generate("--batch-size", "3", "--out", str(out), "--quiet", *remote(served)) == 0
    paths = [tmp_path / f"batch-{i}.png" for i in (1, 2, 3)]
    assert [p.read_bytes() for p in paths] == served.family.pngs[-3:]
    assert not out.exists() and capsys.readouterr().out.splitlines()[:3] == [str(p) for p in paths]


def test_the_orchestrator_and_token_come_from_the_environment(served, tmp_path: Path, monkeypatch):
    monkeypatch.setenv("DIFFMESH_ORCHESTRATOR", served.endpoint)
    monkeypatch.setenv("DIFFMESH_TOKEN", served.token)
    assert generate("--out", str(tmp_path / "a.png"), "--quiet") == 0
    monkeypatch.delenv("DIFFMESH_TOKEN")
    secret = tmp_path / "token"
    secret.write_text(served.token + "\n")
    monkeypatch.setenv("DIFFMESH_TOKEN_FILE", str(secret))
    assert generate("--out", str(tmp_path / "b.png"), "--quiet") == 0
    assert (tmp_path / "b.png").is_file()


def test_an_unreadable_token_file_is_named(served, tmp_path: Path, monkeypatch, capsys):
    monkeypatch.setenv("DIFFMESH_ORCHESTRATOR", served.endpoint)
    monkeypatch.setenv("DIFFMESH_TOKEN_FILE", str(tmp_path / "absent"))
    assert generate("--out", str(tmp_path / "a.png")) == 2
    assert "DIFFMESH_TOKEN_FILE" in capsys.readouterr().err and served.family.requests == []


def write_stack_state(state_dir: Path, endpoint: str, token: str, pid: int) -> None:
    """The state file `diffmesh up` writes (orchestrator/stack/local_stack.py), pointing at our server."""
    state_dir.mkdir()
    service = {"endpoint": endpoint, "pid": pid}
    data = {
        "s3": {"endpoint": "127.0.0.1:1", "pid": pid},
        "token": token,
        "services": {"orchestrator": service},
    }
    (state_dir / "stack.json").write_text(json.dumps(data))


def test_the_running_local_stack_is_found_with_its_token(served, tmp_path: Path):
    state_dir = tmp_path / "stack"
    write_stack_state(state_dir, served.endpoint, served.token, os.getpid())
    out = tmp_path / "a.png"
    assert (
        main(
            [
                "--state-dir",
                str(state_dir),
                "generate",
                "--model",
                "m",
                "--family",
                "testfam",
                "--prompt",
                "p",
                "--out",
                str(out),
                "--quiet",
            ]
        )
        == 0
    )
    assert out.is_file()


def test_a_stopped_local_stack_or_none_says_what_to_do(served, tmp_path: Path, monkeypatch, capsys):
    assert generate("--out", str(tmp_path / "a.png")) == 1
    err = capsys.readouterr().err
    assert err.startswith("diffmesh generate: no orchestrator") and "diffmesh up" in err and "--local" in err
    dead = subprocess.Popen([sys.executable, "-c", ""])
    dead.wait()
    write_stack_state(tmp_path / "stale", served.endpoint, served.token, dead.pid)
    monkeypatch.setenv("DIFFMESH_STATE_DIR", str(tmp_path / "stale"))
    assert generate("--out", str(tmp_path / "a.png")) == 1
    assert "not running" in capsys.readouterr().err and served.family.requests == []


def test_local_runs_in_process(test_family, tmp_path: Path, monkeypatch, capsys):
    monkeypatch.setenv("DIFFMESH_LOCAL_STORE", str(tmp_path / "store"))
    monkeypatch.setenv("DIFFMESH_CACHE_DIR", str(tmp_path / "cache"))
    out = tmp_path / "local.png"
    assert generate("--local", "--steps", "2", "--out", str(out)) == 0
    assert out.read_bytes() == test_family.pngs[-1]
    assert "denoise [####################] 2/2" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("args", "words"),
    [
        (["--strength", "0.5"], "--strength 0.5 needs --input-image"),
        (["--input-image", "/no/such/init.png"], "--input-image /no/such/init.png: no such file"),
        (
            ["--out", "/no/such/dir/x.png"],
            "--out /no/such/dir/x.png: directory '/no/such/dir' does not exist",
        ),
        (["--out", "x.jpg"], "--out x.jpg: expected a .png file, FILE.mp4 or DIR/ for a video"),
        (["--local", "--token", "t"], "--token is for a remote orchestrator"),
    ],
)
def test_bad_arguments_exit_2_before_any_rpc(served, tmp_path: Path, monkeypatch, capsys, args, words):
    monkeypatch.chdir(tmp_path)
    if "--out" not in args:
        args = [*args, "--out", str(tmp_path / "x.png")]
    assert generate(*args) == 2
    assert capsys.readouterr().err.startswith(f"diffmesh generate: {words}")
    assert served.family.requests == []


@pytest.mark.parametrize(
    ("args", "words"),
    [
        (["--steps", "-1"], "argument --steps: -1 is out of range [1, "),
        (["--steps", "ten"], "argument --steps: 'ten' is not an integer"),
        (["--width", "0"], "argument --width: 0 is out of range"),
        (["--seed", "-3"], "argument --seed: -3 is out of range"),
        (["--strength", "1.5"], "argument --strength: 1.5 is out of range [0.0, 1.0]"),
        (["--fps", "0"], "argument --fps: 0 is out of range (0.0"),
        (["--guidance", "inf"], "argument --guidance: inf is out of range"),
        (["--lora", ":0.5"], "argument --lora: LoRA ':0.5': empty path"),
        (["--lora", "a.safetensors:0"], "scale 0 reads as 1.0"),
        (["--lora-mode", "warm"], "argument --lora-mode: invalid choice: 'warm'"),
        (["--request-id", "../etc"], "argument --request-id: '../etc'"),
        (["--local", "--endpoint", "h:1"], "argument --endpoint: not allowed with argument --local"),
    ],
)
def test_out_of_range_flags_exit_2(served, tmp_path: Path, capsys, args, words):
    with pytest.raises(SystemExit) as e:
        generate(*args, "--out", str(tmp_path / "x.png"))
    assert e.value.code == 2
    assert words in capsys.readouterr().err
    assert served.family.requests == []


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["--steps", "99"], "diffmesh generate: INVALID_ARGUMENT: steps=99: allowed range [1, 50]"),
        (["--family", "nosuch"], "diffmesh generate: NOT_FOUND: unknown family 'nosuch'"),
        (["--token", "wrong"], "diffmesh generate: UNAUTHENTICATED: invalid bearer token"),
    ],
)
def test_server_errors_exit_1_with_the_code(served, tmp_path: Path, capsys, args, expected):
    argv = [*remote(served), *args]  # a later --token / --family wins
    out = tmp_path / "x.png"
    assert generate(*argv, "--out", str(out)) == 1
    assert expected in capsys.readouterr().err.splitlines()[-1]
    assert not out.exists()


def test_progress_on_a_tty_redraws_one_line():
    stream = io.StringIO()
    show = ProgressDisplay(stream, tty=True, width=10)
    started = orchestrator_pb2.StageEvent(stage="denoise", kind=orchestrator_pb2.StageEvent.STARTED)
    finished = orchestrator_pb2.StageEvent(
        stage="denoise", kind=orchestrator_pb2.StageEvent.FINISHED, seconds=2.5
    )
    show(orchestrator_pb2.GenerateEvent(stage=started))
    for step in (5, 10):
        progress = common_pb2.Progress(step=step, total=10, elapsed_s=step * 0.24, eta_s=(10 - step) * 0.24)
        show(orchestrator_pb2.GenerateEvent(progress=progress))
    show(orchestrator_pb2.GenerateEvent(stage=finished))
    text = stream.getvalue()
    assert "\rdenoise [#####.....] 5/10 1.2s ETA 1.2s" in text
    assert text.endswith(
        "\rdenoise ... 2.50s".ljust(len("\rdenoise [##########] 10/10 2.4s ETA 0.0s")) + "\n"
    )
    assert text.count("\n") == 1


def test_write_outputs_video_and_mismatches(tmp_path: Path):
    video = orchestrator_pb2.GenerateResult(video=b"\x00\x00\x00\x18ftypmp42")
    assert write_outputs(video, tmp_path / "clip.mp4") == [tmp_path / "clip.mp4"]
    assert (tmp_path / "clip.mp4").read_bytes() == video.video
    with pytest.raises(CommandError, match=r"video: pass --out NAME\.mp4"):
        write_outputs(video, tmp_path / "clip.png")
    with pytest.raises(CommandError, match="holds no video"):
        write_outputs(orchestrator_pb2.GenerateResult(images=[b"png"]), tmp_path / "x.mp4")
