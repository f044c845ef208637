"""Keep-alive HTTPS to the TC for the engine's and the customer's clients: the standard
library's http.client over the pinned TLS context, a few idle connections kept per TC.

Why not a general HTTP client library: an engine asks the TC for a nonce, a verdict or a key
release per node and operation, and at fleet scale the client's own CPU per call is a share of
what the engine's machine spends (bench/tc_service.py: httpx spent about 0.4 ms of CPU a call in
the client, http.client 0.13 ms; 32 clients shared the machine's two cores with the TC, and the
served TC's throughput rose with what the clients gave back). The TC's API needs none of what
such a library adds (redirects, cookies, proxies, content decoding, HTTP/2): one JSON body out,
one back, on a connection kept open.

A connection opened after others (the TC closed one as idle, or the engine's threads need
more) offers a TLS 1.3 session ticket an earlier connection to that TC received, each ticket
once (RFC 8446's advice; it also never has two handshakes share one): the TC resumes the
session instead of a full handshake, so neither side signs or checks a certificate again
(bench/tc_service.py: the TC's CPU for a new connection and a call halves).
What a ticket resumes is only the TC's own session: a server without the TC's ticket key cannot
accept it and must show a certificate the pinned CA signed, as on a first connection.
"""

from __future__ import annotations

import http.client
import json
import select
import ssl
import threading
from collections.abc import Callable
from typing import Any
from urllib.parse import quote, urlsplit

from .. import __version__

# Idle connections kept per TC: as many as an engine's forks use at once (its default 10; 32
# clients in the benchmarks); one past it is closed as it comes back, not reopened per call.
IDLE_KEPT = 64
# The largest answer read: well above the largest listing a TC sends (10,000 nodes' records are a
# few MB), far below what a length the TC's side states would make this process allocate.
MAX_ANSWER = 256 << 20
_CHUNK = 1 << 20
_UNQUOTED = "/?=&%:@!$'()*+,;-._~"  # a path's and a query's own punctuation; anything else percent-encoded


class TransportError(OSError):
    """The TC could not be reached, or the connection failed before a whole answer came."""


class Answer:
    """A TC's whole answer: status, headers (names in lower case), body."""

    __slots__ = ("status_code", "headers", "content")

    def __init__(self, status_code: int, headers: dict[str, str], content: bytes) -> None:
        self.status_code = status_code
        self.headers = headers
        self.content = content

    def json(self) -> Any:
        return json.loads(self.content)

    @property
    def text(self) -> str:
        return self.content.decode("utf-8", errors="replace")


class _Connection(http.client.HTTPSConnection):
    """An HTTPS connection whose handshake offers a session (None: a full handshake), and says
    each handshake it made to handshake(resumed)."""

    def __init__(self, host: str, port: int, context: ssl.SSLContext, timeout: float,
                 session: ssl.SSLSession | None, handshake: Callable[[bool], None]) -> None:
        super().__init__(host, port, context=context, timeout=timeout)
        self.tls_context, self.offered, self._handshake = context, session, handshake
        self.tls: ssl.SSLSocket | None = None
        self.resumed_from: ssl.SSLSession | None = None
        self.fresh = False  # handshook, its session not yet looked at for a ticket to keep

    def connect(self) -> None:
        http.client.HTTPConnection.connect(self)  # (TCP; no proxy tunnel: the TC is reached directly)
        session, self.offered = self.offered, None  # (a ticket is offered once)
        self.sock = self.tls = self.tls_context.wrap_socket(self.sock, server_hostname=self.host, session=session)
        resumed = bool(self.tls.session_reused)
        self.resumed_from = session if resumed else None
        self.fresh = True
        self._handshake(resumed)

    def new_ticket(self) -> ssl.SSLSession | None:
        """The session to keep for a later connection, if the TC gave this one a ticket of its
        own. Asked once the answer's head came (TLS 1.3 sends tickets after the handshake, before
        any answer) and before its body is read (after that, a connection the TC closes has
        forgotten its session)."""
        self.fresh = False
        session = self.tls.session if self.tls is not None else None
        if session is None or not session.has_ticket:
            return None
        if self.resumed_from is not None and session == self.resumed_from:
            return None  # resumed, and no new ticket came: what it holds is the ticket just spent
        return session


class Transport:
    """Thread-safe: a call takes an idle connection to its TC (or opens one), and gives it back
    once the whole answer was read and the TC did not ask to close it. `handshakes` counts the
    TLS handshakes its connections made: "full" and "resumed"."""

    def __init__(self, context: ssl.SSLContext, timeout: float) -> None:
        self.context = context
        self.timeout = timeout
        self._idle: dict[tuple[str, int], list[_Connection]] = {}
        self._tickets: dict[tuple[str, int], list[ssl.SSLSession]] = {}  # unused ones, each for one handshake
        self._lock = threading.Lock()
        self._closed = False
        self.handshakes = {"full": 0, "resumed": 0}

    def request(self, method: str, url: str, body: Any = None) -> Answer:
        """method url with body as JSON (None: no body); TransportError when no whole answer came."""
        parts = urlsplit(url)
        if parts.scheme != "https" or not parts.hostname or not parts.hostname.isascii():
            raise TransportError(f"{url!r} is not an https:// URL with an ASCII host name")
        where = (parts.hostname, 443 if parts.port is None else parts.port)
        # A name with a space or a letter outside ASCII, as a user typed it, goes as the TC's API
        # reads it (percent-encoded), not as a request http.client refuses to send.
        target = quote((parts.path or "/") + (f"?{parts.query}" if parts.query else ""), safe=_UNQUOTED)
        headers = {"user-agent": f"tccdeploy/{__version__}", "accept": "application/json"}
        content = None
        if body is not None:
            content = json.dumps(body, separators=(",", ":")).encode()
            headers["content-type"] = "application/json"
        connection = self._take(where)
        try:
            connection.request(method, target, body=content, headers=headers)
            response = connection.getresponse()
            ticket = connection.new_ticket() if connection.fresh else None
            answer = Answer(response.status, {k.lower(): v for k, v in response.getheaders()}, _read(response))
        except (OSError, http.client.HTTPException) as exc:
            connection.close()
            raise TransportError(f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__) from None
        except BaseException:
            connection.close()  # (in whatever state the call left it: never back in the pool)
            raise
        if ticket is not None:
            self._keep(where, ticket)
        if response.will_close:
            connection.close()
        else:
            self._give_back(where, connection)
        return answer

    def close(self) -> None:
        with self._lock:
            self._closed = True
            idle, self._idle = self._idle, {}
            self._tickets.clear()
        for connections in idle.values():
            for connection in connections:
                connection.close()

    def _take(self, where: tuple[str, int]) -> _Connection:
        while True:
            with self._lock:
                idle = self._idle.get(where)
                connection = idle.pop() if idle else None
                tickets = self._tickets.get(where) if connection is None else None
                session = tickets.pop() if tickets else None
            if connection is None:
                return _Connection(where[0], where[1], self.context, self.timeout, session, self._count)
            if _still_open(connection):
                return connection
            connection.close()  # the TC closed it while idle (past its keep-alive deadline)

    def _count(self, resumed: bool) -> None:
        with self._lock:
            self.handshakes["resumed" if resumed else "full"] += 1

    def _keep(self, where: tuple[str, int], ticket: ssl.SSLSession) -> None:
        """A ticket for a later connection to this TC (after a whole answer came on the connection
        that received it)."""
        with self._lock:
            if self._closed:
                return
            tickets = self._tickets.setdefault(where, [])
            if len(tickets) < IDLE_KEPT:
                tickets.append(ticket)

    def _give_back(self, where: tuple[str, int], connection: _Connection) -> None:
        with self._lock:
            idle = self._idle.setdefault(where, [])
            if not self._closed and len(idle) < IDLE_KEPT:
                idle.append(connection)
                return
        connection.close()


def _read(response: http.client.HTTPResponse) -> bytes:
    """The whole body, in chunks (http.client reads a stated length in one allocation of that
    size), refused past MAX_ANSWER."""
    stated = response.getheader("content-length")
    if stated is not None and stated.isdigit() and int(stated) > MAX_ANSWER:
        raise TransportError(f"the answer is {int(stated)} bytes, more than the {MAX_ANSWER} a TC's answer may be")
    chunks, size = [], 0
    while chunk := response.read(_CHUNK):
        size += len(chunk)
        if size > MAX_ANSWER:
            raise TransportError(f"the answer is more than the {MAX_ANSWER} bytes a TC's answer may be")
        chunks.append(chunk)
    return b"".join(chunks)


def _still_open(connection: http.client.HTTPSConnection) -> bool:
    """An idle connection with something to read has been closed by the TC (or carries bytes no
    request asked for): either way not one to send on. (poll, not select: select fails on a
    descriptor past 1,023, and an engine with many files open would lose every kept connection.)"""
    sock = connection.sock
    if sock is None:
        return False
    poller = select.poll()
    try:
        poller.register(sock, select.POLLIN)
        return not poller.poll(0)
    except (OSError, ValueError):
        return False
