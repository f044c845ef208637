"""Encrypted migration on the node: QEMU's stream, encrypted before it leaves, decrypted only
inside the destination's service.

Both ends act only on the TC's tickets, which carry one Kmig the TC made, wrapped to each end's
TK: no end takes a key or a certificate from the engine.
Source (migrate-out ticket: this node, this TK, the destination the TC chose): the TPM unwraps
Kmig; QEMU migrates to a unix socket the service listens on; the service encrypts what it reads
with STREAM (AES-256-GCM chunks, the migration's id in the header) and gives the engine only
ciphertext. A node whose boot changed cannot unwrap Kmig, so no VM state leaves it for a
trusted node (its VMs are stopped instead).
Destination (migrate-in ticket): the TPM unwraps Kvm and Kmig under PolicyPCR; QEMU waits with
-incoming on a private socket, on the ticket's profile; the service authenticates and decrypts
each chunk before QEMU sees it, and checks the stream's end and its migration. A stream under
any other key (the engine's own) fails its first chunk. Migration state lives in this process,
which serves the engine's whole session.
"""

from __future__ import annotations

import base64
import os
from collections.abc import Callable, Iterator
from typing import Any

from ..crypto.files import durable_remove
from ..crypto.ticket import label as ticket_label
from ..node.protocol import Incoming, Outgoing
from . import runtime, tickets
from .interface import ServiceError, operation
from .qemustream import accept_stream, connect_incoming, migrate_into, private_listener, stream_module, wait_loaded
from .qmp import QMP, QMPError
from .tpm import tk_decrypt
from .vm import (
    SAVED_HERE,
    WRAPPED_KEY_FILE,
    _kill,
    _pid,
    clear_migration,
    digest_of,
    keep_wrapped_key,
    lend_secret,
    mark_migration,
    pending_migration,
    receive_into,
    settle_ticket,
    start_qemu,
    unwrap_passphrase,
    vm_dir,
    vm_lock,
    withdraw_secret,
)

READ_CHUNK = 1024 * 1024  # QEMU's stream read, sealed and sent at most this much at a time


_OUT: dict[str, dict[str, Any]] = {}
_IN: dict[str, dict[str, Any]] = {}


def context(body: dict[str, Any]) -> bytes:
    """What the stream's header names: this migration of this VM."""
    return f"tccdeploy-migration:{body['migration']}:{body['vm_id']}".encode()


@operation("migrate_out_start")
def migrate_out_start(ticket: dict[str, Any]) -> dict[str, Any]:
    """Pause the VM, then start QEMU's migration into the service, under the ticket's Kmig. QEMU
    is lent the disk's secret until the migration is settled, so an abort resumes the VM with its
    disk, whatever point the migration reached."""
    body = tickets.check(ticket, "migrate-out")
    vm_id = body["vm_id"]
    directory = vm_dir(vm_id)
    if not _pid(directory):
        raise ServiceError("tvmm.vm-not-running", "the VM is not running here")
    if vm_id in _OUT or pending_migration(vm_id) is not None:
        raise ServiceError("tvmm.migrating", "a migration of this VM is under way here")
    tickets.spend(body)
    kmig = tk_decrypt(base64.b64decode(body["kmig"]),
                      ticket_label("migrate-out", "kmig", vm_id, body["customer"], body["id"]))
    stream = stream_module()
    path = os.path.join(directory, "mig-out.sock")
    listener = private_listener(path)
    qmp = QMP(os.path.join(directory, "qmp.sock"))
    try:
        status = qmp.execute("query-status")
        try:
            lend_secret(vm_id, qmp)
        except ServiceError:
            # The TPM refuses: this node left its approved boot (an evacuation off a tampered
            # node). The VM still leaves; it just cannot resume here after a late abort, which
            # enforcement would not let it do anyway.
            pass
        # From here the VM resumes here only on the TC's abort (settle ticket), whatever the engine does.
        mark_migration(vm_id, body["migration"], "source", was_running=status.get("status") == "running")
        migrate_into(qmp, path)  # paused first: the switch, the disk does not change while it is copied
    finally:
        qmp.close()
    connection = accept_stream(listener, 60)
    encryptor = stream.Encryptor(kmig, context=context(body))
    del kmig
    _OUT[vm_id] = {"sock": connection, "enc": encryptor, "streamed": False, "was_running": status.get("status") == "running"}
    return {"changed": True, "was_running": _OUT[vm_id]["was_running"], "migration": body["migration"],
            "destination": body["destination"]}


@operation("migrate_out_stream")
def migrate_out_stream(vm_id: str) -> Outgoing:
    """The whole migration stream, as blocks after the answer's line (node.protocol): QEMU's
    bytes sealed into one reused buffer as they come, no base64, no round trip per piece. It goes
    out once; the outcome line says how many bytes of QEMU's stream it carried."""
    state = _OUT.get(vm_id)
    if state is None:
        raise ServiceError("tvmm.no-migration", "no outgoing migration of this VM")
    if state["streamed"]:
        raise ServiceError("tvmm.streamed", "this migration's stream was already sent")
    state["streamed"] = True

    def produce(send: Callable[[bytes | bytearray | memoryview], None]) -> dict[str, Any]:
        sock, encryptor = state["sock"], state["enc"]
        plain = memoryview(bytearray(READ_CHUNK))
        sealed = bytearray(encryptor.output_size(READ_CHUNK))
        frames = memoryview(sealed)
        send(encryptor.header)
        carried = 0
        try:
            while True:
                count = sock.recv_into(plain)
                if not count:
                    break
                carried += count
                send(frames[:encryptor.update_into(plain[:count], sealed)])
            send(encryptor.finish())
        finally:
            sock.close()
        return {"eof": True, "bytes": carried}

    return Outgoing({"vm_id": vm_id}, produce)


@operation("migrate_out_end")
def migrate_out_end(vm_id: str, ticket: dict[str, Any]) -> dict[str, Any]:
    """Settle the source as the TC decided (its settle ticket). Commit: the source QEMU quits, its
    disk goes, and the TPM records the VM's departure. Abort: the source resumes where it was,
    its disk open again. Without the TC's ticket the source stays paused: the engine cannot
    resume it once its state may be running elsewhere."""
    with vm_lock(vm_id):
        body = settle_ticket(ticket, vm_id, "source")
        pending = pending_migration(vm_id) or {}
        _close_stream(_OUT, vm_id)
        directory = vm_dir(vm_id)
        if body["outcome"] == "commit":
            _kill(directory)
            durable_remove(directory)
            evidence = runtime.record(body, {
                "event": "migrated-out", "vm_id": vm_id, "migration": body["migration"], "ticket": body["id"]})
            return {"changed": True, "status": "moved", "evidence": evidence}
        if not _pid(directory):
            clear_migration(vm_id)
            raise ServiceError("tvmm.vm-not-running", "the source VM is gone: it cannot resume")
        qmp = QMP(os.path.join(directory, "qmp.sock"))
        try:
            info = qmp.execute("query-migrate")
            if info.get("status") in ("active", "setup", "device"):
                qmp.execute("migrate_cancel")
            if pending.get("was_running", True):
                qmp.execute("cont")  # reopens the disk if QEMU had handed it over (postmigrate)
            withdraw_secret(qmp)
            status = qmp.execute("query-status")
        finally:
            qmp.close()
        clear_migration(vm_id)
        return {"changed": True, "status": status.get("status")}


@operation("migrate_in_start")
def migrate_in_start(ticket: dict[str, Any]) -> dict[str, Any]:
    """Start QEMU waiting for the migration the ticket names, on its profile, the disk opened with
    the ticket's Kvm; ready to take ciphertext under the ticket's Kmig."""
    body = tickets.check(ticket, "migrate-in")
    with vm_lock(body["vm_id"]):
        vm_id = body["vm_id"]
        directory = vm_dir(vm_id)
        disk = os.path.join(directory, "disk.qcow2")
        if _pid(directory):
            raise ServiceError("tvmm.vm-running", "the VM already runs here")
        if pending_migration(vm_id) is not None:
            raise ServiceError("tvmm.migrating", "a migration of this VM is under way here")
        if digest_of(disk) != body["image_sha256"]:
            raise ServiceError("tvmm.disk-digest", "the copied disk is not the VM's image")
        tickets.spend(body)
        mark_migration(vm_id, body["migration"], "destination")
        kmig = tk_decrypt(base64.b64decode(body["kmig"]), ticket_label("migrate-in", "kmig", vm_id, body["customer"], body["id"]))
        kvm_label = ticket_label("migrate-in", "kvm", vm_id, body["customer"], body["id"])
        passphrase = unwrap_passphrase(body["kvm"], kvm_label)
        accel = start_qemu(directory, vm_id, body["name"], body["memory_mib"], body["vcpus"], incoming=True)
        incoming = os.path.join(directory, "mig-in.sock")
        try:
            qmp = QMP(os.path.join(directory, "qmp.sock"))
            try:
                receive_into(qmp, disk, passphrase, incoming)
                del passphrase
            finally:
                qmp.close()
            keep_wrapped_key(directory, body["kvm"], kvm_label)  # for its own migrations
            sock = connect_incoming(incoming, 60)
        except (QMPError, OSError, ServiceError) as exc:
            _kill(directory)
            raise ServiceError("tvmm.qemu", f"QEMU failed to prepare the incoming migration: {exc}") from None
        _IN[vm_id] = {"sock": sock, "dec": stream_module().Decryptor(kmig, context=context(body)), "bytes": 0, "ticket": body}
        del kmig
        return {"changed": True, "ready": True, "accel": accel}


@operation("migrate_in_stream")
def migrate_in_stream(vm_id: str) -> Incoming:
    """Take the migration stream as blocks after the answer's line (node.protocol): each chunk
    authenticated and opened into one reused buffer, and only then given to QEMU. A chunk that
    does not authenticate ends the migration here (its copy dropped) and is answered at once."""
    state = _IN.get(vm_id)
    if state is None:
        raise ServiceError("tvmm.no-migration", "no incoming migration of this VM")
    stream = stream_module()

    def consume(blocks: Iterator[memoryview]) -> dict[str, Any]:
        decryptor, sock = state["dec"], state["sock"]
        plain = bytearray(READ_CHUNK)
        for piece in blocks:
            need = len(piece) + len(decryptor.buffer)
            if len(plain) < need:
                plain = bytearray(need)
            try:
                count = decryptor.update_into(piece, plain)
            except stream.StreamError as exc:
                _discard(vm_id)
                raise ServiceError("tvmm.stream", f"the migration stream is not authentic: {exc}") from None
            if count:
                with memoryview(plain) as view:
                    sock.sendall(view[:count])
                state["bytes"] += count
        return {"bytes": state["bytes"]}

    return Incoming({"vm_id": vm_id}, consume)


@operation("migrate_in_finish")
def migrate_in_finish(vm_id: str) -> dict[str, Any]:
    """Check the stream ended properly, wait for QEMU to take the state, and hold the VM paused
    with the TPM's evidence of its arrival: it runs only once the TC commits (migrate_in_settle)."""
    with vm_lock(vm_id):  # a discard from another session cannot come between the mark and the TPM's record
        stream = stream_module()
        state = _IN.pop(vm_id, None)
        if state is None:
            raise ServiceError("tvmm.no-migration", "no incoming migration of this VM")
        try:
            state["dec"].finish()
        except stream.StreamError as exc:
            state["sock"].close()
            _kill(vm_dir(vm_id))
            raise ServiceError("tvmm.stream", f"the migration stream is not complete: {exc}") from None
        state["sock"].close()
        qmp = QMP(os.path.join(vm_dir(vm_id), "qmp.sock"))
        try:
            status = wait_loaded(qmp, 60, "the migrated state")
            if status not in ("paused", "running", "prelaunch"):
                raise ServiceError("tvmm.qemu", f"the migrated VM is in state {status}")
            qmp.execute("stop")  # the secret stays until it runs: activation reopens the disk
            status = qmp.execute("query-status")["status"]
        finally:
            qmp.close()
        # The TPM's statement that the VM arrived here through this migration's ticket: the TC
        # commits the migration only on it. Marked first: once the TPM has said so, the engine's
        # word (migrate_in_discard) no longer drops this copy, which the TC may have committed while
        # the source destroys its own (found in review); the TC's settle ticket does.
        body = state["ticket"]
        mark_migration(vm_id, body["migration"], "destination", arrived=True)
        evidence = runtime.record(body, {
            "event": "migrated-in", "vm_id": vm_id, "migration": body["migration"], "source": body["source"],
            "ticket": body["id"], "image_sha256": body["image_sha256"]})
        return {"changed": True, "running": status == "running", "status": status, "bytes": state["bytes"],
                "evidence": evidence}


@operation("migrate_in_settle")
def migrate_in_settle(vm_id: str, ticket: dict[str, Any], resume: bool) -> dict[str, Any]:
    """Settle the destination as the TC decided. Commit: the VM is this node's now, and runs if
    resume. Abort: it is dropped (QEMU quits, the copied disk goes)."""
    with vm_lock(vm_id):
        body = settle_ticket(ticket, vm_id, "destination")
        directory = vm_dir(vm_id)
        if body["outcome"] == "abort":
            _discard(vm_id)
            durable_remove(directory)
            return {"changed": True, "status": "discarded", "running": False}
        if not _pid(directory):
            raise ServiceError("tvmm.vm-not-running", "the migrated VM is not running here")
        clear_migration(vm_id)
        qmp = QMP(os.path.join(directory, "qmp.sock"))
        try:
            if resume:
                qmp.execute("cont")
                withdraw_secret(qmp)
            status = qmp.execute("query-status")["status"]
        finally:
            qmp.close()
        return {"changed": True, "status": status, "running": status == "running"}


def _close_stream(table: dict[str, dict[str, Any]], vm_id: str) -> None:
    """Forget this session's migration stream of vm_id (either end) and close its socket."""
    state = table.pop(vm_id, None)
    if state is not None:
        try:
            state["sock"].close()
        except OSError:
            pass


def _discard(vm_id: str) -> None:
    _close_stream(_IN, vm_id)
    _kill(vm_dir(vm_id))


@operation("migrate_in_discard")
def migrate_in_discard(vm_id: str) -> dict[str, Any]:
    """Abort before the arrival is recorded in the TPM: the destination drops what it received
    (QEMU quits, the copied disk goes); or drop a copied disk (or saved state) carried here that no
    VM ever ran from. An arrival the TPM recorded is the TC's to settle (migrate_in_settle); a VM
    launched here, or whose state this node saved, is this node's: it ends only through an end
    ticket (vm_end), with its evidence."""
    if not os.path.isdir(vm_dir(vm_id)):  # nothing here (and no lock file made for a made-up id)
        raise ServiceError("tvmm.not-migrating", "no unsettled arrival (or unused copied disk) of this VM here to discard")
    with vm_lock(vm_id, wait=False):
        return _discard_here(vm_id)


def _discard_here(vm_id: str) -> dict[str, Any]:
    pending = pending_migration(vm_id)
    directory = vm_dir(vm_id)
    # A state this node saved makes the folder the suspended VM's, not an unused copy: dropping it
    # lost the VM the TC holds suspended (found in review). A state carried here to resume from is
    # the engine's copy, and goes.
    unused_copy = pending is None and not _pid(directory) and not any(
        os.path.exists(os.path.join(directory, name)) for name in (WRAPPED_KEY_FILE, SAVED_HERE))
    if not unused_copy and (pending is None or pending.get("role") != "destination"):
        raise ServiceError("tvmm.not-migrating", "no unsettled arrival (or unused copied disk) of this VM here to discard")
    if pending is not None and pending.get("arrived"):
        raise ServiceError("tvmm.arrived", "the VM's arrival here is in the TPM's runtime log, which the TC may have "
                                           "committed: only the TC's settle ticket drops it (migrate_in_settle)")
    _discard(vm_id)
    durable_remove(vm_dir(vm_id))
    return {"changed": True, "status": "discarded"}
