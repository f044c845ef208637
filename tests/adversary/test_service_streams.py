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
