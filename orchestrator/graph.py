"""Stage graphs as data: each stage declares what it reads and writes; the order is derived and checked.

A family declares one graph per task (t2i, img2img, t2v, ...). `Graph.validate` proves, before anything
runs, that every input of every stage is produced upstream or given by the request.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from orchestrator.errors import invalid

SERVICES = ("text_encoder", "denoiser", "vae", "audio")

# run(client, inputs, ctx) -> outputs; ctx carries the request id, deadline and the event callback.
StageFn = Callable[[Any, Mapping[str, Any], Any], Mapping[str, Any]]


class GraphError(ValueError):
    """A graph that cannot run: names the stage and the value at fault."""


@dataclass(frozen=True)
class Stage:
    name: str
    service: str  # one of SERVICES
    inputs: tuple[str, ...]
    outputs: tuple[str, ...]
    run: StageFn
    optional_inputs: tuple[str, ...] = ()  # read when present, never required

    def __post_init__(self) -> None:
        if self.service not in SERVICES:
            raise GraphError(f"stage {self.name!r}: unknown service {self.service!r}; known: {SERVICES}")
        if not self.outputs:
            raise GraphError(f"stage {self.name!r} declares no outputs")


@dataclass(frozen=True)
class Graph:
    task: str
    stages: tuple[Stage, ...]
    result: tuple[str, ...]  # values the caller gets back

    def validate(self, provided: Iterable[str]) -> list[Stage]:
        """The stages in an order where each runs after what it reads; GraphError if none exists."""
        provided = set(provided)
        names = [s.name for s in self.stages]
        dupes = {n for n in names if names.count(n) > 1}
        if dupes:
            raise GraphError(f"graph {self.task!r}: duplicate stage names {sorted(dupes)}")
        producers: dict[str, str] = {}
        for s in self.stages:
            for out in s.outputs:
                if out in producers or out in provided:
                    first = producers.get(out, "the request")
                    raise GraphError(
                        f"graph {self.task!r}: {out!r} is produced by both {first} and {s.name!r}"
                    )
                producers[out] = s.name
        for s in self.stages:
            for inp in s.inputs:
                if inp not in producers and inp not in provided:
                    raise GraphError(
                        f"graph {self.task!r}: stage {s.name!r} reads {inp!r}, which no stage produces and the "
                        f"request does not give (request gives {sorted(provided)})"
                    )
        for r in self.result:
            if r not in producers and r not in provided:
                raise GraphError(f"graph {self.task!r}: result {r!r} is never produced")
        order: list[Stage] = []
        available = set(provided)
        pending = list(self.stages)
        while pending:
            ready = [s for s in pending if all(i in available for i in s.inputs)]
            if not ready:
                raise GraphError(f"graph {self.task!r}: cycle among {[s.name for s in pending]}")
            for s in ready:
                order.append(s)
                available.update(s.outputs)
                pending.remove(s)
        return order

    def check_request(self, provided: Iterable[str]) -> list[Stage]:
        """validate(), reported to the caller as INVALID_ARGUMENT (the request lacks what the task needs)."""
        try:
            return self.validate(provided)
        except GraphError as e:
            raise invalid(str(e)) from None
