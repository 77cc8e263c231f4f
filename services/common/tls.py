"""A service's TLS: its certificate and key (and, for mutual TLS, the CA its clients' certificates must chain
to), read from files and read again when they change, so a rotated certificate (cert-manager renewing a
mounted Secret, which Kubernetes swaps in atomically) is served without a restart.

gRPC asks for the configuration at each new connection's handshake; the files are only stat()ed then, and
read again when one's size or modification time moved. A new set is used only once it loads as a matching
certificate and key (`ssl.SSLContext.load_cert_chain`): a half-written rotation, or a key that does not match
its certificate, is logged and the previous set stays in use. Connections already open keep their session.
"""

from __future__ import annotations

import logging
import os
import ssl
import tempfile
import threading
from dataclasses import dataclass
from pathlib import Path

import grpc

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TlsFiles:
    cert: Path
    key: Path
    client_ca: Path | None = None  # set: mutual TLS, clients must present a cert signed by it

    def paths(self) -> tuple[Path, ...]:
        return (self.cert, self.key) if self.client_ca is None else (self.cert, self.key, self.client_ca)


def _stamp(tls: TlsFiles) -> tuple[tuple[int, int], ...]:
    stats = [os.stat(p) for p in tls.paths()]
    return tuple((s.st_mtime_ns, s.st_size) for s in stats)


def _load(tls: TlsFiles) -> grpc.ServerCertificateConfiguration:
    """The files as a gRPC configuration, once they load as a matching pair (OSError / ssl.SSLError if not)."""
    cert, key = tls.cert.read_bytes(), tls.key.read_bytes()
    ca = tls.client_ca.read_bytes() if tls.client_ca is not None else None
    with tempfile.TemporaryDirectory(prefix="diffmesh-tls-") as folder:  # the very bytes gRPC will get
        (Path(folder) / "cert.pem").write_bytes(cert)
        (Path(folder) / "key.pem").write_bytes(key)
        ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER).load_cert_chain(
            Path(folder) / "cert.pem", Path(folder) / "key.pem"
        )  # they parse, and the key is the certificate's
    if ca is not None:
        ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER).load_verify_locations(cadata=ca.decode("ascii", "replace"))
    return grpc.ssl_server_certificate_configuration([(key, cert)], root_certificates=ca)


class ReloadingCredentials:
    """Server credentials whose certificate configuration follows the files (see the module's text)."""

    def __init__(self, tls: TlsFiles) -> None:
        self.tls = tls
        self._lock = threading.Lock()
        self._stamp = _stamp(tls)
        self._refused: tuple[tuple[int, int], ...] | None = None
        initial = _load(tls)  # a bad set at start is the caller's error, not a log line
        self.credentials = grpc.dynamic_ssl_server_credentials(
            initial, self._fetch, require_client_authentication=tls.client_ca is not None
        )

    def _fetch(self) -> grpc.ServerCertificateConfiguration | None:
        """Called by gRPC at each handshake: a new configuration, or None to keep the current one."""
        with self._lock:
            try:
                stamp = _stamp(self.tls)
            except OSError as e:
                log.warning("TLS files: cannot stat them (%s); the current certificate stays in use", e)
                return None
            if stamp in (self._stamp, self._refused):
                return None
            try:
                config = _load(self.tls)
            except (OSError, ssl.SSLError, ValueError) as e:
                self._refused = stamp  # logged once per change, not at every handshake
                log.warning(
                    "TLS files %s changed but do not load (%s); the current certificate stays in use",
                    ", ".join(map(str, self.tls.paths())),
                    e,
                )
                return None
            self._stamp, self._refused = stamp, None
            log.info("TLS: certificate %s reloaded", self.tls.cert)
            return config
