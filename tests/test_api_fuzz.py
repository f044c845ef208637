"""No input makes the served TC fail (issue 15): hypothesis over the routes and body schemas of
its own OpenAPI document (bodies shaped by each schema, the same with one value swapped for a
hostile one, and arbitrary hostile JSON; hostile path segments and query parameters), plus the
cases found by hand (the audit-poisoning request and its variants, nesting, surrogates, NUL,
integers beyond 64 bits). On SQLite and PostgreSQL: no answer is a 5xx, and afterwards the
audit chain verifies and the database is intact."""

from __future__ import annotations

import base64
import datetime
import json
import os
import secrets
import sqlite3
import subprocess
from typing import Any
from urllib.parse import quote

import httpx
import pytest
from cryptography.hazmat.primitives.asymmetric import ed25519
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tccdeploy.crypto import customer
from tccdeploy.crypto.canonical import PLACEMENT_REQUEST, SEALED_IMAGE, signed_bytes

from .conftest import REPO
from .tcservice import BIN, Service

SCALARS = st.one_of(
    st.none(), st.booleans(), st.integers(min_value=-(2**80), max_value=2**80),
    st.floats(allow_nan=False, allow_infinity=False),
    st.text(max_size=40),  # any code point, lone surrogates and NUL included
    st.sampled_from(["", "\x00", "\ud800", "\udfff", "a" * 5000, "../../etc/passwd", "0" * 64, "n1", "-1"]),
)
JSON = st.recursive(SCALARS, lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner,
                                                                                          max_size=4), max_leaves=16)
SEGMENTS = st.one_of(
    st.sampled_from(["n1", "1", "0", "-1", str(2**64), str(2**70), "a%00b", "%ED%A0%80", "%FF", "..", "x" * 600,
                     "0" * 32, "web-1", "%2e%2e"]),
    st.text(max_size=20).map(lambda t: quote(t.encode("utf-8", "surrogatepass"), safe="")),
)
QUERY_KEYS = ["node", "vm", "since", "all", "state", "attestation", "limit"]


def _swap(value: Any, data: st.DataObject) -> Any:
    """value with one of its leaves (or itself) replaced by hostile JSON."""
    if isinstance(value, dict) and value and data.draw(st.booleans()):
        key = data.draw(st.sampled_from(sorted(value)))
        return {**value, key: _swap(value[key], data)}
    if isinstance(value, list) and value and data.draw(st.booleans()):
        index = data.draw(st.integers(0, len(value) - 1))
        return [*value[:index], _swap(value[index], data), *value[index + 1:]]
    return data.draw(JSON)


@pytest.fixture(scope="module", params=["sqlite", pytest.param("postgresql", marks=pytest.mark.slow)])
def served(request, tmp_path_factory):
    registry = None
    if request.param == "postgresql":
        registry = request.getfixturevalue("postgres").new_database()
    service = Service(tmp_path_factory.mktemp(f"fuzz-{request.param}"), str(REPO / "examples"), registry=registry)
    service.registry = registry  # type: ignore[attr-defined]
    with service.client(cert=False) as client:
        service.openapi = client.get("/openapi.json").json()  # type: ignore[attr-defined]
    yield service
    service.stop()


def _routes(openapi: dict[str, Any]) -> list[tuple[str, str, dict[str, Any] | None]]:
    schemas = openapi["components"]["schemas"]
    routes = []
    for path, ops in openapi["paths"].items():
        for method, op in ops.items():
            ref = (op.get("requestBody") or {}).get("content", {}).get("application/json", {}).get("schema", {}).get("$ref")
            routes.append((method.upper(), path, schemas[ref.rsplit("/", 1)[1]] if ref else None))
    return sorted(routes, key=lambda r: (r[1], r[0]))


def shaped(schema: dict[str, Any], root: dict[str, Any], depth: int = 0) -> st.SearchStrategy[Any]:
    """Values a JSON schema of the subset the TC's schemas use would take: the shape an honest
    client sends, from which one swapped value (or a bound at its edge) goes astray."""
    if "$ref" in schema:
        target: Any = root
        for part in schema["$ref"].lstrip("#/").split("/"):
            target = target[part]
        return shaped(target, root, depth)
    if "const" in schema:
        return st.just(schema["const"])
    if "enum" in schema:
        return st.sampled_from(schema["enum"])
    for key in ("oneOf", "anyOf"):
        if key in schema:
            return st.one_of([shaped(s, root, depth) for s in schema[key]])
    kind = schema.get("type")
    if isinstance(kind, list):
        return st.one_of([shaped({**schema, "type": k}, root, depth) for k in kind])
    if kind == "object" or "properties" in schema:
        properties = schema.get("properties", {})
        required = [k for k in schema.get("required", []) if k in properties]
        optional = [k for k in properties if k not in required]
        if depth > 6:
            return st.fixed_dictionaries({})
        return st.fixed_dictionaries({k: shaped(properties[k], root, depth + 1) for k in required},
                                     optional={k: shaped(properties[k], root, depth + 1) for k in optional})
    if kind == "array":
        return st.lists(shaped(schema.get("items", {}), root, depth + 1), min_size=schema.get("minItems", 0),
                        max_size=min(schema.get("maxItems", 3), 3))
    if kind == "integer":
        return st.integers(schema.get("minimum", -(2**63)), schema.get("maximum", 2**63 - 1))
    if kind == "number":
        return st.floats(schema.get("minimum"), schema.get("maximum"), allow_nan=False, allow_infinity=False)
    if kind == "boolean":
        return st.booleans()
    if kind == "string":
        if "pattern" in schema:
            return st.from_regex(schema["pattern"], fullmatch=True).filter(
                lambda t: len(t) <= schema.get("maxLength", 10**6))
        return st.text(min_size=schema.get("minLength", 0), max_size=min(schema.get("maxLength", 40), 40))
    return JSON


def _body_strategy(schema: dict[str, Any] | None, root: dict[str, Any]) -> st.SearchStrategy[Any]:
    if schema is None:
        return st.none()
    return st.one_of(shaped(schema, {**root, **schema}), JSON)


def check_intact(service: Service) -> None:
    env = dict(os.environ, TCCDEPLOY_STATE=str(service.state))
    if service.registry:  # type: ignore[attr-defined]
        env["TCCDEPLOY_REGISTRY"] = service.registry  # type: ignore[attr-defined]
    else:
        db = sqlite3.connect(str(service.state / "registry.sqlite"))
        try:
            assert db.execute("PRAGMA integrity_check").fetchall() == [("ok",)]
        finally:
            db.close()
    verify = subprocess.run([str(BIN / "tccdeploy"), "audit", "verify"], env=env, capture_output=True, text=True)
    assert verify.returncode == 0, verify.stdout + verify.stderr


def test_no_input_from_the_openapi_document_or_beyond_it_gets_a_5xx(served):
    routes = _routes(served.openapi)
    assert len(routes) >= 36
    strategies = {(m, p): _body_strategy(s, served.openapi) for m, p, s in routes}
    seen: dict[int, int] = {}
    with served.client() as client:

        @settings(max_examples=500, deadline=None, derandomize=True, database=None,
                  suppress_health_check=list(HealthCheck))
        @given(route=st.sampled_from(routes), data=st.data())
        def one(route: tuple[str, str, dict[str, Any] | None], data: st.DataObject) -> None:
            method, path, schema = route
            url = path
            for name in [part[1:-1] for part in path.split("/") if part.startswith("{")]:
                url = url.replace("{" + name + "}", data.draw(SEGMENTS))
            query = data.draw(st.dictionaries(st.sampled_from(QUERY_KEYS), SEGMENTS, max_size=3))
            if query:
                url += "?" + "&".join(f"{k}={v}" for k, v in query.items())
            kwargs: dict[str, Any] = {}
            if method == "POST":
                body = data.draw(strategies[(method, path)])
                if schema is not None and data.draw(st.booleans()):
                    body = _swap(body, data)
                kwargs = {"content": json.dumps(body).encode(), "headers": {"content-type": "application/json"}}
            response = client.request(method, url, **kwargs)
            seen[response.status_code] = seen.get(response.status_code, 0) + 1
            assert response.status_code < 500, (method, url, kwargs.get("content", b"")[:300], response.text[:300])

        one()
    print("statuses:", dict(sorted(seen.items())))
    assert sum(seen.values()) >= 500 and any(code < 300 for code in seen), seen  # some inputs were taken, too
    check_intact(served)


def _signed_request(key: ed25519.Ed25519PrivateKey, vm_id: Any, **request_fields: Any) -> dict[str, Any]:
    """A request and descriptor that verify under key, carrying whatever vm_id (and fields) given."""
    descriptor = {"type": "tccdeploy-sealed-image", "version": 3, "vm_id": vm_id, "name": "img",
                  "disk": {"file": "disk.qcow2", "sha256": "0" * 64, "size": 1, "virtual_size": 1, "format": "qcow2+luks"},
                  "wrapped_key": base64.b64encode(b"k" * 384).decode(),
                  "customer": {"key": customer.public_text(key.public_key()), "id": customer.key_id(key.public_key())}}
    request = {"manifest": {"apiVersion": "tccdeploy/v1", "kind": "PlacementRequest", "metadata": {"name": "web"},
                            "spec": {"image": "x.sealed", "vcpus": 1, "memoryMiB": 64}},
               "id": secrets.token_hex(16), "created": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
               "customer": customer.public_text(key.public_key()), "image": {"vm_id": vm_id, "sha256": "0" * 64}}
    request.update(request_fields)

    def sign(domain: str, document: dict[str, Any]) -> str:
        try:
            return base64.b64encode(key.sign(signed_bytes(domain, document))).decode()
        except UnicodeEncodeError:  # (a lone surrogate has no UTF-8: nobody can sign it; send it all the same)
            return base64.b64encode(secrets.token_bytes(64)).decode()

    return {"request": {"request": request, "signature": sign(PLACEMENT_REQUEST, request)},
            "bundle": {"descriptor": descriptor, "signature": sign(SEALED_IMAGE, descriptor)}}


POISON = {"int": 5, "list": [], "object": {}, "null": None, "bool": True, "int-2-70": 2**70, "float": 1.5, "empty": "",
          "10k-chars": "x" * 10_000, "nul": "\x00", "lone-surrogate": "\ud800", "bidi-override": "vm\u202e",
          "nested-lists": [[[[]]]], "nested-object": {"a": [1, {}]}}


@pytest.mark.parametrize("vm_id", list(POISON.values()), ids=list(POISON))  # (plain ids: mutmut passes them back)
def test_a_signed_request_from_anyone_with_any_vm_id_leaves_the_audit_chain_verifying(served, vm_id):
    """The audit-poisoning request of issue 15: a descriptor whose vm_id is not text, signed by a
    fresh key no customer registered. Refused (4xx), and `audit verify` still says ok."""
    body = _signed_request(ed25519.Ed25519PrivateKey.generate(), vm_id)
    with served.client(cert=False) as client:
        response = client.post("/v1/requests", content=json.dumps(body).encode(),
                               headers={"content-type": "application/json"})
    assert 400 <= response.status_code < 500, response.text
    check_intact(served)


@pytest.mark.parametrize("fields", [{"created": 123}, {"manifest": "x"}, {"image": {}}, {"id": []}, {"id": 2**70},
                                    {"created": "\ud800"}, {"customer": 5}],
                         ids=["created-int", "manifest-str", "image-empty", "id-list", "id-huge", "created-surrogate",
                              "customer-int"])
def test_wrong_types_inside_a_validly_signed_request_are_a_4xx(served, fields):
    body = _signed_request(ed25519.Ed25519PrivateKey.generate(), "0" * 32, **fields)
    with served.client(cert=False) as client:
        response = client.post("/v1/requests", content=json.dumps(body).encode(),
                               headers={"content-type": "application/json"})
    assert 400 <= response.status_code < 500, response.text
    check_intact(served)


def test_hostile_paths_and_queries_on_every_get_route_are_a_4xx_or_an_answer(served):
    routes = [(m, p) for m, p, _ in _routes(served.openapi) if m == "GET"]
    with served.client() as client:
        for _, path in routes:
            for segment in ("a%00b", "%ED%A0%80", str(2**70), "x" * 600):
                url = path.replace("{name}", segment).replace("{id}", segment).replace("{vm_id}", segment)
                for query in ("", f"?node={segment}", f"?since={segment}", f"?attestation={segment}", f"?all={segment}"):
                    try:
                        response = client.get(url + query)
                    except httpx.HTTPError as exc:  # pragma: no cover - reported with the route
                        raise AssertionError(f"{url + query}: {exc}") from None
                    assert response.status_code < 500, (url + query, response.text[:300])
    check_intact(served)
