"""The customer's own tools against the provider, who runs the network between the customer and
the TC and may hand the customer files: what the customer's side checks itself (found in a review
of the receipt and client code, issue 20). Every test here failed before its fix."""

from __future__ import annotations

import json
import socket
import subprocess
import sys

import pytest

from tccdeploy.coordinator.client import CustomerClient, TCUnavailable
from tccdeploy.crypto import customer

from ..brokerkit import reason


def test_the_customers_client_refuses_a_tc_url_that_is_not_https_before_sending_anything(tmp_path):
    """Over plain HTTP a man in the middle read the signed query (and spent it first) and forged
    the TC's answers: the customer's client took any URL (the engine's refused all but https)."""
    key_path = str(tmp_path / "key.pem")
    customer.init(key_path)
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(1)
    listener.settimeout(0.5)
    url = f"http://127.0.0.1:{listener.getsockname()[1]}"
    try:
        with pytest.raises(TCUnavailable, match="HTTPS only"):
            CustomerClient(url, str(tmp_path / "tc.pem"))
        proc = subprocess.run([sys.executable, "-m", "tccdeploy", "request", "status", "ab" * 16, "--tc", url,
                               "--tc-cert", str(tmp_path / "tc.pem"), "--key", key_path],
                              capture_output=True, text=True, timeout=60)
        assert proc.returncode != 0 and "HTTPS only" in proc.stderr, proc.stdout + proc.stderr
        with pytest.raises(TimeoutError):
            listener.accept()  # nothing came: the query never left
    finally:
        listener.close()


# -- receipts ---------------------------------------------------------------------------------------
@pytest.fixture
def world(broker_world):
    broker_world.customer("mallory")
    broker_world.node("n1")
    return broker_world


def _launched_after_another(world):  # type: ignore[no-untyped-def]
    """mallory's VM launched on n1, then acme's: acme's launch evidence holds both events."""
    first = world.accepted("mallory")
    first_release = world.tc.release_key(first["id"], "n1")
    mallory_event = world.started("n1", first_release)["evidence"]["events"][0]
    world.tc.record_launch(first_release, "n1", world.started("n1", first_release))
    bundle = world.image("acme")
    envelope = world.request("acme", bundle)
    record = world.tc.accept_request(envelope, bundle)
    release = world.tc.release_key(record["id"], "n1")
    body = release["ticket"]["ticket"]
    own = {"event": "launched", "vm_id": body["vm_id"], "image_sha256": body["image_sha256"], "ticket": body["id"],
           "vcpus": body["vcpus"], "memory_mib": body["memory_mib"]}
    evidence = world.nodes["n1"].tpm.runtime_evidence(release["ticket"], events=[mallory_event, own])
    receipt = world.tc.record_launch(release, "n1", {"running": True, "evidence": evidence})
    return envelope, receipt, first, mallory_event


def test_a_receipt_shows_other_vms_on_the_node_by_digest_only_and_still_verifies(world):
    """The receipt carried the node's whole event list: every other tenant's VM ids, image digests
    and sizes since the node's TPM reset, for any customer to read (found in review)."""
    from tccdeploy.coordinator import receipts
    from tccdeploy.crypto.runtime import event_digest

    _, receipt, other, mallory_event = _launched_after_another(world)
    text = json.dumps(receipt)
    assert other["vm_id"] not in text and other["image_sha256"] not in text
    events = receipt["receipt"]["launch_evidence"]["events"]
    assert events[0] == {"redacted": event_digest(mallory_event).hex()} and events[1]["vm_id"] == receipt["receipt"]["vm_id"]
    assert receipts.verify(receipts.parse(text), world.tc.identity().certificate)["version"] == 4


def test_the_tc_takes_no_redacted_event_in_a_nodes_evidence(world):
    """A redacted event replays as its digest in a receipt only: in evidence the TC decides on, an
    engine could hide what a node did behind a digest, so there it is an event like any other."""
    from tccdeploy.coordinator import runtime
    from tccdeploy.crypto.runtime import redact

    record = world.accepted("acme")
    release = world.tc.release_key(record["id"], "n1")
    evidence = world.started("n1", release)["evidence"]
    hidden = dict(evidence, events=redact(evidence["events"], "f" * 32))
    ak = world.tc.registry.identity("n1")["ak_public"]
    ticket = release["ticket"]["ticket"]["id"]
    assert runtime.verify(hidden, ak, 15, ticket, redactions=True).events == hidden["events"]  # (a receipt's way)
    with pytest.raises(Exception) as refused:
        runtime.verify(hidden, ak, 15, ticket)
    assert getattr(refused.value, "reason", None) == "runtime.log"
    assert reason(world.tc.record_launch, release, "n1", {"running": True, "evidence": hidden}) == "runtime.log"


def _verify_cli(tmp_path, world, receipt: dict, *extra: str) -> subprocess.CompletedProcess:  # type: ignore[type-arg]
    from cryptography.hazmat.primitives import serialization

    tc_pem = tmp_path / "tc.pem"
    tc_pem.write_bytes(world.tc.identity().certificate.public_bytes(serialization.Encoding.PEM))
    path = tmp_path / "receipt.json"
    path.write_text(receipt if isinstance(receipt, str) else json.dumps(receipt))
    return subprocess.run([sys.executable, "-m", "tccdeploy", "receipt", "verify", str(path), "--tc", str(tc_pem), *extra],
                          capture_output=True, text=True, timeout=60)


def test_receipt_verify_checks_the_receipt_answers_the_customers_own_request(world, tmp_path):
    """A receipt the TC signed proves a launch, not that it is the launch the customer asked for:
    the provider could hand over an older receipt of the same customer for a new request, and
    `receipt verify` said VALID (found in review)."""
    envelope, receipt, _, _ = _launched_after_another(world)
    mine = tmp_path / "request.json"
    mine.write_text(json.dumps(envelope))
    ok = _verify_cli(tmp_path, world, receipt, "--request", str(mine))
    assert ok.returncode == 0 and ok.stdout.startswith("VALID") and "It answers your request" in ok.stdout, ok.stderr
    assert "this VM's last: launched" in ok.stdout  # its own event, not the node's last (another VM's)
    newer = world.request("acme", world.image("acme"))  # a new request: the old receipt does not answer it
    newer_path = tmp_path / "newer.json"
    newer_path.write_text(json.dumps(newer))
    old = _verify_cli(tmp_path, world, receipt, "--request", str(newer_path))
    assert old.returncode == 1 and "INVALID: receipt.other-request" in old.stderr, old.stdout + old.stderr
    plain = _verify_cli(tmp_path, world, receipt)
    assert plain.returncode == 0 and "Not checked against a request of yours" in plain.stdout


def test_a_receipt_file_with_a_name_given_twice_is_invalid(world, tmp_path):
    """Python's JSON reader keeps the last of two "node" names and verified; a reader that keeps the
    first showed the inserted one: a receipt whose words depend on the reader (found in review)."""
    _, receipt, _, _ = _launched_after_another(world)
    text = json.dumps(receipt).replace('"node": ', '"node": "elsewhere", "node": ', 1)
    assert json.loads(text) == receipt  # the last one is the signed one
    proc = _verify_cli(tmp_path, world, text)
    assert proc.returncode == 1 and "INVALID: receipt.malformed" in proc.stderr and "node given twice" in proc.stderr


def test_receipt_verify_with_a_pin_refuses_a_tc_pem_of_another_ca(world, tmp_path):
    """tc.pem is a file the provider may have handed over: with --pin (the fingerprint the customer
    checked when sealing) a tc.pem of the provider's own CA, and its receipts, are refused."""
    import hashlib

    from cryptography.hazmat.primitives import serialization

    _, receipt, _, _ = _launched_after_another(world)
    right = hashlib.sha256(world.tc.identity().certificate.public_bytes(serialization.Encoding.DER)).hexdigest()
    assert _verify_cli(tmp_path, world, receipt, "--pin", right.upper()).returncode == 0
    wrong = _verify_cli(tmp_path, world, receipt, "--pin", "0" * 64)
    assert wrong.returncode == 1 and "INVALID: tc.pin" in wrong.stderr, wrong.stdout + wrong.stderr


def test_the_customers_tls_matches_the_tc_by_subject_alt_name_only(tmp_path):
    from cryptography.hazmat.primitives import serialization

    from tccdeploy.coordinator import identity
    from tccdeploy.coordinator.client import pinned_context

    tc = identity.init(str(tmp_path / "tc"))[0]
    pem = tmp_path / "tc.pem"
    pem.write_bytes(tc.certificate.public_bytes(serialization.Encoding.PEM))
    assert pinned_context(str(pem), "").hostname_checks_common_name is False


def test_the_customers_client_sends_nothing_to_a_server_the_tcs_ca_did_not_certify(tmp_path):
    """The provider runs the network: it answers the customer's TC address with its own TLS server,
    its certificate valid for that address but not from the TC's CA. The client (http.client on
    kept connections since session 25) must still pin tc.pem: the signed request never leaves."""
    from ..test_tc_connections import OtherServer

    subprocess.run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes",
                    "-keyout", str(tmp_path / "tc-key.pem"), "-out", str(tmp_path / "tc.pem"), "-days", "1",
                    "-subj", "/CN=the TC's CA"], check=True, capture_output=True)
    impostor = OtherServer(tmp_path)
    client = CustomerClient(impostor.url, str(tmp_path / "tc.pem"))
    try:
        with pytest.raises(TCUnavailable, match="CERTIFICATE_VERIFY_FAILED"):
            client.submit({"id": "r1", "signature": "s"}, {"bundle": "b"})
    finally:
        client.close()
        impostor.close()
    assert not any(impostor.received)  # not a byte of the request
