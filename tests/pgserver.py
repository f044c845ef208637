"""A real PostgreSQL server for the tests (Debian's package), on a free loopback port, in a
temporary folder, run as the `postgres` user; stopped by PID."""

from __future__ import annotations

import glob
import os
import pwd
import shutil
import signal
import subprocess
import tempfile
import time

from tccdeploy.procs import stop

from .tcservice import free_port


def postgres_bin() -> str | None:
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/postgres"))
    return os.path.dirname(found[-1]) if found else None


def skip_reason() -> str | None:
    if postgres_bin() is None:
        return "PostgreSQL is not installed (Debian package postgresql; scripts/install installs it)"
    if os.geteuid() != 0:
        return "starting PostgreSQL as its own user needs root"
    try:
        pwd.getpwnam("postgres")
    except KeyError:
        return "no postgres user (Debian's postgresql package creates it)"
    try:
        import psycopg  # noqa: F401
    except ImportError:
        return "psycopg is not installed (pip install -e .)"
    return None


class PostgresServer:
    """root: a folder to keep the cluster in (a small tmpfs, for a full disk); default a new temporary one.
    durable: commits acknowledged only once in the WAL (as any real deployment runs), for tests
    that crash the server; the fast default lets a crash lose the last commits."""

    def __init__(self, root: str | None = None, durable: bool = False) -> None:
        self.durable = durable
        bindir = postgres_bin()
        assert bindir is not None
        self.bindir = bindir
        account = pwd.getpwnam("postgres")
        self.dir = tempfile.mkdtemp(prefix="tccdeploy-test-pg-", dir=root)
        os.chmod(self.dir, 0o700)
        os.chown(self.dir, account.pw_uid, account.pw_gid)
        self.data = os.path.join(self.dir, "data")
        subprocess.run([f"{bindir}/initdb", "-D", self.data, "-A", "trust", "-U", "postgres", "--no-sync", "-E", "UTF8"],
                       user="postgres", group="postgres", check=True, capture_output=True, cwd=self.dir)
        self.port = free_port()
        self.log = open(os.path.join(self.dir, "server.log"), "w")  # noqa: SIM115 - closed in stop()
        self._databases = 0
        self._start()

    def _start(self) -> None:
        self.proc = subprocess.Popen(
            [f"{self.bindir}/postgres", "-D", self.data, "-h", "127.0.0.1", "-p", str(self.port), "-k", self.dir,
             "-c", "fsync=off", "-c", f"synchronous_commit={'on' if self.durable else 'off'}", "-c", "full_page_writes=off",
             "-c", "max_connections=200"],
            user="postgres", group="postgres", stdout=self.log, stderr=subprocess.STDOUT, cwd=self.dir)
        self.wait_ready()

    def wait_ready(self, seconds: float = 30) -> None:
        import psycopg

        deadline = time.monotonic() + seconds
        while True:
            try:
                with psycopg.connect(self.url("postgres"), connect_timeout=2, autocommit=True) as conn:
                    conn.execute("SELECT 1")
                return
            except psycopg.OperationalError:
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    self.stop()
                    raise RuntimeError("PostgreSQL did not start") from None
                time.sleep(0.2)

    def restart(self, how: signal.Signals = signal.SIGINT) -> None:
        """Stop the server (SIGINT: fast shutdown; SIGQUIT: immediate, crash recovery at start)
        and start it again on the same port and data."""
        if self.proc.poll() is None:
            self.proc.send_signal(how)
            self.proc.wait(timeout=30)
        self._start()

    def url(self, database: str) -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/{database}"

    def new_database(self) -> str:
        """A fresh, empty database; its URL."""
        import psycopg

        self._databases += 1
        name = f"tcc{self._databases}"
        with psycopg.connect(self.url("postgres"), autocommit=True) as conn:
            conn.execute(f"CREATE DATABASE {name}")
        return self.url(name)

    def drop_database(self, url: str) -> None:
        """Drop a database new_database made (its sessions cut), and checkpoint, so what a
        benchmark's earlier rows left (dead rows, dirty buffers, autovacuum's work) does not
        fall on the next row's time."""
        import psycopg

        name = url.rsplit("/", 1)[1]
        with psycopg.connect(self.url("postgres"), autocommit=True) as conn:
            conn.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")
            conn.execute("CHECKPOINT")

    def stop(self) -> None:
        stop(self.proc, 20, signal.SIGINT)  # "fast" shutdown: sessions cut, no waiting for clients
        self.log.close()
        shutil.rmtree(self.dir, ignore_errors=True)
