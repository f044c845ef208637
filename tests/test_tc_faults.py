"""The served TC under faults (issue 15), on SQLite and PostgreSQL: eight engine clients make
decisions (verdicts and key releases) through two replicas while one replica is killed with
SIGKILL, the database restarts (PostgreSQL: fast, then immediate, with crash recovery) and the
disk under the store fills up and is freed. Afterwards:

- every decision has its audit entry (each verdict and each ticket issued), and `audit verify` is ok;
- nothing a client was told is missing from the registry (its verdict ids, its tickets);
- nothing doubled: one release row per request, one verdict per nonce;
- no release is stuck: every request the clients were given has its key released, and the ticket
  the client holds is the one the registry says is current (a release whose answer was lost
  was given again to the same node and recorded).

The figures (decisions, 503s, refusals) are printed for the record (`-s`)."""

from __future__ import annotations

import collections
import os
import queue
import shutil
import signal
import subprocess
import tempfile
import threading
import time
from pathlib import Path

import pytest

from tccdeploy.coordinator.client import RemoteCoordinator, TCUnavailable
from tccdeploy.coordinator.refusals import Refused
from tccdeploy.coordinator.store import Registry

from .brokerkit import ADDRESSES, World
from .tcservice import BIN, Service

pytestmark = pytest.mark.slow

NODES = [f"n{i}" for i in range(4)]


class Faults:
    """A TC (two replicas on one store) with four software nodes and a customer's requests."""

    def __init__(self, root: Path, registry: str | None, requests: int) -> None:
        self.registry_url = registry
        self.world = World(root, registry)
        self.world.customer("acme")
        for name in NODES:
            self.world.node(name)
        self.requests = [self.world.accepted("acme")["id"] for _ in range(requests)]
        self.env = dict(os.environ, TCCDEPLOY_STATE=self.world.state)
        if registry:
            self.env["TCCDEPLOY_REGISTRY"] = registry
        subprocess.run([str(BIN / "tccdeploy"), "tc", "engines", "add", "ops", "-o",
                        str(Path(self.world.state) / "engine-ops")], env=self.env, check=True, capture_output=True)
        self.replicas = [self.replica() for _ in range(2)]

    def replica(self) -> Service:
        return Service(Path(self.world.state), self.world.manifests, registry=self.registry_url, setup=False)

    def close(self) -> None:
        for replica in self.replicas:
            replica.stop()
        self.world.close()


class Load:
    """Clients deciding until stopped: a verdict for their node, then a key release, again and
    again; a release is asked for until it is given (the TC may be down meanwhile)."""

    def __init__(self, faults: Faults, clients: int = 8) -> None:
        self.faults = faults
        self.stop = threading.Event()
        self.lock = threading.Lock()
        self.verdicts: list[int] = []
        self.tickets: dict[str, tuple[str, str]] = {}  # request -> (node, ticket id the client holds)
        self.unavailable = 0
        self.refusals: collections.Counter[str] = collections.Counter()
        self.work: queue.Queue[str] = queue.Queue()
        for request in faults.requests:
            self.work.put(request)
        url = ",".join(r.url for r in faults.replicas)
        self.threads = [threading.Thread(target=self.run, args=(i, url), daemon=True) for i in range(clients)]

    def __enter__(self) -> Load:
        for thread in self.threads:
            thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        for thread in self.threads:
            thread.join(timeout=120)

    def count(self, what: str) -> int:
        with self.lock:
            return {"verdicts": len(self.verdicts), "tickets": len(self.tickets)}[what]

    def run(self, index: int, url: str) -> None:
        node = NODES[index % len(NODES)]
        client = RemoteCoordinator(url, str(Path(self.faults.world.state) / "engine-ops"), timeout=10, retries=2)
        try:
            while not self.stop.is_set():
                self.attest(client, node)
                try:
                    request = self.work.get_nowait()
                except queue.Empty:
                    time.sleep(0.05)
                    continue
                self.release(client, request, node)
        finally:
            client.close()

    def attest(self, client: RemoteCoordinator, node: str) -> bool:
        try:
            nonce = client.nonce(node)
            evidence = self.faults.world.nodes[node].tpm.evidence(nonce)
            verdict, attestation = client.verify(node, "site1", ADDRESSES["site1"], evidence)
        except TCUnavailable:
            with self.lock:
                self.unavailable += 1
            time.sleep(0.2)
            return False
        except Refused as exc:
            with self.lock:
                self.refusals[exc.reason] += 1
            return False
        with self.lock:
            self.verdicts.append(attestation)
            if not verdict.trusted:
                self.refusals["verdict:" + ",".join(r["code"] for r in verdict.reasons)] += 1
        return verdict.trusted

    def release(self, client: RemoteCoordinator, request: str, node: str) -> None:
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline:
            try:
                given = client.release_key(request, node)
            except TCUnavailable:
                with self.lock:
                    self.unavailable += 1
                time.sleep(0.3)
                continue
            except Refused as exc:
                with self.lock:
                    self.refusals[exc.reason] += 1
                if exc.reason == "release.not-fresh":  # (a verdict lost to the fault: attest again)
                    self.attest(client, node)
                    continue
                raise
            with self.lock:
                self.tickets[request] = (node, given["ticket"]["ticket"]["id"])
            return
        raise AssertionError(f"request {request}'s key was never released")


def wait_for(condition, seconds: float = 60) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, "the load made no progress"
        time.sleep(0.1)


def fill(where: str) -> str:
    path = os.path.join(where, "filler")
    with open(path, "wb", buffering=0) as fh:
        for size in (1 << 20, 65536, 4096, 1):
            try:
                while True:
                    fh.write(b"\0" * size)
            except OSError:
                pass
    return path


def check(faults: Faults, load: Load) -> dict[str, int]:
    registry = Registry(faults.registry_url or os.path.join(faults.world.state, "registry.sqlite"))
    try:
        entries = registry.audit_entries()
        audited_verdicts = {int(e["data"]["id"]) for e in entries if e["kind"] == "attestation"}
        audited_tickets = {e["data"]["ticket"] for e in entries if e["kind"] == "key-release"}
        attestations = [a for n in NODES for a in registry.attestations(n, limit=100_000)]
        ids = {int(a["id"]) for a in attestations}
        assert ids <= audited_verdicts, f"verdicts with no audit entry: {sorted(ids - audited_verdicts)[:10]}"
        assert set(load.verdicts) <= ids, "a verdict a client was given is not in the registry"
        nonces = [a["nonce"] for a in attestations if a["nonce"]]
        assert len(nonces) == len(set(nonces)), "a nonce was counted twice"
        reissued = 0
        for request in faults.requests:
            row = registry.request(request)
            assert row is not None and row["state"] == "released", (request, row and row["state"])
            made = [r for r in registry.releases(row["vm_id"]) if r["request"] == request]
            assert len(made) == 1, f"request {request} has {len(made)} releases"
            issued = [made[0]["ticket"], *made[0]["superseded"].split()]
            assert set(issued) <= audited_tickets, f"a ticket of request {request} has no audit entry"
            node, held = load.tickets[request]
            assert (made[0]["node"], made[0]["ticket"]) == (node, held), "the client holds another ticket than the TC"
            reissued += len(issued) - 1
    finally:
        registry.close()
    verify = subprocess.run([str(BIN / "tccdeploy"), "audit", "verify"], env=faults.env, capture_output=True, text=True)
    assert verify.returncode == 0, verify.stdout + verify.stderr
    return {"verdicts": len(load.verdicts), "releases": len(load.tickets), "reissued": reissued,
            "entries": len(entries), "unavailable": load.unavailable}


def report(name: str, figures: dict[str, int], load: Load, seconds: float) -> None:
    print(f"\n{name}: {figures} in {seconds:.1f} s; refusals {dict(load.refusals)}")


@pytest.fixture
def small_disk():
    """A 160 MiB tmpfs to fill (root only), where PostgreSQL's own user can reach it."""
    if os.geteuid() != 0:
        pytest.skip("mounting a small tmpfs needs root")
    mount = Path(tempfile.mkdtemp(prefix="tccdeploy-test-disk-"))
    os.chmod(mount, 0o755)
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=160m,mode=0755", "tmpfs", str(mount)],
                             capture_output=True, text=True)
    if mounted.returncode != 0:
        shutil.rmtree(mount, ignore_errors=True)
        pytest.skip(f"cannot mount a small tmpfs here (a container without CAP_SYS_ADMIN?): {mounted.stderr.strip()}")
    yield mount
    subprocess.run(["umount", "-l", str(mount)], check=False)
    shutil.rmtree(mount, ignore_errors=True)


def test_sqlite_a_replica_killed_and_a_full_disk_under_load_lose_and_double_nothing(small_disk):
    faults = Faults(small_disk / "root", None, requests=120)  # the TC's state (and SQLite) on the small disk
    start = time.monotonic()
    try:
        with Load(faults) as load:
            wait_for(lambda: load.count("tickets") >= 20)
            faults.replicas[0].kill()  # SIGKILL, requests in flight
            wait_for(lambda: load.count("tickets") >= 50)
            filler = fill(str(small_disk))  # the store's disk is full
            time.sleep(3)
            os.unlink(filler)
            wait_for(lambda: load.count("tickets") >= 120, 180)
        figures = check(faults, load)
        report("sqlite", figures, load, time.monotonic() - start)
    finally:
        faults.close()


def test_postgresql_a_replica_killed_restarts_and_a_full_disk_under_load_lose_and_double_nothing(small_disk):
    from .pgserver import PostgresServer, skip_reason

    reason = skip_reason()
    if reason:
        pytest.skip(reason)
    server = PostgresServer(root=str(small_disk), durable=True)  # the database on the small disk; the TC's state apart
    state = Path(tempfile.mkdtemp(prefix="tccdeploy-test-faults-"))
    try:
        faults = Faults(state, server.new_database(), requests=120)
        start = time.monotonic()
        try:
            with Load(faults) as load:
                wait_for(lambda: load.count("tickets") >= 20)
                faults.replicas[0].kill()
                wait_for(lambda: load.count("tickets") >= 40)
                server.restart(signal.SIGINT)  # fast shutdown: sessions cut
                wait_for(lambda: load.count("tickets") >= 60)
                server.restart(signal.SIGQUIT)  # immediate: crash recovery at start
                wait_for(lambda: load.count("tickets") >= 80)
                filler = fill(str(small_disk))
                time.sleep(3)
                os.unlink(filler)
                panicked = server.proc.poll() is not None  # it stopped on the full disk (a PANIC on its WAL)
                if panicked:
                    server.restart()
                wait_for(lambda: load.count("tickets") >= 120, 180)
            figures = check(faults, load)
            report(f"postgresql (stopped on the full disk: {panicked})", figures, load, time.monotonic() - start)
        finally:
            faults.close()
    finally:
        server.stop()
        shutil.rmtree(state, ignore_errors=True)
