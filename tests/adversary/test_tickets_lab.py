"""Every key use on a node needs the TC's ticket, and a hostile engine holding real tickets
still cannot bend them: it replays a launch ticket, hands one to another node, starts a VM the
node already runs, points a migration at a key of its own, and feeds a destination a stream it
made under its own Kmig. Each is refused by the node's service with its named reason; no VM
starts twice and no state the engine made runs."""

from __future__ import annotations

import base64
import copy
import itertools
import json
import os
import signal

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.x509.oid import NameOID

from tccdeploy.coordinator import identity
from tccdeploy.crypto import stream
from tccdeploy.crypto import ticket as tickets
from tccdeploy.engine.helper import RemoteError
from tccdeploy.engine.launch import upload_disk
from tccdeploy.engine.migrate import copy_disk

from .conftest import World, read_json

pytestmark = pytest.mark.slow


def _started(world: World, name: str, node: str) -> tuple[str, dict, str, dict]:
    """acme's VM `name` started on node through the engine's own steps, its launch not yet
    reported to the TC: (request id, launch ticket, disk digest, the service's answer)."""
    bundle = world.seal("acme", name)
    submitted = world.submit("acme", world.sign("acme", name, bundle))
    assert submitted.returncode == 0, submitted.stderr
    request_id = json.loads(submitted.stdout)["id"]
    world.ready(node)  # a fresh verdict, as the release needs
    response = world.post(f"/v1/requests/{request_id}/release", {"node": node})
    assert response.status_code == 200, response.text
    ticket = response.json()["ticket"]
    descriptor = read_json(bundle / "descriptor.json")["descriptor"]
    session = world.session(node)
    upload_disk(session, descriptor["vm_id"], str(bundle / "disk.qcow2"), descriptor["disk"]["sha256"])
    answer = session.tvmm("launch", {"ticket": ticket})
    assert answer["running"]
    return request_id, ticket, descriptor["disk"]["sha256"], answer


def _running(world: World, name: str, node: str) -> tuple[str, dict, str]:
    """acme's VM `name`, launched on node and recorded: (vm_id, its launch ticket, disk digest)."""
    request_id, ticket, sha256, answer = _started(world, name, node)
    launched = world.post(f"/v1/requests/{request_id}/launched", {"node": node, "status": answer})
    assert launched.status_code == 200, launched.text
    return ticket["ticket"]["vm_id"], ticket, sha256


def refused(call, reason: str) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(RemoteError) as info:
        call()
    assert info.value.reason == reason, info.value


def test_a_launch_ticket_works_once_on_its_node_only(world: World):
    vm_id, ticket, sha256 = _running(world, "once", "node1")
    try:
        session = world.session("node1")
        refused(lambda: session.tvmm("launch", {"ticket": ticket}), "ticket.replayed")
        # The same ticket on another node, with the disk copied there: a second copy is refused.
        other = world.session("node2")
        copy_disk(session, other, vm_id, sha256)
        refused(lambda: other.tvmm("launch", {"ticket": ticket}), "ticket.node")
        assert len(world.qemus(vm_id)) == 1
        # A second, valid ticket for a VM the node already runs (the TC's keys sign it here: the
        # engine has none) is refused too: one copy per node, whatever the TC signed.
        tc = identity.load(str(world.service.state))
        body = dict(ticket["ticket"], id=tickets.new_id())
        again = tickets.issue(tc.purpose("ticket").key, tc.purpose("ticket").certificate, body)
        refused(lambda: session.tvmm("launch", {"ticket": again}), "tvmm.vm-running")
        assert len(world.qemus(vm_id)) == 1
        other.tvmm("migrate_in_discard", {"vm_id": vm_id})
    finally:
        world.destroy("once")
    assert world.qemus(vm_id) == []


def test_a_second_ticket_of_one_request_starts_no_copy_once_the_first_has_gone(world: World):
    """A release asked for again gives a second launch ticket, valid for its life beside the
    first. The engine launched with the first, had that copy destroyed on the TC's end ticket
    (the records now say destroyed, and the customer's image may be launched anew), uploaded the
    disk again and launched with the second: a copy the records say is gone (found in review).
    The node starts one copy per request; the VM comes back only by migration or resume."""
    request_id, first, sha256, answer = _started(world, "spare", "node2")
    vm_id = first["ticket"]["vm_id"]
    session = world.session("node2")
    try:
        again = world.post(f"/v1/requests/{request_id}/release", {"node": "node2"})
        assert again.status_code == 200, again.text
        spare = again.json()["ticket"]
        assert spare["ticket"]["id"] != first["ticket"]["id"]
        launched = world.post(f"/v1/requests/{request_id}/launched", {"node": "node2", "status": answer})
        assert launched.status_code == 200, launched.text
        end = world.post(f"/v1/vms/{vm_id}/end-ticket", {"node": "node2", "action": "destroy"}).json()
        done = session.tvmm("vm_end", {"ticket": end})
        recorded = world.post(f"/v1/vms/{vm_id}/ended", {"ticket": end, "evidence": done["evidence"]})
        assert recorded.status_code == 200 and recorded.json()["state"] == "destroyed", recorded.text
        upload_disk(session, vm_id, str(world.root / "spare.sealed" / "disk.qcow2"), sha256)
        refused(lambda: session.tvmm("launch", {"ticket": spare}), "tvmm.launched")
        assert world.qemus(vm_id) == []
    finally:
        if world.get_vm("spare") is not None:
            world.destroy("spare")
        for pid in world.qemus(vm_id):  # the second copy, had the node started it
            os.kill(pid, signal.SIGKILL)
        try:
            session.tvmm("migrate_in_discard", {"vm_id": vm_id})  # the re-uploaded disk
        except RemoteError:
            pass
    assert world.qemus(vm_id) == []


def _self_signed_pem() -> str:
    key = rsa.generate_private_key(65537, 2048)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "node3")])
    import datetime

    now = datetime.datetime.now(datetime.UTC)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(1).not_valid_before(now).not_valid_after(now + datetime.timedelta(days=1))
            .sign(key, hashes.SHA256()))
    return cert.public_bytes(serialization.Encoding.PEM).decode()


def test_a_migration_goes_only_where_the_tc_said_under_the_tcs_key(world: World):
    vm_id, _, sha256 = _running(world, "mover", "node1")
    source, destination = world.session("node1"), world.session("node3")
    try:
        # The old interface's attack: a certificate of the engine's own key to wrap Kmig to.
        refused(lambda: source.tvmm("migrate_out_start", {"vm_id": vm_id, "destination_certificate": _self_signed_pem()}),
                "tvmm.args")
        world.ready("node3")
        begin = world.post("/v1/migrations", {"vm": "mover", "destination": "node3"})
        assert begin.status_code == 200, begin.text
        out_ticket, in_ticket, migration = begin.json()["out_ticket"], begin.json()["in_ticket"], begin.json()["migration"]
        assert "certificate_pem" not in begin.json() and "wrapped_key" not in begin.json()
        # Retargeted to another destination, or handed to the wrong end: the signature or the node fails.
        retargeted = json.loads(json.dumps(out_ticket))
        retargeted["ticket"]["destination"] = "node2"
        refused(lambda: source.tvmm("migrate_out_start", {"ticket": retargeted}), "ticket.signature")
        refused(lambda: destination.tvmm("migrate_out_start", {"ticket": out_ticket}), "ticket.node")
        refused(lambda: source.tvmm("migrate_in_start", {"ticket": out_ticket}), "tvmm.args")
        # The destination, given its real ticket, then fed a stream the engine made under a Kmig of
        # its own (with the right migration named): the first chunk fails, QEMU gets nothing.
        copy_disk(source, destination, vm_id, sha256)
        assert destination.tvmm("migrate_in_start", {"ticket": in_ticket}, timeout=120)["ready"]
        body = in_ticket["ticket"]
        forged = stream.Encryptor(os.urandom(32), context=f"tccdeploy-migration:{body['migration']}:{vm_id}".encode())
        data = forged.header + forged.update(os.urandom(2_000_000)) + forged.finish()
        blocks = [data[i:i + 65536] for i in range(0, len(data), 65536)]
        refused(lambda: destination.tvmm_stream_to("migrate_in_stream", blocks, {"vm_id": vm_id}), "tvmm.stream")
        # Answered at once and the rest dropped in step: the same session takes the next call.
        destination.tvmm("migrate_in_discard", {"vm_id": vm_id})
        refused(lambda: destination.tvmm("migrate_in_start", {"ticket": in_ticket}), "ticket.replayed")
        ended = world.post(f"/v1/migrations/{migration}/end", {"vm_id": vm_id, "commit": False, "reason": "test"})
        assert ended.status_code == 200, ended.text
        assert len(world.qemus(vm_id)) == 1  # the source's copy, still running
        assert source.tvmm("vm_status", {"vm_id": vm_id})["status"] == "running"
    finally:
        world.destroy("mover")
    assert world.qemus(vm_id) == []


def test_a_receipt_needs_the_nodes_own_evidence_of_this_launch(world: World):
    """The engine reports a launch without the TPM's evidence, or with the evidence of another
    launch (replayed): the TC records nothing and signs no receipt; with the node's evidence for
    this ticket, it does, and the receipt carries it."""
    first_id, _, _, first = _started(world, "first", "node2")
    second_id, ticket, _, second = _started(world, "second", "node2")
    try:
        before = world.decisions()
        no_evidence = {k: v for k, v in second.items() if k != "evidence"}
        for status, reason in ((no_evidence, "runtime.missing"), (first, "runtime.nonce")):
            response = world.post(f"/v1/requests/{second_id}/launched", {"node": "node2", "status": status})
            assert response.status_code == 403 and response.json()["error"] == reason, response.text
        assert world.decisions() == before  # nothing recorded, no receipt
        recorded = world.post(f"/v1/requests/{second_id}/launched", {"node": "node2", "status": second})
        assert recorded.status_code == 200, recorded.text
        evidence = recorded.json()["receipt"]["launch_evidence"]
        assert evidence["ticket"] == ticket["ticket"]["id"] and evidence["events"][-1]["vm_id"] == ticket["ticket"]["vm_id"]
        assert world.post(f"/v1/requests/{first_id}/launched", {"node": "node2", "status": first}).status_code == 200
    finally:
        world.destroy("first")
        world.destroy("second")


def test_an_engine_cannot_repin_a_running_node_to_a_ca_of_its_own(world: World, tmp_path):
    """The attack: have the node's service make a new TK under the engine's own CA, then sign a
    migrate-out ticket with it for a running VM and read its state under a Kmig the engine
    chose. Within a boot the pin does not change: refused, and the TC's tickets still work."""
    vm_id, _, _ = _running(world, "repin", "node4")
    engine_ca, _ = identity.init(str(tmp_path / "engine-ca"))
    pem = engine_ca.certificate.public_bytes(serialization.Encoding.PEM).decode()
    session = world.session("node4")
    try:
        refused(lambda: session.tvmm("tk_create", {"bank": "sha256", "pcrs": [0, 4, 8, 9, 11],
                                                   "nonce": base64.b64encode(os.urandom(32)).decode(), "tc_ca": pem}),
                "tvmm.tc-ca-pinned")
        forged_body = {"v": 1, "kind": "migrate-out", "id": tickets.new_id(), "node": "node4", "node_serial": "1",
                       "tk_name": "00" * 34, "vm_id": vm_id, "customer": "0" * 32, "issued": 0, "expires": 2**39,
                       "migration": "1", "destination": "node1", "destination_tk_name": "00" * 34, "kmig": "AAAA"}
        forged = tickets.issue(engine_ca.purpose("ticket").key, engine_ca.purpose("ticket").certificate, forged_body)
        refused(lambda: session.tvmm("migrate_out_start", {"ticket": forged}), "ticket.certificate")
        assert session.tvmm("vm_status", {"vm_id": vm_id})["status"] == "running"
    finally:
        world.destroy("repin")
    assert world.qemus(vm_id) == []


def _relay(source, destination, vm_id: str) -> None:  # type: ignore[no-untyped-def]
    """As the engine relays the stream, but cut into blocks of other sizes (1 byte to 1 MiB): the
    blocks only frame, the cipher authenticates, so the engine's cut changes nothing."""
    def recut(pieces):  # type: ignore[no-untyped-def]
        buffer, sizes = bytearray(), itertools.cycle([1, 7, 65_537, 1 << 20, 3])
        size = next(sizes)
        for piece in pieces:
            buffer += piece
            while len(buffer) >= size:
                yield bytes(buffer[:size])
                del buffer[:size]
                size = next(sizes)
        if buffer:
            yield bytes(buffer)

    stream = source.tvmm_stream_from("migrate_out_stream", {"vm_id": vm_id}, timeout=120)
    destination.tvmm_stream_to("migrate_in_stream", recut(stream), {"vm_id": vm_id}, timeout=120)
    assert stream.outcome is not None and stream.outcome["eof"]
    # The stream goes out once: a second copy (for a second destination) is refused.
    refused(lambda: list(source.tvmm_stream_from("migrate_out_stream", {"vm_id": vm_id})), "tvmm.streamed")


def test_one_copy_runs_whatever_the_engine_does_between_the_two_ends(world: World):
    """The attack: let the destination take the VM's state, then resume the source as well (or run
    the destination before the TC commits): two live copies of the customer's VM. Both ends hold
    the VM paused until the TC's settle ticket; the TC decides one outcome; the source resumes
    only on an abort, the destination runs only on a commit. The engine's own word, the other
    end's ticket, an altered ticket and an earlier migration's abort ticket are all refused."""
    vm_id, _, sha256 = _running(world, "twin", "node1")
    source, destination = world.session("node1"), world.session("node3")
    try:
        world.ready("node3")
        first = world.post("/v1/migrations", {"vm": "twin", "destination": "node3"}).json()
        dropped = world.post(f"/v1/migrations/{first['migration']}/end", {"vm_id": vm_id, "commit": False})
        assert dropped.status_code == 200 and dropped.json()["outcome"] == "abort", dropped.text
        old_abort = dropped.json()["source"]  # a real abort ticket for the source, of another migration

        world.ready("node3")
        begin = world.post("/v1/migrations", {"vm": "twin", "destination": "node3"}).json()
        source.tvmm("migrate_out_start", {"ticket": begin["out_ticket"]})
        copy_disk(source, destination, vm_id, sha256)
        destination.tvmm("migrate_in_start", {"ticket": begin["in_ticket"]}, timeout=120)
        _relay(source, destination, vm_id)
        arrived = destination.tvmm("migrate_in_finish", {"vm_id": vm_id}, timeout=120)
        assert arrived["status"] == "paused" and not arrived["running"]
        for end in (source, destination):  # neither end runs on the engine's word
            refused(lambda end=end: end.tvmm("vm_start", {"vm_id": vm_id}), "tvmm.migrating")
        refused(lambda: source.tvmm("migrate_out_end", {"vm_id": vm_id, "ticket": old_abort}), "tvmm.not-migrating")

        settled = world.post(f"/v1/migrations/{begin['migration']}/end",
                             {"vm_id": vm_id, "commit": True, "evidence": arrived["evidence"]})
        assert settled.status_code == 200 and settled.json()["outcome"] == "commit", settled.text
        tickets_ = settled.json()
        # The arrival the TC committed is not the engine's to drop: the source is about to end its
        # copy, and a silent discard here left none while the records say it runs (found in review).
        refused(lambda: destination.tvmm("migrate_in_discard", {"vm_id": vm_id}), "tvmm.arrived")
        refused(lambda: source.tvmm("migrate_out_end", {"vm_id": vm_id, "ticket": tickets_["destination"]}), "ticket.node")
        altered = copy.deepcopy(tickets_["source"])
        altered["ticket"]["outcome"] = "abort"
        refused(lambda: source.tvmm("migrate_out_end", {"vm_id": vm_id, "ticket": altered}), "ticket.signature")
        again = world.post(f"/v1/migrations/{begin['migration']}/end", {"vm_id": vm_id, "commit": False})
        assert again.status_code == 409, again.text  # one outcome: an abort after the commit is refused
        refused(lambda: source.tvmm("vm_start", {"vm_id": vm_id}), "tvmm.migrating")

        ran = destination.tvmm("migrate_in_settle", {"vm_id": vm_id, "ticket": tickets_["destination"], "resume": True})
        assert ran["running"]
        left = source.tvmm("migrate_out_end", {"vm_id": vm_id, "ticket": tickets_["source"]})
        assert left["status"] == "moved" and left["evidence"]["events"][-1]["event"] == "migrated-out"
        assert len(world.qemus(vm_id)) == 1
        refused(lambda: source.tvmm("migrate_out_end", {"vm_id": vm_id, "ticket": old_abort}), "tvmm.not-migrating")
    finally:
        world.destroy("twin")
    assert world.qemus(vm_id) == []


def test_a_vm_leaves_the_tcs_records_only_on_its_nodes_evidence_of_its_end(world: World):
    """The attack: mark a running VM destroyed in the TC's records (then have its customer, or
    anyone, launch the image again: two copies). The engine's word is refused; a quote the
    engine has the service make for the end ticket without ending the VM shows no end; only
    the node ending it, on the TC's ticket, moves the records."""
    vm_id, _, _ = _running(world, "ender", "node2")
    session = world.session("node2")
    try:
        said = world.post(f"/v1/vms/{vm_id}/state", {"state": "destroyed"})
        assert said.status_code == 400, said.text
        ticket = world.post(f"/v1/vms/{vm_id}/end-ticket", {"node": "node2", "action": "destroy"})
        assert ticket.status_code == 200, ticket.text
        end = ticket.json()
        quoted = session.tvmm("runtime_log", {"runtime_pcr": end["ticket"]["runtime_pcr"], "ticket": end["ticket"]["id"]})
        response = world.post(f"/v1/vms/{vm_id}/ended", {"ticket": end, "evidence": quoted["evidence"]})
        assert response.status_code == 403 and response.json()["error"] == "vm.end-evidence", response.text
        other = world.post(f"/v1/vms/{vm_id}/end-ticket", {"node": "node1", "action": "destroy"})
        assert other.status_code == 403 and other.json()["error"] == "vm.end-not-here", other.text
        assert world.qemus(vm_id) and world.get_vm("ender")["state"] == "running"

        done = session.tvmm("vm_end", {"ticket": end})
        assert done["status"] == "destroyed" and world.qemus(vm_id) == []
        refused(lambda: session.tvmm("vm_end", {"ticket": end}), "ticket.replayed")
        recorded = world.post(f"/v1/vms/{vm_id}/ended", {"ticket": end, "evidence": done["evidence"]})
        assert recorded.status_code == 200 and recorded.json()["state"] == "destroyed", recorded.text
        assert world.get_vm("ender") is None
    finally:
        if world.get_vm("ender") is not None:
            world.destroy("ender")
