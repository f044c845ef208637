"""A TVMM service daemon on this machine for the tests: the service's own file, a config whose TPM
is absent (the sessions' answers name it), a socket folder of the daemon's user, stopped by PID."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import BinaryIO

from tccdeploy.bundles import service_bundle
from tccdeploy.lab import procs


@dataclass
class Daemon:
    folder: str
    socket: str
    pyz: str
    digest: str
    proc: subprocess.Popen | None = None

    def config(self, node: str) -> str:
        """A config naming node (the hello says which config served a session)."""
        path = os.path.join(self.folder, f"config-{node}.json")
        with open(path, "w") as fh:
            json.dump({"node": node, "tpm": f"swtpm:path={self.folder}/no-tpm",
                       "state_dir": os.path.join(self.folder, "state"), "eventlog": "/none"}, fh)
        os.chmod(path, 0o644)
        return path

    def start(self, node: str = "warm", uid: int | None = None) -> None:
        prefix = [] if uid is None else ["setpriv", f"--reuid={uid}", f"--regid={uid}", "--clear-groups"]
        if uid is not None:
            os.chown(os.path.dirname(self.socket), uid, uid)
        self.proc = subprocess.Popen([*prefix, sys.executable, self.pyz, "daemon", "--socket", self.socket,
                                      "--config", self.config(node)], stdout=subprocess.DEVNULL,
                                     stderr=open(os.path.join(self.folder, "daemon.log"), "w"))
        deadline = time.monotonic() + 60
        while not os.path.exists(self.socket):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise AssertionError(f"the daemon did not listen: {self.log()}")
            time.sleep(0.05)

    def log(self) -> str:
        with open(os.path.join(self.folder, "daemon.log")) as fh:
            return fh.read()

    def connect(self) -> socket.socket:
        conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        conn.settimeout(30)
        conn.connect(self.socket)
        return conn

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            procs.stop([*procs.children(self.proc.pid), self.proc.pid])
        if self.proc is not None:
            self.proc.wait(timeout=10)


@contextmanager
def daemon_folder() -> Iterator[Daemon]:
    """A folder other users may read (a daemon may run as nobody), its socket folder 0700."""
    folder = tempfile.mkdtemp(prefix="tvmm-daemon-")
    os.chmod(folder, 0o755)
    data, digest = service_bundle()
    pyz = os.path.join(folder, "tccdeploy-tvmm.pyz")
    with open(pyz, "wb") as fh:
        fh.write(data)
    os.chmod(pyz, 0o644)
    run = os.path.join(folder, "run")
    os.mkdir(run, 0o700)
    daemon = Daemon(folder, os.path.join(run, "service.sock"), pyz, digest)
    try:
        yield daemon
    finally:
        daemon.stop()
        shutil.rmtree(folder, ignore_errors=True)


def lines(reader: BinaryIO, count: int) -> list[dict]:
    """The next count JSON lines of a session (reader: the connection's one makefile("rb"))."""
    return [json.loads(reader.readline()) for _ in range(count)]
