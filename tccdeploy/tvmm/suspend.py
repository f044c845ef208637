"""Suspension on the node: a VM's state saved to the node's disk, readable only through the TC.

Suspend (the TC's suspend ticket: a fresh Ksus wrapped to this node's TK): QEMU migrates the
VM into the service, which encrypts the stream with STREAM under Ksus (the suspension's id and
the VM in the header) into the VM's folder, then QEMU quits; the TPM records `suspended` with
the saved state's digest. Nothing here can read the state back: Ksus was unwrapped in this
process only and is gone with it.
Resume (the TC's resume ticket, one per suspension: Kvm and the same Ksus wrapped to the TK of
the node the TC chose, on this node or another that got the disk and the state file): the TPM
unwraps both, QEMU waits for incoming state with the disk opened, and the service feeds it the
state, authenticating every chunk first. A suspension resumes once here (the ids are kept, so
an older copy of the state file written back is refused) and the state file goes.
"""

from __future__ import annotations

import base64
import contextlib
import os
import time
from typing import Any

from ..crypto.files import atomic_write, durable_replace
from ..crypto.ticket import label as ticket_label
from . import config, runtime, tickets
from .interface import ServiceError, operation
from .qemustream import accept_stream, connect_incoming, migrate_into, private_listener, stream_module, wait_loaded
from .qmp import QMP
from .tpm import tk_decrypt
from .vm import (
    DISK,
    SAVED_HERE,
    STATE,
    WRAPPED_KEY_FILE,
    _kill,
    _pid,
    digest_of,
    keep_wrapped_key,
    lock_partial,
    pending_migration,
    receive_into,
    start_qemu,
    unwrap_passphrase,
    vm_dir,
    vm_lock,
    withdraw_secret,
)

STATE_FILE = STATE  # the saved VM state, STREAM ciphertext under Ksus
RESUMED_FILE = "suspensions-resumed.json"
CHUNK = 256 * 1024


def context(body: dict[str, Any]) -> bytes:
    """What the saved state's header names: this suspension of this VM."""
    return f"tccdeploy-suspension:{body['suspension']}:{body['vm_id']}".encode()


@operation("vm_suspend")
def vm_suspend(ticket: dict[str, Any]) -> dict[str, Any]:
    """Save the VM the TC's suspend ticket names to this node's disk under the ticket's Ksus, stop
    its QEMU, and answer with the TPM's evidence (the TC records the suspension only on it)."""
    body = tickets.check(ticket, "suspend")
    vm_id = body["vm_id"]
    directory = vm_dir(vm_id)
    if not _pid(directory):
        raise ServiceError("tvmm.vm-not-running", "the VM is not running here")
    if pending_migration(vm_id) is not None:
        raise ServiceError("tvmm.migrating", "a migration of this VM is not settled")
    # The saved state is written where an upload of a state would be: locked for this suspension
    # alone (vm.lock_partial), before the ticket is spent, so a session appending there is refused
    # first and no byte of the engine's joins the state whose digest the evidence names.
    lock = lock_partial(os.path.join(directory, STATE_FILE + ".partial"), os.O_WRONLY | os.O_CREAT)
    try:
        return _suspend(body, directory, lock)
    finally:
        os.close(lock)


def _suspend(body: dict[str, Any], directory: str, lock: int) -> dict[str, Any]:
    vm_id = body["vm_id"]
    tickets.spend(body)
    ksus = tk_decrypt(base64.b64decode(body["ksus"]),
                      ticket_label("suspend", "ksus", vm_id, body["customer"], body["id"]))
    path = os.path.join(directory, "suspend.sock")
    listener = private_listener(path)
    qmp = QMP(os.path.join(directory, "qmp.sock"))
    try:
        migrate_into(qmp, path)
    finally:
        qmp.close()
    connection = accept_stream(listener, 120)
    encryptor = stream_module().Encryptor(ksus, context=context(body))
    del ksus
    partial = os.path.join(directory, STATE_FILE + ".partial")
    os.ftruncate(lock, 0)
    fd = os.dup(lock)  # (closing it keeps the lock: the lock's descriptor stays open)
    size = 0
    try:
        with os.fdopen(fd, "wb") as out:
            out.write(encryptor.header)
            while True:
                data = connection.recv(CHUNK)
                if not data:
                    break
                size += len(data)
                out.write(encryptor.update(data))
            out.write(encryptor.finish())
    finally:
        connection.close()
    _wait_migrated(directory)
    _kill(directory)  # the VM's memory is now only the ciphertext on disk
    durable_replace(partial, os.path.join(directory, STATE_FILE))
    atomic_write(os.path.join(directory, SAVED_HERE), body["suspension"].encode(), 0o600)  # not the engine's to discard
    for name in (WRAPPED_KEY_FILE, "suspend.sock"):  # a resume ticket brings Kvm again
        try:
            os.unlink(os.path.join(directory, name))
        except FileNotFoundError:
            pass
    digest = digest_of(os.path.join(directory, STATE_FILE))
    evidence = runtime.record(body, {
        "event": "suspended", "vm_id": vm_id, "suspension": body["suspension"], "ticket": body["id"],
        "state_sha256": digest})
    return {"changed": True, "status": "suspended", "state_sha256": digest, "bytes": size, "evidence": evidence}


def _wait_migrated(directory: str) -> None:
    qmp = QMP(os.path.join(directory, "qmp.sock"))
    try:
        deadline = time.monotonic() + 60
        while True:
            status = qmp.execute("query-migrate").get("status")
            if status == "completed":
                return
            if status in ("failed", "cancelled") or time.monotonic() > deadline:
                raise ServiceError("tvmm.qemu", f"QEMU did not save the VM's state ({status})")
            time.sleep(0.02)
    finally:
        qmp.close()


def _resumed() -> list[str]:
    """The suspensions resumed here as the service's first form recorded them (read, never written)."""
    data = config.read_record(RESUMED_FILE, "resumed suspensions")
    return [str(x) for x in data] if isinstance(data, list) else []


@operation("vm_resume")
def vm_resume(ticket: dict[str, Any]) -> dict[str, Any]:
    """Resume the suspended VM the TC's resume ticket names, from the saved state here, on the
    ticket's profile with its Kvm and Ksus; once per suspension."""
    body = tickets.check(ticket, "resume")
    with vm_lock(body["vm_id"]):
        vm_id = body["vm_id"]
        directory = vm_dir(vm_id)
        state = os.path.join(directory, STATE_FILE)
        if _pid(directory):
            raise ServiceError("tvmm.vm-running", "the VM already runs here")
        key = f"{body['vm_id']}:{body['suspension']}"
        if key in _resumed() or tickets.remembered("resumed:" + key):
            raise ServiceError("tvmm.resumed", f"suspension {body['suspension']} of this VM was resumed here already")
        disk = os.path.join(directory, DISK)
        if digest_of(disk) != body["image_sha256"]:
            raise ServiceError("tvmm.disk-digest", "the VM's disk is missing or is not the image the TC released the key for")
        if digest_of(state) != body["state_sha256"]:
            raise ServiceError("tvmm.no-state", "the VM's saved state is missing here or is not the one the TC recorded")
        tickets.spend(body)
        ksus = tk_decrypt(base64.b64decode(body["ksus"]), ticket_label("resume", "ksus", vm_id, body["customer"], body["id"]))
        kvm_label = ticket_label("resume", "kvm", vm_id, body["customer"], body["id"])
        passphrase = unwrap_passphrase(body["kvm"], kvm_label)
        accel = start_qemu(directory, vm_id, body["name"], body["memory_mib"], body["vcpus"], incoming=True)
        incoming = os.path.join(directory, "resume.sock")
        stream = stream_module()
        try:
            qmp = QMP(os.path.join(directory, "qmp.sock"))
            try:
                receive_into(qmp, disk, passphrase, incoming)
                del passphrase
                _feed(incoming, state, stream.Decryptor(ksus, context=context(body)))
                del ksus
                wait_loaded(qmp, 120, "the saved state")
                # From here the suspension is spent on this node: a copy of the state written back
                # later is refused, whatever tickets come.
                tickets.remember("resumed:" + key, tickets.FOREVER)  # (under the tickets' lock: two sessions lost each other's)
                qmp.execute("cont")
                withdraw_secret(qmp)
                status = qmp.execute("query-status").get("status")
            finally:
                qmp.close()
        except stream.StreamError as exc:
            _kill(directory)
            raise ServiceError("tvmm.stream", f"the saved state is not authentic: {exc}") from None
        except (OSError, ServiceError) as exc:
            _kill(directory)
            raise ServiceError("tvmm.qemu", f"QEMU could not resume the VM: {exc}") from None
        keep_wrapped_key(directory, body["kvm"], kvm_label)
        os.unlink(state)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(os.path.join(directory, SAVED_HERE))  # it runs here again: its key marks the folder now
        evidence = runtime.record(body, {
            "event": "resumed", "vm_id": vm_id, "suspension": body["suspension"], "ticket": body["id"],
            "image_sha256": body["image_sha256"]})
        return {"changed": True, "running": status == "running", "status": status, "accel": accel, "evidence": evidence}


def _feed(incoming: str, state: str, decryptor: Any) -> None:
    """The saved state to QEMU's incoming socket, each chunk authenticated before QEMU sees it."""
    sock = connect_incoming(incoming, 120)
    try:
        with open(state, "rb") as fh:
            while True:
                data = fh.read(CHUNK)
                if not data:
                    break
                plain = decryptor.update(data)
                if plain:
                    sock.sendall(plain)
        decryptor.finish()
    finally:
        sock.close()

