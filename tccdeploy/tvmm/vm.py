"""VMs on the node: receive the encrypted disk, unwrap Kvm in the TPM, run QEMU.

Kvm is unwrapped by the TPM with the node's trusted key under a PolicyPCR session (so only in
the approved boot), lives in this process's memory, and goes to QEMU only over the VM's QMP
socket (0600, in the service's 0700 directory) as a secret object, which is deleted once the
disk is open. It is never written to disk, never in any argv, never in a log or an answer.
QEMU's command line is the service's own (the machine profile: vCPUs and memory are the only
inputs), so the engine cannot add a monitor, a debugger or a device to a VM whose disk is open.
"""

from __future__ import annotations

import base64
import contextlib
import fcntl
import hashlib
import json
import os
import signal
import subprocess
import time
from collections.abc import Callable, Iterator
from typing import Any

from ..crypto.files import atomic_write, durable_remove, durable_replace, sha256_file
from ..crypto.ticket import label as ticket_label
from ..node import protocol
from ..node.protocol import Incoming, Outgoing
from . import config, runtime, tickets
from .interface import ServiceError, operation
from .qmp import QMP, QMPError
from .tpm import tk_decrypt

QEMU = "qemu-system-x86_64"
WRAPPED_KEY_FILE = "kvm.wrapped"  # Kvm wrapped to this node's TK (0600)
DISK = "disk.qcow2"
READ_CHUNK = 1024 * 1024  # a disk copy's read, sent as one block


def vm_dir(vm_id: str, create: bool = False) -> str:
    """The VM's folder (0700); made only by what brings the VM here (its disk's first bytes), so
    a question about a VM leaves no trace."""
    if len(vm_id) != 32 or not all(c in "0123456789abcdef" for c in vm_id):
        raise ServiceError("tvmm.vm-id", "a VM id is 32 lowercase hexadecimal digits")
    path = config.current().path("vms", vm_id)
    if create:
        os.makedirs(path, mode=0o700, exist_ok=True)
    return path


STATE = "state.tccstrm"  # a suspended VM's saved state (STREAM ciphertext under the TC's Ksus)
SAVED_HERE = "saved-here"  # this node saved the state beside it: the suspended VM's folder, not a copy
FILES = {"disk": DISK, "state": STATE}


def _disk_paths(vm_id: str, what: str = "disk") -> tuple[str, str]:
    path = os.path.join(vm_dir(vm_id), FILES[what])
    return path, path + ".partial"


DIGEST_SUFFIX = ".sha256"  # beside a disk or saved state: its SHA-256 as this service computed it


def record_digest(path: str, digest: str, st: os.stat_result | None = None) -> None:
    """Note path's SHA-256, computed by this service as it wrote the file, with the size and
    modification time it has (st: as this service's locked descriptor saw it): a file only this
    service writes (its 0700 folder) is not read whole again to check it, for tens of GB that is
    minutes of a launch."""
    st = st or os.stat(path)
    atomic_write(path + DIGEST_SUFFIX, json.dumps({"size": st.st_size, "mtime_ns": st.st_mtime_ns,
                                                   "sha256": digest}).encode(), 0o600)


def _noted(path: str, st: os.stat_result) -> str:
    """The digest noted beside path while the file is still as it was noted, else ""."""
    try:
        with open(path + DIGEST_SUFFIX) as fh:
            noted = json.load(fh)
        if noted["size"] == st.st_size and noted["mtime_ns"] == st.st_mtime_ns:
            return str(noted["sha256"])
    except (OSError, ValueError, KeyError, TypeError):
        pass
    return ""


def digest_of(path: str) -> str:
    """path's SHA-256: the noted one while the file is still as it was noted (size and
    modification time), else read whole; "" when there is no such file."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return ""
    return _noted(path, st) or sha256_file(path)


def _sha256_fd(fd: int) -> str:
    digest = hashlib.sha256()
    offset = 0
    while chunk := os.pread(fd, READ_CHUNK, offset):
        digest.update(chunk)
        offset += len(chunk)
    return digest.hexdigest()


def lock_partial(partial: str, flags: int, disk: str | None = None) -> int:
    """partial opened and locked for this session alone, checked to be still the partial file
    (not committed or removed since it was opened) and, with disk, its disk not yet whole.

    Why: each session is a process of its own and an engine may open many at once. Two sessions
    appending to one partial file would each hash only their own bytes and note that digest
    beside the mixed file, so a commit and a launch would trust a digest that is not the disk's
    (the engine's bytes spliced into the customer's image). Every writer of a partial file takes
    this lock, and notes what it wrote only while it holds it."""
    fd = os.open(partial, flags | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise ServiceError("tvmm.disk-busy", "another session is writing or committing this VM's disk (or "
                                                 "saved state); wait for it to end") from None
        try:
            same = os.path.samestat(os.fstat(fd), os.lstat(partial))
        except FileNotFoundError:
            same = False
        if not same:
            raise ServiceError("tvmm.disk-busy", "this VM's disk was committed or removed while this session "
                                                 "waited to write it")
        if disk is not None and os.path.exists(disk):
            raise ServiceError("tvmm.disk-complete", "this VM's disk is here already; destroy the VM to replace it")
    except BaseException:
        os.close(fd)
        raise
    return fd


@contextlib.contextmanager
def locked_partial(partial: str, flags: int, disk: str | None = None) -> Iterator[int]:
    fd = lock_partial(partial, flags, disk)
    try:
        yield fd
    finally:
        os.close(fd)


@contextlib.contextmanager
def vm_lock(vm_id: str, wait: bool = True) -> Iterator[None]:
    """One session at a time on a VM's folder across the service's processes, from a key-using
    operation's checks (no QEMU here, the disk's digest) until its QEMU holds the disk open. A
    discard from another session in between removed the folder (and the destination's migration
    mark) and let a disk of the engine's choosing be opened under the checked digest (found in
    review). wait=False: refused (tvmm.vm-busy) rather than waiting. The lock file lives outside
    the folder, which a discard removes."""
    vm_dir(vm_id)  # (a VM id, 32 hex digits: the lock's file name)
    folder = config.current().path("vm-locks")
    os.makedirs(folder, mode=0o700, exist_ok=True)
    fd = os.open(os.path.join(folder, vm_id + ".lock"), os.O_CREAT | os.O_RDWR | os.O_CLOEXEC, 0o600)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX if wait else fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise ServiceError("tvmm.vm-busy", "another session is starting this VM here: try again once it has "
                                               "answered") from None
        yield
    finally:
        os.close(fd)


@operation("disk_state")
def disk_state(vm_id: str, what: str = "disk") -> dict[str, Any]:
    """How much of the VM's encrypted disk (or saved state) is here (a cut upload resumes where it
    stopped). Both are ciphertext: moving them needs no key and shows nothing."""
    disk, partial = _disk_paths(vm_id, what)
    return {"changed": False, "complete": os.path.exists(disk),
            "partial_size": os.path.getsize(partial) if os.path.exists(partial) else 0}


@operation("disk_receive")
def disk_receive(vm_id: str, offset: int, what: str = "disk") -> Incoming:
    """Append the ciphertext that follows as blocks (node.protocol) to the disk (or saved state)
    being received; only at its end, only before it is whole. Each block is written as it comes,
    so a copy cut anywhere resumes from what arrived (disk_state)."""
    vm_dir(vm_id, create=True)
    disk, partial = _disk_paths(vm_id, what)
    if os.path.exists(disk):
        raise ServiceError("tvmm.disk-complete", "this VM's disk is here already; destroy the VM to replace it")
    size = os.path.getsize(partial) if os.path.exists(partial) else 0
    if offset != size:
        raise ServiceError("tvmm.disk-offset", f"the disk being received has {size} bytes; write at {size}, not {offset}")

    def consume(blocks: Iterator[memoryview]) -> dict[str, Any]:
        # Hashed as it is written, so the commit need not read the file again; a resumed copy
        # hashes what arrived before first (a hash's state does not outlive the call).
        digest = hashlib.sha256()
        with locked_partial(partial, os.O_RDWR | os.O_CREAT | os.O_APPEND, disk) as fd:
            now = os.fstat(fd).st_size
            if now != size:  # another session wrote since this one was answered
                raise ServiceError("tvmm.disk-offset", f"the disk being received has {now} bytes; write at {now}, "
                                                       f"not {size}")
            with open(fd, "rb", closefd=False) as fh:
                for chunk in iter(lambda: fh.read(READ_CHUNK), b""):
                    digest.update(chunk)
            written = size + write_behind(blocks, fd, digest)
            st = os.fstat(fd)
            if st.st_size != written:
                raise ServiceError("tvmm.disk-busy", f"the disk being received has {st.st_size} bytes, not the "
                                                     f"{written} this session wrote")
            record_digest(partial, digest.hexdigest(), st)
        return {"changed": written > size, "size": written}

    return Incoming({"vm_id": vm_id, "offset": offset}, consume)


WRITE_BEHIND = 3  # blocks received ahead of the one being hashed and written


def write_behind(blocks: Iterator[memoryview], fd: int, digest: Any) -> int:
    """Write every block to fd and into digest, receiving the next blocks meanwhile: the socket's
    reads, the hash and the file's writes each leave the GIL, and done one after another they
    left a disk upload at half the wire's speed. Each block is copied out of the stream's one
    buffer into one of a few of ours. Returns the bytes written. When a write fails, no more is
    received and its error is raised; when the stream fails, what arrived before is written (a
    copy resumes from it) and the stream's error is raised."""
    import queue
    import threading

    spare: queue.Queue[bytearray] = queue.Queue()
    for _ in range(WRITE_BEHIND):
        spare.put(bytearray(protocol.MAX_BLOCK))
    ready: queue.Queue[tuple[bytearray, int] | None] = queue.Queue()
    failed: list[BaseException] = []
    written = 0

    def writer() -> None:
        nonlocal written
        while (item := ready.get()) is not None:
            buffer, size = item
            try:
                if not failed:
                    view = memoryview(buffer)[:size]
                    digest.update(view)
                    while view:
                        count = os.write(fd, view)
                        written += count
                        view = view[count:]
            except BaseException as exc:  # noqa: BLE001 - raised by the receiving thread
                failed.append(exc)
            finally:
                spare.put(buffer)

    thread = threading.Thread(target=writer, name="disk-writer", daemon=True)
    thread.start()
    try:
        for piece in blocks:
            buffer = spare.get()
            if failed:
                break
            buffer[:len(piece)] = piece
            ready.put((buffer, len(piece)))
    finally:
        ready.put(None)
        thread.join()
    if failed:
        raise failed[0]
    return written


@operation("disk_commit")
def disk_commit(vm_id: str, sha256: str, what: str = "disk") -> dict[str, Any]:
    """Check the received disk's (or saved state's) digest, then make it the VM's."""
    disk, partial = _disk_paths(vm_id, what)
    if digest_of(disk) == sha256:
        return {"changed": False}
    try:
        fd = lock_partial(partial, os.O_RDONLY, disk)
    except FileNotFoundError:
        raise ServiceError("tvmm.disk-digest", f"the received disk's sha256 is missing, expected {sha256}; "
                                               "send it again") from None
    try:  # locked: no session appends between the digest and the rename
        st = os.fstat(fd)
        actual = _noted(partial, st) or _sha256_fd(fd)
        if actual != sha256:
            for path in (partial, partial + DIGEST_SUFFIX):
                if os.path.exists(path):
                    os.unlink(path)
            raise ServiceError("tvmm.disk-digest", f"the received disk's sha256 is {actual}, expected {sha256}; "
                                                   "send it again")
        durable_replace(partial, disk)
        record_digest(disk, actual, st)  # (a rename keeps the size and time noted)
        if os.path.exists(partial + DIGEST_SUFFIX):
            os.unlink(partial + DIGEST_SUFFIX)
    finally:
        os.close(fd)
    return {"changed": True}


@operation("disk_send")
def disk_send(vm_id: str, offset: int, what: str = "disk") -> Outgoing:
    """The VM's encrypted disk (LUKS) or saved state from offset, as blocks (node.protocol), for a
    copy to another node: ciphertext only."""
    disk, _ = _disk_paths(vm_id, what)
    try:
        fh = open(disk, "rb")  # noqa: SIM115 - closed by produce, which runs after this answer
    except FileNotFoundError:
        raise ServiceError("tvmm.no-disk", "this VM has no disk here") from None
    size = os.fstat(fh.fileno()).st_size

    def produce(send: Callable[[bytes | bytearray | memoryview], None]) -> dict[str, Any]:
        buffer = bytearray(READ_CHUNK)
        sent = 0
        with fh, memoryview(buffer) as view:
            fh.seek(offset)
            while count := fh.readinto(view):
                send(view[:count])
                sent += count
        return {"changed": False, "sent": sent, "size": size}

    return Outgoing({"vm_id": vm_id, "offset": offset, "size": size}, produce)


def _pid(directory: str) -> int | None:
    try:
        with open(os.path.join(directory, "qemu.pid")) as fh:
            pid = int(fh.read().strip())
        os.kill(pid, 0)
        return pid
    except (OSError, ValueError):
        return None


def _alive(pid: int) -> bool:
    """Running, not merely a zombie waiting for its (re)parent to reap it."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as fh:
            return fh.read().rsplit(b")", 1)[1].split()[0] != b"Z"
    except (OSError, IndexError):
        return False


def _kill(directory: str) -> None:
    """Stop the VM's QEMU now: QMP quit (immediate), else SIGTERM, else SIGKILL."""
    pid = _pid(directory)
    if pid:
        try:
            qmp = QMP(os.path.join(directory, "qmp.sock"), timeout=2)
            try:
                qmp.execute("quit")
            finally:
                qmp.close()
        except (QMPError, OSError):
            os.kill(pid, signal.SIGTERM)
        for _ in range(250):
            if not _alive(pid):
                break
            time.sleep(0.01)
        else:
            os.kill(pid, signal.SIGKILL)
    for name in ("qemu.pid", "qmp.sock"):
        try:
            os.unlink(os.path.join(directory, name))
        except FileNotFoundError:
            pass


@operation("launch")
def launch(ticket: dict[str, Any]) -> dict[str, Any]:
    """Start the VM the TC's launch ticket names, on the profile it names, with the key it carries."""
    timings: dict[str, float] = {}
    clock = time.perf_counter()

    def lap(name: str) -> None:
        nonlocal clock
        now = time.perf_counter()
        timings[name] = round(now - clock, 4)
        clock = now

    body = tickets.check(ticket, "launch")
    with vm_lock(body["vm_id"]):
        vm_id, name = body["vm_id"], body["name"]
        directory = vm_dir(vm_id)
        disk = os.path.join(directory, DISK)
        if _pid(directory):
            raise ServiceError("tvmm.vm-running", f"VM {name} is already running here")
        launched = f"launched:{body['request']}"
        if tickets.remembered(launched):
            raise ServiceError("tvmm.launched", f"request {body['request']} was launched on this node already: a VM key "
                                                "starts one copy per request (the VM left since: it comes back by "
                                                "migration or resume, never a second launch)")
        if digest_of(disk) != body["image_sha256"]:
            raise ServiceError("tvmm.disk-digest", "the VM's disk is missing or is not the image the TC released the key for")
        tickets.spend(body)
        lap("ticket and disk checks")
        label = ticket_label("launch", "kvm", vm_id, body["customer"], body["id"])
        passphrase = unwrap_passphrase(body["kvm"], label)
        lap("TPM unwrap")
        accel = start_qemu(directory, vm_id, name, body["memory_mib"], body["vcpus"])
        lap("QEMU start")
        try:
            qmp = QMP(os.path.join(directory, "qmp.sock"))
            try:
                attach_disk(qmp, disk, passphrase, keep_secret=False)
                del passphrase
                # Running from here: no other ticket of this request (a release asked for again has
                # two, both valid for their life) starts it here again once it has left (found in review).
                tickets.remember(launched, tickets.FOREVER)
                qmp.execute("cont")
                status = qmp.execute("query-status")
                keep_wrapped_key(directory, body["kvm"], label)
            finally:
                qmp.close()
            lap("disk opened, VM running")
        except ServiceError:
            _kill(directory)  # (another session launched this request meanwhile)
            raise
        except (QMPError, OSError) as exc:
            _kill(directory)
            text = str(exc)
            if "password" in text.lower() or "keyslot" in text.lower():
                raise ServiceError("tvmm.disk-key", f"QEMU refused the disk key (LUKS): {text}") from None
            raise ServiceError("tvmm.qemu", f"QEMU failed: {text}") from None
        # The TPM's statement that this VM was launched here, from this ticket: the TC records the
        # launch and signs the receipt only on it.
        evidence = runtime.record(body, {
            "event": "launched", "vm_id": vm_id, "image_sha256": body["image_sha256"], "ticket": body["id"],
            "vcpus": body["vcpus"], "memory_mib": body["memory_mib"]})
        lap("TPM evidence")
        return {"changed": True, "running": status.get("status") == "running", "status": status.get("status"),
                "pid": _pid(directory), "accel": accel, "disk_opened": True, "ticket": body["id"], "evidence": evidence,
                "timings": timings}


def keep_wrapped_key(directory: str, wrapped: str, label: bytes) -> None:
    """Kvm wrapped to this node's TK (useless elsewhere, and here outside the approved boot),
    with its label: kept to lend QEMU the disk's secret again when a migration may need to
    reopen the disk on this side (see lend_secret)."""
    atomic_write(os.path.join(directory, WRAPPED_KEY_FILE),
                 json.dumps({"wrapped": wrapped, "label": label.decode()}).encode(), 0o600)


def lend_secret(vm_id: str, qmp: QMP) -> bool:
    """Give QEMU the disk's secret again, for the span of a migration: a source that reached
    postmigrate has inactivated its disk, and resuming it after an abort reopens the LUKS layer,
    which needs the secret. The TPM unwraps Kvm from the stored wrapped key (only in the
    approved boot). False when there is no stored key (a VM started before this was kept)."""
    path = os.path.join(vm_dir(vm_id), WRAPPED_KEY_FILE)
    if not os.path.exists(path):
        return False
    with open(path) as fh:
        kept = json.load(fh)
    passphrase = unwrap_passphrase(kept["wrapped"], kept["label"].encode())
    try:
        qmp.execute("object-add", **{"qom-type": "secret", "id": "kvm0", "data": passphrase, "format": "raw"})
    except QMPError as exc:
        if "already" not in str(exc).lower() and "duplicate" not in str(exc).lower():
            raise
    finally:
        del passphrase
    return True


def withdraw_secret(qmp: QMP) -> None:
    """Take the disk's secret back from QEMU once the disk is open again (it is readable over QMP)."""
    try:
        qmp.execute("object-del", id="kvm0")
    except QMPError:
        pass


def unwrap_passphrase(wrapped_key: str, label: bytes) -> str:
    """Kvm, unwrapped by the TPM (TK under PolicyPCR, OAEP label checked), in the text form LUKS
    takes (base64)."""
    kvm = tk_decrypt(base64.b64decode(wrapped_key), label)
    try:
        return base64.b64encode(kvm).decode()
    finally:
        del kvm


def start_qemu(directory: str, vm_id: str, name: str, memory_mib: int, vcpus: int, incoming: bool = False) -> str:
    """Start the VM's QEMU paused, daemonized, with its QMP socket private to this user; the
    same machine for a launch and a migration's destination. Returns the accelerator."""
    accel = "kvm" if os.access("/dev/kvm", os.R_OK | os.W_OK) else "tcg"
    argv = [QEMU, "-name", f"tcc-{name},process=tcc-{vm_id[:12]}", "-machine", "pc", "-accel", accel,
            "-m", str(int(memory_mib)), "-smp", str(int(vcpus)), "-nodefaults", "-display", "none", "-S",
            "-qmp", f"unix:{os.path.join(directory, 'qmp.sock')},server=on,wait=off",
            "-pidfile", os.path.join(directory, "qemu.pid"), *(["-incoming", "defer"] if incoming else []),
            "-daemonize"]
    old = os.umask(0o077)  # the QMP socket: only this user may talk to QEMU
    try:
        proc = subprocess.run(argv, capture_output=True, text=True, cwd=directory, timeout=60)
    finally:
        os.umask(old)
    if proc.returncode != 0:
        raise ServiceError("tvmm.qemu", f"QEMU did not start: {proc.stderr.strip()[-400:]}")
    return accel


def attach_disk(qmp: QMP, disk: str, passphrase: str, keep_secret: bool) -> None:
    """Hand QEMU the LUKS passphrase over QMP and open the encrypted disk with it.

    keep_secret: an incoming VM re-opens its image when it is activated after the migration,
    so its secret object is deleted only then (vm_incoming_finish)."""
    qmp.execute("object-add", **{"qom-type": "secret", "id": "kvm0", "data": passphrase, "format": "raw"})
    try:
        qmp.execute("blockdev-add", driver="qcow2", **{"node-name": "disk0"},
                    file={"driver": "file", "filename": disk}, encrypt={"format": "luks", "key-secret": "kvm0"})
    finally:
        if not keep_secret:
            qmp.execute("object-del", id="kvm0")
    qmp.execute("device_add", driver="virtio-blk-pci", drive="disk0", id="vda")


def receive_into(qmp: QMP, disk: str, passphrase: str, incoming: str) -> None:
    """A QEMU started with -incoming defer: the encrypted disk opened (its secret kept until the
    VM runs, when activation reopens it), then waiting for state on the private socket incoming."""
    attach_disk(qmp, disk, passphrase, keep_secret=True)
    qmp.execute("migrate-incoming", uri=f"unix:{incoming}")


def _qmp(vm_id: str) -> QMP:
    directory = vm_dir(vm_id)
    if not _pid(directory):
        raise ServiceError("tvmm.vm-not-running", "the VM is not running here")
    return QMP(os.path.join(directory, "qmp.sock"))


# -- a migration not yet settled --------------------------------------------------------------
# While a VM's migration is under way, both its ends hold it paused, and only the TC's settle
# ticket moves them: the source resumes only on an abort, the destination runs only on a commit.
# The mark is a file, so it holds across the service's processes and restarts.
PENDING_FILE = "migration.json"


def pending_migration(vm_id: str) -> dict[str, Any] | None:
    """The unsettled migration this VM takes part in here ({migration, role}), or None."""
    try:
        with open(os.path.join(vm_dir(vm_id), PENDING_FILE)) as fh:
            data = json.load(fh)
    except FileNotFoundError:
        return None
    except (OSError, ValueError):
        raise ServiceError("tvmm.state", "the VM's migration record is unreadable") from None
    return data if isinstance(data, dict) else {}


def mark_migration(vm_id: str, migration: str, role: str, was_running: bool = True, arrived: bool = False) -> None:
    """Hold the VM for migration at this end (was_running: whether an abort resumes it; arrived:
    the destination holds the whole VM and is about to say so to its TPM, after which only the
    TC's settle ticket drops it)."""
    record = {"migration": migration, "role": role, "was_running": was_running}
    if arrived:
        record["arrived"] = True
    atomic_write(os.path.join(vm_dir(vm_id), PENDING_FILE), json.dumps(record).encode(), 0o600)


def clear_migration(vm_id: str) -> None:
    """The migration is settled here, for good: a power cut must not bring back its record (the
    VM would wait for a settlement again)."""
    durable_remove(os.path.join(vm_dir(vm_id), PENDING_FILE))


def settle_ticket(ticket: dict[str, Any], vm_id: str, role: str) -> dict[str, Any]:
    """The TC's settle ticket for this VM's pending migration at this end; ServiceError otherwise.
    Not spent: it states a decided outcome, and a copy of it can only repeat that outcome."""
    body = tickets.check(ticket, "settle")
    pending = pending_migration(vm_id)
    if body["vm_id"] != vm_id or body["role"] != role:
        raise ServiceError("ticket.vm", f"the settle ticket is for VM {body['vm_id']} as {body['role']}, "
                                        f"not for VM {vm_id} as {role}")
    if pending is None or pending.get("migration") != body["migration"] or pending.get("role") != role:
        raise ServiceError("tvmm.not-migrating", f"VM {vm_id} has no unsettled migration {body['migration']} here "
                                                 f"as {role}")
    return body


def _not_migrating(vm_id: str) -> None:
    pending = pending_migration(vm_id)
    if pending is not None:
        raise ServiceError("tvmm.migrating", f"migration {pending.get('migration')} of this VM is not settled: only the "
                                             "TC's settle ticket moves it")


@operation("vm_status")
def vm_status(vm_id: str) -> dict[str, Any]:
    """QEMU's run state, and the migration this VM waits on (if any)."""
    directory = vm_dir(vm_id)
    pending = pending_migration(vm_id)
    if not _pid(directory):
        return {"changed": False, "status": "absent", "pid": None, "migration": pending}
    qmp = QMP(os.path.join(directory, "qmp.sock"))
    try:
        status = qmp.execute("query-status")
    finally:
        qmp.close()
    return {"changed": False, "status": status.get("status"), "pid": _pid(directory), "migration": pending}


@operation("vm_stop")
def vm_stop(vm_id: str) -> dict[str, Any]:
    """Pause the VM (its memory stays in QEMU, inside this service's reach only)."""
    _not_migrating(vm_id)
    qmp = _qmp(vm_id)
    try:
        qmp.execute("stop")
        status = qmp.execute("query-status")
    finally:
        qmp.close()
    return {"changed": True, "status": status.get("status"), "pid": _pid(vm_dir(vm_id))}


@operation("vm_start")
def vm_start(vm_id: str) -> dict[str, Any]:
    """Continue a paused VM. Refused while a migration of it is unsettled: resuming a source whose
    state went out, or a destination before the TC committed, would run two copies."""
    _not_migrating(vm_id)
    qmp = _qmp(vm_id)
    try:
        qmp.execute("cont")
        withdraw_secret(qmp)
        status = qmp.execute("query-status")
    finally:
        qmp.close()
    return {"changed": True, "status": status.get("status"), "pid": _pid(vm_dir(vm_id))}


@operation("vm_end")
def vm_end(ticket: dict[str, Any]) -> dict[str, Any]:
    """Power off (QEMU quits: the guest's memory is gone, the encrypted disk stays) or destroy
    (the disk goes too) the VM the TC's end ticket names, and answer with the TPM's evidence: the
    TC marks a VM gone only on it. Refused while a migration of the VM is unsettled (the TC's
    outcome decides which copy lives)."""
    body = tickets.check(ticket, "end")
    with vm_lock(body["vm_id"]):
        vm_id = body["vm_id"]
        directory = vm_dir(vm_id)
        _not_migrating(vm_id)
        tickets.spend(body)
        was_running = bool(_pid(directory))
        _kill(directory)
        if body["action"] == "destroy":
            durable_remove(directory)
        event = "destroyed" if body["action"] == "destroy" else "powered-off"
        evidence = runtime.record(body, {"event": event, "vm_id": vm_id, "ticket": body["id"]})
        return {"changed": True, "status": event, "was_running": was_running, "evidence": evidence}

