"""vm.write_behind: a disk upload's blocks hashed and written on one thread while the next are
received on another (tvmm/vm.py). What it must keep from the one-thread loop: every byte in
order, the digest of exactly what was written, a failed write stopping the stream, and a cut
stream leaving what arrived before it on disk (a copy resumes from there)."""

from __future__ import annotations

import errno
import hashlib
import os

import pytest

from tccdeploy.tvmm.vm import WRITE_BEHIND, write_behind


def reused_buffer_blocks(pieces: list[bytes], seen: list[int], cut_after: int | None = None):  # type: ignore[no-untyped-def]
    """As node.protocol.read_blocks does: one buffer, each view valid until the next is asked for."""
    buffer = bytearray(max(len(p) for p in pieces))
    view = memoryview(buffer)
    for number, piece in enumerate(pieces):
        if cut_after is not None and number == cut_after:
            raise ConnectionError("the stream was cut")
        buffer[:len(piece)] = piece
        seen.append(number)
        yield view[:len(piece)]


def test_every_block_is_written_in_order_with_its_digest(tmp_path):
    pieces = [os.urandom(1000 + 37 * i) for i in range(50)]
    digest = hashlib.sha256()
    path = tmp_path / "disk"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    try:
        assert write_behind(reused_buffer_blocks(pieces, []), fd, digest) == sum(map(len, pieces))
    finally:
        os.close(fd)
    assert path.read_bytes() == b"".join(pieces)  # each block copied out of the reused buffer in time
    assert digest.hexdigest() == hashlib.sha256(b"".join(pieces)).hexdigest()


def test_a_failed_write_stops_receiving_and_is_raised(tmp_path):
    path = tmp_path / "disk"
    path.write_bytes(b"")
    fd = os.open(path, os.O_RDONLY)  # every write fails (EBADF)
    seen: list[int] = []
    try:
        with pytest.raises(OSError) as info:
            write_behind(reused_buffer_blocks([b"x" * 4096] * 100, seen), fd, hashlib.sha256())
    finally:
        os.close(fd)
    assert info.value.errno == errno.EBADF
    assert len(seen) <= WRITE_BEHIND + 2  # not the other blocks: the engine is told at once


def test_a_cut_stream_leaves_what_arrived_before_it_and_is_raised(tmp_path):
    pieces = [bytes([i]) * 5000 for i in range(10)]
    path = tmp_path / "disk"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    try:
        with pytest.raises(ConnectionError):
            write_behind(reused_buffer_blocks(pieces, [], cut_after=6), fd, hashlib.sha256())
    finally:
        os.close(fd)
    assert path.read_bytes() == b"".join(pieces[:6])
