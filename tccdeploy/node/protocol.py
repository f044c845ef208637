"""The wire the admin helper and the TVMM service share: one JSON request per line on stdin,
one JSON response per line on stdout, a greeting line first.

A bulk stream (a migration's ciphertext) does not ride in JSON: an operation answers with an
`Outgoing` or `Incoming`, whose first line is followed by the stream itself in blocks (a u32
length, big endian, then that many bytes; a zero length ends it), then one more line with the
outcome. No base64, no round trip per piece: the stream flows at the pace of the SSH channel.
The blocks only frame; what they carry authenticates itself (STREAM), so a block the engine
splits, merges or forges is caught by the cipher, not trusted from the framing.

Kept in one place so both ends frame, answer and fail the same way; what each side accepts is
its own business (the admin helper is the provider's tool; the service checks every argument).
"""

from __future__ import annotations

import json
import struct
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, BinaryIO

MAX_REQUEST = 8 * 1024 * 1024  # one line
MAX_BLOCK = 4 * 1024 * 1024  # one block of a stream; the reader's buffer is this big
BLOCK = struct.Struct(">I")


class ProtocolError(ValueError):
    """The bytes after a streaming answer's line are not blocks (a length over MAX_BLOCK, a cut)."""


@dataclass(frozen=True)
class Outgoing:
    """An answer whose line is followed by blocks the service writes: produce(send) sends them and
    returns the outcome's line. The blocks end (a zero length) whatever produce did."""

    line: dict[str, Any]
    produce: Callable[[Callable[[bytes | bytearray | memoryview], None]], dict[str, Any]]


@dataclass(frozen=True)
class Incoming:
    """An answer whose line is followed by blocks the engine writes: consume(blocks) reads them and
    returns the outcome's line. A failed outcome is answered at once (the engine stops sending),
    then the rest of the blocks is read and dropped, so the session goes on in step."""

    line: dict[str, Any]
    consume: Callable[[Iterator[memoryview]], dict[str, Any]]


Answer = dict[str, Any] | Outgoing | Incoming
Handler = Callable[[dict[str, Any]], Answer]


def read_blocks(source: BinaryIO) -> Iterator[memoryview]:
    """The blocks of one stream, up to its zero length. Each view is valid until the next is asked
    for (one buffer, reused)."""
    buffer = bytearray(MAX_BLOCK)
    view = memoryview(buffer)
    while True:
        size = BLOCK.unpack(_read_exactly(source, view[:BLOCK.size]))[0]
        if size == 0:
            return
        if size > MAX_BLOCK:
            raise ProtocolError(f"a block of {size} bytes (at most {MAX_BLOCK})")
        yield _read_exactly(source, view[:size])


def _read_exactly(source: BinaryIO, into: memoryview) -> memoryview:
    got = 0
    while got < len(into):
        count = source.readinto(into[got:])  # type: ignore[attr-defined]
        if not count:
            raise ProtocolError("the stream was cut before its end")
        got += count
    return into


def block(data: bytes | bytearray | memoryview) -> bytes:
    """A block's length prefix (the data follows it as it is)."""
    return BLOCK.pack(len(data))


def _stream_out(answer: Outgoing, out: BinaryIO) -> dict[str, Any]:
    def send(data: bytes | bytearray | memoryview) -> None:
        for at in range(0, len(data), MAX_BLOCK):
            piece = memoryview(data)[at:at + MAX_BLOCK]
            out.write(block(piece))
            out.write(piece)
        out.flush()

    try:
        return answer.produce(send)
    finally:
        out.write(BLOCK.pack(0))


class _Blocks:
    """read_blocks, remembering whether the framing broke (consume may catch what it raised)."""

    def __init__(self, source: BinaryIO):
        self._blocks = read_blocks(source)
        self.broken: ProtocolError | None = None

    def __iter__(self) -> _Blocks:
        return self

    def __next__(self) -> memoryview:
        try:
            return next(self._blocks)
        except ProtocolError as exc:
            self.broken = exc
            raise


def _stream_in(answer: Incoming, source: BinaryIO, out: BinaryIO) -> bool:
    """Run consume, answer its outcome, keep the session in step; False when it cannot be."""
    blocks = _Blocks(source)
    try:
        outcome = answer.consume(blocks)
    except ProtocolError:  # raised by the blocks, which recorded it: answered below with the framing's reason
        outcome = {"id": answer.line.get("id"), "ok": False}
    answered = False
    try:
        if blocks.broken is None and outcome.get("ok"):
            left = sum(len(piece) for piece in blocks)
            if left:
                outcome = failure(outcome.get("id"), "Refused", f"{left} bytes after the stream's end",
                                  reason="stream.trailing")
            _answer(out, outcome)
            answered = True
        elif blocks.broken is None:
            _answer(out, outcome)  # at once: the engine stops sending
            answered = True
            for _ in blocks:
                pass
    except ProtocolError:
        pass
    if blocks.broken is not None:
        if not answered:
            _answer(out, failure(outcome.get("id"), "BadRequest", str(blocks.broken), reason="stream.framing"))
        return False
    return True


def _answer(out: BinaryIO, response: dict[str, Any]) -> None:
    out.write(json.dumps(response, default=str).encode() + b"\n")
    out.flush()


def own_digest() -> str:
    """The sha256 of the file this program runs from (the helper's upload; the service's measured
    artifact), for its greeting."""
    import hashlib

    try:
        with open(sys.argv[0], "rb") as fh:
            return hashlib.sha256(fh.read()).hexdigest()
    except OSError:
        return ""


def failure(rid: Any, kind: str, message: str, traceback: str = "", reason: str = "") -> dict[str, Any]:
    error = {"type": kind, "message": message, "traceback": traceback}
    if reason:
        error["reason"] = reason
    return {"id": rid, "ok": False, "error": error}


def serve(hello: dict[str, Any], handle: Handler, stdin: BinaryIO | None = None, stdout: BinaryIO | None = None) -> int:
    """Greet, then answer each request line until stdin closes. stdout carries nothing but the
    protocol: anything else the process prints goes to stderr."""
    out = stdout or sys.stdout.buffer
    source = stdin or sys.stdin.buffer
    sys.stdout = sys.stderr
    out.write(json.dumps(hello).encode() + b"\n")
    out.flush()
    while True:
        response: Answer
        line = source.readline(MAX_REQUEST + 1)
        if not line:
            return 0
        if len(line) > MAX_REQUEST and not line.endswith(b"\n"):
            while line and not line.endswith(b"\n"):  # skip the rest of the oversized line
                line = source.readline(MAX_REQUEST)
            response = failure(None, "BadRequest", f"a request is at most {MAX_REQUEST} bytes")
        elif not line.strip():
            continue
        else:
            try:
                request = json.loads(line)
                if not isinstance(request, dict):
                    raise ValueError("a request is a JSON object")
            except (ValueError, RecursionError) as exc:
                response = failure(None, "BadRequest", str(exc)[:200])
            else:
                response = handle(request)
        if isinstance(response, Outgoing):
            _answer(out, response.line)
            response = _stream_out(response, out)
        elif isinstance(response, Incoming):
            _answer(out, response.line)
            if not _stream_in(response, source, out):
                return 1  # the engine's bytes are out of step with the protocol: end the session
            continue
        _answer(out, response)
