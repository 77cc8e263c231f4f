"""`make demo`: the main job on the embedded defaults. Starts the local stack when it is not up (S3 + every
service), generates "a red circle on a white background" with the shipped model through the services, writes
`outputs/demo.png`, prints the path and the time taken. The stack is left running (`make down` stops it).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

from orchestrator.client import Client, ClientError
from orchestrator.stack.local_stack import StackError, read_state, running, up

REPO = Path(__file__).resolve().parents[2]
MODEL = REPO / "models" / "diffmesh-shapes"
PROMPT = "a red circle on a white background"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="make demo", description=__doc__)
    p.add_argument("--model", type=Path, default=MODEL)
    p.add_argument("--prompt", default=PROMPT)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=REPO / "outputs" / "demo.png")
    args = p.parse_args(argv)
    started = time.monotonic()
    state_dir = Path(os.environ.get("DIFFMESH_STATE_DIR", REPO / ".diffmesh"))
    state = read_state(state_dir)
    if state is None or len(running(state)) != len(state.pids()):
        print(
            "starting the local stack (S3 + text-encoder, denoiser, vae, audio, orchestrator)...", flush=True
        )
        try:
            state = up(state_dir)
        except StackError as e:
            print(f"make demo: {e}", file=sys.stderr)
            return 1
        print(f"  stack ready in {state.data['ready_s']:.1f}s", flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    t0 = time.monotonic()
    try:
        with Client(state.endpoints["orchestrator"], state.data["token"], timeout_s=300) as client:
            gen = client.generate(model=str(args.model.resolve()), prompt=args.prompt, seed=args.seed)
    except ClientError as e:
        print(f"make demo: {e}", file=sys.stderr)
        return 1
    args.out.write_bytes(gen.result.images[0])
    print(f"{args.out}  ({args.prompt!r}, seed {gen.seed})")
    print(
        f"generated in {time.monotonic() - t0:.2f}s through the services; {time.monotonic() - started:.1f}s in all"
    )
    print("the stack is still up: `make down` (or `diffmesh down`) stops it")
    return 0


if __name__ == "__main__":
    sys.exit(main())
