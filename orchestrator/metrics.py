"""The orchestrator's Prometheus metrics, in a registry of its own (prometheus_client only: the orchestrator's
control flow may not import `services`). `diffmesh serve orchestrator` serves it beside the process registry
of services/common/metrics.py on one `/metrics` endpoint (orchestrator.local wires the two).

    diffmesh_stage_duration_seconds{stage,endpoint}       histogram  one graph stage as the orchestrator saw it
                                                                     (RPCs, retries and store hops included)
    diffmesh_stage_failures_total{stage,endpoint,code}    counter    stages that ended in an error
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Histogram, disable_created_metrics

disable_created_metrics()  # as services/common/metrics.py: no `*_created` series
REGISTRY = CollectorRegistry(auto_describe=True)

STAGE_SECONDS = Histogram(
    "diffmesh_stage_duration_seconds",
    "Time of one stage of a request's graph, as the orchestrator saw it (calls, retries, store hops included)",
    ["stage", "endpoint"],
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1800),
    registry=REGISTRY,
)
STAGE_FAILURES = Counter(
    "diffmesh_stage_failures",
    "Stages of a request's graph that ended in an error, by status code",
    ["stage", "endpoint", "code"],
    registry=REGISTRY,
)
