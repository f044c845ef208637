"""A hostile engine against the node's record of spent tickets (tvmm/tickets.py). It opens as
many sessions to the TVMM service as it likes, each its own process, and the node's clock is the
provider's to set. Two sessions spending at once each wrote back the record it had read, so one
ticket's record was lost and the ticket could be spent again within its life; and ids are
forgotten a week past their expiry by the node's clock, so a clock moved forward and back
forgot a ticket still valid (both found in review). Every test here failed before its fix."""

from __future__ import annotations

import base64
import json
import threading
import time

import pytest
from cryptography.hazmat.primitives import serialization

from tccdeploy.coordinator import identity
from tccdeploy.crypto import ticket as tickets
from tccdeploy.tvmm import tickets as service_tickets
from tccdeploy.tvmm.interface import ServiceError

from ..test_tickets import issue, node_service, service_reason  # noqa: F401 - the fixture


def spent_together(monkeypatch, bodies: list[dict]) -> list[str | None]:  # type: ignore[type-arg]
    """Each body spent by its own thread, the record read by all before any writes (as far as
    the record's lock lets them): each thread's refusal reason, or None."""
    original = service_tickets._read
    gate = threading.Barrier(len(bodies), timeout=1.0)

    def read_then_wait() -> service_tickets._Record:
        record = original()
        try:
            gate.wait()  # the others read now too, unless a lock keeps them out
        except threading.BrokenBarrierError:
            pass
        return record

    monkeypatch.setattr(service_tickets, "_read", read_then_wait)
    outcomes: list[str | None] = [None] * len(bodies)

    def spend(i: int) -> None:
        try:
            service_tickets.spend(bodies[i])
        except ServiceError as exc:
            outcomes[i] = exc.reason

    threads = [threading.Thread(target=spend, args=(i,)) for i in range(len(bodies))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    monkeypatch.setattr(service_tickets, "_read", original)
    return outcomes


def test_two_sessions_spending_at_once_both_stay_spent(node_service, tc_identity, monkeypatch):  # noqa: F811
    first, second = (service_tickets.check(issue(tc_identity), "launch") for _ in range(2))
    assert spent_together(monkeypatch, [first, second]) == [None, None]
    used = json.loads((node_service / service_tickets.USED_FILE).read_text())["used"]
    assert {first["id"], second["id"]} <= set(used)
    for body in (first, second):
        with pytest.raises(ServiceError) as info:
            service_tickets.spend(body)
        assert info.value.reason == "ticket.replayed"


def test_one_ticket_spent_by_two_sessions_at_once_is_spent_once(node_service, tc_identity, monkeypatch):  # noqa: F811
    body = service_tickets.check(issue(tc_identity), "launch")
    assert sorted(spent_together(monkeypatch, [body, dict(body)]), key=str) == [None, "ticket.replayed"]


def test_a_ticket_forgotten_by_a_clock_moved_forward_is_not_spent_again_when_it_moves_back(
        node_service, tc_identity, monkeypatch):  # noqa: F811
    envelope = issue(tc_identity)
    service_tickets.spend(service_tickets.check(envelope, "launch"))
    later = time.time() + service_tickets.KEEP_AFTER_EXPIRY + 3600  # the provider's NTP, a week on
    monkeypatch.setattr(service_tickets.time, "time", lambda: later)
    service_tickets.spend({"id": tickets.new_id(), "expires": int(later) + 300})  # any spend: the old id goes
    assert envelope["ticket"]["id"] not in json.loads((node_service / service_tickets.USED_FILE).read_text())["used"]
    monkeypatch.undo()  # and back: the ticket is within its life again
    with pytest.raises(ServiceError) as info:
        service_tickets.check(envelope, "launch")
    assert info.value.reason == "ticket.horizon"
    with pytest.raises(ServiceError) as info:
        service_tickets.spend(envelope["ticket"])
    assert info.value.reason == "ticket.horizon"


def test_what_is_done_once_on_a_node_is_refused_a_second_time_even_by_racing_sessions(node_service, monkeypatch):  # noqa: F811
    expires = int(time.time()) + 300
    assert not service_tickets.remembered("launched:r1")
    service_tickets.remember("launched:r1", expires)
    assert service_tickets.remembered("launched:r1")
    with pytest.raises(ServiceError) as info:
        service_tickets.remember("launched:r1", expires)
    assert info.value.reason == "tvmm.done"
    assert oct((node_service / service_tickets.USED_FILE).stat().st_mode & 0o777) == "0o600"


def test_the_first_form_of_the_record_is_still_read(node_service, tc_identity):  # noqa: F811
    """A node upgraded with tickets spent under the previous build: they stay spent."""
    envelope = issue(tc_identity)
    (node_service / service_tickets.USED_FILE).write_text(json.dumps({envelope["ticket"]["id"]: int(time.time()) + 300}))
    with pytest.raises(ServiceError) as info:
        service_tickets.check(envelope, "launch")
    assert info.value.reason == "ticket.replayed"


# -- one session at a time on a VM's folder ----------------------------------------------------
# Between a launch's checks (no QEMU, the disk's digest) and its QEMU opening the disk, another
# session's discard removed the folder (a migration's destination mark with it), and a disk of the
# engine's choosing could be put where the checked one was (found in review). The key-using
# operations hold the VM's lock from their checks until QEMU holds the disk; a discard does not wait.
VM = "1" * 32


def held_by_another_session(vm_id: str):  # type: ignore[no-untyped-def]
    """The VM's lock taken as another session's process would: its own descriptor."""
    import fcntl
    import os

    from tccdeploy.tvmm import vm

    folder = vm.config.current().path("vm-locks")
    os.makedirs(folder, mode=0o700, exist_ok=True)
    fd = os.open(os.path.join(folder, vm_id + ".lock"), os.O_CREAT | os.O_RDWR)
    fcntl.flock(fd, fcntl.LOCK_EX)
    return fd


def test_a_discard_while_another_session_starts_the_vm_is_refused(node_service):  # noqa: F811
    import os

    from tccdeploy.tvmm import migrate

    (node_service / "vms" / VM).mkdir(parents=True, mode=0o700)  # a copied disk, not yet used
    fd = held_by_another_session(VM)
    try:
        with pytest.raises(ServiceError) as info:
            migrate.migrate_in_discard(VM)
        assert info.value.reason == "tvmm.vm-busy"
        assert (node_service / "vms" / VM).exists()
    finally:
        os.close(fd)
    assert migrate.migrate_in_discard(VM)["status"] == "discarded"  # once it is free


KINDS = {  # each key-using operation that starts a QEMU here, and what its ticket holds beyond a launch's
    "launch": ({}, ()),
    "migrate-in": ({"migration": "7", "source": "node2", "kmig": "AAAA"}, ("request",)),
    "resume": ({"suspension": "7", "ksus": "AAAA", "state_sha256": "5" * 64}, ("request",)),
    "end": ({"action": "destroy"}, ("request", "name", "image_sha256", "vcpus", "memory_mib", "kvm")),
    "settle": ({"migration": "7", "outcome": "abort", "role": "destination"},
               ("request", "name", "image_sha256", "vcpus", "memory_mib", "kvm")),
}


def ticket_of(tc_identity, kind: str) -> dict:  # type: ignore[no-untyped-def,type-arg]
    from tccdeploy.crypto import ticket as crypto_tickets

    extra, dropped = KINDS[kind]
    fields = {k: v for k, v in (issue(tc_identity)["ticket"] | extra).items() if k not in dropped}
    fields.update(kind=kind, vm_id=VM)
    return crypto_tickets.issue(tc_identity.purpose("ticket").key, tc_identity.purpose("ticket").certificate, fields)


def operations(tc_identity):  # type: ignore[no-untyped-def]
    """Each operation that acts on a VM's folder: (call, the refusal it ends in here once it runs)."""
    from tccdeploy.tvmm import migrate, suspend, vm

    return {
        "launch": (lambda: vm.launch(ticket_of(tc_identity, "launch")), "tvmm.disk-digest"),
        "migrate_in_start": (lambda: migrate.migrate_in_start(ticket_of(tc_identity, "migrate-in")), "tvmm.disk-digest"),
        "vm_resume": (lambda: suspend.vm_resume(ticket_of(tc_identity, "resume")), "tvmm.disk-digest"),
        "migrate_in_finish": (lambda: migrate.migrate_in_finish(VM), "tvmm.no-migration"),
        "migrate_in_settle": (lambda: migrate.migrate_in_settle(VM, ticket_of(tc_identity, "settle"), True),
                              "tvmm.not-migrating"),
        "migrate_out_end": (lambda: migrate.migrate_out_end(VM, dict(ticket_of(tc_identity, "settle"))),
                            "ticket.vm"),
        "vm_end": (lambda: vm.vm_end(ticket_of(tc_identity, "end")), None),
    }


@pytest.mark.parametrize("name", ["launch", "migrate_in_start", "vm_resume", "migrate_in_finish", "migrate_in_settle",
                                  "migrate_out_end", "vm_end"])
def test_an_operation_on_a_vms_folder_waits_for_the_vms_lock(node_service, tc_identity, name):  # noqa: F811
    """Launch, migrate-in and resume from their checks until QEMU holds the disk; the arrival's
    mark and record; the settlements and ends that kill QEMU and remove the folder."""
    import os

    call, ends_in = operations(tc_identity)[name]
    fd = held_by_another_session(VM)
    outcome: list[str | None] = []

    def start() -> None:
        try:
            call()
            outcome.append(None)
        except ServiceError as exc:
            outcome.append(exc.reason)
        except Exception as exc:  # noqa: BLE001 - past the lock and the ticket (this node has no TPM)
            outcome.append(type(exc).__name__)

    thread = threading.Thread(target=start)
    thread.start()
    thread.join(0.5)
    try:
        assert thread.is_alive() and outcome == []  # waiting, nothing checked or spent yet
        assert not (node_service / service_tickets.USED_FILE).exists()
    finally:
        os.close(fd)
    thread.join(10)
    if ends_in is None:  # then it spent its ticket and acted
        assert len(outcome) == 1 and (node_service / service_tickets.USED_FILE).exists()
    else:
        assert outcome == [ends_in]  # then its checks, in turn (nothing of the VM is here)


def test_a_discard_of_a_vm_never_here_leaves_no_trace(node_service):  # noqa: F811
    from tccdeploy.tvmm import migrate

    with pytest.raises(ServiceError) as info:
        migrate.migrate_in_discard("2" * 32)
    assert info.value.reason == "tvmm.not-migrating"
    assert not (node_service / "vm-locks").exists() and not (node_service / "vms").exists()


def test_a_launch_and_a_resume_are_remembered_past_every_pruning(node_service, tc_identity, monkeypatch):  # noqa: F811
    """Another ticket of the same request (a release asked for again) may expire after the one
    that launched: kept a week past that one's expiry, the launch was forgotten while the other
    was still within its life, past the horizon (found in review). Kept for good."""
    service_tickets.remember("launched:r1", service_tickets.FOREVER)
    later = time.time() + 10 * service_tickets.KEEP_AFTER_EXPIRY
    monkeypatch.setattr(service_tickets.time, "time", lambda: later)
    service_tickets.spend({"id": tickets.new_id(), "expires": int(later) + 300})  # prunes what it may
    assert service_tickets.remembered("launched:r1")


@pytest.mark.parametrize("kept", [{"v": 2, "used": "x", "once": {}, "horizon": 0}, {"v": 2, "used": {}},
                                  {"v": 2, "used": {"a": "soon"}, "once": {}, "horizon": 0}, ["a"]])
def test_a_record_of_spent_tickets_that_does_not_read_refuses_every_ticket(node_service, tc_identity, kept):  # noqa: F811
    """Fail closed: a record half written by hand, or of an unknown form, is never taken as empty."""
    (node_service / service_tickets.USED_FILE).write_text(json.dumps(kept))
    for call in (lambda: service_tickets.check(issue(tc_identity), "launch"),
                 lambda: service_tickets.remember("launched:r1", int(time.time()))):
        with pytest.raises(ServiceError, match="the service's record of used tickets is unreadable") as info:
            call()
        assert info.value.reason == "tvmm.state"


def test_remembering_prunes_what_is_long_expired_as_spending_does(node_service, tc_identity):  # noqa: F811
    old = int(time.time()) - service_tickets.KEEP_AFTER_EXPIRY - 60
    service_tickets.spend({"id": "old-ticket", "expires": old})
    service_tickets.remember("launched:r1", service_tickets.FOREVER)
    kept = json.loads((node_service / service_tickets.USED_FILE).read_text())
    assert kept["used"] == {} and kept["horizon"] == old and kept["once"] == {"launched:r1": service_tickets.FOREVER}


def test_a_ca_written_beside_the_tk_that_its_policy_does_not_pin_takes_no_ticket(node_service, tc_identity, tmp_path):  # noqa: F811
    """The pin was a field beside the TK: a boot of the provider's own software (root there, the
    TK unusable) rewrote it to an engine's CA, and back in the approved boot the service took the
    engine's tickets for the TK the TC certified (found in review). The TK's policy names its CA."""
    other, _ = identity.init(str(tmp_path / "engine-ca"))
    stored = json.loads((node_service / "tk.json").read_text())
    stored["tc_ca"] = other.certificate.public_bytes(serialization.Encoding.PEM).decode()
    (node_service / "tk.json").write_text(json.dumps(stored))
    assert service_reason(issue(other)) == "tvmm.tk-pin"
    assert service_reason(issue(tc_identity)) == "tvmm.tk-pin"  # nothing is taken until it is admitted again
    stored["pcr_policy"] = base64.b64encode(bytes(32)).decode()  # nor with the PCR branch changed to match
    (node_service / "tk.json").write_text(json.dumps(stored))
    assert service_reason(issue(other)) == "tvmm.tk-pin"
