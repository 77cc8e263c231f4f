"""The TLS of a client channel: the CA that verifies the server, and for mutual TLS this client's certificate
and key. When it was read from files (DIFFMESH_STAGE_TLS_*), `TlsSource` reads them again once they change
(a renewed Secret), and the stage clients (orchestrator/clients.py) open their next channel with the new set:
calls already running finish on the old one.

A new set is taken only once the certificate parses and the key is its own (`ssl.load_cert_chain`) and the
CA parses; otherwise it is logged once and the last good set stays in use.
"""

from __future__ import annotations

import logging
import os
import ssl
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

log = logging.getLogger(__name__)
CHECK_EVERY_S = 10.0  # how often a client looks at the files' modification times


@dataclass(frozen=True)
class ChannelTls:
    """TLS of a channel: `ca` (PEM) verifies the server's certificate; `cert` + `key` (PEM) are this client's own
    certificate, for servers that require one (mutual TLS); `server_name` is the name the server's certificate
    must carry when it is not the endpoint's host (e.g. dialing an address); `source`: the files it was read
    from, when it may be read again."""

    ca: bytes
    cert: bytes | None = None
    key: bytes | None = field(default=None, repr=False)
    server_name: str | None = None
    source: TlsSource | None = field(default=None, compare=False, repr=False)

    def __post_init__(self) -> None:
        if (self.cert is None) != (self.key is None):
            raise ValueError("a TLS client certificate and its key go together")


@dataclass(frozen=True)
class TlsFilePaths:
    ca: Path
    cert: Path | None = None
    key: Path | None = None

    def all(self) -> tuple[Path, ...]:
        return tuple(p for p in (self.ca, self.cert, self.key) if p is not None)


def check_pair(cert: bytes, key: bytes) -> None:
    """ssl.SSLError / ValueError unless `key` is the private key of `cert` (both PEM)."""
    with tempfile.TemporaryDirectory(prefix="diffmesh-tls-") as folder:
        (Path(folder) / "cert.pem").write_bytes(cert)
        (Path(folder) / "key.pem").write_bytes(key)
        ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT).load_cert_chain(
            Path(folder) / "cert.pem", Path(folder) / "key.pem"
        )


def check_ca(ca: bytes) -> None:
    ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT).load_verify_locations(cadata=ca.decode("ascii", "replace"))


class TlsSource:
    """The files of a ChannelTls, and the set last read from them."""

    def __init__(self, paths: TlsFilePaths, server_name: str | None = None) -> None:
        self.paths = paths
        self.server_name = server_name
        self.reloads = 0
        self._lock = threading.Lock()
        self._stamp = self._stat()
        self._refused: tuple | None = None
        self._checked = time.monotonic()
        self.current = self._read()  # OSError, or ssl.SSLError / ValueError for a set that does not load

    def _stat(self) -> tuple:
        return tuple((s.st_mtime_ns, s.st_size) for s in (os.stat(p) for p in self.paths.all()))

    def _read(self) -> ChannelTls:
        """The files as a ChannelTls, once the CA parses and the key is the certificate's."""
        ca = self.paths.ca.read_bytes()
        cert = self.paths.cert.read_bytes() if self.paths.cert is not None else None
        key = self.paths.key.read_bytes() if self.paths.key is not None else None
        if cert is not None and key is not None:
            check_pair(cert, key)
        check_ca(ca)
        return ChannelTls(ca, cert, key, self.server_name, source=self)

    def latest(self) -> ChannelTls:
        """The current set, read again first when the files changed (looked at every CHECK_EVERY_S)."""
        with self._lock:
            now = time.monotonic()
            if now - self._checked < CHECK_EVERY_S:
                return self.current
            self._checked = now
            try:
                stamp = self._stat()
            except OSError as e:
                stamp = ("unreadable", str(e))
            if stamp in (self._stamp, self._refused):
                return self.current
            try:
                new = self._read()
            except (OSError, ssl.SSLError, ValueError) as e:
                if stamp != self._refused:
                    log.warning(
                        "TLS files %s changed but do not load (%s); the last good set stays in use",
                        ", ".join(map(str, self.paths.all())),
                        e,
                    )
                self._refused = stamp
                return self.current
            self._stamp, self._refused, self.current = stamp, None, new
            self.reloads += 1
            log.info("TLS: client certificate files %s read again", ", ".join(map(str, self.paths.all())))
            return new
