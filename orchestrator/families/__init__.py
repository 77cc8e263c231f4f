"""Model families the orchestrator can run: defaults and stage graphs as data, one module per family.

A family module builds a `Family` and registers it in FAMILIES. `plan(request, model_dir)` resolves the
request against the model's recorded defaults and the family's, validates it (INVALID_ARGUMENT naming the
field), and returns the task's graph with the request's values; `finish(values, plan)` turns the graph's
result into a GenerateResult.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from orchestrator.errors import invalid, not_found
from orchestrator.graph import Graph
from protos import orchestrator_pb2


@dataclass(frozen=True)
class Plan:
    graph: Graph
    values: Mapping[str, Any]  # the request's inputs to the graph
    params: Any  # the resolved parameters (family dataclass)


@dataclass(frozen=True)
class Family:
    name: str
    pipeline_classes: tuple[str, ...]  # model_index.json `_class_name` values of this family
    tasks: tuple[str, ...]
    plan: Callable[[orchestrator_pb2.GenerateRequest, Path | None], Plan]
    finish: Callable[[Mapping[str, Any], Plan], orchestrator_pb2.GenerateResult]


FAMILIES: dict[str, Family] = {}


def family_of_pipeline(class_name: str) -> Family:
    for fam in FAMILIES.values():
        if class_name in fam.pipeline_classes:
            return fam
    known = sorted(c for f in FAMILIES.values() for c in f.pipeline_classes)
    raise not_found(f"no family runs pipeline class {class_name!r}; known: {known or 'none yet'}")


def detect(model_dir: Path | None, family: str = "", spec: str = "") -> Family:
    """The family a request names, else the one whose pipeline class the model's model_index.json names."""
    if family:
        if family not in FAMILIES:
            raise not_found(f"unknown family {family!r}; known: {sorted(FAMILIES) or 'none yet'}")
        return FAMILIES[family]
    index = model_dir / "model_index.json" if model_dir is not None else None
    if index is None or not index.is_file():
        raise not_found(
            f"cannot tell the family of model {spec or str(model_dir)!r} (no model_index.json); name it with `family`; "
            f"known: {sorted(FAMILIES) or 'none yet'}"
        )
    try:
        data = json.loads(index.read_text())
    except ValueError as e:
        raise invalid(f"{index} is not valid JSON: {e}") from None
    class_name = data.get("_class_name", "") if isinstance(data, dict) else ""
    return family_of_pipeline(str(class_name))


# Each family module registers itself in FAMILIES when imported.
from orchestrator.families import flux, wan  # noqa: E402, F401
