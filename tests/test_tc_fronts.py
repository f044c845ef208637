"""`tc serve --fronts N`: TLS and HTTP in front processes, decisions in the serving process.

The served tests elsewhere run through one front (the default); these prove what fronts add:
the channel's calls and exceptions, metrics summed over fronts, and that no process outlives
the others (real `tc serve` processes, stopped by PID)."""

from __future__ import annotations

import os
import pickle
import re
import signal
import socket
import sqlite3
import threading
import time
from multiprocessing.connection import Connection

import psutil
import pytest

from tccdeploy.coordinator import fronts
from tccdeploy.coordinator.api import Metrics
from tccdeploy.coordinator.db import StoreFailure, store_failure
from tccdeploy.coordinator.refusals import AdmissionRefused, Refused
from tccdeploy.coordinator.store import Conflict

from .conftest import REPO
from .tcservice import BIN, Service


class Decisions:
    """Stands in for the Coordinator on the decision side of a real socket pair (unit tests of
    the channel; the served tests run the real one)."""

    def __init__(self) -> None:
        self.called: list[str] = []

    def nonce(self, node: str, purpose: str) -> bytes:
        self.called.append("nonce")
        return node.encode() + purpose.encode()

    def vm(self, name: str, *, state: str = "running") -> str:
        return f"{name}:{state}"

    def nodes(self) -> object:
        return lambda: None  # a value that does not pickle: this code's bug

    def release_key(self, request: str, node: str) -> dict:
        raise Refused("release.not-admitted", f"{node} is not admitted")

    def admission_finish(self, node: str, answer: str) -> dict:
        raise AdmissionRefused("admit.challenge", "the answer does not match")

    def migration_end(self, *args: object) -> dict:
        raise Conflict("migration.state", "the migration is not under way")

    def ready(self) -> None:
        sqlite3.connect("file:/nonexistent/registry.sqlite?mode=rw", uri=True)  # SQLITE_CANTOPEN: an outage

    def vms(self, everything: bool) -> list:
        raise RuntimeError("secret-key-material-here")  # a bug's words, which must not cross

    def engine_allowed(self, serial: int) -> bool:
        return serial == 1

    def identity(self) -> object:  # what a front must never reach
        self.called.append("identity")
        return "the TC's keys"


@pytest.fixture
def channel():
    decisions = Decisions()
    metrics = Metrics()
    ours, theirs = socket.socketpair()
    thread = threading.Thread(target=fronts.answer, args=(decisions, Connection(ours.detach()), metrics), daemon=True)
    thread.start()
    remote = fronts.Remote([Connection(theirs.detach())], on_gone=lambda: None)
    yield remote, decisions, metrics
    remote._free.get().close()
    thread.join(timeout=5)


def test_keyword_arguments_cross_too(channel):
    remote, _, _ = channel
    assert remote.vm("web", state="suspended") == "web:suspended"


def test_a_value_that_does_not_pickle_comes_back_as_a_failure_not_a_hang(channel):
    remote, _, _ = channel
    with pytest.raises(fronts.DecisionFailed):
        remote.nodes()
    assert remote.nonce("n1", "quote") == b"n1quote"  # the connection still carries calls


def test_an_answer_that_is_neither_a_value_nor_a_refusal_is_refused():
    ours, theirs = socket.socketpair()
    decision_side = Connection(ours.detach())
    remote = fronts.Remote([Connection(theirs.detach())], on_gone=lambda: None)

    def odd() -> None:
        decision_side.recv_bytes()
        decision_side.send_bytes(pickle.dumps(("maybe", "value")))

    threading.Thread(target=odd, daemon=True).start()
    with pytest.raises(fronts.DecisionFailed):
        remote.nonce("n1", "quote")
    decision_side.close()


def test_a_gone_decision_process_is_a_lost_decision_at_once_and_stops_the_front():
    """Not "the database does not answer, nothing was decided": the call may have been decided
    before the decision process died (its commit done, its answer not sent)."""
    ours, theirs = socket.socketpair()
    stopped: list[bool] = []
    remote = fronts.Remote([Connection(theirs.detach())], on_gone=lambda: stopped.append(True))
    ours.close()  # the decision process died
    for _ in range(3):
        with pytest.raises(StoreFailure) as caught:
            remote.nonce("n1", "quote")
        assert store_failure(caught.value) == "service.decision-lost"
    assert remote.gone and stopped == [True]  # stopped once, every call since refused at once


def test_a_front_hands_its_counts_over_and_renders_every_fronts(channel):
    remote, _, total = channel
    total.count("tccdeploy_admissions_total", 2.0)  # another front's, handed over before
    mine = fronts.FrontMetrics(remote, interval=3600)
    mine.count("tccdeploy_admissions_total")
    text = mine.render()
    assert "tccdeploy_admissions_total 3" in text
    assert mine.take() == ({}, {})  # handed over, not kept twice
    mine.flush()  # nothing to hand over: no call
    assert "tccdeploy_admissions_total 3" in total.render()


def test_a_front_runs_without_the_registry_url(monkeypatch):
    monkeypatch.setenv("TCCDEPLOY_REGISTRY", "postgresql://tc:secret@db/tc")
    monkeypatch.setenv("PGPASSWORD", "secret")
    monkeypatch.setenv("PGPASSFILE", "/root/.pgpass")
    monkeypatch.setenv("TCCDEPLOY_STATE", "/var/lib/tc")
    env = fronts._front_environment()
    assert not {"TCCDEPLOY_REGISTRY", "PGPASSWORD", "PGPASSFILE"} & set(env) and env["TCCDEPLOY_STATE"] == "/var/lib/tc"


def test_a_call_runs_in_the_decision_process_and_its_value_comes_back(channel):
    remote, decisions, _ = channel
    assert remote.nonce("n1", "quote") == b"n1quote"
    assert decisions.called == ["nonce"]


@pytest.mark.parametrize("call, kind, reason", [
    (lambda r: r.release_key("req", "n1"), Refused, "release.not-admitted"),
    (lambda r: r.admission_finish("n1", "x"), AdmissionRefused, "admit.challenge"),
    (lambda r: r.migration_end("m", "v"), Conflict, "migration.state"),
], ids=["refused", "admission-refused", "conflict"])
def test_a_refusal_comes_back_as_itself_with_its_reason(channel, call, kind, reason):
    remote, _, _ = channel
    with pytest.raises(kind) as caught:
        call(remote)
    assert type(caught.value) is kind and caught.value.reason == reason and str(caught.value)


def test_a_store_outage_comes_back_as_its_reason_code(channel):
    remote, _, _ = channel
    with pytest.raises(StoreFailure) as caught:
        remote.ready()
    assert store_failure(caught.value) == "store.unavailable" and caught.value.cause == "OperationalError"


def test_a_bug_in_a_decision_comes_back_without_its_words(channel, capfd):
    remote, _, _ = channel
    with pytest.raises(fronts.DecisionFailed) as caught:
        remote.vms(False)
    assert "secret" not in str(caught.value) and "log" in str(caught.value)
    assert "secret-key-material-here" in capfd.readouterr().err  # the decision process's own log has it


def test_a_front_reaches_only_the_calls_the_api_makes(channel):
    """A front parses what the network sends; were one subverted, it still could not ask the
    decision process for the TC's keys or registry (only `CALLS`, checked on both sides)."""
    remote, decisions, _ = channel
    with pytest.raises(AttributeError, match="no call 'identity'.*CALLS"):
        remote.identity  # noqa: B018 - the attribute itself is refused
    with pytest.raises(fronts.DecisionFailed, match="no call 'identity'"):
        remote._call("identity")  # the decision process refuses it too
    with pytest.raises(fronts.DecisionFailed):
        remote._call("__class__")
    assert "identity" not in decisions.called


def test_an_engine_call_runs_only_for_a_certificate_the_registry_lists(channel):
    remote, decisions, _ = channel
    assert remote.nonce.as_engine(("ops", 1), "n1", "quote") == b"n1quote"
    with pytest.raises(Refused) as caught:
        remote.nonce.as_engine(("gone", 2), "n1", "quote")
    assert caught.value.reason == "auth.engine-revoked" and "gone" in str(caught.value)
    assert decisions.called == ["nonce"]  # the removed engine's call never ran
    with pytest.raises(fronts.DecisionFailed, match="no call 'identity'"):
        remote._call(fronts.AS_ENGINE, ("ops", 1), "identity")  # nor does a name the API does not call


def test_every_call_the_api_makes_is_one_the_decision_process_takes():
    called = set(re.findall(r"self\.tc\.([a-z_]+)", (REPO / "tccdeploy/coordinator/api.py").read_text()))
    assert called == set(fronts.CALLS)


def test_metrics_handed_over_by_fronts_are_summed():
    total = Metrics()
    for _ in range(2):
        front = Metrics()
        front.count("tccdeploy_http_requests_total", route="/v1/nonces", status="200")
        front.observe("/v1/nonces", 0.004)
        total.merge(pickle.loads(pickle.dumps(front.take())))
        assert front.take() == ({}, {})  # taken once
    text = total.render()
    assert 'tccdeploy_http_requests_total{route="/v1/nonces",status="200"} 2' in text
    assert 'tccdeploy_http_request_seconds_count{route="/v1/nonces"} 2' in text


# -- real processes ---------------------------------------------------------------------------
def _fronts_of(service: Service) -> list[psutil.Process]:
    return [p for p in psutil.Process(service.proc.pid).children() if "tccdeploy.coordinator.fronts" in " ".join(p.cmdline())]


def _gone(processes: list[psutil.Process], seconds: float) -> bool:
    _, alive = psutil.wait_procs(processes, timeout=seconds)
    return not alive


@pytest.mark.slow
def test_two_fronts_serve_one_port_and_metrics_count_every_fronts_requests(tmp_path):
    service = Service(tmp_path, str(REPO / "examples"), options=("--fronts", "2"))
    clients = []
    try:
        children = _fronts_of(service)
        assert len(children) == 2
        for _ in range(16):
            clients.append(service.client())
            assert clients[-1].get("/v1/policy").status_code == 200  # each on its own kept connection
        held = [sum(1 for c in p.net_connections("tcp") if c.laddr.port == service.port and c.raddr) for p in children]
        assert sum(held) == 16 and min(held) > 0, held  # the kernel handed connections to both
        deadline = time.monotonic() + 10  # a front hands its counts over every second
        while True:
            metrics = clients[0].get("/metrics").text
            if 'tccdeploy_http_requests_total{route="/v1/policy",status="200"} 16' in metrics:
                break
            assert time.monotonic() < deadline, metrics
            time.sleep(0.2)
    finally:
        for client in clients:
            client.close()
        service.stop()


@pytest.mark.slow
def test_a_second_tc_serve_cannot_share_the_port_of_one_with_fronts(tmp_path):
    """Fronts' sockets allow SO_REUSEPORT; a second `tc serve` (stale, or another TC's) must still
    fail to bind, not take a share of the engines' connections."""
    import subprocess

    first = Service(tmp_path / "a", str(REPO / "examples"), options=("--fronts", "2"))
    try:
        env = dict(os.environ, TCCDEPLOY_STATE=str(first.state))
        second = subprocess.run([str(BIN / "tccdeploy"), "tc", "serve", "--listen", f"127.0.0.1:{first.port}",
                                 "--fronts", "2", "-m", str(REPO / "examples")], env=env, capture_output=True,
                                text=True, timeout=60)
        assert second.returncode != 0
        assert "another tc serve listens on 127.0.0.1" in second.stdout + second.stderr
        assert len(_fronts_of(first)) == 2
    finally:
        first.stop()


@pytest.mark.slow
def test_sigterm_stops_the_decision_process_and_its_fronts(tmp_path):
    service = Service(tmp_path, str(REPO / "examples"))
    children = _fronts_of(service)
    assert len(children) == 1
    service.proc.send_signal(signal.SIGTERM)
    assert service.proc.wait(timeout=20) == 0
    assert _gone(children, 5)
    service.stop()


@pytest.mark.slow
def test_a_front_killed_stops_the_service_with_an_error(tmp_path):
    service = Service(tmp_path, str(REPO / "examples"))
    try:
        _fronts_of(service)[0].kill()
        assert service.proc.wait(timeout=20) != 0
        assert "a front process" in (tmp_path / f"serve-{service.port}.log").read_text()
    finally:
        service.stop()


@pytest.mark.slow
def test_fronts_do_not_outlive_a_killed_decision_process(tmp_path):
    """SIGKILL (the OOM killer, kill -9) with requests in flight and more queued than a front has
    connections to its decision process: every one is answered 503, the fronts stop by
    themselves, and the port is free for the next `tc serve`."""
    service = Service(tmp_path, str(REPO / "examples"))
    children = _fronts_of(service)
    answers: list[object] = []
    reasons: list[str] = []

    def ask() -> None:
        with service.client() as client:
            try:
                response = client.get("/v1/policy")
                answers.append(response.status_code)
                if response.status_code == 503:
                    reasons.append(response.json()["error"])
            except Exception as exc:  # noqa: BLE001 - a connection cut is an answer too
                answers.append(type(exc).__name__)

    os.kill(service.proc.pid, signal.SIGSTOP)  # the decision process takes no call now
    askers = [threading.Thread(target=ask) for _ in range(8)]
    for t in askers:
        t.start()
    time.sleep(1.5)  # all 8 are in the front: 4 on its connections, 4 queued behind them
    service.kill()
    for t in askers:
        t.join(timeout=30)
    assert _gone(children, 15), [p.cmdline() for p in children if p.is_running()]
    assert len(answers) == 8 and all(a != 200 for a in answers), answers
    assert 503 in answers
    assert set(reasons) == {"service.decision-lost"}, reasons  # not "nothing was decided": it may have been
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as tc serve binds (TIME_WAIT is no holder)
        s.bind(("127.0.0.1", service.port))  # no process holds it


def test_tc_serve_refuses_a_negative_front_count(tmp_path):
    import subprocess

    result = subprocess.run([str(BIN / "tccdeploy"), "tc", "serve", "--fronts", "-1", "--state", str(tmp_path)],
                            capture_output=True, text=True, env=dict(os.environ))
    assert result.returncode == 2 and "--fronts takes 0 or more" in result.stderr


@pytest.mark.parametrize("count", ["0", "1", "2"])
def test_tc_serve_on_a_port_another_process_holds_says_so_and_does_not_claim_to_serve(tmp_path, count):
    import subprocess

    env = dict(os.environ, TCCDEPLOY_STATE=str(tmp_path))
    subprocess.run([str(BIN / "tccdeploy"), "tc", "init"], env=env, check=True, capture_output=True)
    with socket.create_server(("127.0.0.1", 0)) as holder:
        port = holder.getsockname()[1]
        result = subprocess.run([str(BIN / "tccdeploy"), "tc", "serve", "--listen", f"127.0.0.1:{port}", "--fronts", count,
                                 "-m", str(REPO / "examples")], env=env, capture_output=True, text=True, timeout=60)
    assert result.returncode == 1, result.stderr
    assert f"cannot listen on 127.0.0.1:{port}" in result.stderr and "--listen" in result.stderr
    assert "serving the TC" not in result.stdout
