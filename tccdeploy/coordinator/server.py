"""`tccdeploy tc serve`: the API under uvicorn, with TLS from the TC's own CA.

TLS asks every client for a certificate and accepts only ones the TC's CA issued (customers
and health checks may come without one: their routes need none). Uvicorn does not hand the
verified peer certificate to the application, so a small protocol subclass records it per
connection, keyed by the client's address, where the API looks it up.
"""

from __future__ import annotations

import os
import ssl
import threading
from typing import Any

from uvicorn.protocols.http.h11_impl import H11Protocol

from .api import Api
from .identity import CERT_FILE
from .identity import load as load_identity
from .service import Coordinator
from .tls import server_certificate


class PeerCertificates:
    """Verified client certificates (DER) of the open connections, by (host, port)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._by_peer: dict[tuple[str, int], bytes] = {}

    def set(self, peer: tuple[str, int] | None, der: bytes | None) -> None:
        if peer is None:
            return
        with self._lock:
            if der:
                self._by_peer[peer] = der
            else:
                self._by_peer.pop(peer, None)

    def get(self, peer: Any) -> bytes | None:
        if not peer:
            return None
        with self._lock:
            return self._by_peer.get((str(peer[0]), int(peer[1])))


def protocol_for(peers: PeerCertificates) -> type[H11Protocol]:
    class CertificateAwareH11(H11Protocol):
        def connection_made(self, transport) -> None:  # type: ignore[no-untyped-def,override]
            super().connection_made(transport)
            ssl_object = transport.get_extra_info("ssl_object")
            der = ssl_object.getpeercert(binary_form=True) if ssl_object is not None else None
            self._tcc_peer = transport.get_extra_info("peername")
            if self._tcc_peer:
                peers.set((str(self._tcc_peer[0]), int(self._tcc_peer[1])), der)

        def connection_lost(self, exc) -> None:  # type: ignore[no-untyped-def]
            peer = getattr(self, "_tcc_peer", None)
            if peer:
                peers.set((str(peer[0]), int(peer[1])), None)
            super().connection_lost(exc)

    return CertificateAwareH11


SWEEP_INTERVAL = 30.0


def _sweep(coordinator: Coordinator, stop: threading.Event) -> None:
    """Expire key releases no launch settled (each audited), on the TC's own time, so a request
    whose release was lost does not wait for somebody to ask about it."""
    import sys

    while not stop.wait(SWEEP_INTERVAL):
        try:
            for request in coordinator.expire_releases():
                print(f"tc serve: the key release of request {request} expired unused; it is accepted again",
                      file=sys.stderr, flush=True)
        except Exception as exc:  # noqa: BLE001 - the store is down: the next round tries again
            print(f"tc serve: expiring releases failed ({type(exc).__name__}); trying again in {SWEEP_INTERVAL:g} s",
                  file=sys.stderr, flush=True)


def serve(coordinator: Coordinator, host: str, port: int, names: list[str], log_level: str = "warning",
          manifests: list[str] | None = None) -> None:
    """Serve until SIGINT/SIGTERM (uvicorn's handling: in-flight requests finish). SIGHUP reloads
    the manifests, so a build revoked in them is refused from the next attestation on."""
    import signal
    import sys

    import uvicorn

    def reload(signum: int, frame: object) -> None:
        from ..manifest.loader import load_paths

        result = load_paths(manifests or [])
        if result.perimeter is None or result.errors:
            print(f"tc serve: SIGHUP: the manifests do not validate ({len(result.errors)} error(s)); kept the ones "
                  "in force (run `tccdeploy validate` on them)", file=sys.stderr, flush=True)
            return
        coordinator.reload(result)
        print(f"tc serve: SIGHUP: reloaded {len(result.builds)} build(s) and perimeter {result.perimeter.name}",
              file=sys.stderr, flush=True)

    if manifests:
        signal.signal(signal.SIGHUP, reload)

    sweeper = threading.Thread(target=_sweep, args=(coordinator, threading.Event()), name="tc-expiry", daemon=True)
    sweeper.start()
    identity = load_identity(coordinator.state)
    key_file, cert_file = server_certificate(identity, os.path.join(coordinator.state, "tls"), [host, *names])
    peers = PeerCertificates()
    api = Api(coordinator, peers.get)
    config = uvicorn.Config(
        api.app(), host=host, port=port, http=protocol_for(peers), log_level=log_level, access_log=False,
        ssl_keyfile=key_file, ssl_certfile=cert_file, ssl_ca_certs=os.path.join(coordinator.state, CERT_FILE),
        ssl_cert_reqs=ssl.CERT_OPTIONAL, lifespan="off", timeout_keep_alive=30,
    )
    server = uvicorn.Server(config)
    server.run()
