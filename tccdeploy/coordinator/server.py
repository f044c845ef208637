"""`tccdeploy tc serve`: the API under uvicorn, with TLS from the TC's own CA.

TLS asks every client for a certificate and accepts only ones the TC's CA issued (customers
and health checks may come without one: their routes need none). Uvicorn does not hand the
verified peer certificate to the application, so a small protocol subclass puts the one its
own TLS verified into each request's ASGI scope (api.CLIENT_CERTIFICATE): never looked up by the
client's address, which a proxy header could name.
"""

from __future__ import annotations

import errno
import os
import socket
import ssl
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from .. import logs
from .api import CLIENT_CERTIFICATE, Api
from .identity import CERT_FILE
from .identity import load as load_identity
from .service import Coordinator
from .tls import server_certificate


@dataclass(frozen=True)
class Limits:
    """What one connection may hold of the service, so slow or idle clients cannot starve it."""

    handshake: float = 10.0  # the TLS handshake
    headers: float = 10.0  # a request's headers, whole, from the connection opening or the last response
    body: float = 30.0  # its body, once the headers are in (8 MiB at 300 kB/s)
    answer: float = 120.0  # its answer, from the request's last byte to the response's last byte sent
    per_client: int = 64  # open connections from one address (the engine's fan-out and bench use 32)
    total: int = 2048  # open connections in all (uvicorn answers 503 beyond)
    threads: int = 4  # decisions taken at once, per front (the rest queue in order; see api.Api)
    head: int = 16 * 1024  # a request's line and headers, in bytes (h11's default cap; an engine's are < 1 KiB)


class ConnectionCounts:
    """Open connections per client address, shared by the event loop's protocols (of one process:
    with fronts, each front counts its own)."""

    def __init__(self, limit: int, on_refused: Callable[[], None] = lambda: None) -> None:
        self.limit = limit
        self._open: dict[str, int] = {}
        self.refused = 0
        self._on_refused = on_refused

    def take(self, host: str) -> bool:
        if self._open.get(host, 0) >= self.limit:
            self.refused += 1
            self._on_refused()
            return False
        self._open[host] = self._open.get(host, 0) + 1
        return True

    def give_back(self, host: str) -> None:
        left = self._open.get(host, 0) - 1
        if left > 0:
            self._open[host] = left
        else:
            self._open.pop(host, None)


def protocol_for(limits: Limits = Limits(), counts: ConnectionCounts | None = None) -> type[HttpToolsProtocol]:
    """uvicorn's httptools protocol (llhttp, in C: a third less of the TC's one core a request
    than h11's pure Python), plus: the verified client certificate recorded per connection, a cap
    on connections per client address, a cap on a request's head (llhttp has none: it would
    buffer a header without end), and read deadlines that data trickling in does not extend
    (uvicorn resets its keep-alive timer on every byte and has none before the first request, so
    a slowloris or an idle TLS connection would stay for ever)."""
    import httptools

    shared: ConnectionCounts = counts or ConnectionCounts(limits.per_client)

    class Limited(HttpToolsProtocol):
        _tcc_host: str | None = None
        _tcc_der: bytes | None = None
        _tcc_timer: Any = None
        _tcc_phase = ""
        _tcc_head = 0  # bytes of the request head arrived so far (llhttp buffers them)
        _tcc_in_head = False  # from a request's first byte to the end of its headers

        def connection_made(self, transport) -> None:  # type: ignore[no-untyped-def,override]
            super().connection_made(transport)
            self._tcc_peer = transport.get_extra_info("peername")
            host = str(self._tcc_peer[0]) if self._tcc_peer else ""
            if not shared.take(host):
                transport.abort()  # over this address's share: dropped before anything is read
                return
            self._tcc_host = host
            ssl_object = transport.get_extra_info("ssl_object")
            self._tcc_der = ssl_object.getpeercert(binary_form=True) if ssl_object is not None else None
            self._tcc_arm("headers", limits.headers)

        def connection_lost(self, exc) -> None:  # type: ignore[no-untyped-def]
            self._tcc_arm("", None)
            if self._tcc_host is not None:
                shared.give_back(self._tcc_host)
                self._tcc_host = None
            super().connection_lost(exc)

        def data_received(self, data: bytes) -> None:
            if self.parser is None:  # the connection is being cut
                return
            self._unset_keepalive_if_required()
            try:
                self.parser.feed_data(data)
            except httptools.HttpParserUpgrade:  # the TC speaks no other protocol on this port
                self._tcc_refuse(400, "no protocol upgrade here")
                return
            except httptools.HttpParserError as exc:  # a callback's exception arrives wrapped in one
                if isinstance(exc.__context__, _Upgrade):
                    self._tcc_refuse(400, "no protocol upgrade here")
                elif isinstance(exc.__context__, _HeadTooLarge):
                    self._tcc_refuse(431, "the request's head is larger than the TC takes")
                else:
                    self._tcc_refuse(400, "Invalid HTTP request received.")
                return
            if self._tcc_in_head:
                # all of data may not be head (a pipelined request could have ended in it): the
                # count errs high, never low, and only for pipelined requests
                self._tcc_head += len(data)
                if self._tcc_head > limits.head:
                    self._tcc_refuse(431, "the request's head is larger than the TC takes")

        def on_message_begin(self) -> None:
            super().on_message_begin()
            # The certificate this connection's TLS verified, in the request itself: looked up by
            # the client's address, it was a header away from another connection's (found in review).
            self.scope[CLIENT_CERTIFICATE] = self._tcc_der  # type: ignore[literal-required]
            self._tcc_in_head, self._tcc_head = True, 0

        def on_headers_complete(self) -> None:
            size = len(self.url) + sum(len(name) + len(value) + 4 for name, value in self.headers)
            if size > limits.head:
                raise _HeadTooLarge()
            if self._tcc_upgrade():
                raise _Upgrade()  # here, before uvicorn starts the handler: llhttp's own upgrade error comes after it
            self._tcc_in_head, self._tcc_head = False, 0
            super().on_headers_complete()
            if self._tcc_phase == "headers":
                self._tcc_arm("body", limits.body)

        def on_header(self, name: bytes, value: bytes) -> None:
            if self._tcc_in_head:
                super().on_header(name, value)
                return
            # a chunked body's trailers: llhttp hands them here after the head was checked; the
            # TC reads none of them, and together they are held to the head's size
            self._tcc_head += len(name) + len(value) + 4
            if self._tcc_head > limits.head:
                raise _HeadTooLarge()

        def on_message_complete(self) -> None:
            super().on_message_complete()
            current = self.cycle
            if current is not None and current.response_complete:
                # answered before its body was read (a 404, 405 or 415): the connection now waits
                # for the next request, under the headers' deadline (it had none: a review found it)
                self._tcc_arm("headers", limits.headers)
            elif self._tcc_phase in ("headers", "body"):
                self._tcc_arm("app", limits.answer)  # the request is in: the application's time, and the client's to read

        def on_response_complete(self) -> None:
            super().on_response_complete()
            if self.transport.is_closing():
                return
            current = self.cycle
            if current is not None and not current.response_complete:  # a pipelined request started
                self._tcc_arm("body", limits.body) if current.more_body else self._tcc_arm("app", limits.answer)
            else:
                self._tcc_arm("headers", limits.headers)

        def _tcc_upgrade(self) -> bool:
            """The request asks to switch protocols (`Connection: upgrade`, RFC 9110 7.8) or for a
            tunnel (CONNECT, which llhttp handles as an upgrade)."""
            return self.parser.get_method() == b"CONNECT" or any(name == b"connection" and b"upgrade" in (t.strip().lower() for t in value.split(b","))
                       for name, value in self.headers)

        def _tcc_refuse(self, status: int, message: str) -> None:
            """Answer status and close: nothing of the bad request reached the application. When a
            whole request came before the bad bytes, its handler is already running: its answer is
            the one sent (a refusal in its place would tell the client a request that ran was
            refused; found in review), then the connection closes; nothing after it runs."""
            from http import HTTPStatus

            current = self.cycle
            if current is not None and not current.more_body and not current.response_complete:
                current.keep_alive = False  # its answer says `connection: close`, and closes
                self.pipeline.clear()
                self.parser = None  # type: ignore[assignment]
                return

            reason = HTTPStatus(status).phrase.encode()
            body = message.encode()
            self.transport.write(b"HTTP/1.1 %d %s\r\ncontent-type: text/plain; charset=utf-8\r\ncontent-length: %d\r\n"
                                 b"connection: close\r\n\r\n%s" % (status, reason, len(body), body))
            self._tcc_arm("", None)
            self.parser = None  # type: ignore[assignment]
            self.transport.close()

        def _tcc_arm(self, phase: str, seconds: float | None) -> None:
            if self._tcc_timer is not None:
                self._tcc_timer.cancel()
                self._tcc_timer = None
            self._tcc_phase = phase
            if seconds is not None:
                self._tcc_timer = self.loop.call_later(seconds, self._tcc_expire)

        def _tcc_expire(self) -> None:
            # abort, not close: a TLS close waits for the peer's close_notify (30 s), which a
            # client that stopped talking never sends; so even a closing connection is cut here
            self._tcc_timer = None
            if self.cycle is not None and not self.cycle.response_complete:
                self.cycle.disconnected = True
            self.transport.abort()

        def shutdown(self) -> None:
            """On SIGTERM: a connection between requests is cut at once (uvicorn's TLS close would
            wait for idle clients' close_notify and hold the service's exit); one in a request
            finishes it first, as uvicorn does."""
            if self.cycle is None or self.cycle.response_complete:
                self._tcc_arm("", None)
                self.transport.abort()
            else:
                super().shutdown()

    return Limited


class _Upgrade(Exception):
    """Raised from the parser's callback: the request asks for another protocol."""


class _HeadTooLarge(Exception):
    """Raised from the parser's callback: the request's head passed Limits.head."""


class _Server:
    """uvicorn's server with a deadline on the TLS handshake (asyncio's default is 60 s)."""

    @staticmethod
    def make(config: Any, handshake: float) -> Any:
        import asyncio

        import uvicorn

        class Server(uvicorn.Server):
            async def startup(self, sockets: Any = None) -> None:
                loop = asyncio.get_running_loop()
                create = loop.create_server

                async def create_server(*args: Any, **kwargs: Any) -> Any:
                    if kwargs.get("ssl") is not None:
                        kwargs.setdefault("ssl_handshake_timeout", handshake)
                    return await create(*args, **kwargs)

                loop.create_server = create_server  # type: ignore[method-assign]
                try:
                    await super().startup(sockets)
                finally:
                    del loop.create_server

        return Server(config)


SWEEP_INTERVAL = 30.0


def _sweep(coordinator: Coordinator, stop: threading.Event) -> None:
    """Expire key releases no launch settled (each audited), on the TC's own time, so a request
    whose release was lost does not wait for somebody to ask about it."""

    while not stop.wait(SWEEP_INTERVAL):
        try:
            for request in coordinator.expire_releases():
                logs.emit("release.expired", f"tc serve: the key release of request {request} expired unused; it is "
                          "accepted again", request=request)
        except Exception as exc:  # noqa: BLE001 - the store is down: the next round tries again
            logs.emit("store.failed", f"tc serve: expiring releases failed ({type(exc).__name__}); trying again in "
                      f"{SWEEP_INTERVAL:g} s", "warning", error=type(exc).__name__)


WEBHOOK_INTERVAL = 0.5


def _deliver(coordinator: Coordinator, stop: threading.Event, interval: float = WEBHOOK_INTERVAL) -> None:
    """Deliver webhooks' events while the TC serves (webhooks.py: in order, at least once)."""

    from . import webhooks

    deliverer = webhooks.Deliverer(coordinator.registry, f"urn:tccdeploy:tc:{coordinator.identity().fingerprint}",
                                   owner=webhooks.owner_name(),
                                   first_backoff=float(os.environ.get("TCCDEPLOY_WEBHOOK_BACKOFF", webhooks.BACKOFF_FIRST)))
    warned = False
    while not stop.wait(interval):
        try:
            deliverer.round()
            warned = False
        except Exception as exc:  # noqa: BLE001 - the store is down: the next round tries again
            if not warned:
                logs.emit("webhooks.failed", f"tc serve: delivering webhooks failed ({type(exc).__name__}); trying again",
                          "warning", error=type(exc).__name__)
                warned = True
    try:
        deliverer.release()
    except Exception:  # noqa: BLE001 - the lease then runs out by itself
        pass


def event_loop() -> str:
    """uvloop where installed (its TLS and sockets cost the TC's one core a tenth less per
    request than asyncio's, measured by bench/tc_service.py), else asyncio."""
    try:
        import uvloop  # noqa: F401
    except ImportError:
        return "asyncio"
    return "uvloop"


def serve(coordinator: Coordinator, host: str, port: int, names: list[str], log_level: str = "warning",
          manifests: list[str] | None = None, limits: Limits = Limits(), fronts: int = 0,
          listening: Callable[[], None] = lambda: None) -> int:
    """Serve until SIGINT/SIGTERM (uvicorn's handling: in-flight requests finish). SIGHUP reloads
    the manifests, so a build revoked in them is refused from the next attestation on. With
    fronts, TLS and HTTP run in that many other processes and this one takes the decisions
    (fronts.py); with none, all in this one."""
    import signal

    def reload(signum: int, frame: object) -> None:
        from ..manifest.loader import load_paths

        result = load_paths(manifests or [])
        if result.perimeter is None or result.errors:
            logs.emit("manifests.invalid", f"tc serve: SIGHUP: the manifests do not validate ({len(result.errors)} "
                      "error(s)); kept the ones in force (run `tccdeploy validate` on them)", "warning",
                      errors=len(result.errors))
            return
        coordinator.reload(result)
        logs.emit("manifests.reloaded", f"tc serve: SIGHUP: reloaded {len(result.builds)} build(s) and perimeter "
                  f"{result.perimeter.name}", builds=len(result.builds), perimeter=result.perimeter.name)

    if manifests:
        signal.signal(signal.SIGHUP, reload)

    identity = load_identity(coordinator.state)
    key_file, cert_file = server_certificate(identity, os.path.join(coordinator.state, "tls"), [host, *names])
    files = {"key": key_file, "certificate": cert_file, "ca": os.path.join(coordinator.state, CERT_FILE)}
    listeners = _listen(host, port, max(1, fronts))
    listening()
    sweeper = threading.Thread(target=_sweep, args=(coordinator, threading.Event()), name="tc-expiry", daemon=True)
    sweeper.start()
    delivering = threading.Event()
    deliverer = threading.Thread(target=_deliver, args=(coordinator, delivering), name="tc-webhooks", daemon=True)
    deliverer.start()
    try:
        if fronts:
            return _serve_from_fronts(coordinator, listeners, files, log_level, limits)
        serve_api(coordinator, listeners[0], files, log_level, limits)
        return 0
    finally:
        for listener in listeners:
            listener.close()
        delivering.set()  # a clean stop hands the webhooks' leases back
        deliverer.join(timeout=12)


class ListenError(Exception):
    """The service cannot listen where it was told to: said with the address and what to do."""


def _listen(host: str, port: int, count: int) -> list[socket.socket]:
    try:
        return _bind(host, port, count)
    except OSError as exc:
        what = exc.strerror or str(exc)
        hint = ("another process holds it (`ss -ltnp` names it); stop it or choose another port with --listen"
                if exc.errno == errno.EADDRINUSE else "check the address in --listen")
        raise ListenError(f"cannot listen on {host}:{port}: {what}; {hint}") from None


def _bind(host: str, port: int, count: int) -> list[socket.socket]:
    """The listening sockets, made here (not by uvicorn) so front processes can inherit them: one
    per front, on the same port with SO_REUSEPORT, so the kernel spreads connections over the
    fronts (on one shared socket the front that waited first takes nearly all of them). The host
    is resolved to its first address (a name for several, such as localhost, serves the first)."""
    family, _, _, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)[0]
    if count == 1:
        return [socket.create_server(address[:2], family=family, backlog=2048)]
    _hold_port(family, address)
    made: list[socket.socket] = []
    try:
        for _ in range(count):
            made.append(socket.create_server(address[:2], family=family, backlog=2048, reuse_port=True))
    except OSError:
        for s in made:
            s.close()
        raise
    return made


_PORT_HOLDS: list[socket.socket] = []


def _hold_port(family: int, address: tuple[Any, ...]) -> None:
    """SO_REUSEPORT lets any process of this user bind the port beside the fronts and take a share
    of the connections (a stale `tc serve`, a second TC): one name per address in the abstract
    socket namespace, held for the process's life, makes the second one fail as a plain bind does."""
    hold = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        hold.bind(f"\0tccdeploy-tc-serve-{family}-{address[0]}-{address[1]}")
    except OSError:
        hold.close()
        raise OSError(errno.EADDRINUSE, f"another tc serve listens on {address[0]}:{address[1]}") from None
    _PORT_HOLDS.append(hold)


def freeze_heap(metrics: Any, process: str) -> None:
    """Move what the process holds once started (modules, manifests, schemas, keys: tens of
    thousands of objects) out of the collector's sight, so a full collection while serving scans
    only what came after. Why: each full collection of the started heap stopped every thread of the
    process 17-25 ms, and every decision in flight waited it out (bench/tc_service.py, served
    PostgreSQL releases: p99 108 and 140 ms against 96 and 125 ms frozen, in alternating probes;
    the collections while serving took 0.6-0.7 ms). Counted in /metrics as the objects frozen."""
    import gc

    gc.collect()
    gc.freeze()
    metrics.count("tccdeploy_gc_frozen_objects_total", float(gc.get_freeze_count()), process=process)


def _serve_from_fronts(coordinator: Coordinator, listeners: list[socket.socket], files: dict[str, str],
                       log_level: str, limits: Limits) -> int:
    import signal

    from .fronts import Fronts, front_options

    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda signum, frame: stop.set())
    fronts = Fronts(coordinator, listeners, limits.threads, front_options(files, log_level, limits))
    freeze_heap(fronts.metrics, "decisions")
    return fronts.wait(stop, grace=limits.answer + limits.body)  # a stopping front finishes its answers


def serve_api(tc: Any, listener: socket.socket, files: dict[str, str], log_level: str, limits: Limits,
              metrics: Any = None) -> None:
    """The API over tc (the Coordinator, or a front's fronts.Remote) on listener, until SIGINT/SIGTERM;
    metrics: where its counts go (a front's fronts.FrontMetrics), else the API's own."""
    import signal

    import uvicorn

    # uvicorn raises SIGTERM/SIGINT again after its graceful stop; a Python handler takes it, so
    # the caller's cleanup (the webhooks' leases, a front's last metrics) runs
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda signum, frame: None)
    api = Api(tc, threads=limits.threads)
    if metrics is not None:
        api.metrics = metrics
    refused = "tccdeploy_connections_refused_total"
    api.metrics.count(refused, 0.0)
    freeze_heap(api.metrics, "front" if metrics is not None else "tc serve")
    counts = ConnectionCounts(limits.per_client, on_refused=lambda: api.metrics.count(refused))
    config = uvicorn.Config(
        api.app(), http=protocol_for(limits, counts), log_level=log_level, access_log=False,
        ssl_keyfile=files["key"], ssl_certfile=files["certificate"], ssl_ca_certs=files["ca"],
        ssl_cert_reqs=ssl.CERT_OPTIONAL, lifespan="off", timeout_keep_alive=int(limits.headers), loop=event_loop(),
        limit_concurrency=limits.total,
        log_config=None if logs.is_json() else uvicorn.config.LOGGING_CONFIG,
        proxy_headers=False,  # no proxy is trusted: a client's address is its connection's, never a header's
    )
    _Server.make(config, limits.handshake).run(sockets=[listener])
