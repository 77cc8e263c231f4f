"""TLS between the orchestrator and the stages, and mutual TLS: real gRPC servers (a VAE stage) on port 0 with
certificates from a test CA; the orchestrator's stage clients as `DIFFMESH_STAGE_TLS_*` configure them; and
`diffmesh serve` with its --tls-* flags in a subprocess.

A call that reaches the VAE servicer is answered INVALID_ARGUMENT (the request names no model): proof the
handshake and the token passed. A handshake that fails is UNAVAILABLE."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from tls_certs import CertAuthority

from orchestrator import channel_tls
from orchestrator.clients import CallOptions, ChannelTls, GrpcVae, grpc_clients, open_channel
from orchestrator.errors import StageError
from orchestrator.settings import OrchestratorSettings, stage_tls
from protos import vae_pb2
from services.common.server import create_server
from services.common.settings import Settings
from services.common.store import LocalTensorStore
from services.common.tls import TlsFiles
from services.vae import server as vae_server

TOKEN = "tls-test-token"
OPTS = CallOptions(request_id="tls-1", timeout_s=10)


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory):
    folder = tmp_path_factory.mktemp("certs")
    ca = CertAuthority(folder / "ca")
    other = CertAuthority(folder / "other", name="someone else")
    return {
        "ca": ca,
        "server": ca.issue("vae", dns=("localhost", "vae.diffmesh.svc"), ips=("127.0.0.1",)),
        "named": ca.issue("vae-by-name", dns=("vae.diffmesh.svc",)),
        "client": ca.issue("orchestrator", client=True),
        "stranger": other.issue("stranger", client=True),
        "other": other,
    }


def vae_server_with(tmp_path: Path, tls: TlsFiles):
    settings = Settings(local_store_dir=tmp_path / "store", token=TOKEN, device="cpu", offline=True)
    binding = vae_server.binding(settings, LocalTensorStore(settings.local_store_dir))
    return create_server([binding], port=0, token=TOKEN, tls=tls)


def reached(tls: ChannelTls | None, port: int) -> grpc.StatusCode:
    """The code of a VAE call through `tls` (None: plaintext): INVALID_ARGUMENT means it got through."""
    client = GrpcVae(f"127.0.0.1:{port}", TOKEN, retries=0, tls=tls)
    try:
        client.decode(vae_pb2.VaeDecodeRequest(), OPTS)
    except StageError as e:
        return e.code
    finally:
        client.close()
    raise AssertionError("a request without a model was accepted")


def test_tls_stage_needs_its_ca(certs, tmp_path: Path):
    server_pem = certs["server"]
    server, port = vae_server_with(tmp_path, TlsFiles(server_pem.cert, server_pem.key))
    try:
        ca = certs["ca"].pem.read_bytes()
        assert reached(ChannelTls(ca), port) == grpc.StatusCode.INVALID_ARGUMENT
        assert reached(None, port) == grpc.StatusCode.UNAVAILABLE  # plaintext to a TLS port
        assert reached(ChannelTls(certs["other"].pem.read_bytes()), port) == grpc.StatusCode.UNAVAILABLE
        with open_channel(f"127.0.0.1:{port}", tls=ChannelTls(ca)) as channel:
            resp = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=10)
        assert resp.status == health_pb2.HealthCheckResponse.SERVING
    finally:
        server.stop(0)


def test_mutual_tls_stage_admits_only_clients_of_its_ca(certs, tmp_path: Path):
    server_pem, client, stranger = certs["server"], certs["client"], certs["stranger"]
    ca_pem = certs["ca"].pem
    server, port = vae_server_with(tmp_path, TlsFiles(server_pem.cert, server_pem.key, client_ca=ca_pem))
    try:
        ca = ca_pem.read_bytes()
        mutual = ChannelTls(ca, client.cert_bytes(), client.key_bytes())
        assert reached(mutual, port) == grpc.StatusCode.INVALID_ARGUMENT
        assert reached(ChannelTls(ca), port) == grpc.StatusCode.UNAVAILABLE  # no client certificate
        foreign = ChannelTls(ca, stranger.cert_bytes(), stranger.key_bytes())
        assert reached(foreign, port) == grpc.StatusCode.UNAVAILABLE  # signed by another CA
    finally:
        server.stop(0)


def test_server_name_checks_a_certificate_issued_for_a_service_name(certs, tmp_path: Path):
    named = certs["named"]  # valid for vae.diffmesh.svc only, dialled at 127.0.0.1
    server, port = vae_server_with(tmp_path, TlsFiles(named.cert, named.key))
    try:
        ca = certs["ca"].pem.read_bytes()
        assert reached(ChannelTls(ca), port) == grpc.StatusCode.UNAVAILABLE
        assert (
            reached(ChannelTls(ca, server_name="vae.diffmesh.svc"), port) == grpc.StatusCode.INVALID_ARGUMENT
        )
    finally:
        server.stop(0)


def test_the_orchestrator_calls_stages_over_mutual_tls_from_its_environment(certs, tmp_path: Path):
    server_pem, client = certs["server"], certs["client"]
    ca_pem = certs["ca"].pem
    server, port = vae_server_with(tmp_path, TlsFiles(server_pem.cert, server_pem.key, client_ca=ca_pem))
    env = {
        "DIFFMESH_VAE": f"127.0.0.1:{port}",
        "DIFFMESH_TOKEN": TOKEN,
        "DIFFMESH_STAGE_TLS_CA": str(ca_pem),
        "DIFFMESH_STAGE_TLS_CERT": str(client.cert),
        "DIFFMESH_STAGE_TLS_KEY": str(client.key),
    }
    try:
        orch = OrchestratorSettings.from_env(env)
        assert "BEGIN PRIVATE KEY" not in repr(orch)  # the key never shows in a repr or a log
        vae = grpc_clients(orch.endpoints, orch.token, 0, orch.stage_tls)["vae"]
        with pytest.raises(StageError) as err:
            vae.decode(vae_pb2.VaeDecodeRequest(), OPTS)
        assert err.value.code == grpc.StatusCode.INVALID_ARGUMENT
        vae.close()
    finally:
        server.stop(0)


def test_a_rotated_certificate_is_served_without_a_restart(certs, tmp_path: Path, caplog):
    """The files are replaced in place (as Kubernetes swaps a renewed Secret); new connections get the new
    certificate; a rotation whose key does not match its certificate is refused, and the last good one stays."""
    live = tmp_path / "live"
    live.mkdir()
    cert, key = live / "tls.crt", live / "tls.key"

    def install(cert_bytes: bytes, key_bytes: bytes) -> None:
        for path, data in ((cert, cert_bytes), (key, key_bytes)):
            path.with_suffix(".new").write_bytes(data)
            path.with_suffix(".new").replace(path)

    first = certs["server"]
    install(first.cert_bytes(), first.key_bytes())
    server, port = vae_server_with(tmp_path, TlsFiles(cert, key))
    old_ca, new_ca = certs["ca"].pem.read_bytes(), certs["other"].pem.read_bytes()
    try:
        assert reached(ChannelTls(old_ca), port) == grpc.StatusCode.INVALID_ARGUMENT
        renewed = certs["other"].issue("vae-renewed", dns=("localhost",), ips=("127.0.0.1",))
        install(renewed.cert_bytes(), renewed.key_bytes())
        assert reached(ChannelTls(new_ca), port) == grpc.StatusCode.INVALID_ARGUMENT
        assert reached(ChannelTls(old_ca), port) == grpc.StatusCode.UNAVAILABLE  # the old chain is gone

        # a broken rotation: the first certificate with the renewed one's key
        install(first.cert_bytes(), renewed.key_bytes())
        assert reached(ChannelTls(new_ca), port) == grpc.StatusCode.INVALID_ARGUMENT  # still the renewed
        assert reached(ChannelTls(old_ca), port) == grpc.StatusCode.UNAVAILABLE
        refusals = [r for r in caplog.records if "do not load" in r.getMessage()]
        assert len(refusals) == 1 and str(cert) in refusals[0].getMessage()  # once, not per handshake
    finally:
        server.stop(0)


def test_the_orchestrator_takes_a_renewed_client_certificate_without_a_restart(
    certs, tmp_path: Path, monkeypatch, caplog
):
    """Mutual TLS: the stage admits clients of its CA. The orchestrator's client certificate files are replaced
    in place; its next call opens a channel with the new set (seen by the stage refusing a foreign one)."""
    monkeypatch.setattr(channel_tls, "CHECK_EVERY_S", 0.0)  # look at the files at every call
    server_pem, ca_pem = certs["server"], certs["ca"].pem
    server, port = vae_server_with(tmp_path, TlsFiles(server_pem.cert, server_pem.key, client_ca=ca_pem))
    live = tmp_path / "client"
    live.mkdir()
    cert, key = live / "tls.crt", live / "tls.key"

    def install(pem) -> None:
        for path, data in ((cert, pem.cert_bytes()), (key, pem.key_bytes())):
            path.with_suffix(".new").write_bytes(data)
            path.with_suffix(".new").replace(path)

    install(certs["client"])
    env = {
        "DIFFMESH_VAE": f"127.0.0.1:{port}",
        "DIFFMESH_STAGE_TLS_CA": str(ca_pem),
        "DIFFMESH_STAGE_TLS_CERT": str(cert),
        "DIFFMESH_STAGE_TLS_KEY": str(key),
    }
    orch = OrchestratorSettings.from_env(env)
    vae = grpc_clients(orch.endpoints, TOKEN, 0, orch.stage_tls)["vae"]

    def code() -> grpc.StatusCode:
        with pytest.raises(StageError) as err:
            vae.decode(vae_pb2.VaeDecodeRequest(), OPTS)
        return err.value.code

    try:
        assert code() == grpc.StatusCode.INVALID_ARGUMENT  # through
        install(certs["stranger"])  # a certificate of another CA: the stage refuses the new channel
        assert code() == grpc.StatusCode.UNAVAILABLE
        install(certs["ca"].issue("orchestrator-renewed", client=True))
        assert code() == grpc.StatusCode.INVALID_ARGUMENT
        assert orch.stage_tls.source.reloads == 2

        # a half-done rotation (the renewed certificate, the stranger's key) is refused; the last set stays
        key.write_bytes(certs["stranger"].key_bytes())
        assert code() == grpc.StatusCode.INVALID_ARGUMENT
        assert code() == grpc.StatusCode.INVALID_ARGUMENT
        assert orch.stage_tls.source.reloads == 2
        assert len([r for r in caplog.records if "do not load" in r.getMessage()]) == 1
    finally:
        vae.close()
        server.stop(0)


def test_stage_tls_settings_name_what_is_wrong(certs, tmp_path: Path):
    ca, client = str(certs["ca"].pem), certs["client"]
    assert stage_tls({}) is None
    with pytest.raises(ValueError, match="DIFFMESH_STAGE_TLS_CA"):
        stage_tls({"DIFFMESH_STAGE_TLS_CERT": str(client.cert), "DIFFMESH_STAGE_TLS_KEY": str(client.key)})
    with pytest.raises(ValueError, match="go together"):
        stage_tls({"DIFFMESH_STAGE_TLS_CA": ca, "DIFFMESH_STAGE_TLS_CERT": str(client.cert)})
    with pytest.raises(ValueError, match=r"DIFFMESH_STAGE_TLS_KEY='/no/such.key' cannot be read"):
        stage_tls(
            {
                "DIFFMESH_STAGE_TLS_CA": ca,
                "DIFFMESH_STAGE_TLS_CERT": str(client.cert),
                "DIFFMESH_STAGE_TLS_KEY": "/no/such.key",
            }
        )
    with pytest.raises(ValueError, match="the key is not the certificate's"):
        stage_tls(
            {
                "DIFFMESH_STAGE_TLS_CA": ca,
                "DIFFMESH_STAGE_TLS_CERT": str(client.cert),
                "DIFFMESH_STAGE_TLS_KEY": str(certs["stranger"].key),
            }
        )


def test_diffmesh_serve_with_tls_flags_requires_client_certificates(certs, tmp_path: Path):
    server_pem, client = certs["server"], certs["client"]
    ca_pem = certs["ca"].pem
    port_file = tmp_path / "vae.port"
    cmd = [
        sys.executable,
        "-m",
        "orchestrator.cli",
        "serve",
        "vae",
        "--port",
        "0",
        "--port-file",
        str(port_file),
        "--tls-cert",
        str(server_pem.cert),
        "--tls-key",
        str(server_pem.key),
        "--tls-client-ca",
        str(ca_pem),
    ]
    env = {
        "PATH": "/usr/bin:/bin",
        "DIFFMESH_TOKEN": TOKEN,
        "DIFFMESH_LOCAL_STORE": str(tmp_path / "store"),
        "DIFFMESH_DEVICE": "cpu",
        "DIFFMESH_OFFLINE": "1",
        "HOME": str(tmp_path),
    }
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 120
        while not (port_file.is_file() and port_file.read_text()):
            assert proc.poll() is None, proc.stdout.read().decode()
            assert time.monotonic() < deadline, "diffmesh serve vae did not bind"
            time.sleep(0.1)
        port = int(port_file.read_text())
        ca = ca_pem.read_bytes()
        assert reached(ChannelTls(ca, client.cert_bytes(), client.key_bytes()), port) == (
            grpc.StatusCode.INVALID_ARGUMENT
        )
        assert reached(ChannelTls(ca), port) == grpc.StatusCode.UNAVAILABLE
    finally:
        proc.terminate()
        proc.wait(30)
    assert b"vae serving on 127.0.0.1:" in proc.stdout.read()
