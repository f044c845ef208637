"""The admin helper's operations, by name: what the provider could do with SSH anyway
(`command`), made fast and structured. The helper runs as the node's admin login, which cannot
reach the TPM, the VMs or their keys (those are the TVMM service's), so nothing here can either."""

from __future__ import annotations

import os
import platform
import shlex
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from typing import Any

MAX_OUTPUT = 1024 * 1024
Op = Callable[..., dict[str, Any]]
OPS: dict[str, Op] = {}


class OpError(Exception):
    """A failure the caller should see as a plain message (no traceback needed)."""


def op(name: str) -> Callable[[Op], Op]:
    def register(func: Op) -> Op:
        OPS[name] = func
        return func

    return register


def node_dir() -> str:
    """The helper's private working directory on this node (0700)."""
    path = os.environ.get("TCCDEPLOY_NODE_DIR") or os.path.join(os.path.expanduser("~"), ".cache", "tccdeploy")
    os.makedirs(path, mode=0o700, exist_ok=True)
    return path


@op("ping")
def ping(**_: Any) -> dict[str, Any]:
    return {
        "ping": "pong",
        "node": os.environ.get("TCCDEPLOY_NODE") or socket.gethostname(),
        "python": platform.python_version(),
        "pid": os.getpid(),
        "changed": False,
    }


def _clip(data: bytes) -> str:
    text = data[:MAX_OUTPUT].decode(errors="replace")
    return text + ("\n[output truncated]" if len(data) > MAX_OUTPUT else "")


@op("command")
def command(cmd: str | list[str], timeout: float = 60.0, chdir: str | None = None, creates: str | None = None,
            **_: Any) -> dict[str, Any]:
    """Run a command without a shell, as Ansible's command module does."""
    argv = shlex.split(cmd) if isinstance(cmd, str) else list(cmd)
    if not argv:
        raise OpError("no command given")
    if creates and os.path.exists(os.path.expanduser(creates)):
        return {"rc": 0, "stdout": "", "stderr": "", "changed": False, "skipped": True,
                "msg": f"{creates} exists; not run"}
    start = time.monotonic()
    try:
        proc = subprocess.run(argv, capture_output=True, timeout=timeout, cwd=chdir, stdin=subprocess.DEVNULL)
    except FileNotFoundError:
        raise OpError(f"[Errno 2] No such file or directory: {argv[0]!r}") from None
    except subprocess.TimeoutExpired:
        raise OpError(f"command timed out after {timeout:g} s") from None
    return {
        "rc": proc.returncode,
        "stdout": _clip(proc.stdout).rstrip("\n"),
        "stderr": _clip(proc.stderr).rstrip("\n"),
        "changed": True,
        "delta": round(time.monotonic() - start, 3),
        "cmd": argv,
    }


@op("facts")
def facts(**_: Any) -> dict[str, Any]:
    return {
        "changed": False,
        "python": sys.executable,
        "python_version": platform.python_version(),
        "kernel": platform.release(),
        "machine": platform.machine(),
        "kvm": os.access("/dev/kvm", os.R_OK | os.W_OK),
        "node": os.environ.get("TCCDEPLOY_NODE") or socket.gethostname(),
    }
