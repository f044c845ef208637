"""A hostile engine (or any client, before its certificate is looked at) against the served TC's
connections: each way it found to hold a connection with no deadline, or to pile up memory, or to
be told a request that ran was refused (found in a review of the httptools protocol, issue 20).
Every test here failed before its fix. The deadlines' basic cases are in tests/test_tc_connections.py."""

from __future__ import annotations

import socket
import ssl
import time

import pytest

from ..conftest import REPO
from ..tcservice import Service
from ..test_tc_connections import OPTIONS, answer, closed_after, flooded, tls


@pytest.fixture(scope="module")
def service(tmp_path_factory):
    served = Service(tmp_path_factory.mktemp("served-tc-held"), str(REPO / "examples"), options=OPTIONS)
    yield served
    served.stop()


def test_a_request_answered_before_its_body_was_read_leaves_the_connection_under_a_deadline(service):
    """A 404 answers before the body is read; the body then arriving used to leave the connection
    with no deadline at all (found in review): it stayed open for as long as its client liked."""
    with tls(service) as sock:
        sock.sendall(b"POST /no/such/route HTTP/1.1\r\nHost: tc\r\nContent-Length: 5\r\n\r\n")
        sock.settimeout(10)
        head = sock.recv(65536)
        assert head.startswith(b"HTTP/1.1 404 "), head[:100]
        sock.sendall(b"abcde")
        assert closed_after(sock) < 10  # 1 s configured for the next request's headers


def test_a_chunked_bodys_trailers_are_held_to_the_heads_size(service):
    """llhttp hands a chunked body's trailer lines to the header callback after the head's check:
    without a count they piled up in memory until the body's deadline."""
    start = (b"POST /v1/requests HTTP/1.1\r\nHost: tc\r\nContent-Type: application/json\r\n"
             b"Transfer-Encoding: chunked\r\n\r\n2\r\n{}\r\n0\r\n")
    assert flooded(service, start, b"a: b\r\n" * 170, 64).startswith(b"HTTP/1.1 431 ")  # 64 KiB of trailers


def test_a_client_that_stops_reading_its_answers_is_cut_at_the_answer_deadline(service):
    """Pipelined requests whose answers are never read: the service's writes stall, and without an
    answer deadline the connection was held for good (found in review)."""
    request = b"GET /openapi.json HTTP/1.1\r\nHost: tc\r\n\r\n"
    with tls(service) as sock:
        sock.settimeout(5)
        try:
            sock.sendall(request * 200)
        except OSError:
            pass
        time.sleep(6)  # past the headers' (1 s), body's (2 s) and answer's (3 s) deadlines
        replies = answer(sock).count(b"HTTP/1.1 200 ")
    assert 0 < replies < 200


def test_bytes_that_are_not_http_after_a_whole_request_leave_that_request_its_true_answer(service):
    """The request before the bad bytes runs (its handler started as its headers ended); the client
    used to get a 400 for it all the same. Now it gets that request's answer, then the close."""
    with tls(service) as sock:
        sock.sendall(b"GET /v1/status HTTP/1.1\r\nHost: tc\r\n\r\n\x00not http\r\n\r\n")
        replies = answer(sock)
    assert replies.startswith(b"HTTP/1.1 200 ") and b"connection: close" in replies.lower(), replies[:300]
    assert b"HTTP/1.1 400 " not in replies


@pytest.mark.parametrize("request_head", [
    b"GET /v1/status HTTP/1.1\r\nHost: tc\r\nConnection: upgrade\r\nUpgrade: h2c\r\n\r\n",
    b"POST /v1/requests HTTP/1.1\r\nHost: tc\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n"
    b"Content-Type: application/json\r\nContent-Length: 2\r\n\r\n{}",
    b"CONNECT tc:443 HTTP/1.1\r\nHost: tc:443\r\n\r\n",
], ids=["get-h2c", "post-websocket", "connect"])
def test_a_request_asking_for_another_protocol_is_refused_before_its_handler_runs(service, request_head):
    """The TC speaks one protocol here: a request asking to switch is refused whole. A GET's
    handler used to run first (the switch is only seen after its headers, when the handler had
    started), so its answer went out and the upgrade passed unremarked."""
    with tls(service) as sock:
        sock.sendall(request_head)
        replies = answer(sock)
    assert replies.startswith(b"HTTP/1.1 400 ") and b"no protocol upgrade here" in replies, replies[:300]
    assert b"HTTP/1.1 200 " not in replies


def test_a_client_without_a_certificate_cannot_borrow_an_engines_connection_by_forwarding_headers(service):
    """The TC looked an engine's certificate up by the request's client address, which uvicorn
    takes from `X-Forwarded-For` when the connection comes from loopback (the TC's default
    listening address, and what any tunnel in front of it delivers): a client without a
    certificate named the engine's connection and was taken for the engine (found in review)."""
    context = ssl.create_default_context(cafile=str(service.engine_dir / "tc-ca.pem"))
    context.load_cert_chain(str(service.engine_dir / "engine-cert.pem"), str(service.engine_dir / "engine-key.pem"))
    raw = socket.create_connection(("127.0.0.1", service.port), timeout=15)
    with context.wrap_socket(raw, server_hostname="127.0.0.1") as engine:
        engine.sendall(b"GET /v1/nodes HTTP/1.1\r\nHost: tc\r\n\r\n")
        engine.settimeout(10)
        assert engine.recv(65536).startswith(b"HTTP/1.1 200 ")  # the engine's connection is open, and known
        host, port = engine.getsockname()
        with tls(service) as stranger:
            stranger.sendall(b"GET /v1/nodes HTTP/1.1\r\nHost: tc\r\nX-Forwarded-For: %s:%d\r\n"
                             b"Forwarded: for=\"%s:%d\"\r\nConnection: close\r\n\r\n" % (host.encode(), port, host.encode(), port))
            replies = answer(stranger)
    assert replies.startswith(b"HTTP/1.1 401 ") and b"auth.engine-certificate" in replies, replies[:300]
