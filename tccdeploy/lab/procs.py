"""Starting and stopping the lab's processes, always by PID, never by name.

`lab down` must stop exactly what the lab started, even after a crash left the state file
half-written, and never a process that merely reused a PID. So every PID is checked against
its command line (which names the lab directory) before it is signalled.
"""

from __future__ import annotations

import errno
import os
import signal
import socket
import subprocess
import time
from collections.abc import Iterable


def spawn(argv: list[str], log_path: str, env: dict[str, str] | None = None) -> subprocess.Popen:
    """Start a daemon-like child in its own session, output to log_path."""
    log = open(log_path, "ab")
    try:
        return subprocess.Popen(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            close_fds=True,
            env=env,
        )
    finally:
        log.close()


def cmdline(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as fh:
            return fh.read().replace(b"\x00", b" ").decode(errors="replace").strip()
    except OSError:
        return ""


def alive(pid: int | None) -> bool:
    if not pid:
        return False
    try:
        with open(f"/proc/{pid}/stat", "rb") as fh:
            state = fh.read().rsplit(b")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state != b"Z"


def belongs(pid: int | None, marker: str) -> bool:
    """True when pid is alive and its command line names marker (the lab directory)."""
    return bool(pid) and alive(pid) and marker in cmdline(pid)  # type: ignore[arg-type]


def children(pid: int) -> list[int]:
    """Every descendant of pid (sshd's per-connection processes, a helper's QEMU)."""
    parents: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", "rb") as fh:
                ppid = int(fh.read().rsplit(b")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        parents.setdefault(ppid, []).append(int(entry))
    out: list[int] = []
    todo = [pid]
    while todo:
        for child in parents.get(todo.pop(), []):
            out.append(child)
            todo.append(child)
    return out


def processes_mentioning(marker: str) -> list[int]:
    """PIDs whose command line names marker: what a crashed `lab up` may have left behind."""
    me = os.getpid()
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit() and int(entry) != me and marker in cmdline(int(entry)):
            found.append(int(entry))
    return found


def signal_all(pids: Iterable[int], sig: int) -> None:
    for pid in pids:
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            pass


def stop(pids: Iterable[int], timeout: float = 3.0) -> list[int]:
    """SIGCONT (a frozen process cannot die of SIGTERM), SIGTERM, then SIGKILL what is left.

    Returns the PIDs that could not be stopped (should be none).
    """
    pids = [p for p in set(pids) if alive(p)]
    signal_all(pids, signal.SIGCONT)
    for sig, wait in ((signal.SIGTERM, timeout), (signal.SIGKILL, 2.0)):
        signal_all(pids, sig)
        pids = _wait_gone(pids, wait)
        if not pids:
            return []
    return pids


def _wait_gone(pids: list[int], seconds: float) -> list[int]:
    """The PIDs still alive after up to `seconds` (reaping our own children meanwhile)."""
    deadline = time.monotonic() + seconds
    while True:
        _reap(pids)
        pids = [p for p in pids if alive(p)]
        if not pids or time.monotonic() >= deadline:
            return pids
        time.sleep(0.02)


def _reap(pids: Iterable[int]) -> None:
    for pid in pids:
        try:
            os.waitpid(pid, os.WNOHANG)
        except ChildProcessError:
            pass


def port_free(address: str, port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((address, port))
        except OSError as exc:
            if exc.errno in (errno.EADDRINUSE, errno.EACCES):
                return False
            raise
    return True


def _wait_accepting(family: int, where: object, proc: subprocess.Popen, timeout: float) -> bool:
    """Wait until something accepts at where; False if proc died first or time ran out."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            return False
        with socket.socket(family, socket.SOCK_STREAM) as sock:
            sock.settimeout(0.5)
            try:
                sock.connect(where)
                return True
            except OSError:
                pass
        time.sleep(0.01)
    return False


def wait_listening(address: str, port: int, proc: subprocess.Popen, timeout: float = 10.0) -> bool:
    return _wait_accepting(socket.AF_INET, (address, port), proc, timeout)


def wait_socket(path: str, proc: subprocess.Popen, timeout: float = 10.0) -> bool:
    """Wait until something accepts on the unix socket path (a node's TPM)."""
    return _wait_accepting(socket.AF_UNIX, path, proc, timeout)
