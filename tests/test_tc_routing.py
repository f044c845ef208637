"""The served API's dispatch (coordinator/routing.py): what Starlette's router answered, without
trying fifty patterns a request."""

from __future__ import annotations

import asyncio

import pytest
from starlette.responses import JSONResponse

from tccdeploy.coordinator.routing import Dispatch, pattern


def endpoint(tag: str):  # type: ignore[no-untyped-def]
    async def answer(request):  # type: ignore[no-untyped-def]
        return JSONResponse({"tag": tag, "params": dict(request.path_params)})

    return answer


APP = Dispatch([("GET", "/v1/nodes", endpoint("nodes")), ("GET", "/v1/nodes/{name}", endpoint("node")),
                ("POST", "/v1/nodes/{name}/quarantine", endpoint("quarantine")),
                ("POST", "/v1/requests/{id}/release", endpoint("release")), ("POST", "/v1/leases", endpoint("lease")),
                ("GET", "/v1/requests/{id}", endpoint("request"))])


def call(method: str, path: str) -> tuple[int, dict[bytes, bytes], bytes]:
    sent: list[dict] = []  # type: ignore[type-arg]

    async def receive():  # type: ignore[no-untyped-def]
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message):  # type: ignore[no-untyped-def]
        sent.append(message)

    scope = {"type": "http", "method": method, "path": path, "headers": [], "query_string": b""}
    asyncio.run(APP(scope, receive, send))
    return sent[0]["status"], dict(sent[0]["headers"]), b"".join(m.get("body", b"") for m in sent[1:])


def test_fixed_and_templated_paths_reach_their_endpoint_with_parameters():
    assert call("GET", "/v1/nodes")[2] == b'{"tag":"nodes","params":{}}'
    assert call("GET", "/v1/nodes/n1")[2] == b'{"tag":"node","params":{"name":"n1"}}'
    assert call("POST", "/v1/nodes/n 1/quarantine")[2] == b'{"tag":"quarantine","params":{"name":"n 1"}}'
    assert call("POST", "/v1/requests/ab/release")[2] == b'{"tag":"release","params":{"id":"ab"}}'


def test_a_parameter_is_one_segment_and_the_whole_path_must_match():
    assert call("GET", "/v1/nodes/a/b")[0] == 404
    assert call("GET", "/v1/nodes/")[0] == 404
    assert call("GET", "/v1/nodesX")[0] == 404
    assert call("GET", "/v1/requests/1/releaseX")[0] == 404
    assert call("GET", "/x/v1/nodes/n1")[0] == 404


def test_another_method_is_a_405_naming_the_allowed_ones_and_head_is_get():
    status, headers, _ = call("DELETE", "/v1/nodes/n1")
    assert status == 405 and headers[b"allow"] == b"GET, HEAD"
    status, headers, _ = call("GET", "/v1/leases")
    assert status == 405 and headers[b"allow"] == b"POST"
    assert call("HEAD", "/v1/nodes")[0] == 200


def test_a_route_given_twice_is_refused_at_start():
    with pytest.raises(ValueError, match="routed twice"):
        Dispatch([("GET", "/a/{x}", endpoint("1")), ("GET", "/a/{x}", endpoint("2"))])


def test_pattern_escapes_the_fixed_parts():
    assert pattern("/v1/a.b/{id}").fullmatch("/v1/a.b/7")
    assert not pattern("/v1/a.b/{id}").fullmatch("/v1/aXb/7")
