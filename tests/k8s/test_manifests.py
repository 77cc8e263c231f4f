"""k8s/: the base and every overlay render with `kubectl kustomize`, validate strictly against the Kubernetes
1.33 schemas (`kubernetes-validate --strict`, as `make k8s-check` does), and have the properties the
deployment relies on: gRPC probes, non-root pods with read-only root filesystems, resources, pinned images,
references that resolve, Services and budgets that select pods, a minimal Role, GPUs for the denoiser in
prod. The NetworkPolicies and the trainer-Job contract are in test_network_policies.py."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import yaml
from k8s_render import (
    GRPC_PORT,
    K8S,
    OVERLAYS,
    S3_PORT,
    STAGES,
    containers,
    env_of,
    matches,
    named,
    of,
    pod_spec,
    render,
    workloads,
)

K8S_VERSION = "1.33.0"
UID = 10001  # the image's user (Dockerfile)
EXTERNAL_SECRETS = {"diffmesh-s3", "diffmesh-token", "diffmesh-tls"}  # created out of band in prod
TLS_MOUNT = "/var/run/secrets/diffmesh/tls"

# -- render and validate ---------------------------------------------------------------------------------


def test_renders_and_validates_strictly(rendered: tuple[str, list[dict]]) -> None:
    tree, docs = rendered
    stream = yaml.safe_dump_all(docs, sort_keys=False)
    validate = Path(sys.executable).parent / "kubernetes-validate"
    out = subprocess.run(
        [str(validate), "--strict", "--quiet", "-k", K8S_VERSION, "-"],
        input=stream,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0, f"k8s/{tree} does not validate:\n{out.stdout}\n{out.stderr}"
    assert {d["metadata"].get("namespace") for d in docs if d["kind"] != "Namespace"} == {"diffmesh"}
    assert {d["metadata"]["labels"].get("app.kubernetes.io/part-of") for d in docs} == {"diffmesh"}


def test_every_component_is_used_and_documented() -> None:
    used = "".join((K8S / "overlays" / o / "kustomization.yaml").read_text() for o in OVERLAYS)
    for comp in (K8S / "components").iterdir():
        assert (comp / "README.md").is_file(), f"components/{comp.name} has no README.md"
        assert f"components/{comp.name}" in used, f"components/{comp.name} is in no overlay"


# -- pods ------------------------------------------------------------------------------------------------


def test_pods_are_non_root_with_read_only_root_filesystems(rendered: tuple[str, list[dict]]) -> None:
    _, docs = rendered
    for w in workloads(docs):
        pod, name = w["spec"]["template"]["spec"], w["metadata"]["name"]
        assert pod["securityContext"] == {
            **pod["securityContext"],
            "runAsNonRoot": True,
            "runAsUser": UID,
            "runAsGroup": UID,
            "fsGroup": UID,
            "seccompProfile": {"type": "RuntimeDefault"},
        }, name
        assert not pod.get("hostNetwork") and not pod.get("hostPID") and not pod.get("hostIPC"), name
        # Only the orchestrator talks to the API server (training Jobs).
        assert pod["automountServiceAccountToken"] is (name == "orchestrator"), name
        for c in pod["containers"]:
            sc = c["securityContext"]
            assert sc["allowPrivilegeEscalation"] is False and sc["readOnlyRootFilesystem"] is True, name
            assert sc["capabilities"] == {"drop": ["ALL"]} and not sc.get("privileged"), name
            mounts = {m["mountPath"] for m in c["volumeMounts"]}
            assert "/tmp" in mounts, f"{name}: no writable /tmp on a read-only root"


def test_resources_requests_and_limits(rendered: tuple[str, list[dict]]) -> None:
    _, docs = rendered
    for w, c in containers(docs):
        res = c["resources"]
        for part in ("requests", "limits"):
            assert {"cpu", "memory"} <= res[part].keys(), f"{w['metadata']['name']}: {part} {res.get(part)}"


def test_grpc_probes_and_graceful_stop(rendered: tuple[str, list[dict]]) -> None:
    _, docs = rendered
    for d in of(docs, "Deployment"):
        pod, name = d["spec"]["template"]["spec"], d["metadata"]["name"]
        c = pod["containers"][0]
        assert c["args"][:2] == ["serve", name], name
        assert {"name": "grpc", "containerPort": GRPC_PORT} in c["ports"], name
        tls = any(v.get("secret", {}).get("secretName") == "diffmesh-tls" for v in pod["volumes"])
        for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
            # the kubelet's gRPC probe speaks plaintext: a TLS port is probed over TCP
            kind = "tcpSocket" if tls else "grpc"
            assert c[probe][kind]["port"] == GRPC_PORT, f"{name}: {probe}"
        grace = float(c["args"][c["args"].index("--grace") + 1])
        assert pod["terminationGracePeriodSeconds"] > grace + c["lifecycle"]["preStop"]["sleep"]["seconds"]
    minio = named(docs, "StatefulSet", "minio")["spec"]["template"]["spec"]["containers"][0]
    assert minio["readinessProbe"]["httpGet"]["path"] == "/minio/health/ready"
    assert minio["livenessProbe"]["httpGet"]["path"] == "/minio/health/live"


def test_images_are_pinned_and_one_image_runs_everything(rendered: tuple[str, list[dict]]) -> None:
    _, docs = rendered
    images = {c["image"] for _, c in containers(docs)}
    for image in images:
        assert "@sha256:" in image or re.search(r":[\w][\w.-]*$", image.rsplit("/", 1)[-1]), image
        assert not image.endswith(":latest"), image
    engine = {pod_spec(docs, n)["containers"][0]["image"] for n in STAGES}
    orchestrator = pod_spec(docs, "orchestrator")["containers"][0]
    assert engine == {orchestrator["image"]}, "the stages and the orchestrator run one image"
    assert env_of(docs, "orchestrator")["DIFFMESH_TRAIN_IMAGE"] == orchestrator["image"]


def test_references_resolve(rendered: tuple[str, list[dict]]) -> None:
    """ConfigMaps, Secrets, claims and service accounts the pods name exist (prod: the two external Secrets)."""
    tree, docs = rendered
    names = {kind: {d["metadata"]["name"] for d in of(docs, kind)} for kind in {d["kind"] for d in docs}}
    secrets = names.get("Secret", set())
    if tree == "overlays/prod":
        assert not secrets, "prod takes its credentials from Secrets created out of band"
        secrets = EXTERNAL_SECRETS
    for w in workloads(docs):
        pod = w["spec"]["template"]["spec"]
        assert pod["serviceAccountName"] in names["ServiceAccount"]
        claims = {t["metadata"]["name"] for t in w["spec"].get("volumeClaimTemplates", [])}
        for v in pod.get("volumes", []):
            if "secret" in v:
                assert v["secret"]["secretName"] in secrets, v
            if "persistentVolumeClaim" in v:
                assert v["persistentVolumeClaim"]["claimName"] in names["PersistentVolumeClaim"], v
        for c in pod["containers"]:
            assert {m["name"] for m in c["volumeMounts"]} <= {v["name"] for v in pod["volumes"]} | claims
            for src in c.get("envFrom", []):
                assert src["configMapRef"]["name"] in names["ConfigMap"]
    env = env_of(docs, "orchestrator")
    assert env["DIFFMESH_S3_SECRET"] in secrets
    assert env["DIFFMESH_TRAIN_CACHE_PVC"] in names["PersistentVolumeClaim"]


def test_service_settings_parse() -> None:
    """The shared ConfigMap is a valid environment for services.common.settings (secrets come as files)."""
    from services.common.settings import Settings

    docs = render("base")
    env = env_of(docs, "denoiser")
    settings = Settings.from_env({k: v for k, v in env.items() if not k.endswith("_FILE")})
    assert settings.store == "s3" and settings.s3.endpoint == f"minio:{S3_PORT}"
    assert settings.model_roots == (Path("/models"),) and settings.cache_dir == Path("/cache")
    for var in ("DIFFMESH_S3_ACCESS_KEY_FILE", "DIFFMESH_S3_SECRET_KEY_FILE", "DIFFMESH_TOKEN_FILE"):
        mount, key = env[var].rsplit("/", 1)
        c = pod_spec(docs, "denoiser")["containers"][0]
        assert mount in {m["mountPath"] for m in c["volumeMounts"]}, var
        secret = next(s for s in of(docs, "Secret") if key in s["data"])
        assert secret["metadata"]["name"] in EXTERNAL_SECRETS


# -- services --------------------------------------------------------------------------------------------


def test_every_service_selects_pods_on_a_named_port(rendered: tuple[str, list[dict]]) -> None:
    _, docs = rendered
    for svc in of(docs, "Service"):
        pods = [
            w
            for w in workloads(docs)
            if matches({"matchLabels": svc["spec"]["selector"]}, w["spec"]["template"]["metadata"]["labels"])
        ]
        assert pods, f"Service {svc['metadata']['name']} selects no pods"
        ports = {
            p["name"] for w in pods for c in w["spec"]["template"]["spec"]["containers"] for p in c["ports"]
        }
        for port in svc["spec"]["ports"]:
            assert port["targetPort"] in ports, (svc["metadata"]["name"], port)
    for stage in (*STAGES, "orchestrator"):
        svc = named(docs, "Service", stage)["spec"]
        assert svc["type"] == "ClusterIP" and svc["ports"][0] == {
            "name": "grpc",
            "port": GRPC_PORT,
            "targetPort": "grpc",
            "appProtocol": "grpc",
        }
    endpoints = env_of(docs, "orchestrator")
    for stage in STAGES:
        assert endpoints[f"DIFFMESH_{stage.upper().replace('-', '_')}"] == f"{stage}:{GRPC_PORT}"


def test_disruption_budgets_select_pods(rendered: tuple[str, list[dict]]) -> None:
    _, docs = rendered
    for pdb in of(docs, "PodDisruptionBudget"):
        targets = [
            w
            for w in workloads(docs)
            if matches(pdb["spec"]["selector"], w["spec"]["template"]["metadata"]["labels"])
        ]
        assert len(targets) == 1, pdb["metadata"]["name"]
        assert targets[0]["spec"]["replicas"] > pdb["spec"]["minAvailable"], "a PDB that blocks every drain"


# -- RBAC ------------------------------------------------------------------------------------------------


def test_orchestrator_role_is_minimal(rendered: tuple[str, list[dict]]) -> None:
    _, docs = rendered
    assert not of(docs, "ClusterRole") and not of(docs, "ClusterRoleBinding")
    (role,) = of(docs, "Role")
    rules = {
        (group, resource): set(rule["verbs"])
        for rule in role["rules"]
        for group in rule["apiGroups"]
        for resource in rule["resources"]
    }
    assert not any("*" in k or "*" in v for k, v in rules.items())
    assert rules == {
        ("batch", "jobs"): {"create", "get", "list", "watch", "delete"},
        ("", "pods"): {"get", "list", "watch"},
        ("", "pods/log"): {"get", "list", "watch"},
        ("", "configmaps"): {"create", "get", "patch", "delete"},
    }
    (binding,) = of(docs, "RoleBinding")
    assert binding["roleRef"] == {
        "apiGroup": "rbac.authorization.k8s.io",
        "kind": "Role",
        "name": role["metadata"]["name"],
    }
    orch = pod_spec(docs, "orchestrator")
    assert binding["subjects"] == [
        {"kind": "ServiceAccount", "name": orch["serviceAccountName"], "namespace": "diffmesh"}
    ]


# -- overlays --------------------------------------------------------------------------------------------


def test_dev_overlay_is_small_and_verbose() -> None:
    docs = render("overlays/dev")
    assert all(d["spec"]["replicas"] == 1 for d in workloads(docs))
    assert env_of(docs, "denoiser")["DIFFMESH_LOG_LEVEL"] == "DEBUG"
    assert not any("nvidia.com/gpu" in c["resources"]["limits"] for _, c in containers(docs))


def test_prod_overlay_puts_the_denoiser_on_a_gpu_with_replicas_and_budgets() -> None:
    docs = render("overlays/prod")
    for name in ("denoiser", "text-encoder", "vae"):
        pod = pod_spec(docs, name)
        assert pod["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] == "1", name
        assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in pod["tolerations"]
        assert pod["nodeSelector"]
        assert env_of(docs, name)["DIFFMESH_DEVICE"] == "cuda"
    assert "nvidia.com/gpu" not in pod_spec(docs, "orchestrator")["containers"][0]["resources"]["limits"]
    budgets = {p["metadata"]["name"] for p in of(docs, "PodDisruptionBudget")}
    for d in of(docs, "Deployment"):
        assert d["spec"]["replicas"] >= 2 and d["metadata"]["name"] in budgets, d["metadata"]["name"]


def test_prod_serves_tls_and_mutual_tls_from_the_orchestrator_to_the_stages() -> None:
    docs = render("overlays/prod")
    for name in (*STAGES, "orchestrator"):
        c = pod_spec(docs, name)["containers"][0]
        assert {"name": "tls", "mountPath": TLS_MOUNT, "readOnly": True} in c["volumeMounts"], name
        env = env_of(docs, name)
        assert (env["DIFFMESH_TLS_CERT"], env["DIFFMESH_TLS_KEY"]) == (
            f"{TLS_MOUNT}/tls.crt",
            f"{TLS_MOUNT}/tls.key",
        )
    for name in STAGES:  # stages admit only clients with a certificate of the CA
        assert env_of(docs, name)["DIFFMESH_TLS_CLIENT_CA"] == f"{TLS_MOUNT}/ca.crt", name
    orch = env_of(docs, "orchestrator")
    assert "DIFFMESH_TLS_CLIENT_CA" not in orch  # its clients authenticate with the bearer token
    settings = {k: v for k, v in orch.items() if k.startswith("DIFFMESH_STAGE_TLS_")}
    assert settings == {
        "DIFFMESH_STAGE_TLS_CA": f"{TLS_MOUNT}/ca.crt",
        "DIFFMESH_STAGE_TLS_CERT": f"{TLS_MOUNT}/tls.crt",
        "DIFFMESH_STAGE_TLS_KEY": f"{TLS_MOUNT}/tls.key",
    }
    for tree in ("base", "overlays/dev"):  # plaintext where there is no certificate
        assert "DIFFMESH_TLS_CERT" not in env_of(render(tree), "denoiser")
