"""The engine's side of the two programs it talks to on a node, over one line-JSON protocol:

- the admin helper, as the node's admin login: start-up is one SSH command that runs the helper
  if this version is already on the node, or says where to upload it; the engine then uploads it
  by SFTP (atomically, 0600, into the login's private 0700 directory) and starts it. The
  helper's first line names the digest of the file it runs from; a file that does not match is
  replaced. One helper process serves the whole run.
- the TVMM service, as the node's TVMM user: the engine cannot choose what runs (the user's
  authorized_keys forces the booted service), so it only opens the channel and reads the
  greeting. What the service is, the TC learns from the node's quote, never from this greeting.
"""

from __future__ import annotations

import io
import json
import shlex
import threading
import time
from collections.abc import Iterable, Iterator
from typing import Any

import paramiko

from ..bundles import helper_bundle
from ..node.protocol import BLOCK, MAX_BLOCK
from .connection import Connection, Unreachable

UPLOAD_MARK = "TCCDEPLOY-UPLOAD "
STREAMS = 2  # the TVMM service's protocol version from which answers may go on as byte streams
MAX_LINE = 64 * 1024 * 1024


class HelperError(Exception):
    """The helper could not be started or stopped answering."""


class RemoteError(Exception):
    """An operation failed on the node; reason is the service's code (tvmm.*) when it refused,
    traceback the helper's, for -vvv."""

    def __init__(self, kind: str, message: str, traceback: str = "", reason: str = ""):
        super().__init__(f"{reason}: {message}" if reason else message)
        self.kind = kind
        self.traceback = traceback
        self.reason = reason


def start_command(python: str, digest: str) -> str:
    return (
        'umask 077; D="${TCCDEPLOY_NODE_DIR:-$HOME/.cache/tccdeploy}"; mkdir -p "$D" || exit 97; '
        f'H="$D/helper-{digest}.pyz"; '
        # -S: no site import at start-up (20-30 ms a node); the helper imports site itself
        # before an operation that needs a third-party package (tpm2-pytss).
        f'if [ -f "$H" ]; then exec {shlex.quote(python)} -S "$H"; else echo "{UPLOAD_MARK}$D"; fi'
    )


class LineClient:
    """One program on a node spoken to over an SSH channel: a request line out, a response in."""

    def __init__(self, connection: Connection):
        self.connection = connection
        self.channel: paramiko.Channel | None = None
        self.info: dict[str, Any] = {}
        self._buffer = bytearray()
        self._next_id = 0
        self._lock = threading.Lock()

    def start(self) -> None:
        raise NotImplementedError

    def _readline(self, deadline: float, starting: bool = False) -> bytes:
        assert self.channel is not None
        while b"\n" not in self._buffer:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise HelperError(f"the helper on {self.connection.target.address} did not answer in time")
            self.channel.settimeout(min(remaining, 1.0))
            try:
                chunk = self.channel.recv(1 << 16)
            except TimeoutError:
                continue
            except (paramiko.SSHException, OSError, EOFError) as exc:
                raise Unreachable("ssh", f"connection to {self.connection.target.address} lost: {exc}") from None
            if not chunk:
                err = b""
                while self.channel.recv_stderr_ready():
                    err += self.channel.recv_stderr(65536)
                status = self.channel.recv_exit_status() if self.channel.exit_status_ready() else None
                what = "did not start" if starting else "exited"
                detail = err.decode(errors="replace").strip()[-500:] or f"exit status {status}"
                raise HelperError(f"the helper on {self.connection.target.address} {what}: {detail}")
            self._buffer += chunk
            if len(self._buffer) > MAX_LINE:
                raise HelperError("the helper sent an oversized message")
        line, _, rest = bytes(self._buffer).partition(b"\n")
        self._buffer = bytearray(rest)
        return line

    def call(self, op: str, args: dict[str, Any] | None = None, timeout: float | None = None) -> dict[str, Any]:
        """Run one operation on the node; RemoteError if it failed there."""
        with self._lock:
            return self._request(op, args, timeout)

    def _request(self, op: str, args: dict[str, Any] | None, timeout: float | None) -> dict[str, Any]:
        """Send one request and read its answer's line (the lock held by the caller)."""
        if self.channel is None:
            self.start()
        assert self.channel is not None
        self._next_id += 1
        rid = self._next_id
        try:
            self.channel.sendall(json.dumps({"id": rid, "op": op, "args": args or {}}).encode() + b"\n")
        except (paramiko.SSHException, OSError, EOFError) as exc:
            raise Unreachable("ssh", f"connection to {self.connection.target.address} lost: {exc}") from None
        return self._response(rid, self._deadline(timeout))

    def _deadline(self, timeout: float | None) -> float:
        return time.monotonic() + (timeout if timeout is not None else self.connection.target.timeout + 60)

    def _response(self, rid: int, deadline: float) -> dict[str, Any]:
        line = self._readline(deadline)
        try:
            response = json.loads(line)
        except ValueError:
            raise HelperError(f"malformed answer from the helper: {line[:200]!r}") from None
        if response.get("id") != rid:
            raise HelperError("the helper answered another request")
        if not response.get("ok"):
            error = response.get("error") or {}
            raise RemoteError(str(error.get("type", "Error")), str(error.get("message", "failed")),
                              str(error.get("traceback", "")), str(error.get("reason", "")))
        return response.get("result") or {}

    def _read_exactly(self, size: int, deadline: float) -> bytes:
        """size bytes of the stream: what the last line's read took past it first, then the
        channel, asked for no more than is missing (so nothing is read past the block)."""
        assert self.channel is not None
        parts: list[bytes] = []
        have = min(size, len(self._buffer))
        if have:
            parts.append(bytes(self._buffer[:have]))
            del self._buffer[:have]
        while have < size:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise HelperError(f"the stream from {self.connection.target.address} stalled")
            self.channel.settimeout(min(remaining, 1.0))
            try:
                chunk = self.channel.recv(size - have)
            except TimeoutError:
                continue
            except (paramiko.SSHException, OSError, EOFError) as exc:
                raise Unreachable("ssh", f"connection to {self.connection.target.address} lost: {exc}") from None
            if not chunk:
                raise HelperError(f"the stream from {self.connection.target.address} was cut before its end")
            parts.append(chunk)
            have += len(chunk)
        return b"".join(parts)

    def _streams(self) -> None:
        """Refuse, by name, to stream with a service too old for it (its greeting says)."""
        with self._lock:
            if self.channel is None:
                self.start()
        version = self.info.get("protocol", STREAMS) if isinstance(self, Service) else STREAMS
        if not isinstance(version, int) or version < STREAMS:
            raise HelperError(f"the TVMM service on {self.connection.target.address} speaks protocol {version}, without "
                              f"byte streams (migration, disk copies): deploy a TVMM build made by this tccdeploy")

    def stream_from(self, op: str, args: dict[str, Any] | None = None, timeout: float | None = None) -> StreamFrom:
        """An operation whose answer goes on as a byte stream (node.protocol's Outgoing): the
        blocks, each waited for at most timeout; the outcome once they ended."""
        self._streams()
        return StreamFrom(self, op, args, timeout)

    def stream_to(self, op: str, blocks: Iterable[bytes], args: dict[str, Any] | None = None,
                  timeout: float | None = None) -> dict[str, Any]:
        """An operation that takes a byte stream after its answer (node.protocol's Incoming): send
        the blocks, stop early if the node already answered (it refused a chunk), return the
        outcome. Whatever goes wrong on the way, the channel is closed rather than left out of step."""
        self._streams()
        with self._lock:
            self._request(op, args, timeout)
            assert self.channel is not None
            try:
                for piece in blocks:
                    if self.channel.recv_ready():  # an answer before the end: a refusal
                        break
                    self.channel.sendall(BLOCK.pack(len(piece)))
                    self.channel.sendall(piece)
                self.channel.sendall(BLOCK.pack(0))
            except BaseException:
                self._stop_channel()  # mid-stream (the blocks' source failed, or the channel): out of step
                raise
            return self._response(self._next_id, self._deadline(timeout))

    def _stop_channel(self) -> None:
        if self.channel is not None:
            try:
                self.channel.shutdown_write()
                self.channel.close()
            except Exception:  # noqa: BLE001 - closing is best effort
                pass
        self.channel = None
        self._buffer = bytearray()

    def close(self) -> None:
        self._stop_channel()


class StreamFrom:
    """The blocks of an Outgoing answer, read off the channel as they are iterated; `outcome` once
    they ended. Left before the end (the destination refused), the channel is closed: the rest of
    the stream is not read, so the session cannot go on in step."""

    def __init__(self, client: LineClient, op: str, args: dict[str, Any] | None, timeout: float | None):
        self.client, self.op, self.args, self.timeout = client, op, args, timeout
        self.outcome: dict[str, Any] | None = None
        self.bytes = 0

    def __iter__(self) -> Iterator[bytes]:
        client = self.client
        with client._lock:
            client._request(self.op, self.args, self.timeout)
            done = False
            try:
                while True:
                    size = BLOCK.unpack(client._read_exactly(BLOCK.size, client._deadline(self.timeout)))[0]
                    if size == 0:
                        break
                    if size > MAX_BLOCK:
                        raise HelperError(f"the node sent a block of {size} bytes (at most {MAX_BLOCK})")
                    data = client._read_exactly(size, client._deadline(self.timeout))
                    self.bytes += size
                    yield data
                done = True
                self.outcome = client._response(client._next_id, client._deadline(self.timeout))
            except RemoteError:
                if not done:
                    client._stop_channel()
                raise
            except BaseException:
                client._stop_channel()
                raise


class Helper(LineClient):
    """The admin helper on one node, uploaded by the engine when missing."""

    def __init__(self, connection: Connection, python: str):
        super().__init__(connection)
        self.python = python
        self.bundle, self.digest = helper_bundle()
        self.uploaded = False

    def start(self) -> None:
        for attempt in range(3):
            channel = self.connection.open_process(start_command(self.python, self.digest))
            self.channel = channel
            first = self._readline(time.monotonic() + self.connection.target.timeout + 5, starting=True)
            text = first.decode(errors="replace").strip()
            if text.startswith(UPLOAD_MARK):
                channel.close()
                self._upload(text[len(UPLOAD_MARK):])
                continue
            try:
                hello = json.loads(text)
            except ValueError:
                raise HelperError(f"the helper did not start on {self.connection.target.address}: {text[:300]!r}") from None
            if hello.get("hello") != "tccdeploy-node":
                raise HelperError(f"unexpected greeting from {self.connection.target.address}: {text[:300]!r}")
            if hello.get("digest") != self.digest and attempt < 2:
                # The file on the node is not the one we shipped (edited, corrupted): replace it.
                self._stop_channel()
                directory = self._helper_dir()
                self._upload(directory)
                continue
            self.info = hello
            return
        raise HelperError(f"could not start the helper on {self.connection.target.address}")

    def _helper_dir(self) -> str:
        status, out, _ = self.connection.exec('echo "${TCCDEPLOY_NODE_DIR:-$HOME/.cache/tccdeploy}"')
        return out.decode().strip()

    def _upload(self, directory: str) -> None:
        sftp = self.connection.sftp()
        final = f"{directory}/helper-{self.digest}.pyz"
        temporary = f"{final}.{int(time.time() * 1e6)}.tmp"
        try:
            sftp.putfo(io.BytesIO(self.bundle), temporary, file_size=len(self.bundle), confirm=True)
            sftp.chmod(temporary, 0o600)
            sftp.posix_rename(temporary, final)
        except (OSError, paramiko.SSHException) as exc:
            try:
                sftp.remove(temporary)
            except (OSError, paramiko.SSHException):
                pass
            raise HelperError(f"cannot upload the helper to {self.connection.target.address}:{directory}: {exc}") from None
        self.uploaded = True


SERVICE_COMMAND = "tccdeploy-tvmm serve"  # what a node without a forced command would run


class Service(LineClient):
    """The node's TVMM service, reached as the TVMM user (its forced command runs, whatever we ask)."""

    def start(self) -> None:
        self.channel = self._open()
        first = self._readline(time.monotonic() + self.connection.target.timeout + 10, starting=True)
        try:
            hello = json.loads(first)
        except ValueError:
            hello = None
        if not isinstance(hello, dict) or hello.get("hello") != "tccdeploy-tvmm":
            text = first.decode(errors="replace")[:300]
            self._stop_channel()
            raise HelperError(f"no TVMM service answered as {self.connection.target.user} on "
                              f"{self.connection.target.address}: {text!r}")
        self.info = hello

    def _open(self) -> Any:
        """The channel the session runs on (bulk.BulkService: an OpenSSH client's)."""
        return self.connection.open_process(SERVICE_COMMAND)
