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
    """Feed plaintext in any pieces; get frames out. finish() emits the final chunk."""

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
        self.buffer = bytearray()
        self.done = False

    def _frame(self, chunk: bytes | memoryview, last: bool) -> bytes:
        ciphertext = self.aead.encrypt(_nonce(self.prefix, self.counter, last), chunk, self.header)
        self.counter += 1
        return struct.pack(">I", len(ciphertext)) + ciphertext

    def update(self, data: bytes) -> bytes:
        """Frames for every full chunk now available (a full chunk is held back until more data
        or finish() tells whether it is the last)."""
        if self.done:
            raise StreamError("the stream was finished")
        self.buffer += data
        size = self.chunk_size
        count = (len(self.buffer) - 1) // size  # keep the last (maybe full) chunk: it may be the final one
        if count <= 0:
            return b""
        view = memoryview(self.buffer)
        try:
            frames = [self._frame(view[i * size:(i + 1) * size], last=False) for i in range(count)]
        finally:
            view.release()
        del self.buffer[: count * size]  # one move per call, not one per chunk
        return b"".join(frames)

    def finish(self) -> bytes:
        self.done = True
        frame = self._frame(bytes(self.buffer), last=True)
        self.buffer.clear()
        return frame


class Decryptor:
    """Feed frames in any pieces; get verified plaintext out. finish() checks the stream ended."""

    def __init__(self, key: bytes, context: bytes = b""):
        if len(key) != 32:
            raise ValueError("STREAM uses a 256-bit key")
        self.context = context
        self.aead = AESGCM(key)
        self.buffer = bytearray()
        self.header: bytes | None = None
        self.prefix = b""
        self.chunk_size = 0
        self.counter = 0
        self.ended = False

    def update(self, data: bytes) -> bytes:
        self.buffer += data
        out = bytearray()
        if self.header is None:
            if len(self.buffer) < HEADER_SIZE:
                return b""
            magic = bytes(self.buffer[:len(MAGIC)])
            size = HEADER_SIZE
            if magic == MAGIC_CONTEXT:
                if len(self.buffer) < HEADER_SIZE + 2:
                    return b""
                size = HEADER_SIZE + 2 + struct.unpack_from(">H", self.buffer, HEADER_SIZE)[0]
                if len(self.buffer) < size:
                    return b""
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
            del self.buffer[:size]
        pos, end = 0, len(self.buffer)
        view = memoryview(self.buffer)
        try:
            while end - pos >= 4:
                size = struct.unpack_from(">I", self.buffer, pos)[0]
                if size < TAG or size > self.chunk_size + TAG:
                    raise StreamError(f"frame of {size} bytes cannot be a chunk of this stream")
                if end - pos < 4 + size:
                    break
                if self.ended:
                    raise StreamError("data after the final chunk")
                out += self._open(view[pos + 4:pos + 4 + size])
                pos += 4 + size
        finally:
            view.release()
        del self.buffer[:pos]  # one move per call
        return bytes(out)

    def _open(self, ciphertext: bytes | memoryview) -> bytes:
        for last in (False, True):
            try:
                plain = self.aead.decrypt(_nonce(self.prefix, self.counter, last), ciphertext, self.header)
            except InvalidTag:
                continue
            if not last and len(plain) != self.chunk_size:
                raise StreamError("a non-final chunk of the wrong size")
            self.counter += 1
            self.ended = last
            return plain
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
    return out


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
            yield plain
    dec.finish()
