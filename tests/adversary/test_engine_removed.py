"""A removed engine against the served TC: its certificate still passes TLS (the TC's CA issued
it), so the registry is what refuses it. The check runs off the event loop, beside the request's
decision; whatever order a route takes, nothing is decided for a removed engine and it learns
nothing but auth.engine-revoked: not a fresh nonce, not a 400 about its body, not the policy."""

from __future__ import annotations

import os
import sqlite3
import subprocess

import pytest

from ..conftest import REPO
from ..tcservice import BIN, Service


@pytest.fixture(scope="module", params=["1", "0"], ids=["a-front", "one-process"])
def removed(tmp_path_factory, request):  # type: ignore[no-untyped-def]
    """A served TC and the certificate files of an engine added, used once, then removed: through
    a front process (the engine's certificate checked in the decision process, in the same round
    trip as the call) and with all in one process (checked in the API's worker thread)."""
    state = tmp_path_factory.mktemp("served-tc-removed")
    service = Service(state, str(REPO / "examples"), options=("--fronts", request.param))
    env = dict(os.environ, TCCDEPLOY_STATE=str(state))
    out = state / "gone"
    subprocess.run([str(BIN / "tccdeploy"), "tc", "engines", "add", "gone", "-o", str(out)], env=env, check=True,
                   capture_output=True)
    files = (str(out / "engine-cert.pem"), str(out / "engine-key.pem"))
    with service.client(cert_files=files) as client:
        assert client.get("/v1/policy").status_code == 200  # it was an engine
    subprocess.run([str(BIN / "tccdeploy"), "tc", "engines", "remove", "gone"], env=env, check=True, capture_output=True)
    yield service, files
    service.stop()


def nonces(service: Service) -> int:
    with sqlite3.connect(service.state / "registry.sqlite") as db:
        return int(db.execute("SELECT count(*) FROM nonces").fetchone()[0])


def refused(response) -> bool:  # type: ignore[no-untyped-def]
    return response.status_code == 403 and response.json()["error"] == "auth.engine-revoked"


def test_a_removed_engine_gets_no_decision(removed):
    service, files = removed
    before = nonces(service)
    with service.client(cert_files=files) as client:
        assert refused(client.post("/v1/nonces", json={"node": "n1"}))
        assert refused(client.post("/v1/leases", json={"nodes": ["n1"], "seconds": 60}))
    assert nonces(service) == before  # the decision did not run


def test_a_removed_engine_learns_nothing_about_its_body_or_a_route_without_a_decision(removed):
    service, files = removed
    with service.client(cert_files=files) as client:
        assert refused(client.post("/v1/nonces", content=b"{not json", headers={"content-type": "application/json"}))
        assert refused(client.post("/v1/nonces", json={"node": "n1", "extra": 1}))  # against the schema
        assert refused(client.post("/v1/enrollments", json={"node": "n1", "ek_certificate": "@@", "ek_public": "@@",
                                                             "ak_public": "@@", "ssh_host_key": "h"}))  # not base64
        assert refused(client.get("/v1/policy"))  # answered without a decision: checked all the same
    with service.client() as client:  # the engine still on the registry is served
        answer = client.post("/v1/nonces", json={"node": "n1"})  # refused or not, not for its certificate
        assert not answer.is_success or "nonce" in answer.json()
        assert answer.is_success or not answer.json()["error"].startswith("auth.")
        assert client.get("/v1/policy").status_code == 200


def test_a_removed_engine_resuming_its_tls_session_gets_no_decision(tmp_path):
    """TLS session resumption (the engine's client offers the ticket an earlier connection got,
    issue 20): the resumed session carries the certificate TLS checked before the engine was
    removed, and no certificate is checked again. The registry still decides: refused
    auth.engine-revoked on the resumed connection, no nonce made."""
    from tccdeploy.coordinator.client import RemoteCoordinator, TCUnavailable

    service = Service(tmp_path, str(REPO / "examples"))
    env = dict(os.environ, TCCDEPLOY_STATE=str(tmp_path))
    subprocess.run([str(BIN / "tccdeploy"), "tc", "engines", "add", "late", "-o", str(tmp_path / "late")], env=env,
                   check=True, capture_output=True)
    remote = RemoteCoordinator(service.url, str(tmp_path / "late"))
    try:
        assert remote.nonce("n1")
        where = ("127.0.0.1", service.port)
        for connection in remote.http._idle.pop(where):
            connection.close()  # (as the TC closes an idle one)
        subprocess.run([str(BIN / "tccdeploy"), "tc", "engines", "remove", "late"], env=env, check=True,
                       capture_output=True)
        before = nonces(service)
        with pytest.raises(TCUnavailable, match="answered 403 to POST /v1/nonces: auth.engine-revoked"):
            remote.nonce("n1")
        assert remote.http.handshakes == {"full": 1, "resumed": 1}  # it was a resumed session
        assert nonces(service) == before
    finally:
        remote.close()
        service.stop()
