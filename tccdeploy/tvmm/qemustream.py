"""The plumbing between QEMU's migration stream and the service, shared by migration and
suspension: a private socket QEMU migrates into, a connection to QEMU's incoming socket, the
wait until QEMU has loaded what it was fed. The stream itself is encrypted and authenticated by
the callers (STREAM under the TC's key); here only bytes move, on sockets no one else reaches."""

from __future__ import annotations

import os
import socket
import time
from typing import Any

from .interface import ServiceError
from .qmp import QMP


def stream_module() -> Any:
    """crypto.stream, imported when a migration or suspension needs it (most sessions only attest)."""
    from ..crypto import stream

    return stream


def private_listener(path: str) -> socket.socket:
    """A Unix socket only this user may connect to (QEMU migrates into it)."""
    if os.path.exists(path):
        os.unlink(path)
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    old = os.umask(0o077)
    try:
        listener.bind(path)
    finally:
        os.umask(old)
    listener.listen(1)
    listener.settimeout(30)
    return listener


def migrate_into(qmp: QMP, path: str) -> None:
    """Pause the VM and have QEMU migrate its state into the service's socket at path."""
    qmp.execute("stop")
    qmp.execute("migrate", uri=f"unix:{path}")


def accept_stream(listener: socket.socket, timeout: float) -> socket.socket:
    """QEMU's connection to the service's socket (the listener is closed: one stream only)."""
    connection, _ = listener.accept()
    listener.close()
    connection.settimeout(timeout)
    return connection


def connect_incoming(path: str, timeout: float) -> socket.socket:
    """A connection to QEMU's incoming socket, once QEMU has opened it (within about 4 s)."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(timeout)
    for _ in range(200):
        try:
            sock.connect(path)
            return sock
        except OSError:
            time.sleep(0.02)
    sock.close()
    raise ServiceError("tvmm.qemu", "QEMU did not open its incoming socket")


def wait_loaded(qmp: QMP, seconds: float, what: str) -> str:
    """QEMU's run state once it has left `inmigrate` (it took the whole stream)."""
    deadline = time.monotonic() + seconds
    while True:
        status = str(qmp.execute("query-status")["status"])
        if status != "inmigrate":
            return status
        if time.monotonic() > deadline:
            raise ServiceError("tvmm.qemu", f"QEMU did not finish loading {what}")
        time.sleep(0.02)
