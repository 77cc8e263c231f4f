"""`diffmesh generate`: one request to the orchestrator (or, with --local, to the engine in this process).

Arguments are checked before any RPC (exit 2, naming the flag and the value); the stages and the sampling
steps are shown on stderr; the images are written exactly as received (their PNG tEXt chunk carries the
parameters). Server errors exit 1 as `diffmesh generate: <CODE>: <message>`.
"""

from __future__ import annotations

import argparse
import math
import os
import re
import sys
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, TextIO

if TYPE_CHECKING:
    from orchestrator.client import Client
    from protos import orchestrator_pb2

PROG = "diffmesh generate"
_REQUEST_ID = re.compile(r"^[A-Za-z0-9._-]{1,128}$")
_OUT_SUFFIXES = (".png", ".mp4")
_UINT32, _UINT64 = (1 << 32) - 1, (1 << 64) - 1


class CommandError(Exception):
    """Ends the command with `message` on stderr and `exit_code` (2: bad arguments, 1: anything else)."""

    def __init__(self, message: str, exit_code: int = 2) -> None:
        super().__init__(message)
        self.exit_code = exit_code


# ---------------------------------------------------------------------------------------------------------
# Argument types: argparse reports their errors as "argument --flag: <message>" and exits 2.


def _integer(lo: int, hi: int) -> Callable[[str], int]:
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
        if not lo <= value <= hi:
            raise argparse.ArgumentTypeError(f"{value} is out of range [{lo}, {hi}]")
        return value

    return parse


def _number(lo: float, hi: float = math.inf, lo_open: bool = False) -> Callable[[str], float]:
    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
        if not math.isfinite(value) or value < lo or (lo_open and value == lo) or value > hi:
            low = f"({lo}" if lo_open else f"[{lo}"
            raise argparse.ArgumentTypeError(f"{text} is out of range {low}, {hi}]")
        return value

    return parse


def _text(text: str) -> str:
    """A string that goes into a request or a header as UTF-8: not one with argv bytes that do not decode."""
    try:
        text.encode()
    except UnicodeEncodeError:
        raise argparse.ArgumentTypeError(f"{text!r} is not valid UTF-8") from None
    return text


def _token(text: str) -> str:
    """A bearer token: what a gRPC header value can hold (printable ASCII). The token itself is not shown."""
    for i, c in enumerate(text):
        if not " " <= c <= "~":
            raise argparse.ArgumentTypeError(
                f"not a valid token: character {i + 1} ({c!r}) is not printable ASCII"
            )
    return text


def _lora(text: str) -> tuple[str, float]:
    from orchestrator.client import parse_lora

    try:
        return parse_lora(_text(text))
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _request_id(text: str) -> str:
    if not _REQUEST_ID.match(text):
        raise argparse.ArgumentTypeError(f"{text!r}: 1-128 chars of [A-Za-z0-9._-]")
    return text


def add_parser(sub: argparse._SubParsersAction) -> None:
    """Register `generate` on the `diffmesh` subparsers."""
    g = sub.add_parser(
        "generate",
        help="generate an image (or video) and write it to --out",
        description="Run one generation on the orchestrator (--endpoint, $DIFFMESH_ORCHESTRATOR, or the "
        "running `diffmesh up` stack) or in this process (--local). Options left out take the model's "
        "defaults.",
    )
    g.add_argument(
        "--model",
        metavar="SPEC",
        required=True,
        type=_text,
        help="model spec: a directory, a file, hf://ID, modelscope://ID",
    )
    g.add_argument("--prompt", metavar="TEXT", type=_text, required=True)
    g.add_argument("--negative-prompt", metavar="TEXT", type=_text)
    g.add_argument(
        "--seed", metavar="N", type=_integer(0, _UINT64), help="default: random, printed at the end"
    )
    g.add_argument("--steps", metavar="N", type=_integer(1, _UINT32))
    g.add_argument("--width", metavar="W", type=_integer(1, _UINT32))
    g.add_argument("--height", metavar="H", type=_integer(1, _UINT32))
    g.add_argument("--guidance", metavar="G", type=_number(0.0), help="distilled guidance (FLUX)")
    g.add_argument("--cfg-scale", metavar="S", type=_number(0.0), help="classifier-free guidance scale")
    g.add_argument(
        "--cfg-scale-2", metavar="S", type=_number(0.0), help="Wan 2.2 A14B: the low-noise expert's CFG scale"
    )
    g.add_argument(
        "--solver", metavar="NAME", type=_text, help="sampler: euler, unipc (default: the model's scheduler)"
    )
    g.add_argument("--shift", metavar="F", type=_number(0.0, lo_open=True), help="flow-matching shift")
    g.add_argument(
        "--lora", type=_lora, action="append", default=[], metavar="PATH[:SCALE]", help="repeatable"
    )
    g.add_argument("--lora-mode", choices=("hot", "fused"))
    g.add_argument("--input-image", metavar="PATH", help="img2img init / i2v first frame / edit reference")
    g.add_argument("--last-image", metavar="PATH", help="flf2v: the last frame")
    g.add_argument("--input-video", metavar="PATH", help="v2v: the video to start from (MP4)")
    g.add_argument(
        "--strength",
        metavar="F",
        type=_number(0.0, 1.0),
        help="img2img / v2v: how much of --input-image / --input-video to redo",
    )
    g.add_argument("--num-frames", metavar="N", type=_integer(1, _UINT32))
    g.add_argument("--fps", metavar="F", type=_number(0.0, lo_open=True))
    g.add_argument("--batch-size", metavar="N", type=_integer(1, 64))
    g.add_argument(
        "--max-sequence-length", metavar="N", type=_integer(1, _UINT32), help="T5 tokens (FLUX: 512)"
    )
    g.add_argument(
        "--family",
        metavar="NAME",
        type=_text,
        default="",
        help="default: detected from the model's model_index.json",
    )
    g.add_argument(
        "--task",
        metavar="NAME",
        type=_text,
        default="",
        help="t2i, img2img, t2v, i2v, ... (default: from the inputs)",
    )
    g.add_argument("--vae", metavar="SPEC", type=_text, help="a VAE other than the model's own")
    g.add_argument("--text-encoder", metavar="SPEC", type=_text)
    g.add_argument("--text-encoder-2", metavar="SPEC", type=_text)
    g.add_argument(
        "--transformer", metavar="SPEC", type=_text, help="a DiT / UNet other than the model's own"
    )
    g.add_argument("--request-id", metavar="ID", type=_request_id)
    g.add_argument(
        "--out",
        required=True,
        metavar="FILE.png",
        help="with several images: FILE-1.png, ...; a video: FILE.mp4, or DIR/ for lossless PNG frames",
    )
    where = g.add_mutually_exclusive_group()
    where.add_argument("--local", action="store_true", help="run the engine in this process")
    where.add_argument(
        "--endpoint", metavar="HOST:PORT", type=_text, help="the orchestrator (default: see above)"
    )
    add_connection_args(g)
    g.add_argument("--timeout", type=_number(0.0, lo_open=True), metavar="SECONDS")
    g.add_argument("--quiet", action="store_true", help="no progress on stderr")
    g.set_defaults(fn=cmd_generate)


# ---------------------------------------------------------------------------------------------------------
# Checks before any RPC, and where the request goes.


def check_args(args: argparse.Namespace) -> None:
    """What argparse cannot see: files, directories and flags that go together. CommandError (exit 2)."""
    if args.strength is not None and not (args.input_image or args.input_video):
        raise CommandError(f"--strength {args.strength} needs --input-image or --input-video")
    if args.last_image and not args.input_image:
        raise CommandError("--last-image needs --input-image (the first frame)")
    for flag, value in (
        ("--input-image", args.input_image),
        ("--last-image", args.last_image),
        ("--input-video", args.input_video),
    ):
        if value and not Path(value).is_file():
            raise CommandError(f"{flag} {value}: no such file")
    if "\x00" in args.out:
        raise CommandError(f"--out {args.out!r}: contains a NUL character")
    out = Path(args.out)
    if is_frames_dir(args.out):
        if out.exists() and not out.is_dir():
            raise CommandError(f"--out {args.out}: exists and is not a directory")
        if not out.parent.is_dir():
            raise CommandError(f"--out {args.out}: directory {str(out.parent)!r} does not exist")
        return check_connection_args(args)
    if out.suffix.lower() not in _OUT_SUFFIXES:
        raise CommandError(f"--out {args.out}: expected a .png file, FILE.mp4 or DIR/ for a video")
    if not out.parent.is_dir():
        raise CommandError(f"--out {args.out}: directory {str(out.parent)!r} does not exist")
    if out.is_dir():
        raise CommandError(f"--out {args.out} is a directory (end it with / for video frames)")
    check_connection_args(args)


def add_connection_args(p: argparse.ArgumentParser) -> None:
    """--token, TLS, --retries: how a command reaches a remote orchestrator (see check_connection_args)."""
    p.add_argument(
        "--token",
        metavar="T",
        type=_token,
        help="bearer token (default: $DIFFMESH_TOKEN / $DIFFMESH_TOKEN_FILE; prefer those)",
    )
    p.add_argument("--tls-ca", metavar="PEM", default=os.environ.get("DIFFMESH_TLS_CA"))
    p.add_argument(
        "--tls-client-cert",
        metavar="PEM",
        default=os.environ.get("DIFFMESH_TLS_CLIENT_CERT"),
        help="this client's certificate, for an orchestrator that requires one (mutual TLS; with --tls-ca)",
    )
    p.add_argument("--tls-client-key", metavar="PEM", default=os.environ.get("DIFFMESH_TLS_CLIENT_KEY"))
    p.add_argument(
        "--retries",
        type=_integer(0, 100),
        default=2,
        metavar="N",
        help="submit again under the same request id when the orchestrator is unavailable (default 2): the "
        "request resumes where it stopped, nothing finished is computed again",
    )


def is_frames_dir(out: str) -> bool:
    """`--out DIR/`: a video's frames as numbered PNG files."""
    return out.endswith(("/", os.sep))


def check_connection_args(args: argparse.Namespace) -> None:
    if args.local and args.token:
        raise CommandError("--token is for a remote orchestrator; --local runs in this process")
    for flag in ("tls_ca", "tls_client_cert", "tls_client_key"):
        path = getattr(args, flag)
        if path and not Path(path).is_file():
            raise CommandError(f"--{flag.replace('_', '-')} {path}: no such file")
    if (args.tls_client_cert or args.tls_client_key) and not (
        args.tls_ca and args.tls_client_cert and args.tls_client_key
    ):
        raise CommandError("--tls-client-cert and --tls-client-key go together, and with --tls-ca")


def _env_token(env: Mapping[str, str]) -> str | None:
    """$DIFFMESH_TOKEN, or the contents of the file $DIFFMESH_TOKEN_FILE names (a mounted secret)."""
    from orchestrator.settings import read_secret

    try:
        return read_secret(env, "DIFFMESH_TOKEN")
    except OSError as e:
        raise CommandError(
            f"DIFFMESH_TOKEN_FILE={env['DIFFMESH_TOKEN_FILE']!r} cannot be read: {e.strerror}"
        ) from None


def resolve_endpoint(args: argparse.Namespace, env: Mapping[str, str]) -> tuple[str, str | None]:
    """(endpoint, token): --endpoint, else $DIFFMESH_ORCHESTRATOR, else the running `diffmesh up` stack
    (whose own token is used unless --token is given)."""
    endpoint = args.endpoint or env.get("DIFFMESH_ORCHESTRATOR")
    if endpoint:
        return endpoint, args.token or _env_token(env)
    from orchestrator.stack.local_stack import running

    state_dir = Path(args.state_dir or env.get("DIFFMESH_STATE_DIR", ".diffmesh"))
    state = read_stack(state_dir)
    if state is None or "orchestrator" not in state.endpoints:
        raise CommandError(
            f"no orchestrator to talk to: no local stack in {str(state_dir)!r}. Start one with `diffmesh up`, "
            "pass --endpoint HOST:PORT (or set DIFFMESH_ORCHESTRATOR), or run in this process with --local",
            exit_code=1,
        )
    if "orchestrator" not in running(state):
        raise CommandError(
            f"the local stack in {str(state_dir)!r} is not running (its orchestrator exited); "
            "run `diffmesh down` then `diffmesh up`, or pass --local",
            exit_code=1,
        )
    return state.endpoints["orchestrator"], args.token or state.token


def read_stack(state_dir: Path):
    """The `diffmesh up` state in `state_dir` (None: there is none); CommandError (exit 1) for a state file
    that is not one (truncated, edited by hand, another program's)."""
    from orchestrator.stack.local_stack import STATE_FILE, read_state

    try:
        state = read_state(state_dir)
        why = None if state is None else _stack_problem(state.data)
    except (OSError, ValueError) as e:  # unreadable, not UTF-8, not JSON
        why = str(e)
    if why:
        raise CommandError(f"{STATE_FILE} in {str(state_dir)!r} is not a `diffmesh up` state: {why}", 1)
    return state


def _stack_problem(data: object) -> str | None:
    """What a state file lacks of what `status` and `generate` read: services with endpoint and pid, s3's pid,
    the token."""
    if not isinstance(data, dict) or not isinstance(data.get("services"), dict):
        return "no 'services' object"
    for name, service in [*data["services"].items(), ("s3", data.get("s3"))]:
        pid = service.get("pid") if isinstance(service, dict) else None
        if type(pid) is not int or not 0 < pid < 1 << 31:
            return f"{name!r}: no valid pid"
        if name != "s3" and not isinstance(service.get("endpoint"), str):
            return f"{name!r}: no endpoint"
    if not isinstance(data.get("token"), str):
        return "no token"
    return None


def open_client(args: argparse.Namespace, env: Mapping[str, str]) -> Client:
    from orchestrator.client import Client

    if args.local:
        client = Client.in_process(timeout_s=args.timeout)
        client.retries = args.retries
        return client
    endpoint, token = resolve_endpoint(args, env)

    def read(path: str | None) -> bytes | None:
        return Path(path).read_bytes() if path else None

    return Client(
        endpoint,
        token,
        tls_ca=read(args.tls_ca),
        tls_cert=read(args.tls_client_cert),
        tls_key=read(args.tls_client_key),
        timeout_s=args.timeout,
        retries=args.retries,
    )


# ---------------------------------------------------------------------------------------------------------
# Progress on stderr and the outputs.


class ProgressDisplay:
    """Stage lines ("encode_prompt ... 0.12s") and a one-line step bar; on a TTY the bar redraws in place
    with '\\r', elsewhere every update is a line of its own."""

    def __init__(self, stream: TextIO, tty: bool | None = None, width: int = 20) -> None:
        self.stream = stream
        self.tty = stream.isatty() if tty is None else tty
        self.width = width
        self._open = 0  # length of the line the cursor is on (TTY), 0 when at a fresh line
        self._stage = ""

    def __call__(self, event: orchestrator_pb2.GenerateEvent) -> None:
        kind = event.WhichOneof("event")
        if kind == "queued":
            self._line(f"queued: position {event.queued.position} of {event.queued.queue_size}", final=False)
        elif kind == "stage":
            self._on_stage(event.stage)
        elif kind == "progress":
            p = event.progress
            filled = min(round(self.width * p.step / p.total), self.width) if p.total else 0
            bar = "#" * filled + "." * (self.width - filled)
            name = p.stage or self._stage
            self._line(
                f"{name} [{bar}] {p.step}/{p.total} {p.elapsed_s:.1f}s ETA {p.eta_s:.1f}s", final=False
            )
        elif kind == "result":
            self.close()

    def _on_stage(self, s: orchestrator_pb2.StageEvent) -> None:
        kind = s.Kind.Name(s.kind)
        if kind == "STARTED":
            self._stage = s.stage
            self._line(f"{s.stage} ...", final=not self.tty)
        elif kind == "FINISHED":
            self._line(f"{s.stage} ... {s.seconds:.2f}s", final=True)
        elif kind == "RETRIED":
            self._line(f"retry: {s.message}", final=True)

    def _line(self, text: str, final: bool) -> None:
        if not self.tty:
            self.stream.write(text + "\n")
        else:
            self.stream.write("\r" + text.ljust(self._open) + ("\n" if final else ""))
            self._open = 0 if final else len(text)
        self.stream.flush()

    def close(self) -> None:
        """End a line left open by the bar (before an error message, say)."""
        if self._open:
            self.stream.write("\n")
            self.stream.flush()
            self._open = 0


def _write(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_bytes(data)
    tmp.replace(path)  # never a half-written file under the final name


def write_outputs(result: orchestrator_pb2.GenerateResult, out: Path, frames_dir: bool = False) -> list[Path]:
    """The result's bytes as received: a video to FILE.mp4 or its frames to DIR/00000.png ...; one image to
    FILE.png, several to FILE-1.png..."""
    if frames_dir:
        if not result.images:
            raise CommandError(f"--out {out}/: the result holds no frames", 1)
        out.mkdir(exist_ok=True)
        paths = [out / f"{i:05d}.png" for i in range(len(result.images))]
        for path, png in zip(paths, result.images, strict=True):
            _write(path, png)
        return paths
    if out.suffix.lower() == ".mp4":
        if not result.video:
            raise CommandError(f"--out {out}: the result holds no video ({len(result.images)} images)", 1)
        _write(out, result.video)
        return [out]
    if not result.images:
        hint = "; it is a video: pass --out NAME.mp4" if result.video else ""
        raise CommandError(f"the result holds no images{hint}", 1)
    if len(result.images) == 1:
        paths = [out]
    else:
        paths = [out.with_name(f"{out.stem}-{i}{out.suffix}") for i in range(1, len(result.images) + 1)]
    for path, png in zip(paths, result.images, strict=True):
        _write(path, png)
    return paths


def cmd_generate(args: argparse.Namespace) -> int:
    from orchestrator.client import ClientError, build_request

    display = None if args.quiet else ProgressDisplay(sys.stderr)
    components = {
        key: spec
        for key, spec in (
            ("vae", args.vae),
            ("text_encoder", args.text_encoder),
            ("text_encoder_2", args.text_encoder_2),
            ("transformer", args.transformer),
        )
        if spec
    }
    try:
        check_args(args)
        try:
            request = build_request(
                model=args.model,
                prompt=args.prompt,
                negative_prompt=args.negative_prompt,
                seed=args.seed,
                steps=args.steps,
                width=args.width,
                height=args.height,
                guidance=args.guidance,
                cfg_scale=args.cfg_scale,
                loras=args.lora,
                lora_mode=args.lora_mode,
                input_image=Path(args.input_image) if args.input_image else None,
                last_image=Path(args.last_image) if args.last_image else None,
                input_video=Path(args.input_video) if args.input_video else None,
                strength=args.strength,
                num_frames=args.num_frames,
                fps=args.fps,
                batch_size=args.batch_size,
                max_sequence_length=args.max_sequence_length,
                components=components,
                request_id=args.request_id,
                family=args.family,
                task=args.task,
                cfg_scale_2=args.cfg_scale_2,
                solver=args.solver,
                shift=args.shift,
                frames_png=is_frames_dir(args.out),
            )
        except ValueError as e:
            raise CommandError(str(e)) from None
        with open_client(args, os.environ) as client:
            gen = client.run(request, display)
        paths = write_outputs(gen.result, Path(args.out), frames_dir=is_frames_dir(args.out))
    except CommandError as e:
        return _fail(display, str(e), e.exit_code)
    except ClientError as e:
        return _fail(display, f"{e.code.name}: {e.message}", 1)
    except OSError as e:  # reading --input-image or --tls-ca, writing --out
        return _fail(display, f"{e.filename}: {e.strerror}" if e.filename else str(e), 1)
    except KeyboardInterrupt:
        return _fail(display, "cancelled", 130)
    for path in paths:
        print(path)
    print(f"seed {gen.seed}  {gen.result.total_seconds:.2f}s")
    return 0


def _fail(display: ProgressDisplay | None, message: str, code: int) -> int:
    if display is not None:
        display.close()
    print(f"{PROG}: {message}", file=sys.stderr)
    return code
