"""`<output>/status.json`: the job's progress for whoever launched it (the orchestrator's launchers).

    {"state": "running" | "succeeded" | "failed", "step": int, "total_steps": int, "loss": float | null,
     "message": str, "artifacts": [str], "fingerprint": str, "started_at": float, "updated_at": float}

Written through the output's storage (a local folder or S3), whole each time. Progress writes are throttled to
one per `min_interval_s`; state changes and checkpoints are always written.
"""

from __future__ import annotations

import json
import logging
import time
from typing import Any

from trainer.storage import Storage

log = logging.getLogger(__name__)
STATUS_FILE = "status.json"
STATES = ("running", "succeeded", "failed")


class StatusWriter:
    def __init__(self, storage: Storage, total_steps: int, fingerprint: str, min_interval_s: float = 2.0):
        self.storage = storage
        self.fingerprint = fingerprint
        self.min_interval_s = min_interval_s
        self.doc: dict[str, Any] = {
            "state": "running",
            "step": 0,
            "total_steps": total_steps,
            "loss": None,
            "message": "",
            "artifacts": [],
            "fingerprint": fingerprint,
            "started_at": time.time(),
            "updated_at": time.time(),
        }
        self._last_write = 0.0

    def write(
        self,
        state: str,
        *,
        step: int | None = None,
        loss: float | None = None,
        message: str | None = None,
        artifacts: list[str] | None = None,
        force: bool = False,
    ) -> None:
        """Update the document; write it when forced, when the state changes, or when the interval passed."""
        if state not in STATES:
            raise ValueError(f"state {state!r}; one of {STATES}")
        changed = state != self.doc["state"]
        self.doc["state"] = state
        for key, value in (("step", step), ("loss", loss), ("message", message), ("artifacts", artifacts)):
            if value is not None:
                self.doc[key] = value
        now = time.monotonic()
        if not (force or changed or now - self._last_write >= self.min_interval_s):
            return
        self.doc["updated_at"] = time.time()
        try:
            self.storage.write(STATUS_FILE, json.dumps(self.doc, indent=2).encode())
        except Exception as e:  # progress reporting must never be what kills (or masks) the job
            log.warning("could not write %s: %s", self.storage.uri(STATUS_FILE), e)
            return
        self._last_write = now


def read_status(storage: Storage) -> dict[str, Any] | None:
    """The status document under a storage root, or None when there is none yet."""
    try:
        return json.loads(storage.read(STATUS_FILE))
    except FileNotFoundError:
        return None
