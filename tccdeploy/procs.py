"""Stopping a child process by its PID: ask (a signal, or the caller closed its input), wait a
bounded time, then kill it and reap it, so no run leaves a process or a zombie behind."""

from __future__ import annotations

import subprocess


def stop(proc: subprocess.Popen, timeout: float, signum: int | None = None) -> int:  # type: ignore[type-arg]
    """Send signum (when given and the process still runs), wait up to timeout seconds, then
    kill it; its exit status."""
    if signum is not None and proc.poll() is None:
        proc.send_signal(signum)
    try:
        return proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        return proc.wait()
