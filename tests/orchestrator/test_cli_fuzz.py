"""Fuzzing `diffmesh` (orchestrator.cli:main, in this process) with hypothesis: argv lists that mix the
real flags of `generate`, `train submit | status | logs | list | cancel`, `eval shapes` and `status` with
malformed values (huge, negative, NaN / inf, empty, NUL, undecodable bytes, very long, `..`, missing files,
directories where files go, bad spec / kubeconfig / stack files, unknown and repeated flags). Whatever the
argv, the command ends with an int exit code (argparse's SystemExit(2) or a CommandError's code) and a
`diffmesh ...:` message on stderr: no other exception escapes and no traceback is printed.

The environment is isolated: an empty state dir, no orchestrator / token / TLS / Kubernetes from the
machine, `DIFFMESH_TRAIN_COMMAND=true` (a local training job that passes every check runs `true`), no
`--local` but with values that fail before any model load (the engine is never loaded), never `serve`, `up`
or `down`. The only server is the test orchestrator of conftest.py (its test family draws flat images), and
the client's retry backoff does not sleep. Hypothesis is derandomized: the same sweep in every run.
"""

from __future__ import annotations

import io
import json
import os
import time
import types
from contextlib import redirect_stderr, redirect_stdout
from dataclasses import dataclass
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from orchestrator import client as client_module
from orchestrator.cli import main

FUZZ = settings(
    max_examples=200,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
    derandomize=True,  # the same sweep in every run
    database=None,
)


# ---------------------------------------------------------------------------------------------------------
# The files the argv point at, and the environment.


@dataclass(frozen=True)
class Files:
    root: Path
    spec_ok: Path  # a valid TrainSpec: a local training launch runs `true`
    specs: tuple[str, ...]  # spec files that are not one (bad JSON, YAML, binary, wrong fields, ...)
    kubeconfigs: tuple[str, ...]
    state_dirs: tuple[str, ...]  # --state-dir: empty, missing, a file, corrupt stack.json / job records
    png: Path
    paths: tuple[str, ...]  # everything else: missing files, directories, `..`, NUL


def _write(path: Path, data: str | bytes) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    if isinstance(data, bytes):
        path.write_bytes(data)
    else:
        path.write_text(data)
    return str(path)


def _stack(services: object, s3: object = None, token: object = "tok") -> str:
    return json.dumps({"services": services, "s3": s3 or {"pid": os.getpid()}, "token": token})


def make_files(root: Path) -> Files:
    f = root / "f"
    data = f / "data"
    _write(data / "metadata.csv", "image,prompt\na.png,a cat\n")
    spec = {
        "name": "fuzz-lora",
        "family": "flux",
        "baseModel": "/models/flux-tiny",
        "dataset": {"uri": str(data)},
        "mode": "LORA",
        "lora": {"rank": 4},
        "steps": 3,
        "output": str(f / "out"),
    }
    spec_ok = Path(_write(f / "spec.json", json.dumps(spec)))
    specs = (
        _write(f / "spec-bad.json", '{"name": '),
        _write(f / "spec.yaml", "name: fuzz-lora\nfamily: flux\n"),
        _write(f / "spec.bin", b"\xff\xfe\x00\x01binary\x80"),
        _write(f / "spec-list.json", "[1, 2]"),
        _write(f / "spec-unknown.json", json.dumps({**spec, "nope": 1})),
        _write(f / "spec-types.json", json.dumps({**spec, "steps": "many", "lora": {"rank": -4}})),
        _write(f / "spec-values.json", json.dumps({**spec, "resolution": 17, "learningRate": 5})),
        _write(f / "spec-nodata.json", json.dumps({**spec, "dataset": {"uri": str(f / "missing")}})),
        _write(f / "spec-empty.json", ""),
        _write(f / "spec-huge.json", json.dumps({**spec, "steps": 10**30})),
        str(f / "dir"),
    )
    (f / "dir").mkdir()
    (f / "dir.png").mkdir()
    kubeconfigs = (
        _write(f / "kube-binary", b"\xff\xfe\x00"),
        _write(f / "kube-bad-yaml", "{{{: ["),
        _write(f / "kube-list", "- a\n- b\n"),
        _write(f / "kube-scalar", "42\n"),
        _write(f / "kube-mapping", "name: x\n"),
        _write(f / "kube-types", "current-context: x\ncontexts: 5\nclusters: {}\nusers: 7\n"),
        _write(f / "kube-entries", "current-context: x\ncontexts: [{name: x, context: 5}]\n"),
        _write(
            f / "kube-refused",  # a real kubeconfig, of an API server that is not there
            "apiVersion: v1\nclusters: [{name: c, cluster: {server: 'http://127.0.0.1:1'}}]\n"
            "contexts: [{name: x, context: {cluster: c, user: u}}]\ncurrent-context: x\n"
            "users: [{name: u, user: {token: t}}]\n",
        ),
        _write(f / "kube-empty", ""),
        str(f / "dir"),
        str(f / "no-kubeconfig"),
    )
    pid = os.getpid()
    stacks = {
        "corrupt": '{"services": ',
        "binary": b"\xff\xfe\x00",
        "list": "[]",
        "no-services": _stack(None),
        "pid-text": _stack({"orchestrator": {"endpoint": "127.0.0.1:1", "pid": "x"}}),
        "pid-huge": _stack({"orchestrator": {"endpoint": "127.0.0.1:1", "pid": 1 << 80}}),
        "endpoint-int": _stack({"orchestrator": {"endpoint": 5, "pid": pid}}),
        "token-list": _stack({"orchestrator": {"endpoint": "127.0.0.1:1", "pid": pid}}, token=[1]),
        "s3-missing": json.dumps({"services": {}, "token": "t"}),
        "refused": _stack({"orchestrator": {"endpoint": "127.0.0.1:1", "pid": pid}}),
    }
    state_dirs = [
        _write(f / "stacks" / name / "stack.json", text).removesuffix("/stack.json")
        for name, text in stacks.items()
    ]
    _write(f / "stacks" / "jobs-corrupt" / "jobs" / "fuzz-job-abcdef" / "job.json", '{"id": ')
    _write(f / "stacks" / "jobs-binary" / "jobs" / "fuzz-job-abcdef" / "job.json", b"\xff\x00")
    state_dirs += [str(f / "stacks" / "jobs-corrupt"), str(f / "stacks" / "jobs-binary")]
    state_dirs += [str(f / "missing-state"), str(spec_ok), str(f / "dir")]
    png = f / "in.png"
    Image.new("RGB", (8, 8), (1, 2, 3)).save(png)
    paths = (
        str(png),
        str(spec_ok),
        str(f / "dir"),
        str(f / "dir") + "/",
        str(f / "dir.png"),
        str(f / "missing" / "x.png"),
        str(f / "missing.png"),
        str(f / "dir" / ".." / "x.png"),
        "../../x.png",
        "../../..",
        "/nonexistent-dir/x.png",
        "/",
        "/dev/null",
        "x.png",
        "x.mp4",
        "frames/",
        "out.PNG",
        "out.jpg",
        str(f / "a\x00.png"),
        "fr\x00ames/",
        str(f / "\udcff.png"),
        "\n.png",
        "x" * 300 + ".png",
        ("d" * 200 + "/") * 30 + "x.png",
    )
    return Files(root, spec_ok, specs, kubeconfigs, tuple(state_dirs), png, paths)


@pytest.fixture
def files(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Files:
    for name in list(
        os.environ
    ):  # DIFFMESH_ORCHESTRATOR, _TOKEN[_FILE], _TLS_*, _LAUNCHER, KUBERNETES_*, ...
        if name.startswith(("DIFFMESH_", "KUBERNETES_")):
            monkeypatch.delenv(name)
    monkeypatch.setenv("DIFFMESH_STATE_DIR", str(tmp_path / "state"))
    monkeypatch.setenv("DIFFMESH_TRAIN_COMMAND", "true")
    monkeypatch.setenv("KUBECONFIG", str(tmp_path / "no-kubeconfig"))
    # no backoff sleeps between retries (up to --retries 100) against an endpoint that refuses
    monkeypatch.setattr(
        client_module, "time", types.SimpleNamespace(monotonic=time.monotonic, sleep=lambda s: None)
    )
    cwd = tmp_path / "cwd" / "a" / "b"  # relative paths, `../..` included, stay in tmp_path
    cwd.mkdir(parents=True)
    monkeypatch.chdir(cwd)
    return make_files(tmp_path)


# ---------------------------------------------------------------------------------------------------------
# Values and argv.

NASTY = (
    "",
    " ",
    "\x00",
    "a\x00b",
    "\n",
    "\t",
    "-",
    "--",
    "-1",
    "-3",
    "0",
    "-0",
    "1",
    "7",
    " 7 ",
    "1.5",
    "1e3",
    "1e400",
    "-1e400",
    "1e-400",
    "nan",
    "NaN",
    "inf",
    "-inf",
    "Infinity",
    "0x10",
    "1_000",
    "\u0663",  # ARABIC-INDIC DIGIT THREE: int() takes it
    "9" * 400,
    "-" + "9" * 30,
    "18446744073709551616",
    "4294967296",
    "x" * 5000,
    "é",
    "\U0001f642",
    "\udcff",  # an undecodable byte of argv (surrogateescape)
    "..",
    "../../x",
    "a:b:c",
    ":",
    "x:0",
    "x:nan",
    "x:-inf",
    "x:1e400",
    "hf://org/x.safetensors:0.5",
    "--steps",
    "-h-",
)
ENDPOINTS = (
    "127.0.0.1:1",
    "",
    "\x00",
    "\udcff",
    "localhost:99999",
    "[::1]:1",
    "unix:/nonexistent/s",
    "a b:1",
)
JUNK = ("--no-such-flag", "--no-such-flag=1", "-x", "stray", "--", "--steps", "--out", "--model=", "-")


def ints(lo: int = -(2**70), hi: int = 2**70) -> st.SearchStrategy[str]:
    return st.integers(lo, hi).map(str)


def floats(lo: float | None = None, hi: float | None = None) -> st.SearchStrategy[str]:
    return st.floats(lo, hi, allow_nan=lo is None, allow_infinity=lo is None).map(repr)


# undecodable argv bytes (surrogateescape), controls, RTL override, path and flag characters
STRANGE = st.text(st.sampled_from("\udcff\udc80\x00\n\x7f\u202e\u00e9 a/:-."), min_size=1, max_size=8)
BAD = st.one_of(st.sampled_from(NASTY), STRANGE, st.text(max_size=40), ints(), floats())


@dataclass(frozen=True)
class Flag:
    """A flag's values: `good` ones (that pass its checks, mostly) and `bad` ones; None for a switch."""

    good: st.SearchStrategy[str] | None = None
    bad: st.SearchStrategy[str] = BAD


SWITCH = Flag()


def text(*examples: str) -> Flag:
    return Flag(st.sampled_from(examples) if examples else st.text(max_size=20))


def path(files: Files, *good: str, bad: tuple[str, ...] = ()) -> Flag:
    return Flag(st.sampled_from(good), st.one_of(st.sampled_from(files.paths + bad), BAD))


@st.composite
def argv(
    draw: st.DrawFn,
    command: list[str],
    flags: dict[str, Flag],
    files: Files,
    required: tuple[str, ...] = (),
    positional: Flag | None = None,
    max_flags: int = 6,
    bad_odds: int = 4,
) -> list[str]:
    """[--state-dir DIR] COMMAND, then in any order: the required flags (mostly), up to `max_flags` optional
    ones (repeats possible), maybe a positional, maybe junk. One value in `bad_odds` is a bad one, so that
    most argv get past argparse to the checks and the work after it."""

    def one_in(n: int) -> bool:  # (st.integers leans to its bounds)
        return draw(st.sampled_from(range(n))) == 0

    def value(flag: Flag) -> str:
        return draw(flag.bad if flag.good is None or one_in(bad_odds) else flag.good)

    chunks: list[list[str]] = [[name, value(flags[name])] for name in required if not one_in(30)]
    optional = sorted(set(flags) - set(required))
    for name in draw(st.lists(st.sampled_from(optional), max_size=max_flags)) if optional else ():
        flag = flags[name]
        if flag is SWITCH:
            chunks.append([name])
        elif one_in(5):
            chunks.append([f"{name}={value(flag)}"])
        else:
            chunks.append([name, value(flag)])
    if positional is not None and not one_in(10):
        chunks.append([value(positional)])
    if one_in(8):
        chunks.append([draw(st.sampled_from(JUNK))])
    head = ["--state-dir", draw(st.sampled_from(files.state_dirs))] if one_in(3) else []
    return head + command + [a for chunk in draw(st.permutations(chunks)) for a in chunk]


def run(args: list[str]) -> tuple[int, str, str]:
    """main(args) as the shell sees it: (exit code, stdout, stderr); any other exception fails the test."""
    out, err = io.StringIO(), io.StringIO()  # not capsys: a real stderr writes undecodable bytes escaped
    with redirect_stdout(out), redirect_stderr(err):
        try:
            code = main(args)
        except SystemExit as e:
            code = e.code
    return code, out.getvalue(), err.getvalue()


def check(args: list[str], *, errors_on_stderr: bool = True) -> int:
    code, out, err = run(args)
    assert isinstance(code, int) and not isinstance(code, bool), (args, code)
    assert "Traceback" not in err and "Traceback" not in out, (args, err)
    if code != 0 and errors_on_stderr:
        assert any(line.startswith("diffmesh") for line in err.splitlines()), (args, err)
    return code


# ---------------------------------------------------------------------------------------------------------
# generate

OUTS = ("x.png", "y.PNG", "x.mp4", "frames/", "../../up.png", "../b/x.png")


def connection_flags(files: Files) -> dict[str, Flag]:
    return {
        "--endpoint": Flag(st.sampled_from(ENDPOINTS[:1] + ENDPOINTS[4:]), st.sampled_from(ENDPOINTS) | BAD),
        "--token": text("tok", "a.b-c_d"),
        "--tls-ca": path(files, str(files.png), bad=files.kubeconfigs),
        "--tls-client-cert": path(files, str(files.png)),
        "--tls-client-key": path(files, str(files.png)),
        "--retries": Flag(ints(0, 3)),
        "--timeout": Flag(floats(0.5, 30)),
        "--quiet": SWITCH,
    }


def generate_flags(files: Files, small: bool = False) -> dict[str, Flag]:
    """`small`: no image sizes the test family would take long to draw (bad ones are rejected by argparse)."""
    bad_size = st.one_of(ints(-3, 0), st.sampled_from(NASTY[:30])) if small else BAD
    return {
        "--model": text("tiny", str(files.root / "f" / "dir")),
        "--prompt": text(),
        "--out": path(files, *OUTS),
        "--negative-prompt": text(),
        "--seed": Flag(ints(0, 2**64 - 1)),
        "--steps": Flag(ints(1, 8), bad_size),
        "--width": Flag(ints(1, 48), bad_size),
        "--height": Flag(ints(1, 48), bad_size),
        "--guidance": Flag(floats(0, 20)),
        "--cfg-scale": Flag(floats(0, 20)),
        "--cfg-scale-2": Flag(floats(0, 20)),
        "--solver": text("euler", "unipc"),
        "--shift": Flag(floats(0.1, 10)),
        "--lora": text("/l/a.safetensors:0.5", "b.safetensors", "hf://org/c.safetensors:-1"),
        "--lora-mode": text("hot", "fused"),
        "--input-image": path(files, str(files.png)),
        "--last-image": path(files, str(files.png)),
        "--input-video": path(files, str(files.png)),
        "--strength": Flag(floats(0, 1)),
        "--num-frames": Flag(ints(1, 9), bad_size),
        "--fps": Flag(floats(1, 60)),
        "--batch-size": Flag(ints(1, 3), bad_size),
        "--max-sequence-length": Flag(ints(1, 512)),
        "--family": text("testfam"),
        "--task": text("t2i", "img2img", "t2v"),
        "--vae": text("/m/vae"),
        "--text-encoder": text("/m/te"),
        "--text-encoder-2": text("/m/t5"),
        "--transformer": text("/m/dit"),
        "--request-id": Flag(st.from_regex(r"\A[A-Za-z0-9._-]{1,20}\Z")),
        **connection_flags(files),
    }


def test_generate_without_a_server(files: Files):
    @FUZZ
    @given(argv(["generate"], generate_flags(files), files, required=("--model", "--prompt", "--out")))
    def fuzz(args: list[str]) -> None:
        assert check(args) != 0  # nothing answers: never a success

    fuzz()


def test_generate_against_the_orchestrator(files: Files, served):
    flags = generate_flags(files, small=True)
    nul = ("a\x00.png", "fr\x00ames/", "x.mp4\x00")
    flags["--out"] = Flag(st.sampled_from(OUTS + files.paths + nul * 3))  # what is written where: any path
    del flags["--endpoint"]  # the test server's, last: see below
    required = ("--model", "--prompt", "--out", "--family")

    @settings(FUZZ, max_examples=150)
    @given(argv(["generate"], flags, files, required, max_flags=4, bad_odds=8))
    def fuzz(args: list[str]) -> None:
        check([*args, "--endpoint", served.endpoint, "--token", served.token])

    fuzz()


# ---------------------------------------------------------------------------------------------------------
# train

JOB_IDS = ("fuzz-job-abcdef", "abc", "../x", "a" * 64, "ABC", "-a-")


def train_flags(files: Files, sub: str) -> dict[str, Flag]:
    flags = {
        "--launcher": text("local", "kubernetes", "kubernetes"),
        "--namespace": text("ns"),
        "--kubeconfig": Flag(st.sampled_from(files.kubeconfigs), path(files).bad),
        "--endpoint": Flag(st.sampled_from(ENDPOINTS[:1]), st.sampled_from(ENDPOINTS) | BAD),
        "--token": text("tok"),
        "--json": SWITCH,
    }
    if sub == "submit":
        flags |= {
            "--spec": Flag(st.sampled_from((str(files.spec_ok),) * 4 + files.specs), path(files).bad),
            "--image": text("img:1"),
            "--gpus": Flag(ints(0, 8)),
            "--service-account": text("sa"),
            "--dry-run": SWITCH,
        }
    elif sub == "list":
        flags["--state"] = text("running", "JOB_STATE_FAILED", "succeeded")
    elif sub == "logs":
        flags["--tail"] = Flag(ints(0, 2**32 - 1))  # no --follow: it waits for a running job to end
    return flags


@pytest.mark.parametrize("sub", ["submit", "status", "logs", "list", "cancel"])
def test_train(files: Files, sub: str):
    required = ("--spec",) if sub == "submit" else ()
    positional = None if sub in ("submit", "list") else text(*JOB_IDS)

    @settings(FUZZ, max_examples=100 if sub == "submit" else 50)
    @given(argv(["train", sub], train_flags(files, sub), files, required, positional))
    def fuzz(args: list[str]) -> None:
        check(args)

    fuzz()


# ---------------------------------------------------------------------------------------------------------
# eval shapes


def eval_flags(files: Files, small: bool = False) -> dict[str, Flag]:
    bad_size = st.one_of(ints(-3, 0), st.sampled_from(NASTY[:30])) if small else BAD
    return {
        "--model": text("tiny"),
        "--n": Flag(ints(1, 2), bad_size),
        "--prompts": text("base", "concept"),
        "--lora": text("/l/a.safetensors:0.5"),
        "--seed": Flag(ints(0, 2**64 - 1001)),
        "--steps": Flag(ints(1, 4), bad_size),
        "--width": Flag(ints(1, 32), bad_size),
        "--height": Flag(ints(1, 32), bad_size),
        "--guidance": Flag(floats(0, 20)),
        "--out-dir": path(files, "ev", "ev/sub/", "../../ev"),
        "--limit-prompts": Flag(ints(1, 2), bad_size),
        **connection_flags(files),
    }


def test_eval_without_a_server(files: Files):
    @settings(FUZZ, max_examples=150)
    @given(argv(["eval", "shapes"], eval_flags(files), files, required=("--model", "--endpoint")))
    def fuzz(args: list[str]) -> None:
        assert check(args) != 0

    fuzz()


def test_eval_against_the_orchestrator(files: Files, served, model_dir: Path):
    flags = eval_flags(files, small=True)
    flags["--model"] = text(str(model_dir))
    del flags["--endpoint"]
    # at most 1 prompt x 2 samples whatever came before: these come last
    tail = ["--limit-prompts", "1", "--n", "2", "--endpoint", served.endpoint, "--token", served.token]

    @settings(FUZZ, max_examples=80)
    @given(argv(["eval", "shapes"], flags, files, required=("--model",), max_flags=4, bad_odds=8))
    def fuzz(args: list[str]) -> None:
        check([*args, *tail])

    fuzz()


# ---------------------------------------------------------------------------------------------------------
# status


def test_status(files: Files):
    state_dir = st.sampled_from(files.state_dirs)

    @settings(FUZZ, max_examples=150)
    @given(st.lists(state_dir, max_size=2), st.lists(st.sampled_from(("status", *JUNK)), max_size=2))
    def fuzz(dirs: list[str], tail: list[str]) -> None:
        head = [a for d in dirs for a in ("--state-dir", d)]
        check([*head, "status", *tail], errors_on_stderr=False)  # "not running" / health go to stdout

    fuzz()


# ---------------------------------------------------------------------------------------------------------
# The important messages: exit code, and the bad value named.


def _err(args: list[str]) -> tuple[int, str]:
    code, _, err = run(args)
    assert "Traceback" not in err
    return code, err


GEN = ["generate", "--model", "tiny", "--prompt", "a cat"]


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["--steps", "-3"], "argument --steps: -3 is out of range"),
        (["--steps", "nan"], "argument --steps: 'nan' is not an integer"),
        (["--width", "abc"], "argument --width: 'abc' is not an integer"),
        (["--height", "9" * 30], "argument --height: " + "9" * 30 + " is out of range"),
        (["--guidance", "nan"], "argument --guidance: nan is out of range"),
        (["--cfg-scale", "inf"], "argument --cfg-scale: inf is out of range"),
        (["--shift", "0"], "argument --shift: 0 is out of range (0.0"),
        (["--retries", "-1"], "argument --retries: -1 is out of range [0, 100]"),
        (["--request-id", "a/b"], "argument --request-id: 'a/b'"),
        (["--lora", "x.safetensors:0"], "scale 0"),
        (["--prompt", "\udcff"], "argument --prompt: '\\udcff' is not valid UTF-8"),
        (["--model", "a\udcffb"], "argument --model: 'a\\udcffb' is not valid UTF-8"),
        (["--lora", "\udcff.safetensors"], "argument --lora: '\\udcff.safetensors' is not valid UTF-8"),
        (["--endpoint", "\udcff"], "argument --endpoint: '\\udcff' is not valid UTF-8"),
        (["--token", "a\nb"], "argument --token: not a valid token: character 2 ('\\n')"),
        (["--local", "--steps", "-3"], "argument --steps: -3 is out of range"),
        (["--local", "--endpoint", "h:1"], "not allowed with argument"),
    ],
)
def test_generate_argparse_messages(files: Files, args: list[str], needle: str):
    code, err = _err([*GEN, "--out", "x.png", *args])
    assert code == 2 and needle in err, err


def test_generate_check_messages(files: Files):
    f = files.root / "f"
    cases = [
        (["--out", "/nonexistent-dir/x.png"], "--out /nonexistent-dir/x.png: directory '/nonexistent-dir'"),
        (["--out", str(f / "dir.png")], f"--out {f / 'dir.png'} is a directory"),
        (["--out", str(f / "dir")], f"--out {f / 'dir'}: expected a .png file"),
        (["--out", "x.jpg"], "--out x.jpg: expected a .png file"),
        (["--out", "a\x00.png"], "--out 'a\\x00.png': contains a NUL character"),
        (["--out", "fr\x00ames/"], "--out 'fr\\x00ames/': contains a NUL character"),
        (["--out", "x.png", "--input-image", str(f / "dir")], f"--input-image {f / 'dir'}: no such file"),
        (["--out", "x.png", "--tls-ca", str(f / "nope.pem")], f"--tls-ca {f / 'nope.pem'}: no such file"),
        (["--out", "x.png", "--strength", "0.5"], "--strength 0.5 needs --input-image"),
        # --local with a value that fails before any model is loaded
        (["--out", "/nonexistent-dir/x.png", "--local"], "--out /nonexistent-dir/x.png: directory"),
        (["--out", "x.png", "--local", "--token", "t"], "--token is for a remote orchestrator"),
    ]
    for args, needle in cases:
        code, err = _err([*GEN, *args])
        assert code == 2 and err.startswith("diffmesh generate: ") and needle in err, (args, err)


def test_train_submit_messages(files: Files):
    f = files.root / "f"
    for spec, needle in [
        (f / "spec.bin", f"--spec {f / 'spec.bin'}: not UTF-8 text"),
        (f / "spec.yaml", f"{f / 'spec.yaml'}: not a valid training spec"),
        (f / "spec-bad.json", f"{f / 'spec-bad.json'}: not a valid training spec"),
        (f / "dir", f"--spec {f / 'dir'}: no such file"),
        (f / "missing.json", f"--spec {f / 'missing.json'}: no such file"),
        (f / "spec-values.json", "learningRate: 5.0 must be in (0, 1]"),
    ]:
        code, err = _err(["train", "submit", "--spec", str(spec)])
        assert code == 2 and err.startswith("diffmesh train submit: ") and needle in err, (spec, err)
    for args, needle in [
        (["--launcher", "kubernetes", "--image", "\udcff"], "argument --image: '\\udcff' is not valid UTF-8"),
        (["--endpoint", "127.0.0.1:1", "--token", "t\x00"], "argument --token: not a valid token"),
        (["--gpus", "-1"], "argument --gpus: -1 is out of range [0, 64]"),
        (["--namespace", "ns"], "--namespace is for --launcher kubernetes"),
    ]:
        code, err = _err(["train", "submit", "--spec", str(files.spec_ok), *args])
        assert code == 2 and needle in err, (args, err)
    code, err = _err(["train", "status", "\udcff", "--endpoint", "127.0.0.1:1"])
    assert code == 2 and "argument job: '\\udcff' is not valid UTF-8" in err, err
    # a valid spec runs DIFFMESH_TRAIN_COMMAND (`true`) and prints the job id
    code, out, err = run(["train", "submit", "--spec", str(files.spec_ok)])
    assert code == 0 and out.startswith("fuzz-lora-"), err


def test_train_kubeconfig_messages(files: Files):
    f = files.root / "f"
    for name, needle in [
        ("kube-binary", "not UTF-8 text"),
        ("kube-bad-yaml", "not YAML"),
        ("kube-list", "not a kubeconfig"),
        ("kube-types", "'contexts'"),
        ("kube-entries", "'contexts'"),
        ("dir", "no such file"),
        ("no-kubeconfig", "no such file"),
    ]:
        path = f / name
        for args in (["list"], ["status", "abc"], ["submit", "--spec", str(files.spec_ok), "--dry-run"]):
            code, err = _err(["train", *args, "--launcher", "kubernetes", "--kubeconfig", str(path)])
            assert code == 2 and f"--kubeconfig {path}: " in err and needle in err, (name, args, err)


def test_a_malformed_kubeconfig_named_by_the_environment(files: Files, monkeypatch: pytest.MonkeyPatch):
    # $KUBECONFIG (not --kubeconfig, which is checked first) reaches the kubernetes client's own loader
    f = files.root / "f"
    for name in ("kube-binary", "kube-bad-yaml", "kube-list", "kube-types", "kube-entries"):
        monkeypatch.setenv("KUBECONFIG", str(f / name))
        for args in (["list"], ["status", "abc"]):
            code, err = _err(["train", *args, "--launcher", "kubernetes"])
            assert code == 1 and "Traceback" not in err, (name, args, err)
            assert f"the kubeconfig '{f / name}' is not a valid kubeconfig" in err, (name, args, err)


def test_corrupt_state_messages(files: Files):
    stacks = files.root / "f" / "stacks"
    for name in (
        "corrupt",
        "binary",
        "list",
        "no-services",
        "pid-text",
        "pid-huge",
        "endpoint-int",
        "s3-missing",
    ):
        state = stacks / name
        for args in (["status"], [*GEN, "--out", "x.png"], ["eval", "shapes"]):
            code, err = _err(["--state-dir", str(state), *args])
            assert code == 1 and f"stack.json in '{state}' is not a `diffmesh up` state" in err, (name, err)
    for name in ("jobs-corrupt", "jobs-binary"):
        for args in (["list"], ["status", "fuzz-job-abcdef"], ["cancel", "fuzz-job-abcdef"]):
            code, err = _err(["--state-dir", str(stacks / name), "train", *args])
            assert code == 1 and "fuzz-job-abcdef" in err and "job.json" in err, (name, args, err)


def test_eval_messages(files: Files):
    f = files.root / "f"
    remote = ["--endpoint", "127.0.0.1:1", "--retries", "0"]
    for args, needle in [
        ([*remote, "--out-dir", str(files.spec_ok)], f"--out-dir {files.spec_ok} is not a directory"),
        ([*remote, "--out-dir", "o\x00"], "--out-dir 'o\\x00': contains a NUL character"),
        ([*remote, "--tls-ca", str(f / "nope.pem")], f"--tls-ca {f / 'nope.pem'}: no such file"),
        ([*remote, "--model", "\udcff"], "argument --model: '\\udcff' is not valid UTF-8"),
        (["--local", "--token", "t"], "--token is for a remote orchestrator"),  # before any model load
    ]:
        code, err = _err(["eval", "shapes", *args])
        assert code == 2 and needle in err, (args, err)
    # a --model too long to be a path is no local directory: it goes to the server as it is
    code, err = _err(["eval", "shapes", *remote, "--model", "x" * 5000, "--n", "1", "--limit-prompts", "1"])
    assert code == 1 and err.startswith("diffmesh eval shapes: UNAVAILABLE"), err
