"""A served TC for the tests: `tccdeploy tc serve` as a real process on a free loopback port,
with an engine's credentials; stopped by PID."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx

from tccdeploy.procs import stop

BIN = Path(sys.executable).parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Service:
    """registry: a postgresql:// URL (replicas share it, and the state folder with the TC's
    identity); setup=False for a second replica of an existing TC."""

    def __init__(self, state: Path, manifests: str, registry: str | None = None, setup: bool = True,
                 options: tuple[str, ...] = ()):
        self.state = state
        self.engine_dir = state / "engine-ops"
        env = dict(os.environ, TCCDEPLOY_STATE=str(state))
        if registry:
            env["TCCDEPLOY_REGISTRY"] = registry
        if setup:
            subprocess.run([str(BIN / "tccdeploy"), "tc", "init"], env=env, check=True, capture_output=True)
            subprocess.run([str(BIN / "tccdeploy"), "tc", "engines", "add", "ops", "-o", str(self.engine_dir)], env=env,
                           check=True, capture_output=True)
        self.port = free_port()
        self.url = f"https://127.0.0.1:{self.port}"
        self.log = open(state / f"serve-{self.port}.log", "w")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen([str(BIN / "tccdeploy"), "tc", "serve", "--listen", f"127.0.0.1:{self.port}",
                                      "-m", manifests, *options], env=env, stdout=self.log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 20
        while True:
            try:
                if self.client(cert=False).get("/healthz").status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"tc serve did not start: {(state / f'serve-{self.port}.log').read_text()[-2000:]}")
            time.sleep(0.1)

    def client(self, cert: bool = True, cert_files: tuple[str, str] | None = None) -> httpx.Client:
        import ssl

        context = ssl.create_default_context(cafile=str(self.engine_dir / "tc-ca.pem"))
        if cert_files:
            context.load_cert_chain(*cert_files)
        elif cert:
            context.load_cert_chain(str(self.engine_dir / "engine-cert.pem"), str(self.engine_dir / "engine-key.pem"))
        return httpx.Client(base_url=self.url, verify=context, timeout=20)

    def kill(self) -> None:
        """As a machine lost: no clean shutdown."""
        self.proc.kill()
        self.proc.wait()
        self.log.close()

    def stop(self) -> None:
        if self.log.closed:
            return
        stop(self.proc, 10, signal.SIGTERM)
        self.log.close()
