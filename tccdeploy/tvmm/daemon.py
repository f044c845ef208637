"""`tccdeploy-tvmm daemon`: the service started once at boot, one forked process per engine session.

Why: a node that starts Python and imports the service (cryptography, tpm2-pytss) for every SSH
session pays that at every attestation; under TCG (the lab's real-boot nodes) it is seconds a
session. The daemon pays it once, listens on a Unix socket in a folder only the TVMM user can
enter, and forks a child per connection that runs exactly what `serve` runs, with the connection
as its stdin and stdout. Each session is still its own process, forked from a parent that never
opened the TPM or served a request, so nothing one session does is in the next one's memory.

The TVMM user's forced command (`CONNECT_SCRIPT`, in the measured build) joins the engine's SSH
channel to the socket with socat, and runs `serve` itself when no daemon listens (still booting,
or stopped): slower, never different. The daemon answers only its own user (SO_PEERCRED); the
folder's mode already keeps the node's admin login out, the check keeps it out if that is wrong.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import stat
import struct
import sys
import traceback
from typing import Any

from ..crypto.files import atomic_write
from ..node.protocol import Handler, failure, serve

CONNECT_SCRIPT = """#!/bin/sh
# The TVMM user's forced command (tccdeploy-tvmm, in the measured build): join this SSH session to
# the service started at boot, or run the service for this session alone when it is not listening.
# (socat's blocks of 256 KiB, not its 8 KiB default: a disk upload went 142 -> 166 MiB/s.)
# A daemon killed without its SIGTERM (the OOM killer) leaves its socket and its pid file: its
# pid no longer alive, the session is served alone rather than refused by a socket nobody answers.
sock={socket}
if [ -S "$sock" ] && [ -x {socat} ]; then
  if ! read pid 2>/dev/null < "$sock.pid" || kill -0 "$pid" 2>/dev/null; then
    exec {socat} -b 262144 -t 900 STDIO "UNIX-CONNECT:$sock"
  fi
fi
exec {python} {service} serve --config {config}
"""

PID_SUFFIX = ".pid"  # beside the socket: the daemon's pid, for the forced command's check


def connect_script(socket_path: str, python: str, service: str, config: str, socat: str = "/usr/bin/socat") -> str:
    """The forced command's script, for a node's image (the paths are the build's, not the engine's)."""
    return CONNECT_SCRIPT.format(socket=socket_path, socat=socat, python=python, service=service, config=config)


def preload() -> None:
    """Import what the operations import on first use, so no session pays for it."""
    import hashlib  # noqa: F401

    import tpm2_pytss  # noqa: F401
    import tpm2_pytss.utils  # noqa: F401
    from cryptography import x509  # noqa: F401
    from cryptography.hazmat.primitives import serialization  # noqa: F401

    from ..crypto import stream  # noqa: F401


def peer_uid(conn: socket.socket) -> int:
    """The uid of the process at the other end of a Unix socket, as the kernel recorded it at connect."""
    _pid, uid, _gid = struct.unpack("3i", conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i")))
    return uid


class DaemonError(Exception):
    """The daemon cannot listen where it was told to (a folder others may enter, not a socket path)."""


def listen(path: str) -> socket.socket:
    """A socket at path, in a folder that must be this user's and closed to everyone else."""
    folder = os.path.dirname(os.path.abspath(path))
    try:
        info = os.stat(folder)
    except OSError as exc:
        raise DaemonError(f"the socket's folder {folder} is not there: {exc.strerror}") from None
    if not stat.S_ISDIR(info.st_mode) or info.st_uid != os.getuid() or info.st_mode & 0o077:
        raise DaemonError(f"the socket's folder {folder} must be a directory of uid {os.getuid()} with mode 0700 "
                          f"(it is uid {info.st_uid}, mode {stat.S_IMODE(info.st_mode):04o})")
    try:
        if stat.S_ISSOCK(os.lstat(path).st_mode):
            os.unlink(path)  # an earlier daemon's, left by a crash
    except FileNotFoundError:
        pass
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    old = os.umask(0o177)
    try:
        listener.bind(path)
    except OSError as exc:
        listener.close()
        raise DaemonError(f"cannot listen on {path}: {exc.strerror}") from None
    finally:
        os.umask(old)
    listener.listen(128)
    return listener


def _session(conn: socket.socket, hello: dict[str, Any], handle: Handler) -> int:
    """One engine session in a forked child: the connection is its stdin and stdout."""
    if peer_uid(conn) != os.getuid():
        refusal = failure(None, "Refused", "only the TVMM user's sessions reach the service", reason="tvmm.peer")
        conn.sendall(json.dumps(refusal).encode() + b"\n")
        conn.shutdown(socket.SHUT_WR)
        conn.settimeout(2.0)
        try:  # what it sent stays unread: read it, so the refusal is not lost to a reset
            while conn.recv(65536):
                pass
        except OSError:
            pass
        return 1
    with conn.makefile("rb") as stdin, conn.makefile("wb") as stdout:
        return serve(hello, handle, stdin, stdout)


def _reap() -> None:
    while True:
        try:
            pid, _ = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return


def _stop(_signum: int, _frame: Any) -> None:
    raise SystemExit(0)


def run(path: str, hello: dict[str, Any], handle: Handler, ready: Any = None, tick: float = 5.0) -> int:
    """Accept sessions until killed. ready, if given, is called once the socket listens; every tick
    seconds without a new session, the sessions that ended are reaped."""
    preload()
    listener = listen(path)
    atomic_write(path + PID_SUFFIX, f"{os.getpid()}\n".encode(), 0o600)
    signal.signal(signal.SIGTERM, _stop)  # stopped at shutdown: the socket goes with it
    if ready is not None:
        ready()
    print(f"tccdeploy-tvmm: serving sessions on {path} (pid {os.getpid()})", file=sys.stderr, flush=True)
    listener.settimeout(tick)
    try:
        while True:
            _reap()
            try:
                conn, _ = listener.accept()
            except TimeoutError:
                continue
            conn.settimeout(None)
            pid = os.fork()
            if pid == 0:
                code = 1
                try:
                    signal.signal(signal.SIGTERM, signal.SIG_DFL)
                    listener.close()
                    code = _session(conn, hello, handle)
                except BaseException:  # noqa: BLE001 - a child never returns into the accept loop
                    traceback.print_exc(limit=-3)
                finally:
                    os._exit(code)
            conn.close()
    finally:
        listener.close()
        for name in (path, path + PID_SUFFIX):
            try:
                os.unlink(name)
            except OSError:
                pass
