"""Each check of the TC's key broker, constraints, receipts, roster and audit verification, pinned
to its reason code: the cases mutation testing (mutmut, see pyproject's [tool.mutmut]) showed
that nothing else would catch."""

from __future__ import annotations

import base64
import dataclasses
import datetime
import hashlib
import secrets
import time

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from tccdeploy.coordinator import audit, constraints, identity, receipts, roster
from tccdeploy.coordinator.keybroker import check_customer_query, sign_customer_query
from tccdeploy.coordinator.records import NodeRecord, VMRecord
from tccdeploy.crypto import customer, wrap
from tccdeploy.crypto import ticket as tickets
from tccdeploy.crypto.canonical import PLACEMENT_REQUEST, signed_bytes

from .brokerkit import reason


@pytest.fixture
def world(broker_world):
    return broker_world


# -- the key broker: requests --------------------------------------------------------------------
def test_a_request_by_an_unregistered_key_is_refused(world):
    stranger = world.customer("stranger")
    bundle = world.image("stranger")
    with world.tc.registry.transaction() as db:
        db.execute("DELETE FROM customers WHERE name = 'stranger'")
    envelope = world.request("stranger", bundle)
    assert stranger is not None and reason(world.tc.accept_request, envelope, bundle) == "request.signature"


def test_a_request_signature_that_is_not_strict_base64_is_refused(world):
    bundle = world.image("acme")
    envelope = world.request("acme", bundle)
    envelope["signature"] = envelope["signature"][:10] + "!" + envelope["signature"][10:]
    assert reason(world.tc.accept_request, envelope, bundle) == "request.signature"


def test_a_request_without_a_creation_time_is_stale(world):
    bundle = world.image("acme")
    envelope = world.request("acme", bundle)
    del envelope["request"]["created"]
    envelope["signature"] = base64.b64encode(world.keys["acme"].sign(
        signed_bytes(PLACEMENT_REQUEST, envelope["request"]))).decode()
    assert reason(world.tc.accept_request, envelope, bundle) == "request.stale"
    future = world.request("acme", bundle, created=datetime.datetime.now(datetime.UTC) + datetime.timedelta(hours=1))
    assert reason(world.tc.accept_request, future, bundle) == "request.stale"


@pytest.mark.parametrize("field", ["vm_id", "sha256", "customer"])
def test_a_request_naming_another_image_than_the_bundle_is_refused(world, field):
    bundle = world.image("acme")
    envelope = world.request("acme", bundle)
    descriptor = dict(bundle["descriptor"])
    if field == "vm_id":
        descriptor["vm_id"] = secrets.token_hex(16)
    elif field == "sha256":
        descriptor["disk"] = dict(descriptor["disk"], sha256=secrets.token_hex(32))
    else:
        other = world.customer("other")
        descriptor["customer"] = {"key": customer.public_text(other.public_key()), "id": "x"}
    assert reason(world.tc.accept_request, envelope, {"descriptor": descriptor, "signature": ""}) == "request.image"


def test_a_request_missing_a_field_is_refused_by_name_not_a_crash(world):
    bundle = world.image("acme")
    envelope = world.request("acme", bundle)
    del envelope["request"]["manifest"]["metadata"]
    envelope["signature"] = base64.b64encode(world.keys["acme"].sign(
        signed_bytes(PLACEMENT_REQUEST, envelope["request"]))).decode()
    assert reason(world.tc.accept_request, envelope, bundle) == "request.image"


def test_a_sealed_key_that_is_not_strict_base64_is_not_the_customers(world):
    bundle = world.image("acme")
    bundle["descriptor"]["wrapped_key"] = "!" + bundle["descriptor"]["wrapped_key"]
    assert reason(world.tc.accept_request, world.request("acme", bundle), bundle) == "request.image-owner"


# -- the key broker: release -----------------------------------------------------------------------
def test_the_released_key_comes_in_a_launch_ticket_for_that_node_and_opens_only_under_its_label(world):
    kvm = secrets.token_bytes(32)
    node = world.node("n1")
    bundle = world.image("acme", kvm=kvm)
    record = world.tc.accept_request(world.request("acme", bundle), bundle)
    release = world.tc.release_key(record["id"], "n1")
    body = tickets.verify(release["ticket"], world.tc.identity().certificate)
    customer_id = bundle["descriptor"]["customer"]["id"]
    certificate = world.tc.registry.certificate("n1")
    assert (body["kind"], body["node"], body["vm_id"], body["customer"], body["request"]) == (
        "launch", "n1", record["vm_id"], customer_id, record["id"])
    assert (body["node_serial"], body["tk_name"]) == (certificate["serial"], certificate["tk_name"])
    assert (body["vcpus"], body["memory_mib"], body["image_sha256"]) == (1, 64, record["image_sha256"])
    assert body["expires"] - body["issued"] == tickets.TTL
    wrapped = base64.b64decode(body["kvm"])
    assert wrap.unwrap(node.tk, wrapped, tickets.label("launch", "kvm", record["vm_id"], customer_id, body["id"])) == kvm
    for other in (f"tccdeploy-vm:{record['vm_id']}".encode(),  # the old VM-only label
                  tickets.label("launch", "kvm", record["vm_id"], customer_id, tickets.new_id()),  # another ticket
                  tickets.label("launch", "kvm", record["vm_id"], "0" * 32, body["id"]),  # another customer
                  tickets.label("migrate-in", "kvm", record["vm_id"], customer_id, body["id"])):  # another use
        with pytest.raises(ValueError):
            wrap.unwrap(node.tk, wrapped, other)
    assert len(world.tc.registry.releases(record["vm_id"])) == 1
    entry = [e for e in world.tc.registry.audit_entries(vm=record["vm_id"]) if e["kind"] == "key-release"][-1]
    assert entry["data"]["ticket"] == body["id"]  # the audit names the ticket


def test_a_request_whose_image_is_no_longer_its_customers_gets_no_key(world):
    world.node("n1")
    record = world.accepted("acme")
    with world.tc.registry.transaction() as db:
        db.execute("DELETE FROM images WHERE vm_id = ?", (record["vm_id"],))
    assert reason(world.tc.release_key, record["id"], "n1") == "request.image-owner"


def test_a_node_without_a_trusted_attestation_or_a_certificate_gets_no_key(world):
    world.node("n1", admit=False)
    record = world.accepted("acme")
    with world.tc.registry.transaction() as db:
        db.execute("UPDATE nodes SET state = 'admitted' WHERE name = 'n1'")  # as if admitted, with nothing behind it
    assert reason(world.tc.release_key, record["id"], "n1") == "release.not-fresh"  # no attestation at all
    world.attest("n1")
    assert reason(world.tc.release_key, record["id"], "n1") == "release.no-certificate"


# -- constraints, the one function -----------------------------------------------------------------
NODE = NodeRecord("n1", "admitted", "site1", "127.0.1.7", "b2")
VERSIONS = {"b1": "2026.1", "b2": "2026.2"}


def vm(node: str = "n1", state: str = "running", group: str | None = None, customer_: str = "acme",
       vm_id: str = "v") -> VMRecord:
    return VMRecord(vm_id, "name", customer_, node, state, anti_affinity=group)


@pytest.mark.parametrize("spec, vms, capacity, expected", [
    ({}, [], None, []),
    ({"constraints": {"sites": ["site1"]}}, [], None, []),
    ({"constraints": {"sites": ["site2"]}}, [], None, ["site site1 not in ['site2']"]),
    ({"constraints": {"builds": ["b2"]}}, [], None, []),
    ({"constraints": {"builds": ["b1"]}}, [], None, ["build b2 not in ['b1']"]),
    ({"constraints": {"minBuildVersion": "2026.2"}}, [], None, []),  # equal is enough
    ({"constraints": {"minBuildVersion": "2026.3"}}, [], None, ["build b2 older than 2026.3"]),
    ({}, [vm()], 1, ["full (1/1 VMs)"]),
    ({}, [vm(state="destroyed"), vm(node="n2")], 1, []),  # only live VMs on this node count
    ({"constraints": {"antiAffinityGroup": "g"}}, [vm(group="g")], None, ["already runs a VM of anti-affinity group g"]),
    ({"constraints": {"antiAffinityGroup": "g"}}, [vm(group="g", customer_="other")], None, []),  # another customer's
    ({"constraints": {"antiAffinityGroup": "g"}}, [vm(group="h")], None, []),
    ({"constraints": {"antiAffinityGroup": "g"}}, [vm(group="g", node="n2")], None, []),
])
def test_constraints_judge_one_node(spec, vms, capacity, expected):
    assert constraints.problems(spec, NODE, vms, VERSIONS, "acme", capacity) == expected


def test_the_vms_are_read_only_where_a_limit_or_a_group_weighs_them():
    """Issue 20: a release's guard makes a record of each VM on the node only when the request
    has a group or the roster a limit; both still see every VM (the cases above)."""
    read: list[int] = []

    def vms():  # type: ignore[no-untyped-def]
        read.append(1)
        yield vm(group="g")

    assert constraints.problems({"constraints": {"sites": ["site1"]}}, NODE, vms(), VERSIONS, "acme", None) == [] and not read
    assert constraints.problems({}, NODE, vms(), VERSIONS, "acme", 1) == ["full (1/1 VMs)"] and read


def test_a_build_the_tc_does_not_know_is_never_recent_enough():
    assert constraints.problems({"constraints": {"minBuildVersion": "1.0"}}, dataclasses.replace(NODE, build="mystery"), [], VERSIONS,
                                "acme", None) == ["build mystery older than 1.0"]


# -- the customer's queries -----------------------------------------------------------------------
def test_a_query_signature_that_is_not_strict_base64_is_refused(world):
    record = world.accepted("acme")
    query = sign_customer_query(world.keys["acme"], record["id"], "status")
    assert reason(check_customer_query, world.tc.registry, record["id"], "status", query["time"],
                  query["signature"][:8] + "!" + query["signature"][8:]) == "query.signature"


# -- receipts ---------------------------------------------------------------------------------------
def test_a_receipt_verifies_only_as_the_tc_signed_it(tc_identity, tmp_path):
    body = {"vm": "web", "vm_id": "v", "customer": "acme", "node": "n1", "time": 1.0}
    signed = receipts.sign(tc_identity, body)
    assert receipts.verify(signed, tc_identity.certificate) == {
        "type": "tccdeploy-launch-receipt", "version": 2, **body,
        "tc": hashlib.sha256(tc_identity.certificate.public_bytes(serialization.Encoding.DER)).hexdigest()}
    assert receipts.sign(tc_identity, dict(body, launch_evidence={}))["receipt"]["version"] == 3
    assert receipts.sign(tc_identity, dict(body, launch_evidence={}, customer_key_id="k"))["receipt"]["version"] == 4

    def refusal(envelope, ca=tc_identity.certificate) -> tuple[str, str]:  # type: ignore[no-untyped-def]
        with pytest.raises(receipts.ReceiptError) as info:
            receipts.verify(envelope, ca)
        return info.value.reason, str(info.value)

    assert refusal(dict(signed, receipt=dict(signed["receipt"], node="n2")))[0] == "receipt.signature"
    other = identity.init(str(tmp_path / "other"))[0]
    assert refusal(signed, other.certificate)[0] == "receipt.malformed"  # its certificate is not this TC's
    forged = receipts.sign(other, body)  # another TC's receipt, claiming to be this one's
    forged["receipt"]["tc"] = signed["receipt"]["tc"]
    assert refusal(forged)[0] == "receipt.malformed"
    audit_der = tc_identity.purpose("audit").certificate.public_bytes(serialization.Encoding.DER)
    as_audit = dict(signed, certificate=base64.b64encode(audit_der).decode())  # a key for another purpose
    assert refusal(as_audit) == ("receipt.malformed", "not a receipt of this TC: the signing certificate is not for "
                                                      "receipt signatures")
    by_audit_key = signed_bytes(receipts.DOMAIN, signed["receipt"])  # the receipt key's certificate, another key's signature
    audit_signed = dict(signed, signature=base64.b64encode(tc_identity.purpose("audit").key.sign(
        by_audit_key, ec.ECDSA(hashes.SHA256()))).decode())
    assert refusal(audit_signed)[0] == "receipt.signature"
    envelope_only = "not a receipt: it holds exactly receipt, signature and certificate"
    for broken, code, why in (({}, "receipt.malformed", envelope_only),
                              (dict(signed, note="unsigned"), "receipt.malformed", envelope_only),
                              ([signed], "receipt.malformed", envelope_only),
                              (dict(signed, signature="!!"), "receipt.malformed",
                               "not a receipt of this TC: not base64: Only base64 data is allowed"),
                              (dict(signed, receipt=dict(signed["receipt"], type="other")), "receipt.malformed",
                               "not a tccdeploy launch receipt"),
                              (dict(signed, receipt=[1]), "receipt.malformed", "not a tccdeploy launch receipt"),
                              (dict(signed, receipt=dict(signed["receipt"], tc="0" * 64)), "receipt.other-tc",
                               "the receipt names another TC than this certificate")):
        assert refusal(broken) == (code, why)


def test_a_purpose_certificate_must_be_the_tcs_for_that_purpose_and_valid(tc_identity):
    ca, ca_key = tc_identity.certificate, tc_identity.key
    now = datetime.datetime.now(datetime.UTC)

    def made(purpose_oid, not_after, signer=ca_key, issuer=ca.subject):  # type: ignore[no-untyped-def]
        key = ec.generate_private_key(ec.SECP256R1())
        cert = (x509.CertificateBuilder().subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "k")]))
                .issuer_name(issuer).public_key(key.public_key()).serial_number(1)
                .not_valid_before(now - datetime.timedelta(days=2)).not_valid_after(not_after)
                .add_extension(x509.ExtendedKeyUsage([purpose_oid]), critical=True).sign(signer, hashes.SHA256()))
        return cert.public_bytes(serialization.Encoding.PEM)

    good = identity.PURPOSES["receipt"]
    assert identity.purpose_certificate(made(good, now + datetime.timedelta(days=1)), ca, "receipt")
    with pytest.raises(ValueError, match="validity"):
        identity.purpose_certificate(made(good, now - datetime.timedelta(days=1)), ca, "receipt")
    with pytest.raises(ValueError, match="not for receipt"):
        identity.purpose_certificate(made(identity.PURPOSES["audit"], now + datetime.timedelta(days=1)), ca, "receipt")
    stranger = ec.generate_private_key(ec.SECP256R1())
    with pytest.raises(ValueError, match="not issued"):
        identity.purpose_certificate(made(good, now + datetime.timedelta(days=1), signer=stranger), ca, "receipt")


# -- the roster's names for an EK ----------------------------------------------------------------------
def test_an_ek_is_named_by_its_certificate_and_by_its_public_key(tc_identity):
    der = tc_identity.wrap_certificate.public_bytes(serialization.Encoding.DER)
    by_cert, by_key = roster.ek_identities(der)
    spki = tc_identity.wrap_certificate.public_key().public_bytes(serialization.Encoding.DER,
                                                                  serialization.PublicFormat.SubjectPublicKeyInfo)
    assert by_cert == "sha256:" + hashlib.sha256(der).hexdigest() and by_key == "sha256:" + hashlib.sha256(spki).hexdigest()


# -- the audit log's verification, by reason -----------------------------------------------------------
def _rows(tc_identity) -> list[dict]:  # type: ignore[type-arg]
    auditor, prev, rows = audit.Auditor(tc_identity), audit.GENESIS, []
    for i in range(1, 4):
        entry = {"id": i, "time": float(i), "kind": "k", "node": "n", "vm": None, "data": {"i": i}}
        digest, signature = auditor(prev, entry)
        rows.append(entry | {"prev": prev, "hash": digest, "signature": signature})
        prev = digest
    return rows


def test_audit_verification_names_each_problem(tc_identity, tmp_path):
    ca, pem = tc_identity.certificate, tc_identity.purpose("audit").pem
    rows = _rows(tc_identity)
    assert audit.verify_entries(rows, ca, pem).ok
    cases = {
        "audit.deleted": [rows[0], rows[2]],
        "audit.reordered": [rows[0], dict(rows[1], prev="f" * 64), rows[2]],
        "audit.edited": [rows[0], dict(rows[1], data={"i": 9}), rows[2]],
        "audit.unsigned": [rows[0], dict(rows[1], signature=rows[0]["signature"]), rows[2]],
    }
    for code, changed in cases.items():
        result = audit.verify_entries(changed, ca, pem)
        assert result.ok is False and result.code == code and result.entries == len(changed), (code, result)
        assert len(result.head) == 64 and result.problem
    wrong = audit.verify_entries(rows, ca, tc_identity.purpose("receipt").pem)
    assert wrong.ok is False and wrong.code == "audit.certificate" and wrong.entries == 3 and wrong.problem
    other = identity.init(str(tmp_path / "other"))[0]
    assert audit.verify_entries(rows, other.certificate, other.purpose("audit").pem).code == "audit.unsigned"
    assert wrong.head == audit.GENESIS and "the audit certificate is not this TC's" in wrong.problem

    def failed(result, code: str, entries: int, says: str) -> None:  # type: ignore[no-untyped-def]
        assert (result.ok, result.code, result.entries) == (False, code, entries) and says in result.problem, result
        assert result.head == rows[entries - 1]["hash"]  # where the chain stood when it stopped

    failed(audit.verify_entries(rows, ca, pem, expect_head=f"4:{rows[2]['hash']}"), "audit.truncated", 3,
           "entries were removed")
    head = {"count": 3, "head": rows[2]["hash"], "signature": rows[2]["signature"]}
    assert audit.verify_entries(rows, ca, pem, checkpoint=head).ok
    failed(audit.verify_entries(rows[:2], ca, pem, checkpoint=head), "audit.checkpoint-missing", 2,
           f"the published checkpoint 3:{rows[2]['hash'][:16]}... is not in this")
    failed(audit.verify_entries(rows, ca, pem, checkpoint=dict(head, signature=rows[1]["signature"])),
           "audit.checkpoint-unsigned", 3, "the checkpoint is not signed by this TC's audit key")
    reordered = audit.verify_entries(cases["audit.reordered"], ca, pem)
    assert "entry 2 does not follow entry 1" in reordered.problem, reordered
    assert audit.verify_entries(rows).ok and audit.verify_entries(rows, ca, None).ok  # hashes only, said so by the CLI


# A flipped byte in the certificate can make its serial negative, which this cryptography loads with a
# warning and a later release refuses: the test takes the later release's behaviour.
@pytest.mark.filterwarnings("error::cryptography.utils.CryptographyDeprecationWarning")
def test_every_byte_of_a_receipt_is_signed_or_checked(tc_identity):
    """Change any one byte of a receipt file (outside JSON's whitespace) and it no longer verifies."""
    import json

    raw = json.dumps(receipts.sign(tc_identity, {"vm": "web", "vm_id": "v" * 32, "node": "n1", "time": 1.5})).encode()
    for i in range(len(raw)):
        altered = bytearray(raw)
        altered[i] = (altered[i] + 1) % 256
        try:
            receipts.verify(json.loads(bytes(altered)), tc_identity.certificate)
        except (receipts.ReceiptError, ValueError, UnicodeDecodeError):
            continue
        assert raw[i:i + 1].isspace() or altered[i:i + 1].isspace(), f"byte {i} ({raw[i:i + 20]!r}) is not protected"


def test_records_take_their_fields_from_a_row_or_json_and_give_them_back():
    from tccdeploy.coordinator.records import RequestRecord

    row = {"id": "r1", "customer": "acme", "vm": "web", "vm_id": "v", "image_sha256": "d", "spec": {"vcpus": 1},
           "state": "accepted", "received": 1.0, "wrapped_key": "the TC's, never the engine's"}
    record = RequestRecord.from_row(row)
    assert record.state == "accepted" and "wrapped_key" not in record.as_dict()
    assert RequestRecord.from_row(record.as_dict()) == record
    assert VMRecord.from_row(vm().as_dict()) == vm()


@pytest.mark.parametrize("offset, taken", [(-300, True), (-301, False), (24 * 3600, True), (24 * 3600 + 1, False)],
                         ids=["5-min-ahead", "over-5-min-ahead", "a-day-old", "over-a-day-old"])
def test_a_request_is_taken_from_five_minutes_ahead_to_a_day_old_and_not_a_second_beyond(world, monkeypatch, offset,
                                                                                       taken):
    """The bounds exactly, on a frozen clock: a request signed up to five minutes in the future
    (clock skew) or at most a day ago."""
    now = datetime.datetime(2026, 12, 2, 12, 0, 0, tzinfo=datetime.UTC)
    bundle = world.image("acme")
    envelope = world.request("acme", bundle, created=now - datetime.timedelta(seconds=offset))
    monkeypatch.setattr(time, "time", lambda: now.timestamp())
    if taken:
        assert world.tc.accept_request(envelope, bundle)["id"] == envelope["request"]["id"]
    else:
        assert reason(world.tc.accept_request, envelope, bundle) == "request.stale"


def test_a_customer_query_is_signed_in_utc_and_taken_within_five_minutes_exactly(world, monkeypatch):
    from tccdeploy.coordinator.keybroker import QUERY_MAX_SKEW, check_customer_query, sign_customer_query

    record = world.accepted("acme")
    query = sign_customer_query(world.keys["acme"], record["id"], "status")
    assert query["time"].endswith("+00:00")  # UTC whatever the machine's zone
    signed = datetime.datetime.fromisoformat(query["time"]).timestamp()
    monkeypatch.setattr(time, "time", lambda: signed + QUERY_MAX_SKEW)
    assert check_customer_query(world.tc.registry, record["id"], "status", query["time"], query["signature"])
    later = sign_customer_query(world.keys["acme"], record["id"], "receipt")
    monkeypatch.setattr(time, "time", lambda: datetime.datetime.fromisoformat(later["time"]).timestamp()
                        + QUERY_MAX_SKEW + 1)
    assert reason(check_customer_query, world.tc.registry, record["id"], "receipt", later["time"],
                  later["signature"]) == "query.expired"


def test_a_receipt_answers_a_request_only_if_its_id_vm_image_and_key_are_that_requests():
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    key = Ed25519PrivateKey.generate().public_key()
    request = {"id": "r" * 32, "image": {"vm_id": "v" * 32, "sha256": "s" * 64}, "customer": customer.public_text(key)}
    body = {"request": "r" * 32, "vm_id": "v" * 32, "image_sha256": "s" * 64, "customer_key_id": customer.key_id(key)}
    receipts.check_answers(body, request)
    receipts.check_answers(body, request_id="r" * 32, key_id=customer.key_id(key))
    receipts.check_answers({}, None)  # nothing asked, nothing checked
    for changed in ({"request": "x"}, {"vm_id": "x"}, {"image_sha256": "x"}, {"customer_key_id": "x"}):
        with pytest.raises(receipts.ReceiptError) as info:
            receipts.check_answers(dict(body, **changed), request)
        assert info.value.reason == "receipt.other-request", changed
    older = {k: v for k, v in body.items() if k != "customer_key_id"}  # a version 3 receipt
    for kwargs in ({"request": request}, {"key_id": customer.key_id(key)}):
        with pytest.raises(receipts.ReceiptError, match="does not name the customer's key") as info:
            receipts.check_answers(older, **kwargs)
        assert info.value.reason == "receipt.other-request"
    receipts.check_answers(older, request_id="r" * 32)
    with pytest.raises(receipts.ReceiptError) as info:
        receipts.check_answers(body, request_id="x")
    assert info.value.reason == "receipt.other-request"
    with pytest.raises(receipts.ReceiptError) as info:
        receipts.check_answers(body, {"id": "r" * 32})
    assert info.value.reason == "receipt.other-request"


@pytest.mark.parametrize("text", ['{"a": 1, "a": 2}', '{"a": {"b": 1, "b": 1}}', "[1]", "not json", '"x"'])
def test_a_receipt_file_is_one_json_object_with_each_name_once(text):
    with pytest.raises(receipts.ReceiptError) as info:
        receipts.parse(text)
    assert info.value.reason == "receipt.malformed"
    assert receipts.parse('{"a": {"b": 1}, "b": 2}') == {"a": {"b": 1}, "b": 2}  # the same name in two objects is fine


def test_a_redacted_event_replays_as_its_digest_only_where_redactions_are_allowed():
    from tccdeploy.crypto.runtime import event_digest, redact, replay

    events = [{"event": "launched", "vm_id": "a" * 32}, {"event": "launched", "vm_id": "b" * 32}]
    shown = redact(events, "b" * 32)
    assert shown == [{"redacted": event_digest(events[0]).hex()}, events[1]]
    assert replay(shown, redactions=True) == replay(events) != replay(shown)
    assert replay([{"redacted": event_digest(events[0]).hex(), "vm_id": "a" * 32}], redactions=True) != replay(events[:1])
    for digest in ("ab", 5, "zz" * 32):
        with pytest.raises((ValueError, TypeError)):
            replay([{"redacted": digest}], redactions=True)
