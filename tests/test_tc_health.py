"""Honest failure (issue 15): when the TC cannot decide (its store down or full, its wall clock
behind a time it saw) it answers 503 with the reason and a Retry-After, decides nothing, and
/readyz says so; clients back off and say why."""

from __future__ import annotations

import asyncio
import os
import sqlite3
import subprocess

import httpx
import pytest

from tccdeploy.coordinator.api import Api
from tccdeploy.coordinator.db import store_failure
from tccdeploy.coordinator.health import CLOCK_TOLERANCE, Health

from .conftest import REPO
from .tcservice import BIN, Service, free_port


class Wall:
    def __init__(self) -> None:
        self.now = 1_000_000.0

    def __call__(self) -> float:
        return self.now


def test_the_clock_guard_stops_decisions_while_the_wall_clock_is_behind_what_it_saw():
    wall = Wall()
    said: list[str] = []
    health = Health(wall=wall, log=said.append)
    wall.now += 100
    assert health.clock() is None  # forward is time passing
    wall.now -= CLOCK_TOLERANCE - 1
    assert health.clock() is None  # NTP's small corrections are tolerated
    wall.now -= 3600
    problem = health.clock()
    assert problem is not None and problem.reason == "clock.backwards" and problem.retry_after > 1
    assert health.clock_behind() > 3600 and health.clock_steps_back == 1
    assert health.clock() is not None and health.clock_steps_back == 2
    assert len(said) == 1 and "behind" in said[0]  # logged once, when it happened
    wall.now += 3600
    assert health.clock() is None  # caught up
    assert len(said) == 2 and "caught up" in said[1]
    wall.now -= 60
    assert health.clock() is not None and len(said) == 3  # back again: said again


def test_a_store_failure_counts_until_a_write_succeeds(monkeypatch):
    mono = [0.0]
    health = Health(mono=lambda: mono[0])
    health.store_failed("store.full", "OperationalError")
    assert health.store().reason == "store.full" and health.store().retry_after == 30
    health.store_wrote()
    assert health.store() is None
    health.store_failed("store.unavailable", "OperationalError")
    mono[0] += 31
    assert health.store() is None  # old news: /readyz tries a write again


def test_a_full_database_an_unreachable_server_and_a_read_only_file_are_store_failures_and_bad_sql_is_not(tmp_path):
    db = sqlite3.connect(tmp_path / "full.db", isolation_level=None)
    db.execute("CREATE TABLE t (x BLOB)")
    db.execute("PRAGMA max_page_count = 3")  # SQLite's own "disk is full"
    with pytest.raises(sqlite3.Error) as full:
        for _ in range(10):
            db.execute("INSERT INTO t VALUES (?)", (b"x" * 4000,))
    assert store_failure(full.value) == "store.full"
    with pytest.raises(sqlite3.Error) as bad:
        db.execute("SELECT * FROM no_such_table")
    assert store_failure(bad.value) is None  # a bug is not an outage
    db.close()
    ro = sqlite3.connect(f"file:{tmp_path / 'full.db'}?mode=ro", uri=True)
    with pytest.raises(sqlite3.Error) as readonly:
        ro.execute("INSERT INTO t VALUES (1)")
    assert store_failure(readonly.value) == "store.unavailable"
    ro.close()
    psycopg = pytest.importorskip("psycopg")
    with pytest.raises(psycopg.Error) as down:
        psycopg.connect(f"postgresql://127.0.0.1:{free_port()}/x", connect_timeout=2)
    assert store_failure(down.value) == "store.unavailable"
    assert store_failure(OSError(28, "No space left on device")) == "store.full"
    assert store_failure(ValueError("x")) is None


def test_a_clock_gone_back_is_a_503_on_every_state_change_and_in_readiness(broker_world):
    api = Api(broker_world.tc)
    wall = Wall()
    api.health = Health(wall=wall)

    async def session() -> None:
        transport = httpx.ASGITransport(app=api.app())
        async with httpx.AsyncClient(transport=transport, base_url="https://tc") as client:
            assert (await client.get("/readyz")).status_code == 200
            wall.now -= 600
            response = await client.post("/v1/requests", json={})
            assert response.status_code == 503 and response.json()["error"] == "clock.backwards"
            assert int(response.headers["retry-after"]) > 0
            ready = await client.get("/readyz")
            assert ready.status_code == 503 and ready.json()["error"] == "clock.backwards"
            assert (await client.get("/healthz")).status_code == 200  # alive, only not deciding
            assert "tccdeploy_clock_behind_seconds 6" in (await client.get("/metrics")).text
            wall.now += 600
            assert (await client.post("/v1/requests", json={})).status_code == 400  # deciding again (a bad body)

    asyncio.run(session())


@pytest.fixture
def small_disk(tmp_path):
    """A 16 MiB tmpfs the test can fill (root only), unmounted after."""
    if os.geteuid() != 0:
        pytest.skip("mounting a small tmpfs needs root")
    mount = tmp_path / "disk"
    mount.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=16m,mode=0700", "tmpfs", str(mount)],
                             capture_output=True, text=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here (a container without CAP_SYS_ADMIN?): {mounted.stderr.strip()}")
    yield mount
    subprocess.run(["umount", "-l", str(mount)], check=False)


def fill(where) -> str:
    """Fill the disk to the last byte; returns the filler's path."""
    path = os.path.join(where, "filler")
    with open(path, "wb", buffering=0) as fh:
        try:
            while True:
                fh.write(b"\0" * 65536)
        except OSError:
            pass
        try:
            while True:
                fh.write(b"\0")
        except OSError:
            pass
    return path


def test_a_full_disk_is_a_503_store_full_that_decides_nothing_and_readiness_follows_the_disk(small_disk):
    service = Service(small_disk / "tc", str(REPO / "examples"))
    try:
        with service.client() as client:
            assert client.post("/v1/nonces", json={"node": "n1"}).status_code == 200
            filler = fill(small_disk)
            statuses = [client.post("/v1/nonces", json={"node": "n1"}) for _ in range(20)]
            full = [r for r in statuses if r.status_code == 503]
            assert full, [r.status_code for r in statuses]
            assert all(r.status_code in (200, 503) for r in statuses)
            assert full[0].json()["error"] == "store.full" and full[0].headers["retry-after"] == "30"
            ready = client.get("/readyz")
            assert ready.status_code == 503 and ready.json()["error"] == "store.full"
            os.unlink(filler)
            assert client.post("/v1/nonces", json={"node": "n1"}).status_code == 200
            assert client.get("/readyz").status_code == 200
    finally:
        service.stop()
    verify = subprocess.run([str(BIN / "tccdeploy"), "audit", "verify"], env=dict(os.environ, TCCDEPLOY_STATE=str(service.state)),
                            capture_output=True, text=True)
    assert verify.returncode == 0, verify.stdout + verify.stderr


def test_the_engines_client_backs_off_on_a_503_and_says_why(broker_world, capsys, monkeypatch):
    from tccdeploy.coordinator import client as client_module
    from tccdeploy.coordinator.transport import Answer

    waits: list[float] = []
    monkeypatch.setattr(client_module.time, "sleep", waits.append)
    calls = []

    class Answers:  # the TC's side as the client's transport hands it over (pure retry logic here)
        def request(self, method: str, url: str, body: object = None) -> Answer:
            calls.append(url.removeprefix("https://tc"))
            if len(calls) < 3:
                return Answer(503, {"retry-after": "5", "content-type": "application/json"},
                              b'{"error": "store.unavailable", "message": "down"}')
            return Answer(200, {"content-type": "application/json"}, b'{"nonce": "00"}')

    remote = client_module.RemoteCoordinator.__new__(client_module.RemoteCoordinator)
    remote.urls, remote.url, remote.retries = ["https://tc"], "https://tc", 3
    remote.http = Answers()
    assert remote._call("POST", "/v1/nonces", {"node": "n1"}) == {"nonce": "00"}
    assert waits == [5.0, 5.0] and len(calls) == 3
    assert "store.unavailable" in capsys.readouterr().err
    calls.clear()
    remote.retries = 1
    with pytest.raises(client_module.TCUnavailable, match="503"):
        remote._call("POST", "/v1/nonces", {"node": "n1"})


def test_the_clock_guards_bounds_and_figures_are_exact():
    wall = Wall()
    health = Health(tolerance=5.0, wall=wall, log=lambda line: None)
    assert health.clock_behind() == 0.0
    wall.now -= 5.0
    assert health.clock() is None  # exactly the tolerance: still deciding
    wall.now -= 0.5
    problem = health.clock()
    assert problem is not None and problem.retry_after == 6  # 5.5 s behind: ask again in 6
    assert problem.message.startswith("the TC's wall clock is 6 s behind a time it saw already: it decides nothing ")
    assert problem.message.endswith("restarting `tc serve` accepts it as it is)")
    wall.now -= 10_000
    assert health.clock().retry_after == 301  # never more than five minutes and a second
    assert health.clock_steps_back == 2


def test_a_store_failure_is_remembered_exactly_as_long_as_its_memory_and_says_what_failed():
    from tccdeploy.coordinator.health import STORE_MEMORY, retry_after

    mono = [1000.0]
    health = Health(mono=lambda: mono[0])
    health.store_failed("store.unavailable", "OperationalError")
    problem = health.store()
    assert (problem.reason, problem.message, problem.retry_after) == ("store.unavailable", "OperationalError", 5)
    mono[0] += STORE_MEMORY
    assert health.store() is not None  # exactly its memory: still news
    mono[0] += 0.1
    assert health.store() is None
    assert (retry_after("store.full"), retry_after("store.unavailable")) == (30, 5)
