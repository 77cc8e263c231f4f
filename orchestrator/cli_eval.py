"""`diffmesh eval shapes`: how well a model follows the shapes prompts, generated through the stack.

Every prompt of the fixed set (`trainer.datasets.shapes.eval_prompts`: "base", 24 prompts, or "concept", the
12 prompts of the held-out colour) is generated `--n` times, sample i with seed `--seed + i`, through the
orchestrator (--endpoint, $DIFFMESH_ORCHESTRATOR, or the running `diffmesh up` stack) or in this process
(--local), and scored by the classifier of `orchestrator.eval.shapes`. Prints the per-prompt and overall
accuracies (shape colour, background, shape class, all three) and writes `contact_sheet.png` (one row per
prompt) and `report.json` into --out-dir. Bad arguments exit 2, a failed generation exits 1.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

from orchestrator.cli_generate import (
    _UINT32,
    _UINT64,
    CommandError,
    _integer,
    _lora,
    _number,
    _text,
    add_connection_args,
    check_connection_args,
    open_client,
)

PROG = "diffmesh eval shapes"
DEFAULT_MODEL = "models/diffmesh-shapes"
MAX_COLS = 16


def add_parser(sub: argparse._SubParsersAction) -> None:
    """Register `eval` (with its one suite, `shapes`) on the `diffmesh` subparsers."""
    e = sub.add_parser("eval", help="evaluate a model: `diffmesh eval shapes`")
    suites = e.add_subparsers(dest="suite", required=True)
    s = suites.add_parser(
        "shapes",
        help="prompt following on the shapes dataset (colour, background, shape class)",
        description=__doc__.split("\n\n")[1].replace("\n", " "),
    )
    s.add_argument(
        "--model", metavar="SPEC", type=_text, default=DEFAULT_MODEL, help=f"default: {DEFAULT_MODEL}"
    )
    s.add_argument("--n", metavar="PER_PROMPT", type=_integer(1, 1000), default=8, help="default: 8")
    s.add_argument("--prompts", choices=("base", "concept"), default="base", help="the prompt set")
    s.add_argument(
        "--lora", type=_lora, action="append", default=[], metavar="PATH[:SCALE]", help="repeatable"
    )
    s.add_argument("--seed", metavar="N", type=_integer(0, _UINT64 - 1000), default=0)
    s.add_argument("--steps", metavar="N", type=_integer(1, _UINT32), help="default: the model's")
    s.add_argument("--width", metavar="W", type=_integer(1, _UINT32))
    s.add_argument("--height", metavar="H", type=_integer(1, _UINT32))
    s.add_argument("--guidance", metavar="G", type=_number(0.0))
    s.add_argument("--out-dir", metavar="DIR", default="outputs/eval", help="default: outputs/eval")
    s.add_argument("--limit-prompts", type=_integer(1, 1000), help=argparse.SUPPRESS)  # tests: a subset
    where = s.add_mutually_exclusive_group()
    where.add_argument("--local", action="store_true", help="run the engine in this process")
    where.add_argument(
        "--endpoint", metavar="HOST:PORT", type=_text, help="the orchestrator (default: see above)"
    )
    add_connection_args(s)
    s.add_argument("--timeout", type=_number(0.0, lo_open=True), metavar="SECONDS", help="per image")
    s.add_argument("--quiet", action="store_true", help="no progress on stderr")
    s.set_defaults(fn=cmd_eval_shapes)


def _model_spec(model: str) -> str:
    """A local model directory goes by its absolute path: the stack's services may run elsewhere."""
    try:
        return str(Path(model).resolve()) if Path(model).exists() else model
    except OSError:  # e.g. a name too long for a path: not a local directory
        return model


def _check(args: argparse.Namespace) -> Path:
    if "\x00" in args.out_dir:
        raise CommandError(f"--out-dir {args.out_dir!r}: contains a NUL character")
    out_dir = Path(args.out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise CommandError(f"--out-dir {args.out_dir} is not a directory")
    check_connection_args(args)
    return out_dir


def cmd_eval_shapes(args: argparse.Namespace) -> int:
    from orchestrator.client import ClientError
    from orchestrator.eval.shapes import contact_sheet, run_eval
    from trainer.datasets.shapes import eval_prompts

    prompts = eval_prompts(args.prompts)[: args.limit_prompts]
    model = _model_spec(args.model)
    overrides = {
        k: v
        for k, v in (("steps", args.steps), ("width", args.width), ("height", args.height))
        if v is not None
    }
    if args.guidance is not None:
        overrides["guidance"] = args.guidance
    total, done, start = len(prompts) * args.n, 0, time.monotonic()

    def progress(sample) -> None:
        nonlocal done
        done += 1
        if not args.quiet:
            mark = "ok" if sample.correct["all"] else "--"
            got = f"{sample.got.colour} {sample.got.shape}/{sample.got.background}"
            print(f"[{done}/{total}] {mark} seed {sample.seed} {sample.prompt!r}: {got}", file=sys.stderr)

    try:
        out_dir = _check(args)
        with open_client(args, os.environ) as client:

            def generate(prompt: str, seed: int):
                gen = client.generate(model=model, prompt=prompt, seed=seed, loras=args.lora, **overrides)
                return gen.image

            report = run_eval(generate, prompts, args.n, args.seed, on_sample=progress)
        seconds = time.monotonic() - start
        out_dir.mkdir(parents=True, exist_ok=True)
        sheet = contact_sheet(report.images, report.tiles(), cols=min(args.n, MAX_COLS))
        sheet.save(out_dir / "contact_sheet.png")
        info = {
            "model": args.model,
            "loras": [{"spec": spec, "scale": scale} for spec, scale in args.lora],
            "prompt_set": args.prompts,
            "n_per_prompt": args.n,
            "seed": args.seed,
            "overrides": overrides,
            "seconds": round(seconds, 2),
        }
        (out_dir / "report.json").write_text(report.to_json(**info) + "\n")
    except CommandError as e:
        return _fail(str(e), e.exit_code)
    except ClientError as e:
        return _fail(f"{e.code.name}: {e.message}", 1)
    except OSError as e:
        return _fail(f"{e.filename}: {e.strerror}" if e.filename else str(e), 1)
    except KeyboardInterrupt:
        return _fail("cancelled", 130)
    lora = "".join(f" + LoRA {spec}:{scale:g}" for spec, scale in args.lora)
    print(f"{args.model}{lora}: {args.prompts} prompts, {len(prompts)} x {args.n} samples, seed {args.seed}")
    print(report.table())
    print(f"{total} images in {seconds:.1f}s ({seconds / total:.2f}s each)")
    print(out_dir / "contact_sheet.png")
    print(out_dir / "report.json")
    return 0


def _fail(message: str, code: int) -> int:
    print(f"{PROG}: {message}", file=sys.stderr)
    return code
