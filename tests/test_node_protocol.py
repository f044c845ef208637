"""The node protocol (node/protocol.py), the wire of the admin helper and of the TVMM service:
request lines (oversized, malformed, blank) and byte streams after an answer's line (a
migration's ciphertext, a disk), framed in blocks, ended by a zero length, and kept in step with
the request lines whatever the engine sends: a refusal is answered at once, trailing bytes and
broken framing are named."""

from __future__ import annotations

import io
import json
import struct
from collections.abc import Iterator
from typing import Any

import pytest

from tccdeploy.node.protocol import (
    MAX_BLOCK,
    MAX_REQUEST,
    Incoming,
    Outgoing,
    ProtocolError,
    failure,
    own_digest,
    read_blocks,
    serve,
)


def block(data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + data


END = struct.pack(">I", 0)


def run(stdin: bytes, handle: Any) -> tuple[int, bytes, None]:
    """serve() over in-memory pipes: its exit code and its raw output."""
    import sys

    out, stdout = io.BytesIO(), sys.stdout
    try:
        code = serve({"hello": "test"}, handle, io.BufferedReader(io.BytesIO(stdin)), out)  # type: ignore[arg-type]
    finally:
        sys.stdout = stdout  # serve points it at stderr, for the process it runs in
    return code, out.getvalue(), None


def lines(raw: bytes) -> list[dict[str, Any]]:
    return [json.loads(line) for line in raw.splitlines() if line.startswith(b"{")]


def request(op: str, rid: int = 1) -> bytes:
    return json.dumps({"id": rid, "op": op}).encode() + b"\n"


class Receiver:
    """A service whose `take` operation consumes a stream (refusing at a marker) and `ping` answers."""

    def __init__(self, refuse_at: bytes | None = None, stop_early: bool = False):
        self.got = bytearray()
        self.refuse_at, self.stop_early = refuse_at, stop_early

    def __call__(self, req: dict[str, Any]) -> Any:
        if req["op"] == "ping":
            return {"id": req["id"], "ok": True, "result": "pong"}

        def consume(blocks: Iterator[memoryview]) -> dict[str, Any]:
            for piece in blocks:
                if self.refuse_at is not None and self.refuse_at in bytes(piece):
                    return {"id": req["id"], "ok": False, "error": {"type": "Refused", "message": "bad chunk"}}
                self.got += piece
                if self.stop_early:
                    break
            return {"id": req["id"], "ok": True, "result": {"bytes": len(self.got)}}

        return Incoming({"id": req["id"], "ok": True, "result": "ready"}, consume)


def test_an_incoming_stream_is_taken_whole_and_the_session_goes_on():
    service = Receiver()
    code, raw, _ = run(request("take") + block(b"abc") + block(b"defg") + END + request("ping", 2), service)
    assert code == 0 and bytes(service.got) == b"abcdefg"
    assert [entry.get("result") for entry in lines(raw)[1:]] == ["ready", {"bytes": 7}, "pong"]


def test_a_refusal_is_answered_before_the_rest_is_read_and_the_rest_is_dropped_in_step():
    service = Receiver(refuse_at=b"BAD")
    stdin = request("take") + block(b"ok") + block(b"BAD") + block(b"never") + END + request("ping", 2)
    code, raw, _ = run(stdin, service)
    answers = lines(raw)[1:]
    assert code == 0 and bytes(service.got) == b"ok"
    assert answers[1]["ok"] is False and answers[1]["error"]["message"] == "bad chunk"
    assert answers[2]["result"] == "pong"  # the next request line is read as one, not as stream bytes


def test_bytes_after_a_streams_end_are_named_not_dropped_silently():
    code, raw, _ = run(request("take") + block(b"a") + block(b"after") + END, Receiver(stop_early=True))
    answer = lines(raw)[2]
    assert answer["ok"] is False and answer["error"]["reason"] == "stream.trailing"
    assert answer["error"]["message"] == "5 bytes after the stream's end"


@pytest.mark.parametrize("stdin, says", [
    (struct.pack(">I", MAX_BLOCK + 1) + b"x", f"a block of {MAX_BLOCK + 1} bytes (at most {MAX_BLOCK})"),
    (block(b"abc")[:-1], "the stream was cut before its end"),
    (b"\x00\x00", "the stream was cut before its end"),
])
def test_broken_framing_ends_the_session_with_its_reason(stdin: bytes, says: str):
    code, raw, _ = run(request("take") + stdin, Receiver())
    answers = lines(raw)[1:]
    assert code == 1  # out of step: nothing after it is read as a request
    assert answers[-1]["error"]["reason"] == "stream.framing" and answers[-1]["error"]["message"] == says
    assert len(answers) == 2


def test_nothing_after_broken_framing_is_read_as_a_request():
    code, raw, _ = run(request("take") + struct.pack(">I", MAX_BLOCK + 1) + request("ping", 2), Receiver())
    assert code == 1 and "pong" not in raw.decode(errors="replace")


def test_broken_framing_after_a_refusal_is_answered_once():
    stdin = request("take") + block(b"BAD") + struct.pack(">I", MAX_BLOCK + 1)
    code, raw, _ = run(stdin, Receiver(refuse_at=b"BAD"))
    answers = lines(raw)[1:]
    assert code == 1 and len(answers) == 2 and answers[1]["error"]["message"] == "bad chunk"


def test_a_block_may_be_as_large_as_max_block():
    payload = bytes(MAX_BLOCK)
    service = Receiver()
    code, _, _ = run(request("take") + block(payload) + END, service)
    assert code == 0 and len(service.got) == MAX_BLOCK


def sender(pieces: list[bytes], fail: bool = False) -> Any:
    def handle(req: dict[str, Any]) -> Any:
        def produce(send: Any) -> dict[str, Any]:
            for piece in pieces:
                send(piece)
            if fail:
                return {"id": req["id"], "ok": False, "error": {"type": "Refused", "message": "QEMU went away"}}
            return {"id": req["id"], "ok": True, "result": {"eof": True}}

        return Outgoing({"id": req["id"], "ok": True, "result": "streaming"}, produce)

    return handle


def read_answer_stream(raw: bytes) -> tuple[dict[str, Any], list[bytes], dict[str, Any]]:
    reader = io.BufferedReader(io.BytesIO(raw))
    reader.readline()  # the greeting
    first = json.loads(reader.readline())
    got = [bytes(piece) for piece in read_blocks(reader)]
    return first, got, json.loads(reader.readline())


def test_an_outgoing_stream_is_blocks_then_its_end_then_the_outcome():
    code, raw, _ = run(request("give"), sender([b"one", b"", b"two" * 3]))
    first, got, outcome = read_answer_stream(raw)
    assert code == 0 and first["result"] == "streaming" and outcome["result"] == {"eof": True}
    assert got == [b"one", b"twotwotwo"]  # nothing sent for an empty piece: a zero length would end the stream


def test_an_outgoing_stream_larger_than_a_block_is_cut_into_blocks():
    _, raw, _ = run(request("give"), sender([b"x" * (MAX_BLOCK + 10)]))
    _, got, _ = read_answer_stream(raw)
    assert [len(piece) for piece in got] == [MAX_BLOCK, 10]


def test_a_failed_outgoing_stream_still_ends_so_the_engine_reads_the_failure():
    _, raw, _ = run(request("give"), sender([b"partial"], fail=True))
    _, got, outcome = read_answer_stream(raw)
    assert got == [b"partial"] and outcome["error"]["message"] == "QEMU went away"


def test_an_outgoing_stream_ends_even_when_produce_raises():
    def handle(req: dict[str, Any]) -> Any:
        def produce(send: Any) -> dict[str, Any]:
            send(b"half")
            raise OSError("the socket broke")

        return Outgoing({"id": 1, "ok": True, "result": "streaming"}, produce)

    out = io.BytesIO()
    with pytest.raises(OSError):
        serve({"hello": "test"}, handle, io.BufferedReader(io.BytesIO(request("give"))), out)  # type: ignore[arg-type]
    assert out.getvalue().endswith(block(b"half") + END)


def test_read_blocks_refuses_what_cannot_be_a_block():
    with pytest.raises(ProtocolError, match="a block of 4194305 bytes"):
        list(read_blocks(io.BufferedReader(io.BytesIO(struct.pack(">I", MAX_BLOCK + 1)))))
    with pytest.raises(ProtocolError, match="cut before its end"):
        list(read_blocks(io.BufferedReader(io.BytesIO(block(b"abc")))))  # no zero length



# -- request lines ------------------------------------------------------------------------------
def echo(req: dict[str, Any]) -> Any:
    return {"id": req.get("id"), "ok": True, "result": req.get("op")}


def test_the_greeting_comes_first_and_blank_lines_are_skipped():
    code, raw, _ = run(b"\n  \n" + request("one") + b"\n" + request("two", 2), echo)
    assert code == 0
    assert lines(raw) == [{"hello": "test"}, {"id": 1, "ok": True, "result": "one"}, {"id": 2, "ok": True, "result": "two"}]


@pytest.mark.parametrize("line, message", [
    (b"not json\n", "Expecting value: line 1 column 1 (char 0)"),
    (b"[1, 2]\n", "a request is a JSON object"),
])
def test_a_line_that_is_not_a_request_is_answered_and_the_session_goes_on(line: bytes, message: str):
    code, raw, _ = run(line + request("after", 2), echo)
    assert code == 0
    assert lines(raw)[1:] == [{"id": None, "ok": False, "error": {"type": "BadRequest", "message": message, "traceback": ""}},
                              {"id": 2, "ok": True, "result": "after"}]


def test_an_oversized_line_is_refused_whole_and_the_next_request_is_read():
    code, raw, _ = run(b"x" * (MAX_REQUEST + 5000) + b"\n" + request("after", 2), echo)
    assert code == 0
    assert lines(raw)[1:] == [
        {"id": None, "ok": False, "error": {"type": "BadRequest", "message": f"a request is at most {MAX_REQUEST} bytes",
                                            "traceback": ""}},
        {"id": 2, "ok": True, "result": "after"}]


def test_a_line_of_exactly_the_limit_is_a_request():
    head = b'{"id": 7, "op": "big", "pad": "'
    line = head + b"p" * (MAX_REQUEST - len(head) - 2) + b'"}'
    assert len(line) == MAX_REQUEST
    code, raw, _ = run(line + b"\n" + request("after", 8), echo)
    assert [entry.get("result") for entry in lines(raw)[1:]] == ["big", "after"]


def test_what_a_handler_prints_never_reaches_the_protocol(capsys):
    def noisy(req: dict[str, Any]) -> Any:
        print("a stray line")
        return echo(req)

    _, raw, _ = run(request("one"), noisy)
    assert b"stray" not in raw and "a stray line" in capsys.readouterr().err


def test_values_json_cannot_hold_are_answered_as_text():
    import datetime

    when = datetime.datetime(2026, 12, 3, 18, 0)
    _, raw, _ = run(request("one"), lambda req: {"id": 1, "ok": True, "result": {"at": when}})
    assert lines(raw)[1]["result"] == {"at": "2026-12-03 18:00:00"}


def test_a_failure_has_its_shape():
    assert failure(3, "Refused", "no", "tb", reason="x.y") == {
        "id": 3, "ok": False, "error": {"type": "Refused", "message": "no", "traceback": "tb", "reason": "x.y"}}
    assert failure(None, "BadRequest", "bad") == {
        "id": None, "ok": False, "error": {"type": "BadRequest", "message": "bad", "traceback": ""}}


def test_the_greeting_names_the_digest_of_the_program_that_runs(tmp_path, monkeypatch):
    import hashlib
    import sys

    program = tmp_path / "service.pyz"
    program.write_bytes(b"the measured service")
    monkeypatch.setattr(sys, "argv", [str(program)])
    assert own_digest() == hashlib.sha256(b"the measured service").hexdigest()
    monkeypatch.setattr(sys, "argv", [str(tmp_path / "absent")])
    assert own_digest() == ""


def test_refusals_after_a_streaming_answer_carry_its_request_id():
    stdin = request("take", 41) + block(b"a") + block(b"after") + END
    answer = lines(run(stdin, Receiver(stop_early=True))[1])[2]
    assert answer["id"] == 41 and answer["error"]["type"] == "Refused"
    stdin = request("take", 42) + struct.pack(">I", MAX_BLOCK + 1)
    answer = lines(run(stdin, Receiver())[1])[2]
    assert answer["id"] == 42 and answer["error"]["type"] == "BadRequest"

    def raising(req: dict[str, Any]) -> Any:
        def consume(blocks: Iterator[memoryview]) -> dict[str, Any]:
            for _ in blocks:
                pass
            return {"id": req["id"], "ok": True, "result": {}}

        return Incoming({"id": req["id"], "ok": True, "result": "ready"}, consume)

    answer = lines(run(request("take", 43) + block(b"abc")[:-1], raising)[1])[2]
    assert answer == {"id": 43, "ok": False, "error": {"type": "BadRequest", "message": "the stream was cut before its end",
                                                       "traceback": "", "reason": "stream.framing"}}


class Trickle(io.RawIOBase):
    """A pipe that gives at most 3 bytes per read, as a socket may."""

    def __init__(self, data: bytes):
        self.data = memoryview(data)

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        count = min(3, len(buffer), len(self.data))
        buffer[:count] = self.data[:count]
        self.data = self.data[count:]
        return count


def test_blocks_arriving_a_few_bytes_at_a_time_are_read_whole():
    got = [bytes(piece) for piece in read_blocks(Trickle(block(b"0123456789") + block(b"x") + END))]  # type: ignore[arg-type]
    assert got == [b"0123456789", b"x"]


def test_the_engine_refuses_by_name_to_stream_with_a_service_of_an_older_build():
    """A node still on a build whose service has no streams: a named error, not a broken session."""
    from types import SimpleNamespace

    from tccdeploy.engine.helper import HelperError, Service

    service = Service.__new__(Service)
    service.__dict__.update(channel=object(), info={"hello": "tccdeploy-tvmm", "protocol": 1},
                            connection=SimpleNamespace(target=SimpleNamespace(address="127.0.1.9")))
    import threading

    service._lock = threading.Lock()
    with pytest.raises(HelperError, match="^the TVMM service on 127.0.1.9 speaks protocol 1, without byte streams"):
        service.stream_from("migrate_out_stream", {"vm_id": "0" * 32})
    with pytest.raises(HelperError, match="speaks protocol 1"):
        service.stream_to("migrate_in_stream", [b"x"], {"vm_id": "0" * 32})
    service.info["protocol"] = 2
    assert service.stream_from("migrate_out_stream", {"vm_id": "0" * 32}).op == "migrate_out_stream"
