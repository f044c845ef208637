"""Bulk byte streams to a node's TVMM service through OpenSSH's client.

paramiko moves every 32 KiB SSH packet through Python: a GiB costs the engine 3.4 s of CPU, and
once the node received at full speed (vm.write_behind) an upload ran at paramiko's own ceiling,
0.55x of `ssh cat` (bench/launch.py). For the streams that carry gigabytes, the engine runs `ssh`
itself and speaks the same node protocol to the same service over a socket pair, so the session
code (helper.LineClient) is unchanged.

The OpenSSH client is pinned to the one host key the engine's own connection verified (a
known_hosts holding that key alone, strict checking, no other file, no user configuration), so
the stream goes to the node the engine checked or nowhere. Nothing secret is on its command line
(the key file's path, not the key). Without an `ssh` on PATH, or with TCCDEPLOY_BULK_SSH=0, the
streams stay on paramiko.
"""

from __future__ import annotations

import os
import select
import shutil
import socket
import subprocess
import tempfile
from typing import Any

from .. import procs
from .connection import Connection
from .helper import SERVICE_COMMAND, Service

# AES-GCM first, as the engine's own connections prefer (connection.PREFERRED_CIPHERS): with
# AES-NI on both ends it costs a fraction of chacha20-poly1305, OpenSSH's own first choice.
CIPHERS = "aes128-gcm@openssh.com,aes256-gcm@openssh.com,chacha20-poly1305@openssh.com"


class ProcessChannel:
    """The part of paramiko's Channel that helper.LineClient uses, over an `ssh` process whose
    standard input and output are one end of a socket pair (so timeouts work as on a channel)."""

    def __init__(self, argv: list[str]):
        mine, theirs = socket.socketpair()
        self._stderr = tempfile.TemporaryFile()  # noqa: SIM115 - closed in close()
        try:
            self.proc = subprocess.Popen(argv, stdin=theirs.fileno(), stdout=theirs.fileno(), stderr=self._stderr,
                                         close_fds=True)
        except OSError:
            mine.close()
            self._stderr.close()
            raise
        finally:
            theirs.close()
        self.sock = mine
        self._stderr_read = False

    def settimeout(self, seconds: float | None) -> None:
        self.sock.settimeout(seconds)

    def recv(self, size: int) -> bytes:
        data = self.sock.recv(size)
        if not data:  # the client closed its output: let it exit, so its status and reason are there
            try:
                self.proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                pass
        return data

    def sendall(self, data: bytes | bytearray | memoryview) -> None:
        self.sock.sendall(data)

    def recv_ready(self) -> bool:
        return bool(select.select([self.sock], [], [], 0)[0])

    def exit_status_ready(self) -> bool:
        return self.proc.poll() is not None

    def recv_exit_status(self) -> int:
        return self.proc.wait()

    def recv_stderr_ready(self) -> bool:
        """True once, after the client exited, when it wrote anything on stderr (its reason)."""
        if self._stderr_read or self.proc.poll() is None:
            return False
        self._stderr_read = True
        return os.fstat(self._stderr.fileno()).st_size > 0

    def recv_stderr(self, size: int) -> bytes:
        self._stderr.seek(0)
        return self._stderr.read(size)

    def shutdown_write(self) -> None:
        try:
            self.sock.shutdown(socket.SHUT_WR)
        except OSError:
            pass

    def close(self) -> None:
        """Closing our end ends the client's input; it is waited for, then killed (by its PID)."""
        self.sock.close()
        procs.stop(self.proc, 5)
        self._stderr.close()


def ssh_binary() -> str | None:
    """The OpenSSH client to stream through, or None: paramiko then carries the stream."""
    if os.environ.get("TCCDEPLOY_BULK_SSH", "1") == "0":
        return None
    return shutil.which("ssh")


def pinned_known_hosts(connection: Connection, folder: str) -> str:
    """A known_hosts file (in folder) holding only the host key connection verified."""
    key = connection.host_key
    if key is None:
        raise ValueError("the connection has not verified a host key yet")
    path = os.path.join(folder, "known_hosts")
    with open(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600), "w") as fh:
        fh.write(f"{connection.target.known_hosts_name} {key.get_name()} {key.get_base64()}\n")
    return path


def ssh_command(ssh: str, connection: Connection, known_hosts: str) -> list[str]:
    """The client's argv: the target's user, port and key file; strict checking against the
    pinned file only; no configuration file, no prompts, keep-alives as the engine's own."""
    t = connection.target
    argv = [ssh, "-F", "/dev/null", "-T", "-p", str(t.port), "-o", "BatchMode=yes", "-o", "StrictHostKeyChecking=yes",
            "-o", f"UserKnownHostsFile={known_hosts}", "-o", "GlobalKnownHostsFile=/dev/null",
            "-o", "UpdateHostKeys=no", "-o", f"ConnectTimeout={max(1, int(t.timeout))}",
            "-o", "ServerAliveInterval=15", "-o", "ServerAliveCountMax=4", "-o", "LogLevel=ERROR",
            "-o", f"Ciphers={CIPHERS}"]
    if t.key_file:
        argv += ["-i", t.key_file]
    if t.user:
        argv += ["-l", t.user]
    return [*argv, "--", t.address, SERVICE_COMMAND]


class BulkService(Service):
    """A session with the node's TVMM service on its own OpenSSH client, for one bulk stream."""

    def __init__(self, connection: Connection, ssh: str):
        super().__init__(connection)
        self.ssh = ssh
        self._folder = tempfile.mkdtemp(prefix="tccdeploy-bulk-")

    def _open(self) -> Any:
        return ProcessChannel(ssh_command(self.ssh, self.connection, pinned_known_hosts(self.connection, self._folder)))

    def close(self) -> None:
        super().close()
        shutil.rmtree(self._folder, ignore_errors=True)


def service(connection: Connection) -> BulkService | None:
    """A bulk session to connection's host (connected and verified already), or None without ssh."""
    ssh = ssh_binary()
    if ssh is None or connection.host_key is None:
        return None
    return BulkService(connection, ssh)
