"""STREAM: a long byte stream (a VM's migration) encrypted in authenticated chunks.

The STREAM construction (Hoang, Reyhanitabar, Rogaway, Vizár, "Online authenticated-encryption
and its nonce-reuse misuse-resistance", 2015) over AES-256-GCM:

    header   = b"TCCSTRM1" || nonce_prefix (7 bytes, random) || chunk_size (u32, big endian)
             | b"TCCSTRM2" || nonce_prefix || chunk_size || len(context) (u16) || context
    nonce_i  = nonce_prefix || i (u32, big endian) || last (1 byte: 1 for the final chunk, else 0)
    frame_i  = len(ct_i) (u32, big endian) || ct_i,   ct_i = AES-256-GCM(K, nonce_i, chunk_i, aad=header)

Every chunk but the last holds exactly chunk_size bytes; the last may be shorter (or empty).
Reordered, duplicated or dropped chunks fail authentication (the counter is in the nonce); a
stream cut short has no chunk flagged last and is rejected at its end; a flipped bit fails its
chunk's tag. A decryptor releases a chunk's plaintext only after its tag verified.

A context (a migration's id) names what the stream is for: it travels in the header, which every
chunk authenticates, and a decryptor expecting another context refuses the header, so a stream
made for one migration is not accepted for another even under the same key.
"""

from __future__ import annotations

import os
import struct
from collections.abc import Iterable, Iterator
from typing import BinaryIO

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

MAGIC = b"TCCSTRM1"
MAGIC_CONTEXT = b"TCCSTRM2"
HEADER_SIZE = len(MAGIC) + 7 + 4
MAX_CONTEXT = 256
DEFAULT_CHUNK = 64 * 1024
MAX_CHUNK = 16 * 1024 * 1024
TAG = 16


class StreamError(ValueError):
    """The stream is not authentic: altered, reordered, duplicated, truncated or malformed."""


def _nonce(prefix: bytes, counter: int, last: bool) -> bytes:
    if counter >= 2**32:
        raise StreamError("stream too long: the chunk counter would wrap")
    return prefix + struct.pack(">I", counter) + (b"\x01" if last else b"\x00")


class Encryptor:
    """Feed plaintext in any pieces; get frames out. finish() emits the final chunk.

    update_into() is the migration's path: it seals straight from the caller's buffer into the
    caller's preallocated output (AES-GCM's encrypt_into), so a chunk is copied only when it
    straddles two calls; update() is the same into a fresh buffer, for callers that keep what
    they get."""

    def __init__(self, key: bytes, chunk_size: int = DEFAULT_CHUNK, nonce_prefix: bytes | None = None,
                 context: bytes = b""):
        if len(key) != 32:
            raise ValueError("STREAM uses a 256-bit key")
        if not 1 <= chunk_size <= MAX_CHUNK:
            raise ValueError("bad chunk size")
        if len(context) > MAX_CONTEXT:
            raise ValueError("the stream's context is at most 256 bytes")
        self.aead = AESGCM(key)
        self.prefix = nonce_prefix if nonce_prefix is not None else os.urandom(7)
        if len(self.prefix) != 7:
            raise ValueError("the nonce prefix is 7 bytes")
        self.chunk_size = chunk_size
        self.header = MAGIC + self.prefix + struct.pack(">I", chunk_size)
        if context:
            self.header = MAGIC_CONTEXT + self.prefix + struct.pack(">IH", chunk_size, len(context)) + context
        self.counter = 0
        self.pending = bytearray(chunk_size)  # the held-back chunk: it may be the final one
        self.held = 0
        self.done = False

    def _seal(self, chunk: bytes | bytearray | memoryview, out: memoryview, last: bool) -> int:
        size = len(chunk) + TAG
        struct.pack_into(">I", out, 0, size)
        self.aead.encrypt_into(_nonce(self.prefix, self.counter, last), chunk, self.header, out[4:4 + size])
        self.counter += 1
        return 4 + size

    def output_size(self, length: int) -> int:
        """How many bytes of frames update_into() writes for length more bytes of plaintext."""
        count = max(0, (self.held + length - 1) // self.chunk_size)
        return count * (4 + self.chunk_size + TAG)

    def update_into(self, data: bytes | bytearray | memoryview, out: bytearray | memoryview) -> int:
        """Write the frames of every full chunk now available into out (at least output_size(len(data))
        bytes) and return how many bytes were written. A full chunk is held back until more data
        or finish() tells whether it is the last."""
        if self.done:
            raise StreamError("the stream was finished")
        size = self.chunk_size
        with memoryview(data) as source, memoryview(out) as sink:
            source = source.cast("B") if source.format != "B" or source.ndim != 1 else source
            length = len(source)
            count = max(0, (self.held + length - 1) // size)
            if len(sink) < count * (4 + size + TAG):
                raise ValueError(f"the output holds {len(sink)} bytes; these frames need {count * (4 + size + TAG)}")
            pos = written = 0
            if count and self.held:
                pos = size - self.held
                self.pending[self.held:] = source[:pos]
                written = self._seal(self.pending, sink, last=False)
                self.held = 0
                count -= 1
            for _ in range(count):
                written += self._seal(source[pos:pos + size], sink[written:], last=False)
                pos += size
            rest = length - pos
            self.pending[self.held:self.held + rest] = source[pos:]
            self.held += rest
        return written

    def update(self, data: bytes | bytearray | memoryview) -> bytearray:
        """The frames of every full chunk now available, in a new buffer (see update_into)."""
        out = bytearray(self.output_size(memoryview(data).nbytes))
        del out[self.update_into(data, out):]
        return out

    def finish(self) -> bytes:
        if self.done:
            raise StreamError("the stream was finished")
        self.done = True
        frame = bytearray(4 + self.held + TAG)
        with memoryview(self.pending) as pending, memoryview(frame) as sink:
            self._seal(pending[:self.held], sink, last=True)
        self.held = 0
        return bytes(frame)


class Decryptor:
    """Feed frames in any pieces; get verified plaintext out. finish() checks the stream ended.

    update_into() opens frames straight from the caller's buffer into the caller's output
    (AES-GCM's decrypt_into); only a frame split across two calls is copied, into `buffer`."""

    def __init__(self, key: bytes, context: bytes = b""):
        if len(key) != 32:
            raise ValueError("STREAM uses a 256-bit key")
        self.context = context
        self.aead = AESGCM(key)
        self.buffer = bytearray()  # the header or a frame not yet whole
        self.header: bytes | None = None
        self.prefix = b""
        self.chunk_size = 0
        self.counter = 0
        self.ended = False

    def _read_header(self) -> int:
        """The header's length once it is whole in buffer (then checked and taken), else 0."""
        if len(self.buffer) < HEADER_SIZE:
            return 0
        magic = bytes(self.buffer[:len(MAGIC)])
        size = HEADER_SIZE
        if magic == MAGIC_CONTEXT:
            if len(self.buffer) < HEADER_SIZE + 2:
                return 0
            size = HEADER_SIZE + 2 + struct.unpack_from(">H", self.buffer, HEADER_SIZE)[0]
            if len(self.buffer) < size:
                return 0
        elif magic != MAGIC:
            raise StreamError("not a tccdeploy STREAM (bad magic)")
        header = bytes(self.buffer[:size])
        context = header[HEADER_SIZE + 2:] if magic == MAGIC_CONTEXT else b""
        if context != self.context:
            raise StreamError("the stream was made for another context (another migration)")
        self.chunk_size = struct.unpack(">I", header[HEADER_SIZE - 4:HEADER_SIZE])[0]
        if not 1 <= self.chunk_size <= MAX_CHUNK:
            raise StreamError(f"chunk size {self.chunk_size} out of range")
        self.header, self.prefix = header, header[len(MAGIC):len(MAGIC) + 7]
        return size

    def _frame_size(self, source: bytes | bytearray | memoryview, pos: int) -> int:
        size: int = struct.unpack_from(">I", source, pos)[0]
        if size < TAG or size > self.chunk_size + TAG:
            raise StreamError(f"frame of {size} bytes cannot be a chunk of this stream")
        return size

    def update_into(self, data: bytes | bytearray | memoryview, out: bytearray | memoryview) -> int:
        """Open every whole frame now available into out (at least len(data) + len(buffer)
        bytes) and return how many bytes of verified plaintext it holds. Bytes of out past that
        count are scratch (a frame that failed is wiped from it)."""
        with memoryview(data) as source, memoryview(out) as sink:
            source = source.cast("B") if source.format != "B" or source.ndim != 1 else source
            if len(sink) < len(source) + len(self.buffer):  # plaintext is never longer than what came in
                raise ValueError(f"the output holds {len(sink)} bytes; give at least {len(source) + len(self.buffer)}")
            pos = written = 0
            if self.header is None:
                self.buffer += source
                taken = self._read_header()
                if not taken:
                    return 0
                source = memoryview(bytes(self.buffer[taken:]))  # once per stream: what followed the header
                self.buffer.clear()
                pos = 0
            if self.buffer:  # a frame begun in an earlier piece: complete it first
                need = 4 - len(self.buffer)
                if need > 0:
                    self.buffer += source[:need]
                    pos = min(need, len(source))
                    if len(self.buffer) < 4:
                        return 0
                size = self._frame_size(self.buffer, 0)
                take = min(4 + size - len(self.buffer), len(source) - pos)
                self.buffer += source[pos:pos + take]
                pos += take
                if len(self.buffer) < 4 + size:
                    return 0
                if self.ended:
                    raise StreamError("data after the final chunk")
                with memoryview(self.buffer) as frame:
                    written = self._open_into(frame[4:], sink)
                self.buffer.clear()
            end = len(source)
            while end - pos >= 4:
                size = self._frame_size(source, pos)
                if end - pos < 4 + size:
                    break
                if self.ended:
                    raise StreamError("data after the final chunk")
                written += self._open_into(source[pos + 4:pos + 4 + size], sink[written:])
                pos += 4 + size
            if pos < end:
                self.buffer += source[pos:]
        return written

    def update(self, data: bytes | bytearray | memoryview) -> bytearray:
        """Verified plaintext of every whole frame now available, in a new buffer (see update_into)."""
        out = bytearray(memoryview(data).nbytes + len(self.buffer))
        del out[self.update_into(data, out):]
        return out

    def _open_into(self, ciphertext: memoryview, out: memoryview) -> int:
        length = len(ciphertext) - TAG
        target = out[:length]
        for last in (False, True):
            try:
                self.aead.decrypt_into(_nonce(self.prefix, self.counter, last), ciphertext, self.header, target)
            except InvalidTag:
                continue
            if not last and length != self.chunk_size:
                raise StreamError("a non-final chunk of the wrong size")
            self.counter += 1
            self.ended = last
            return length
        target[:] = bytes(length)  # AES-GCM wrote the unauthenticated plaintext before it checked the tag
        raise StreamError(f"chunk {self.counter} does not authenticate (altered, reordered, duplicated or from another stream)")

    def finish(self) -> None:
        if self.header is None:
            raise StreamError("empty stream: no header")
        if self.buffer:
            raise StreamError(f"{len(self.buffer)} trailing bytes: a frame was cut short")
        if not self.ended:
            raise StreamError(f"the stream ended after {self.counter} chunk(s) without its final chunk (truncated)")


def encrypt(key: bytes, data: bytes, chunk_size: int = DEFAULT_CHUNK, nonce_prefix: bytes | None = None) -> bytes:
    enc = Encryptor(key, chunk_size, nonce_prefix)
    return enc.header + enc.update(data) + enc.finish()


def decrypt(key: bytes, data: bytes) -> bytes:
    dec = Decryptor(key)
    out = dec.update(data)
    dec.finish()
    return bytes(out)


def encrypt_file(key: bytes, source: BinaryIO, sink: BinaryIO, chunk_size: int = DEFAULT_CHUNK) -> int:
    """Stream source to sink encrypted; memory stays at one chunk. Returns bytes written."""
    enc = Encryptor(key, chunk_size)
    written = sink.write(enc.header)
    for piece in iter(lambda: source.read(chunk_size), b""):
        written += sink.write(enc.update(piece))
    written += sink.write(enc.finish())
    return written


def decrypt_iter(key: bytes, pieces: Iterable[bytes]) -> Iterator[bytes]:
    dec = Decryptor(key)
    for piece in pieces:
        plain = dec.update(piece)
        if plain:
            yield bytes(plain)
    dec.finish()
