"""`python -m trainer --spec SPEC.json`: train what a TrainSpec (JSON) describes.

The spec comes from `--spec PATH` (`-` for stdin), else from the environment as a pod gets it:
`DIFFMESH_TRAIN_SPEC` (the JSON text) or `DIFFMESH_TRAIN_SPEC_FILE` (a path). Exit codes: 0 done, 2 a bad spec
(the message names the field; checked before anything heavy is imported), 1 any other failure. Progress goes
to stdout as log lines and to `<output>/status.json`.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path

from trainer.spec import SpecError, TrainSpec, check_implemented, parse_spec, validate_spec, with_defaults

SPEC_ENV = "DIFFMESH_TRAIN_SPEC"
SPEC_FILE_ENV = "DIFFMESH_TRAIN_SPEC_FILE"
EXIT_OK, EXIT_FAILED, EXIT_BAD_SPEC = 0, 1, 2


class Terminated(Exception):
    """SIGTERM (a cancelled or preempted pod): the job stops at once, `status.json` says so."""


def _on_sigterm(signum: int, frame: object) -> None:
    raise Terminated("terminated by SIGTERM; a restart resumes from the latest checkpoint")


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m trainer", description=__doc__.split("\n\n")[0])
    p.add_argument("--spec", help=f"spec JSON file, '-' for stdin (default: ${SPEC_ENV} or ${SPEC_FILE_ENV})")
    p.add_argument("--warmup-steps", type=int, default=0, help="linear LR warmup steps (default 0)")
    p.add_argument("--hold-after-checkpoint", type=float, default=0.0, help=argparse.SUPPRESS)
    return p


def read_spec_text(arg: str | None, env: Mapping[str, str]) -> str:
    """The spec's JSON text; SpecError("spec") when there is none or it cannot be read."""
    if arg == "-":
        return sys.stdin.read()
    path = arg or env.get(SPEC_FILE_ENV)
    if path:
        try:
            return Path(path).read_text()
        except OSError as e:
            raise SpecError("spec", f"cannot read {path}: {e.strerror or e}") from None
    if env.get(SPEC_ENV):
        return env[SPEC_ENV]
    raise SpecError("spec", f"no spec: pass --spec FILE (or '-'), or set ${SPEC_ENV} / ${SPEC_FILE_ENV}")


def load_spec(arg: str | None, env: Mapping[str, str]) -> TrainSpec:
    spec = with_defaults(parse_spec(read_spec_text(arg, env), source="spec"))
    validate_spec(spec)
    check_implemented(spec)
    return spec


def main(argv: Sequence[str] | None = None, env: Mapping[str, str] | None = None) -> int:
    env = os.environ if env is None else env
    args = _parser().parse_args(argv)
    logging.basicConfig(
        stream=sys.stdout,
        level=logging.INFO,
        format="%(asctime)s %(name)s %(levelname)s %(message)s",
        force=True,
    )
    if args.warmup_steps < 0:
        print("bad spec: --warmup-steps must be >= 0", file=sys.stderr)
        return EXIT_BAD_SPEC
    try:
        spec = load_spec(args.spec, env)
    except SpecError as e:
        print(f"bad spec: {e}", file=sys.stderr)
        return EXIT_BAD_SPEC

    from trainer.job import Options, train  # torch and the models load only for a valid spec

    signal.signal(signal.SIGTERM, _on_sigterm)
    try:
        result = train(spec, env, Options(args.warmup_steps, args.hold_after_checkpoint))
    except SpecError as e:
        print(f"bad spec: {e}", file=sys.stderr)
        return EXIT_BAD_SPEC
    except (KeyboardInterrupt, Terminated) as e:
        print(f"stopped: {e or 'interrupted'}", file=sys.stderr)
        return EXIT_FAILED
    except Exception as e:
        logging.getLogger("trainer").exception("training failed")
        print(f"training failed: {type(e).__name__}: {e}", file=sys.stderr)
        return EXIT_FAILED
    print(f"done: {result.steps} steps; artifacts {result.artifacts}", flush=True)
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
