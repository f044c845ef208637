"""The hostile engine against the TVMM service's byte streams (node/protocol.py), at unit speed:
the real service (tvmm.service.handle, its real operations and state directory) behind the real
protocol loop, fed the bytes an engine with an SSH login on the node could send. The lab
versions (a re-cut, forged or repeated migration stream) are in test_tickets_lab.py."""

from __future__ import annotations

import io
import json
import os
import struct
import sys
from pathlib import Path
from typing import Any

import pytest

from tccdeploy.node.protocol import MAX_BLOCK, serve
from tccdeploy.tvmm import config
from tccdeploy.tvmm.service import handle

VM = "ab" * 16
END = struct.pack(">I", 0)


@pytest.fixture
def state(tmp_path: Path):  # type: ignore[no-untyped-def]
    before = config._current
    config.use(config.Config(node="n1", tpm="none", state_dir=str(tmp_path / "state"), eventlog="/none"))
    yield tmp_path / "state"
    config.use(before)  # type: ignore[arg-type]


def block(data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + data


def line(op: str, rid: int = 1, **args: Any) -> bytes:
    return json.dumps({"id": rid, "op": op, "args": args}).encode() + b"\n"


def session(stdin: bytes) -> tuple[int, list[dict[str, Any]]]:
    out, stdout = io.BytesIO(), sys.stdout
    try:
        code = serve({"hello": "tccdeploy-tvmm"}, handle, io.BufferedReader(io.BytesIO(stdin)), out)  # type: ignore[arg-type]
    finally:
        sys.stdout = stdout
    return code, [json.loads(text) for text in out.getvalue().splitlines()[1:]]


def partial(state: Path) -> bytes:
    path = state / "vms" / VM / "disk.qcow2.partial"
    return path.read_bytes() if path.exists() else b""


def test_a_block_longer_than_the_protocol_allows_ends_the_session_and_keeps_only_whole_blocks(state: Path):
    """The engine claims a 4 GiB block: the service neither allocates it nor reads what follows
    as requests (the bytes after it are the engine's, out of step); what arrived whole stays."""
    stdin = (line("disk_receive", 1, vm_id=VM, offset=0) + block(b"first") + struct.pack(">I", 2**32 - 1)
             + b"x" * MAX_BLOCK + END + line("disk_commit", 2, vm_id=VM, sha256="00" * 32))
    code, answers = session(stdin)
    assert code == 1
    assert answers[0]["ok"] and answers[-1]["error"]["reason"] == "stream.framing"
    assert all(a.get("id") != 2 for a in answers)  # the request hidden after the bad block never ran
    assert partial(state) == b"first"


def test_a_block_cut_short_is_not_written(state: Path):
    code, answers = session(line("disk_receive", 1, vm_id=VM, offset=0) + block(b"whole") + block(b"cut short")[:-3])
    assert code == 1 and answers[-1]["error"]["reason"] == "stream.framing"
    assert partial(state) == b"whole"


def test_a_write_that_is_not_at_the_end_is_refused_before_any_byte_is_taken(state: Path):
    code, answers = session(line("disk_receive", 1, vm_id=VM, offset=0) + block(b"12345") + END
                            + line("disk_receive", 2, vm_id=VM, offset=2) + line("disk_state", 3, vm_id=VM))
    assert code == 0
    assert answers[1]["result"] == {"changed": True, "size": 5}
    assert answers[2]["error"]["reason"] == "tvmm.disk-offset"
    assert answers[3]["result"]["partial_size"] == 5 and partial(state) == b"12345"


def test_a_resumed_copy_continues_exactly_where_the_cut_one_stopped(state: Path):
    session(line("disk_receive", 1, vm_id=VM, offset=0) + block(b"abc") + block(b"de")[:-1])  # cut
    code, answers = session(line("disk_receive", 1, vm_id=VM, offset=3) + block(b"def") + END)
    assert code == 0 and answers[1]["result"]["size"] == 6 and partial(state) == b"abcdef"


def test_streams_of_a_migration_that_is_not_under_way_are_refused_by_name(state: Path):
    code, answers = session(line("migrate_out_stream", 1, vm_id=VM) + line("migrate_in_stream", 2, vm_id=VM))
    assert code == 0
    assert [a["error"]["reason"] for a in answers] == ["tvmm.no-migration", "tvmm.no-migration"]


def test_the_largest_block_is_taken(state: Path):
    code, answers = session(line("disk_receive", 1, vm_id=VM, offset=0) + block(bytes(MAX_BLOCK)) + END)
    assert code == 0 and answers[1]["result"]["size"] == MAX_BLOCK
    assert os.path.getsize(state / "vms" / VM / "disk.qcow2.partial") == MAX_BLOCK


def test_a_disk_hashed_as_it_arrived_is_checked_again_once_anything_changed_it(state: Path):
    """Issue 20: the service notes a disk's SHA-256 as it writes it, so neither the commit nor a
    launch reads tens of GB again; the note holds only while the file is as it was noted. A
    resumed copy hashes what arrived before; a disk changed after its commit (another size or
    time) is hashed again, and refused for the image it no longer is."""
    import hashlib

    whole = b"ciphertext " * 1000
    right = hashlib.sha256(whole).hexdigest()
    code, answers = session(line("disk_receive", 1, vm_id=VM, offset=0) + block(whole[:700]) + END
                            + line("disk_receive", 2, vm_id=VM, offset=700) + block(whole[700:]) + END
                            + line("disk_commit", 3, vm_id=VM, sha256=right))
    assert code == 0 and answers[-1]["result"] == {"changed": True}, answers
    disk = state / "vms" / VM / "disk.qcow2"
    noted = json.loads((state / "vms" / VM / "disk.qcow2.sha256").read_text())
    assert noted["sha256"] == right and noted["size"] == len(whole) and not Path(str(disk) + ".partial.sha256").exists()
    _, answers = session(line("disk_commit", 1, vm_id=VM, sha256=right))
    assert answers[0]["result"] == {"changed": False}  # the note answers
    with open(disk, "r+b") as fh:  # the disk is changed in place, same size
        fh.write(b"X")
    os.utime(disk, ns=(noted["mtime_ns"], noted["mtime_ns"] + 1))
    _, answers = session(line("disk_commit", 1, vm_id=VM, sha256=right))
    assert answers[0]["error"]["reason"] == "tvmm.disk-digest"  # hashed again: not the image any more


def test_a_note_that_does_not_match_the_received_bytes_cannot_be_made_by_the_stream(state: Path):
    """What the engine sends is what is hashed: a commit naming another digest is refused and the
    copy (and its note) dropped, whatever was claimed."""
    code, answers = session(line("disk_receive", 1, vm_id=VM, offset=0) + block(b"the engine's bytes") + END
                            + line("disk_commit", 2, vm_id=VM, sha256="11" * 32) + line("disk_state", 3, vm_id=VM))
    assert answers[2]["error"]["reason"] == "tvmm.disk-digest"
    assert answers[3]["result"]["partial_size"] == 0 and not (state / "vms" / VM / "disk.qcow2.partial.sha256").exists()


class _OpenSession:
    """A session the engine keeps open (a process of its own on a node; a thread here), fed its
    bytes as the test chooses, while other sessions run."""

    def __init__(self) -> None:
        import threading

        read, self._write = os.pipe()
        self.answers: list[dict[str, Any]] = []
        self._stdin = os.fdopen(read, "rb")

        def run() -> None:
            out = io.BytesIO()
            serve({"hello": "tccdeploy-tvmm"}, handle, self._stdin, out)  # type: ignore[arg-type]
            self.answers = [json.loads(text) for text in out.getvalue().splitlines()[1:]]

        self._thread = threading.Thread(target=run, daemon=True)
        self._stdout = sys.stdout
        self._thread.start()

    def send(self, data: bytes) -> None:
        os.write(self._write, data)

    def end(self) -> list[dict[str, Any]]:
        os.close(self._write)
        self._thread.join(30)
        sys.stdout = self._stdout  # (serve points it at stderr)
        self._stdin.close()
        return self.answers


def _until(predicate, seconds: float = 10.0) -> None:  # type: ignore[no-untyped-def]
    import time

    deadline = time.monotonic() + seconds
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.01)


def test_a_second_session_cannot_splice_its_bytes_into_a_disk_another_session_is_writing(state: Path):
    """Each session is a process of its own. Session A sends half of the customer's ciphertext and
    waits; session B resumes at the partial's current end with the engine's bytes; A sends the
    rest. Before the fix both appended (O_APPEND) and A noted the digest of its own bytes beside
    the mixed file, so the commit and a launch took the spliced disk for the image (a review
    showed it). Now B is refused while A writes, and what A notes is the file's."""
    import hashlib

    image = bytes(range(256)) * 400
    a = _OpenSession()
    a.send(line("disk_receive", 1, vm_id=VM, offset=0) + block(image[:50_000]))
    _until(lambda: len(partial(state)) == 50_000)
    _, answers = session(line("disk_state", 1, vm_id=VM) + line("disk_receive", 2, vm_id=VM, offset=50_000)
                         + block(b"EVIL" * 1000) + END + line("disk_commit", 3, vm_id=VM,
                                                              sha256=hashlib.sha256(image).hexdigest()))
    assert answers[0]["result"]["partial_size"] == 50_000
    assert [a.get("error", {}).get("reason") for a in answers[1:]] == [None, "tvmm.disk-busy", "tvmm.disk-busy"], answers
    assert partial(state) == image[:50_000]
    a.send(block(image[50_000:]) + END)
    assert a.end()[1]["result"] == {"changed": True, "size": len(image)}
    _, answers = session(line("disk_commit", 1, vm_id=VM, sha256=hashlib.sha256(image).hexdigest()))
    assert answers[0]["result"] == {"changed": True}
    from tccdeploy.crypto.files import sha256_file
    from tccdeploy.tvmm.vm import digest_of

    disk = str(state / "vms" / VM / "disk.qcow2")
    assert Path(disk).read_bytes() == image
    assert digest_of(disk) == sha256_file(disk) == hashlib.sha256(image).hexdigest()


def test_a_session_that_waited_past_a_commit_writes_nothing_into_the_committed_disk(state: Path, monkeypatch):
    """The lock is taken on the file a session opened; if the partial was committed (renamed to
    the disk) or removed meanwhile, that file is not the partial any more: refused by name."""
    from tccdeploy.tvmm import vm

    session(line("disk_receive", 1, vm_id=VM, offset=0) + block(b"abc") + END)
    path = str(state / "vms" / VM / "disk.qcow2.partial")
    elsewhere = str(state / "vms" / VM / "moved")
    real = vm.fcntl.flock

    def renamed_while_waiting(fd: int, op: int) -> None:
        os.replace(path, elsewhere)  # another session's commit, between this one's open and lock
        real(fd, op)

    monkeypatch.setattr(vm.fcntl, "flock", renamed_while_waiting)
    with pytest.raises(vm.ServiceError) as refused:
        vm.lock_partial(path, os.O_RDWR | os.O_APPEND)
    assert refused.value.reason == "tvmm.disk-busy"
    assert Path(elsewhere).read_bytes() == b"abc"


def test_a_session_writing_where_the_saved_state_goes_stops_a_suspension_before_its_ticket_is_spent(
        state: Path, monkeypatch):
    """A suspension writes the VM's state where an upload of a state is received: a session
    appending there would put the engine's bytes into the state whose digest the TPM's evidence
    names. The suspension takes the lock first, so it is refused by name with its ticket unspent
    (the TC's ticket and the running VM are the lab's: test_suspend_lab.py; here only the order)."""
    from tccdeploy.tvmm import suspend, vm

    spent: list[dict[str, Any]] = []
    monkeypatch.setattr(suspend.tickets, "check", lambda ticket, kind: {"vm_id": VM, "id": "t1"})
    monkeypatch.setattr(suspend.tickets, "spend", spent.append)
    monkeypatch.setattr(suspend, "_pid", lambda directory: 4242)
    monkeypatch.setattr(suspend, "pending_migration", lambda vm_id: None)
    folder = state / "vms" / VM
    folder.mkdir(parents=True, mode=0o700)
    writer = vm.lock_partial(str(folder / "state.tccstrm.partial"), os.O_RDWR | os.O_CREAT | os.O_APPEND)
    try:
        with pytest.raises(vm.ServiceError) as refused:
            suspend.vm_suspend({"ticket": {}})
    finally:
        os.close(writer)
    assert refused.value.reason == "tvmm.disk-busy" and spent == []


def test_a_writer_outside_the_lock_is_caught_before_its_bytes_are_noted(state: Path, monkeypatch):
    """What a session notes is the size it wrote: should anything else have grown the file while
    it wrote, the digest is not noted (the commit then reads the file whole) and it says so."""
    from tccdeploy.tvmm import vm

    real = vm.write_behind

    def and_another_writer(blocks, fd, digest):  # type: ignore[no-untyped-def]
        written = real(blocks, fd, digest)
        with open(state / "vms" / VM / "disk.qcow2.partial", "ab") as other:
            other.write(b"!")
        return written

    monkeypatch.setattr(vm, "write_behind", and_another_writer)
    _, answers = session(line("disk_receive", 1, vm_id=VM, offset=0) + block(b"abc") + END)
    assert answers[1]["error"]["reason"] == "tvmm.disk-busy"
    assert not (state / "vms" / VM / "disk.qcow2.partial.sha256").exists()


def test_a_session_answered_before_another_wrote_is_refused_at_its_lock(state: Path, monkeypatch):
    """A session is answered at the partial's end, then takes the lock: bytes another session
    wrote in between move the end, and this one is refused rather than appended after them."""
    from tccdeploy.tvmm import vm

    session(line("disk_receive", 1, vm_id=VM, offset=0) + block(b"abc") + END)
    real = vm.fcntl.flock

    def another_session_first(fd: int, op: int) -> None:
        with open(state / "vms" / VM / "disk.qcow2.partial", "ab") as other:
            other.write(b"de")
        real(fd, op)

    monkeypatch.setattr(vm.fcntl, "flock", another_session_first)
    _, answers = session(line("disk_receive", 1, vm_id=VM, offset=3) + block(b"XYZ") + END)
    assert answers[1]["error"]["reason"] == "tvmm.disk-offset"
    assert partial(state) == b"abcde"


def test_a_session_that_reaches_its_lock_after_the_disk_was_committed_is_refused_as_complete(state: Path):
    """Answered before another session's commit, at its lock after it (a fresh partial then): the
    disk is whole now, and bytes in a partial beside it could never be committed."""
    from tccdeploy.tvmm import vm

    folder = state / "vms" / VM
    folder.mkdir(parents=True, mode=0o700)
    (folder / "disk.qcow2").write_bytes(b"abc")
    with pytest.raises(vm.ServiceError) as refused:
        vm.lock_partial(str(folder / "disk.qcow2.partial"), os.O_RDWR | os.O_CREAT | os.O_APPEND,
                        str(folder / "disk.qcow2"))
    assert refused.value.reason == "tvmm.disk-complete"
    assert (folder / "disk.qcow2").read_bytes() == b"abc"
