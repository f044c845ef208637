"""`tc serve`: the same enrollment and attestation through HTTPS as through the embedded TC, and
bad input at the API answered with a clear 4xx that changes nothing."""

from __future__ import annotations

import json
import os
import sqlite3
import ssl
import subprocess

import httpx
import pytest

from tccdeploy.lab.lab import Lab

from .conftest import REPO
from .tcservice import BIN, Service


@pytest.fixture(scope="module")
def examples_service(tmp_path_factory):
    service = Service(tmp_path_factory.mktemp("served-tc"), str(REPO / "examples"))
    yield service
    service.stop()


def dump(state, without_audit: bool = False) -> str:  # type: ignore[no-untyped-def]
    db = sqlite3.connect(str(state / "registry.sqlite"))
    try:
        return "\n".join(line for line in db.iterdump() if not (without_audit and line.startswith('INSERT INTO "audit"')))
    finally:
        db.close()


BAD = [
    ("wrong content type", {"content": b"node=node1", "headers": {"content-type": "application/x-www-form-urlencoded"}},
     415, "request.content-type"),
    ("malformed JSON", {"content": b'{"node": ', "headers": {"content-type": "application/json"}}, 400, "request.json"),
    ("unknown field", {"json": {"node": "node1", "purpose": "quote", "admin": True}}, 400, "request.schema"),
    ("wrong type", {"json": {"node": 7}}, 400, "request.schema"),
    ("a node name with a path in it", {"json": {"node": "../node1"}}, 400, "request.schema"),
    ("oversized body", {"content": b"[" + b"0," * (5 * 1024 * 1024) + b"0]", "headers": {"content-type": "application/json"}},
     413, "request.too-large"),
]


@pytest.mark.parametrize("what, request_args, status, code", BAD, ids=[b[0] for b in BAD])
def test_bad_input_is_a_clear_4xx_and_changes_nothing(examples_service, what, request_args, status, code):
    before = dump(examples_service.state)
    with examples_service.client() as client:
        response = client.post("/v1/nonces", **request_args)
    assert response.status_code == status, response.text
    assert response.json()["error"] == code and response.json()["message"]
    assert dump(examples_service.state) == before


def test_an_ear_is_asked_for_by_node_and_verdict_id_and_none_is_made_up(examples_service):
    with examples_service.client() as client:
        unknown = client.get("/v1/nodes/nobody/ear")
        wrong = client.get("/v1/nodes/nobody/ear?attestation=first")
    assert unknown.status_code == 404 and unknown.json()["error"] == "node.unknown"
    assert wrong.status_code == 400 and wrong.json()["error"] == "request.query"


def test_malformed_evidence_is_refused_with_a_reason_not_a_500(examples_service):
    """A refusal is a decision, so it goes to the audit log (nothing else changes)."""
    before = dump(examples_service.state, without_audit=True)
    with examples_service.client() as client:
        response = client.post("/v1/enrollments", json={"node": "n1", "ek_certificate": "AAAA", "ek_public": "",
                                                         "ak_public": "", "ssh_host_key": "SHA256:x",
                                                         "address": "127.0.1.7"})
        assert response.status_code == 403 and response.json()["error"] in ("ek.certificate-malformed", "evidence.malformed")
        response = client.post("/v1/attestations", json={"node": "n1", "address": "127.0.0.1", "evidence": {
            "attest": "AAAA", "signature": "AAAA", "pcrs": {"0": "zz"}, "eventlog": "", "nonce": ""}})
        assert response.status_code == 400  # pcr values must be hex
    assert dump(examples_service.state, without_audit=True) == before


def test_engine_routes_need_an_engine_certificate_of_this_tc(examples_service, tmp_path):
    with examples_service.client(cert=False) as client:
        response = client.get("/v1/policy")
        assert response.status_code == 401 and response.json()["error"] == "auth.engine-certificate"
        assert client.get("/v1/status").status_code == 200  # public routes need none
    # A certificate from another CA: the TLS handshake itself refuses it (unknown CA).
    subprocess.run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes",
                    "-keyout", str(tmp_path / "k.pem"), "-out", str(tmp_path / "c.pem"), "-days", "1",
                    "-subj", "/OU=tccdeploy engine/CN=intruder"], check=True, capture_output=True)
    with pytest.raises((httpx.HTTPError, ssl.SSLError)):
        with examples_service.client(cert_files=(str(tmp_path / "c.pem"), str(tmp_path / "k.pem"))) as client:
            client.get("/v1/policy")
    # A removed engine is refused at once, by serial.
    env = dict(os.environ, TCCDEPLOY_STATE=str(examples_service.state))
    run = [str(BIN / "tccdeploy"), "tc", "engines"]
    subprocess.run([*run, "add", "temp", "-o", str(tmp_path / "temp")], env=env, check=True, capture_output=True)
    files = (str(tmp_path / "temp" / "engine-cert.pem"), str(tmp_path / "temp" / "engine-key.pem"))
    with examples_service.client(cert_files=files) as client:
        assert client.get("/v1/policy").status_code == 200
    subprocess.run([*run, "remove", "temp"], env=env, check=True, capture_output=True)
    with examples_service.client(cert_files=files) as client:
        response = client.get("/v1/policy")
    assert response.status_code == 403 and response.json()["error"] == "auth.engine-revoked"


def test_openapi_health_readiness_and_metrics_are_served(examples_service):
    with examples_service.client(cert=False) as client:
        spec = client.get("/openapi.json").json()
        assert {"/v1/attestations", "/v1/nonces", "/v1/enrollments", "/v1/admissions"} <= set(spec["paths"])
        assert spec["paths"]["/v1/attestations"]["post"]["requestBody"]
        assert client.get("/healthz").json() == {"ok": True} and client.get("/readyz").json() == {"ready": True}
        metrics = client.get("/metrics").text
        assert "tccdeploy_http_requests_total{" in metrics and "tccdeploy_http_request_seconds_bucket{" in metrics
        bundle = client.get("/v1/certificate").text
        assert bundle.count("BEGIN CERTIFICATE") == 6  # CA, key wrapping, receipt, audit, ticket and EAR signing


def test_the_decision_process_and_its_front_freeze_their_started_heaps(examples_service):
    """A full collection of the started heap stopped each process 17-25 ms while decisions were
    in flight (server.freeze_heap); /metrics shows what each froze (a front's count arrives
    with its next hand-over, within a second or so)."""
    import re
    import time

    deadline = time.monotonic() + 10
    with examples_service.client(cert=False) as client:
        while True:
            frozen = {m[0]: float(m[1]) for m in re.findall(
                r'^tccdeploy_gc_frozen_objects_total\{process="(\w+)"\} (\S+)$', client.get("/metrics").text, re.M)}
            if set(frozen) == {"decisions", "front"} or time.monotonic() > deadline:
                break
            time.sleep(0.2)
    assert set(frozen) == {"decisions", "front"} and min(frozen.values()) > 10_000, frozen


@pytest.mark.slow
@pytest.mark.parametrize("where", ["embedded", "served"])
def test_enrollment_and_attestation_give_the_same_verdicts_embedded_and_served(lab: Lab, tmp_path, where):
    state = tmp_path / "tc"
    env = dict(os.environ, NO_COLOR="1", TCCDEPLOY_STATE=str(state))
    common = ["-i", lab.inventory_dir, "node1,node3,roguetpm1,outside1"]
    service = None
    if where == "served":
        service = Service(state, lab.manifests_dir)
        env["TCCDEPLOY_STATE"] = str(tmp_path / "engine-state")  # the engine has no TC state of its own
        common += ["--tc", service.url, "--engine-dir", str(service.engine_dir)]
    else:
        subprocess.run([str(BIN / "tccdeploy"), "tc", "init"], env=env, check=True, capture_output=True)
        common += ["-m", lab.manifests_dir]
    try:
        tcc = [str(BIN / "tccdeploy")]
        enrolled = subprocess.run([*tcc, "enroll", *common, "--json"], env=env, capture_output=True, text=True)
        attested = subprocess.run([*tcc, "attest", "--admit", *common, "--json"], env=env, capture_output=True, text=True)
        reading = common[common.index("--tc"):] if service is not None else ["-m", lab.manifests_dir]
        ears = {node: subprocess.run([*tcc, "nodes", "show", node, "--ear", "--json", *reading], env=env,
                                     capture_output=True, text=True) for node in ("node1", "outside1")}
    finally:
        if service is not None:
            service.stop()
    enroll = {r["name"]: r for r in json.loads(enrolled.stdout)}
    attest = {r["name"]: r for r in json.loads(attested.stdout)}
    assert enrolled.returncode == attested.returncode == 2
    assert enroll["roguetpm1"]["state"] == "failed" and "manufacturer" in enroll["roguetpm1"]["msg"]
    assert enroll["outside1"]["reason"] == "perimeter.not-in-roster"  # the TC's roster, not the address
    assert attest["outside1"]["reason"] == "node.not-enrolled"
    assert attest["node1"]["result"]["admitted"] and attest["node3"]["result"]["admitted"]  # node3: a certified asset tag
    db = sqlite3.connect(str(state / "registry.sqlite"))
    try:
        admitted = sorted(r[0] for r in db.execute("SELECT name FROM nodes WHERE state = 'admitted'"))
    finally:
        db.close()
    assert admitted == ["node1", "node3"]
    from cryptography import x509

    from .test_ear import relying_party

    with open(state / "tc-cert.pem", "rb") as fh:
        ca = x509.load_pem_x509_certificate(fh.read())
    assert ears["node1"].returncode == 0, ears["node1"].stderr
    shown = json.loads(ears["node1"].stdout)
    claims = relying_party(shown["token"], ca)  # the TC's signed result of node1's verdict, read with PyJWT
    assert claims == shown["claims"] and claims["sub"] == "node1" and claims["submods"]["tvmm"]["ear.status"] == "affirming"
    assert claims["tccdeploy.verdict"]["attestation"] == shown["attestation"]
    assert ears["outside1"].returncode == 1 and "outside1" in ears["outside1"].stderr  # never enrolled: no verdict


def test_sighup_reloads_the_manifests_so_a_revoked_build_is_refused_at_once(tmp_path):
    import signal
    import time

    from tccdeploy.coordinator import identity
    from tccdeploy.coordinator.client import RemoteCoordinator

    from .attestkit import Node, enroll_software_node
    from .conftest import audited_registry, live_examples

    manifests = live_examples(tmp_path)
    service = Service(tmp_path / "tc", str(manifests))
    try:
        node = Node()
        registry = audited_registry(str(tmp_path / "tc" / "registry.sqlite"), identity.load(str(tmp_path / "tc")))
        enroll_software_node(registry, "sw1", node)
        registry.close()
        tc = RemoteCoordinator(service.url, str(service.engine_dir))
        try:
            def verdict():  # type: ignore[no-untyped-def]
                return tc.verify("sw1", "site1", "127.0.1.7", node.evidence(tc.nonce("sw1")))[0]

            assert verdict().trusted
            build = manifests / "builds" / "tvmm-2026.1.yml"
            build.write_text(build.read_text().replace("status: approved", "status: revoked"))
            service.proc.send_signal(signal.SIGHUP)
            deadline = time.monotonic() + 10
            while verdict().trusted and time.monotonic() < deadline:
                time.sleep(0.1)
            assert [r["code"] for r in verdict().reasons] == ["build.revoked"]
            build.write_text("not: [valid")  # a broken edit is not taken: the TC keeps what is in force
            service.proc.send_signal(signal.SIGHUP)
            time.sleep(0.5)
            assert service.proc.poll() is None and [r["code"] for r in verdict().reasons] == ["build.revoked"]
        finally:
            tc.close()
    finally:
        service.stop()


def _post_routes(service) -> list[str]:  # type: ignore[no-untyped-def]
    with service.client(cert=False) as client:
        spec = client.get("/openapi.json").json()
    return [path.replace("{name}", "node1").replace("{id}", "1").replace("{vm_id}", "v")
            for path, ops in spec["paths"].items() if "post" in ops]


def test_hostile_json_is_a_clear_400_on_every_route_never_a_500(examples_service):
    """Nested 10,000 deep (the parser would recurse), NaN (not JSON), and a signed request with
    fields missing or of the wrong type: each refused before any code reads it."""
    before = dump(examples_service.state)
    deep = b"[" * 10000 + b"]" * 10000
    with examples_service.client() as client:
        for path in _post_routes(examples_service):
            response = client.post(path, content=deep, headers={"content-type": "application/json"})
            assert response.status_code == 400 and response.json()["error"] == "request.json-depth", (path, response.text)
            response = client.post(path, content=b'{"node": NaN}', headers={"content-type": "application/json"})
            assert response.status_code == 400 and response.json()["error"] == "request.json", (path, response.text)
        for body in ({"request": {}, "bundle": {}},
                     {"request": {"request": {"id": [], "created": 123}, "signature": ""}, "bundle": {}},
                     {"request": {"request": {"manifest": "x", "id": "0" * 32, "created": "", "customer": "",
                                              "image": {}}, "signature": ""},
                      "bundle": {"descriptor": {"vm_id": 5}, "signature": ""}}):
            response = client.post("/v1/requests", json=body)
            assert response.status_code == 400 and response.json()["error"] == "request.schema", response.text
    assert dump(examples_service.state) == before


def test_text_no_database_stores_and_integers_beyond_64_bits_are_a_clear_400(examples_service):
    """Issue 15's 500s: a lone surrogate or a NUL in a field, a path segment or a query parameter,
    and an integer beyond 64 bits, each refused with its reason before any code reads it."""
    before = dump(examples_service.state)
    with examples_service.client() as client:
        for raw, code in ((b'{"node": "\\ud800", "purpose": "quote"}', "request.text"),
                          (b'{"node": "node1\\u0000", "purpose": "quote"}', "request.text"),
                          (b'{"\\ud800": 1}', "request.text")):
            response = client.post("/v1/nonces", content=raw, headers={"content-type": "application/json"})
            assert response.status_code == 400 and response.json()["error"] == code, (raw, response.text)
        response = client.post("/v1/admissions", json={"node": "node1", "attestation": 2**70, "tk_public": "",
                                                       "certify_attest": "", "certify_signature": "", "nonce": ""})
        assert response.status_code == 400 and response.json()["error"] == "request.integer", response.text
        for path in ("/v1/vms/a%00b", "/v1/audit?node=n%00", "/v1/nodes/node1%00"):
            response = client.get(path)
            assert response.status_code == 400 and response.json()["error"] == "request.text", (path, response.text)
    assert dump(examples_service.state) == before
