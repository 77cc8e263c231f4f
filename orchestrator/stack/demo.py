"""`make demo`: until a model family lands, start the local stack, show every service SERVING, stop it.

A stack that was already running (`diffmesh up`) is used and left running.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

from orchestrator.stack.local_stack import down, read_state, running, up, wait_serving


def main() -> int:
    state_dir = Path(os.environ.get("DIFFMESH_STATE_DIR", ".diffmesh"))
    started = time.monotonic()
    state = read_state(state_dir)
    ours = state is None or not running(state)
    if ours:
        print("starting the local stack (S3 + text-encoder, denoiser, vae, audio, orchestrator)...")
        state = up(state_dir)
    try:
        for name, endpoint in state.endpoints.items():
            wait_serving(endpoint, 30)
            print(f"  {name:<13} {endpoint:<22} SERVING")
        print(f"  {'s3':<13} {state.data['s3']['endpoint']:<22} (SeaweedFS)")
        print(f"all services SERVING in {time.monotonic() - started:.1f}s")
    finally:
        if ours:
            print(f"stopped: {', '.join(down(state_dir))}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
