"""The NetworkPolicies of every rendering allow exactly the designed traffic (evaluated on the objects: the
orchestrator and trainer pods reach the stages, everything diffmesh reaches MinIO, nothing else crosses), and
the trainer Jobs the orchestrator's kubernetes launcher builds from the deployed environment fit the
deployment: its Secret keys, claim, image and NetworkPolicy."""

from __future__ import annotations

from k8s_render import GRPC_PORT, S3_PORT, STAGES, env_of, matches, named, of, render

# -- network policies ------------------------------------------------------------------------------------

# Pods of the namespace by role; None: a client pod in another namespace (its egress is not ours to police).
POD_LABELS: dict[str, dict[str, str] | None] = {
    "orchestrator": {"app.kubernetes.io/component": "orchestrator"},
    "minio": {"app.kubernetes.io/component": "object-store"},
    "trainer": {"app.kubernetes.io/component": "trainer"},
    "client": None,
    **{s: {"app.kubernetes.io/component": "stage", "app.kubernetes.io/name": s} for s in STAGES},
}


def _peer_ok(peers: list[dict] | None, labels: dict[str, str] | None) -> bool:
    """A pod with `labels` (None: from another namespace) is among `peers` (absent: everyone)."""
    if peers is None:
        return True
    if labels is None:
        return False  # no policy here names another namespace's pods
    return any(
        "podSelector" in p and "namespaceSelector" not in p and matches(p["podSelector"], labels)
        for p in peers
    )


def _allowed(docs: list[dict], src: str, dst: str, port: int) -> bool:
    """Whether a TCP connection src -> dst:port passes the NetworkPolicies (egress of src, ingress of dst)."""
    policies = of(docs, "NetworkPolicy")

    def direction(pod: str, kind: str, peer: str) -> bool:
        labels = POD_LABELS[pod]
        if labels is None:
            return True
        selecting = [
            p
            for p in policies
            if kind in p["spec"]["policyTypes"] and matches(p["spec"]["podSelector"], labels)
        ]
        if not selecting:
            return True  # not isolated in this direction
        rules = [r for p in selecting for r in p["spec"].get(kind.lower(), [])]
        return any(
            _peer_ok(r.get("from" if kind == "Ingress" else "to"), POD_LABELS[peer])
            and any(p["port"] == port for p in r.get("ports", [{"port": port}]))
            for r in rules
        )

    return direction(src, "Egress", dst) and direction(dst, "Ingress", src)


def test_network_policies_allow_exactly_the_designed_traffic(rendered: tuple[str, list[dict]]) -> None:
    _, docs = rendered
    deny = named(docs, "NetworkPolicy", "default-deny")["spec"]
    assert deny == {"podSelector": {}, "policyTypes": ["Ingress", "Egress"]}
    for stage in STAGES:
        assert _allowed(docs, "orchestrator", stage, GRPC_PORT)
        assert _allowed(docs, "trainer", stage, GRPC_PORT)
        assert _allowed(docs, stage, "minio", S3_PORT)
        assert not _allowed(docs, stage, "orchestrator", GRPC_PORT)
        assert not _allowed(docs, "client", stage, GRPC_PORT), "stages are reachable only from diffmesh"
        assert not _allowed(docs, stage, "denoiser" if stage != "denoiser" else "vae", GRPC_PORT)
    for src in ("orchestrator", "trainer"):
        assert _allowed(docs, src, "minio", S3_PORT)
    assert _allowed(docs, "client", "orchestrator", GRPC_PORT)
    assert not _allowed(docs, "client", "minio", S3_PORT)
    assert not _allowed(docs, "orchestrator", "minio", GRPC_PORT)
    dns = named(docs, "NetworkPolicy", "allow-dns")["spec"]
    assert dns["podSelector"] == {} and {p["port"] for p in dns["egress"][0]["ports"]} == {53}


# -- the trainer Jobs the orchestrator launches ----------------------------------------------------------


def test_trainer_jobs_fit_the_deployment() -> None:
    """A Job built by the kubernetes launcher from the deployed orchestrator's environment uses the deployed
    Secret's keys, claim and image, and the NetworkPolicies let its pods reach MinIO and the stages."""
    from orchestrator.jobs.manifest import build_job_manifest, labels
    from orchestrator.settings import STORE_ENV, JobSettings
    from protos import orchestrator_pb2
    from trainer.spec import parse_spec

    docs = render("base")
    env = {**env_of(docs, "orchestrator"), "DIFFMESH_NAMESPACE": "diffmesh"}
    settings = JobSettings.from_env(env)
    assert settings.launcher == "kubernetes" and settings.namespace == "diffmesh"
    spec = parse_spec(
        '{"name": "contract", "family": "flux", "baseModel": "flux-dev", "dataset": {"uri": "s3://diffmesh/data/"},'
        ' "lora": {"rank": 4}, "steps": 1, "output": "s3://diffmesh/loras/contract/"}'
    )
    job = build_job_manifest(spec, orchestrator_pb2.LaunchOptions(), settings, "contract-abcdef")
    pod = job["spec"]["template"]["spec"]
    c = pod["containers"][0]
    assert c["image"] == env_of(docs, "orchestrator")["DIFFMESH_TRAIN_IMAGE"]
    secret = named(docs, "Secret", "diffmesh-s3")
    for e in c["env"]:
        if "valueFrom" in e:
            ref = e["valueFrom"]["secretKeyRef"]
            assert ref["name"] == "diffmesh-s3" and ref["key"] in secret["data"], ref
    claims = {v["persistentVolumeClaim"]["claimName"] for v in pod["volumes"] if "persistentVolumeClaim" in v}
    assert claims <= {p["metadata"]["name"] for p in of(docs, "PersistentVolumeClaim")} and claims
    # Its pods carry the labels the NetworkPolicies know trainer pods by (test above: MinIO and the stages).
    assert POD_LABELS["trainer"].items() <= job["spec"]["template"]["metadata"]["labels"].items()
    assert job["spec"]["template"]["metadata"]["labels"] == labels("contract-abcdef")
    passed = {e["name"]: e.get("value") for e in c["env"]}
    assert all(passed[k] == env[k] for k in STORE_ENV if k in env), "the trainer gets the store's settings"
