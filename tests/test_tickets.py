"""TC tickets, both ends: the TC's signature, its ticket-only certificate from the pinned CA and
the expiry (crypto/ticket.py), then what the node's service checks before a key is unwrapped:
the kind, this node, this TK, and never twice (tvmm/tickets.py). Each refusal by its reason."""

from __future__ import annotations

import base64
import copy
import json
import os
import sys
import time
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from tpm2_pytss import TPM2B_PUBLIC, TPMA_OBJECT

from tccdeploy.coordinator import identity, tpm2
from tccdeploy.crypto import ticket as tickets
from tccdeploy.tvmm import config
from tccdeploy.tvmm import tickets as service_tickets
from tccdeploy.tvmm.interface import OPERATIONS, ServiceError, problems

TK = TPM2B_PUBLIC.parse("rsa2048:oaep-sha256:null", objectAttributes=TPMA_OBJECT.DECRYPT | TPMA_OBJECT.FIXEDTPM
                         | TPMA_OBJECT.FIXEDPARENT | TPMA_OBJECT.SENSITIVEDATAORIGIN)
TK_NAME = bytes(TK.get_name())


def body(**changes) -> dict:  # type: ignore[no-untyped-def]
    now = int(time.time())
    out = {"v": 1, "kind": "launch", "id": tickets.new_id(), "node": "node1", "node_serial": "ab12",
           "tk_name": TK_NAME.hex(), "vm_id": "1" * 32, "name": "web", "customer": "2" * 32, "request": "3" * 32,
           "image_sha256": "4" * 64, "vcpus": 1, "memory_mib": 64, "issued": now, "expires": now + tickets.TTL,
           "kvm": base64.b64encode(bytes(256)).decode(), "runtime_pcr": 15}
    out.update(changes)
    return out


def issue(tc, **changes) -> dict:  # type: ignore[no-untyped-def]
    return tickets.issue(tc.purpose("ticket").key, tc.purpose("ticket").certificate, body(**changes))


def reason(envelope: dict, ca: x509.Certificate) -> str:
    with pytest.raises(tickets.TicketError) as info:
        tickets.verify(envelope, ca)
    return info.value.reason


def test_the_tk_name_the_tc_records_is_the_one_the_service_computes():
    assert tpm2.parse_public(TK.marshal()).name == TK_NAME


def test_a_ticket_signed_by_the_tc_verifies_and_is_what_the_services_schema_takes(tc_identity):
    envelope = issue(tc_identity)
    assert tickets.verify(envelope, tc_identity.certificate)["node"] == "node1"
    assert not problems(OPERATIONS["launch"], {"ticket": envelope})


def test_a_ticket_is_good_until_its_expiry_second_and_not_after(tc_identity):
    envelope = issue(tc_identity)
    expires = envelope["ticket"]["expires"]
    assert tickets.verify(envelope, tc_identity.certificate, now=expires)["expires"] == expires
    with pytest.raises(tickets.TicketError, match="the ticket has expired") as info:
        tickets.verify(envelope, tc_identity.certificate, now=expires + 0.5)
    assert info.value.reason == "ticket.expired"


def test_an_altered_ticket_is_refused(tc_identity):
    envelope = issue(tc_identity)
    for field, value in (("node", "node2"), ("vcpus", 64), ("expires", 2**39), ("vm_id", "5" * 32)):
        altered = copy.deepcopy(envelope)
        altered["ticket"][field] = value
        assert reason(altered, tc_identity.certificate) == "ticket.signature", field


def test_a_ticket_from_another_tc_or_another_purpose_key_is_refused(tc_identity, tmp_path: Path):
    other, _ = identity.init(str(tmp_path / "other"))
    assert reason(issue(other), tc_identity.certificate) == "ticket.certificate"  # another TC's CA
    # The TC's own receipt key, not its ticket key: a signature for one purpose is not one for another.
    receipt = tc_identity.purpose("receipt")
    envelope = tickets.issue(receipt.key, receipt.certificate, body())
    assert reason(envelope, tc_identity.certificate) == "ticket.certificate"
    # The right certificate, but the body signed by another key.
    forged = tickets.issue(other.purpose("ticket").key, tc_identity.purpose("ticket").certificate, body())
    assert reason(forged, tc_identity.certificate) == "ticket.signature"


def test_an_expired_or_malformed_ticket_is_refused(tc_identity):
    assert reason(issue(tc_identity, expires=int(time.time()) - 1), tc_identity.certificate) == "ticket.expired"
    envelope = issue(tc_identity)
    for broken in ({}, {"ticket": envelope["ticket"]}, dict(envelope, signature="!!"),
                   dict(envelope, certificate=envelope["certificate"] + "=")):
        assert reason(broken, tc_identity.certificate) == "ticket.malformed"


def test_labels_bind_kind_key_vm_customer_and_ticket():
    base = tickets.label("launch", "kvm", "1" * 32, "2" * 32, "3" * 32)
    others = {tickets.label("migrate-in", "kvm", "1" * 32, "2" * 32, "3" * 32),
              tickets.label("launch", "kmig", "1" * 32, "2" * 32, "3" * 32),
              tickets.label("launch", "kvm", "9" * 32, "2" * 32, "3" * 32),
              tickets.label("launch", "kvm", "1" * 32, "9" * 32, "3" * 32),
              tickets.label("launch", "kvm", "1" * 32, "2" * 32, "9" * 32)}
    assert base not in others and len(others) == 5


def test_the_pin_qualifier_binds_the_nonce_and_the_ca():
    nonce = bytes(32)
    assert tickets.pin_qualifier(nonce, b"ca") != tickets.pin_qualifier(nonce, b"other ca")
    assert tickets.pin_qualifier(nonce, b"ca") != tickets.pin_qualifier(bytes([1]) * 32, b"ca")
    assert tickets.pin_qualifier(nonce, b"ca") != nonce


PCR_POLICY = bytes([0x11]) * 32  # a PolicyPCR digest (the service's TPM makes it; any stands in here)


def pinned_tk(ca_der: bytes) -> TPM2B_PUBLIC:
    """The TK as tk_create makes it: its policy pins ca_der (crypto.ticket.pinned_policy)."""
    return TPM2B_PUBLIC.parse("rsa2048:oaep-sha256:null", objectAttributes=TPMA_OBJECT.DECRYPT | TPMA_OBJECT.FIXEDTPM
                              | TPMA_OBJECT.FIXEDPARENT | TPMA_OBJECT.SENSITIVEDATAORIGIN,
                              authPolicy=tickets.pinned_policy(PCR_POLICY, ca_der))


@pytest.fixture
def node_service(tmp_path: Path, tc_identity, monkeypatch):  # type: ignore[no-untyped-def]
    """The service's state on node1: a TK made with the TC's CA pinned (its policy names the CA);
    the tickets here name that TK (TK_NAME)."""
    state = tmp_path / "state"
    state.mkdir(mode=0o700)
    pem = tc_identity.certificate.public_bytes(serialization.Encoding.PEM).decode()
    tk = pinned_tk(tc_identity.certificate.public_bytes(serialization.Encoding.DER))
    monkeypatch.setattr(sys.modules[__name__], "TK_NAME", bytes(tk.get_name()))
    (state / "tk.json").write_text(json.dumps({"private": "", "public": base64.b64encode(tk.marshal()).decode(),
                                               "bank": "sha256", "pcrs": [0], "tc_ca": pem,
                                               "pcr_policy": base64.b64encode(PCR_POLICY).decode()}))
    previous = config._current
    config.use(config.Config(node="node1", tpm="none", state_dir=str(state), eventlog=""))
    yield state
    config._current = previous


def service_reason(envelope: dict, kind: str = "launch") -> str:
    with pytest.raises(ServiceError) as info:
        service_tickets.check(envelope, kind)
    return info.value.reason


def test_the_service_takes_a_ticket_for_itself_once(node_service, tc_identity):
    envelope = issue(tc_identity)
    checked = service_tickets.check(envelope, "launch")
    service_tickets.spend(checked)
    assert service_reason(envelope) == "ticket.replayed"
    with pytest.raises(ServiceError) as info:
        service_tickets.spend(checked)
    assert info.value.reason == "ticket.replayed"
    assert oct((node_service / service_tickets.USED_FILE).stat().st_mode & 0o777) == "0o600"


def test_the_services_used_tickets_are_kept_a_week_past_expiry_and_a_broken_record_is_refused(node_service, tc_identity):
    now = int(time.time())
    old, recent = tickets.new_id(), tickets.new_id()
    record = node_service / service_tickets.USED_FILE
    record.write_text(json.dumps({old: now - service_tickets.KEEP_AFTER_EXPIRY - 60,
                                  recent: now - service_tickets.KEEP_AFTER_EXPIRY + 60}))
    for _ in range(2):  # two tickets in turn: the record grows, the long-expired id goes
        checked = service_tickets.check(issue(tc_identity), "launch")
        service_tickets.spend(checked)
    kept = json.loads(record.read_text())
    used = kept["used"]
    assert old not in used and recent in used and used[checked["id"]] == checked["expires"] and len(used) == 3
    assert kept["horizon"] == now - service_tickets.KEEP_AFTER_EXPIRY - 60  # what was forgotten stays refused
    record.write_text("{not json")
    with pytest.raises(ServiceError, match="the service's record of used tickets is unreadable") as info:
        service_tickets.check(issue(tc_identity), "launch")
    assert info.value.reason == "tvmm.state"


def test_a_ticket_refusal_at_the_service_says_why(node_service, tc_identity):
    with pytest.raises(ServiceError, match="the ticket has expired") as info:
        service_tickets.check(issue(tc_identity, expires=int(time.time()) - 5), "launch")
    assert info.value.reason == "ticket.expired"


def test_the_service_refuses_a_ticket_for_another_node_tk_or_use(node_service, tc_identity, tmp_path: Path):
    assert service_reason(issue(tc_identity, node="node2")) == "ticket.node"
    other_tk = bytes(TPM2B_PUBLIC.parse("rsa2048:oaep-sha256:null", objectAttributes=TPMA_OBJECT.DECRYPT,
                                        authPolicy=b"x" * 32).get_name())
    assert service_reason(issue(tc_identity, tk_name=other_tk.hex())) == "ticket.tk"
    assert service_reason(issue(tc_identity), kind="migrate-in") == "ticket.kind"
    other, _ = identity.init(str(tmp_path / "engine-ca"))  # tickets from a CA the node did not pin
    assert service_reason(issue(other)) == "ticket.certificate"
    assert service_reason(issue(tc_identity, expires=int(time.time()) - 5)) == "ticket.expired"


def test_without_a_pinned_ca_no_ticket_is_taken(node_service, tc_identity):
    stored = json.loads((node_service / "tk.json").read_text())
    del stored["tc_ca"]
    (node_service / "tk.json").write_text(json.dumps(stored))
    assert service_reason(issue(tc_identity)) == "tvmm.no-tk"
    (node_service / "tk.json").unlink()
    assert service_reason(issue(tc_identity)) == "tvmm.no-tk"


def test_a_ticket_label_fits_a_tpms_label_buffer():
    """TPM2B_DATA holds 64 bytes, the trailing NUL included."""
    assert len(tickets.label("migrate-out", "kmig", "f" * 32, "f" * 64, "f" * 32)) + 1 <= 64


def test_within_a_boot_the_pinned_ca_cannot_be_replaced(node_service, tc_identity, tmp_path: Path):
    """An engine that had a new TK made under a CA of its own could sign tickets the service would
    take and order a running VM's state out: so while VMs run, a pin changes only with a TPM
    reset (a reboot, which ends them)."""
    from tccdeploy.tvmm import tpm as service_tpm

    stored = json.loads((node_service / "tk.json").read_text())
    stored["reset_count"] = 7
    (node_service / "tk.json").write_text(json.dumps(stored))
    own = tc_identity.certificate.public_bytes(serialization.Encoding.DER)
    other, _ = identity.init(str(tmp_path / "engine-ca"))
    engines = other.certificate.public_bytes(serialization.Encoding.DER)
    service_tpm._check_pin(engines, 7)  # no VM here: a node may move to another TC
    vm = node_service / "vms" / ("a" * 32)
    vm.mkdir(parents=True)
    (vm / "qemu.pid").write_text(str(os.getpid()))  # a VM's QEMU runs here (any live process stands in)
    service_tpm._check_pin(own, 7)  # the same TC again (a re-admission): fine
    with pytest.raises(ServiceError) as info:
        service_tpm._check_pin(engines, 7)
    assert info.value.reason == "tvmm.tc-ca-pinned"
    service_tpm._check_pin(engines, 8)  # after a reboot (its VMs are gone with it)


# -- a migration's settlement and a VM's end, at the service ------------------------------------
def settle(tc, **changes) -> dict:  # type: ignore[no-untyped-def]
    now = int(time.time())
    fields = {"v": 1, "kind": "settle", "id": tickets.new_id(), "node": "node1", "node_serial": "ab12",
              "tk_name": TK_NAME.hex(), "vm_id": "1" * 32, "customer": "2" * 32, "issued": now,
              "expires": now + tickets.TTL, "migration": "7", "outcome": "abort", "role": "source", "runtime_pcr": 15}
    fields.update(changes)
    envelope = tickets.issue(tc.purpose("ticket").key, tc.purpose("ticket").certificate, fields)
    if fields["kind"] == "settle" and fields["vm_id"] == "1" * 32:  # the shape the service takes
        assert not problems(OPERATIONS["migrate_out_end"], {"vm_id": "1" * 32, "ticket": envelope})
    return envelope


def test_a_settle_ticket_moves_only_its_end_of_the_pending_migration(node_service, tc_identity):
    """The source resumes only on an abort of the migration it holds, the destination runs only on
    a commit of its own: another migration's ticket, the other end's, or none at all is refused."""
    from tccdeploy.tvmm import vm

    vm_id = "1" * 32
    with pytest.raises(ServiceError) as info:  # nothing pending here
        vm.settle_ticket(settle(tc_identity), vm_id, "source")
    assert info.value.reason == "tvmm.not-migrating"
    assert not (node_service / "vms" / vm_id).exists()  # a question leaves no trace
    (node_service / "vms" / vm_id).mkdir(parents=True, mode=0o700)  # the VM is here
    vm.mark_migration(vm_id, "7", "source", was_running=True)
    assert oct((node_service / "vms" / vm_id / vm.PENDING_FILE).stat().st_mode & 0o777) == "0o600"
    for changes, where, reason in (({"migration": "6"}, "source", "tvmm.not-migrating"),
                                   ({"role": "destination"}, "source", "ticket.vm"),
                                   ({}, "destination", "ticket.vm"),
                                   ({"vm_id": "3" * 32}, "source", "ticket.vm"),
                                   ({"node": "node2"}, "source", "ticket.node"),
                                   ({"kind": "end"}, "source", "ticket.kind")):
        with pytest.raises(ServiceError) as info:
            vm.settle_ticket(settle(tc_identity, **changes), vm_id, where)
        assert info.value.reason == reason, changes
    assert vm.settle_ticket(settle(tc_identity), vm_id, "source")["outcome"] == "abort"
    vm.clear_migration(vm_id)
    assert vm.pending_migration(vm_id) is None


def test_while_a_migration_is_unsettled_neither_end_runs_pauses_or_ends_on_the_engines_word(node_service, tc_identity):
    from tccdeploy.tvmm import migrate, vm

    vm_id = "1" * 32
    (node_service / "vms" / vm_id).mkdir(parents=True, mode=0o700)  # the VM is here
    for role in ("source", "destination"):
        vm.mark_migration(vm_id, "7", role)
        for op in (vm.vm_start, vm.vm_stop):
            with pytest.raises(ServiceError) as info:
                op(vm_id)
            assert info.value.reason == "tvmm.migrating", (role, op)
        end = tickets.issue(tc_identity.purpose("ticket").key, tc_identity.purpose("ticket").certificate,
                            body(kind="end", action="destroy") | {"kind": "end"})
        with pytest.raises(ServiceError) as info:
            vm.vm_end(end)
        assert info.value.reason == "tvmm.migrating"
        assert not (node_service / service_tickets.USED_FILE).exists()  # refused before it was spent
    vm.mark_migration(vm_id, "7", "source")
    with pytest.raises(ServiceError) as info:  # only an unsettled arrival is dropped on the engine's say ...
        migrate.migrate_in_discard(vm_id)
    assert info.value.reason == "tvmm.not-migrating"
    vm.clear_migration(vm_id)
    (node_service / "vms" / vm_id / vm.WRAPPED_KEY_FILE).write_text("{}")  # ... not a VM that ran here ...
    with pytest.raises(ServiceError) as info:
        migrate.migrate_in_discard(vm_id)
    assert info.value.reason == "tvmm.not-migrating"
    (node_service / "vms" / vm_id / vm.WRAPPED_KEY_FILE).unlink()  # ... but a copied disk never used, yes
    assert migrate.migrate_in_discard(vm_id)["status"] == "discarded"
    assert not (node_service / "vms" / vm_id).exists()


def test_a_ticket_schema_takes_exactly_its_fields(tc_identity):
    """The schemas are built when crypto/ticket.py is imported; built again here, so a change to
    how they are built is seen: every field required, nothing else, the kind named, the envelope's
    three strings in their bounds."""
    import jsonschema

    own = {k: v for k, v in tickets.LAUNCH["properties"].items() if k not in tickets._COMMON and k != "kind"}
    launch = tickets.signed(tickets._body("launch", own))
    assert launch == tickets.SIGNED
    assert launch["required"] == ["certificate", "signature", "ticket"] and launch["additionalProperties"] is False
    assert launch["properties"]["ticket"]["required"] == sorted(body())
    validator = jsonschema.Draft202012Validator(launch)
    envelope = issue(tc_identity)
    assert not list(validator.iter_errors(envelope))
    broken = [dict(envelope, extra="x"), {k: v for k, v in envelope.items() if k != "certificate"},
              dict(envelope, signature="A" * 257), dict(envelope, signature="not base64!"),
              dict(envelope, certificate="A" * 4097), dict(envelope, ticket=dict(envelope["ticket"], kind="end")),
              dict(envelope, ticket=dict(envelope["ticket"], extra=1)),
              dict(envelope, ticket={k: v for k, v in envelope["ticket"].items() if k != "vm_id"})]
    for each in broken:
        assert list(validator.iter_errors(each)), each
