"""Webhooks over a real SQLite registry and a real HTTP receiver: CloudEvents 1.0 in the audit
log's order, signed as Standard Webhooks sign, retried with backoff through refusals and dropped
connections, at least once across a crash between a delivery and its bookkeeping, one replica
at a time, and `tc webhooks` as the TC's operator uses it."""

from __future__ import annotations

import json
import os
import subprocess
import time

import pytest

from tccdeploy.coordinator import audit, webhooks
from tccdeploy.coordinator.store import Registry

from .conftest import REPO
from .helpers_apply import BIN
from .webhookkit import Receiver


@pytest.fixture
def receiver():
    made: list[Receiver] = []

    def make(**kwargs):  # type: ignore[no-untyped-def]
        made.append(Receiver(**kwargs))
        return made[-1]

    yield make
    for r in made:
        r.close()


SOURCE = "urn:tccdeploy:tc:" + "ab" * 32


def decisions(registry: Registry) -> None:
    registry.audit_append(audit.entry("quarantine", "node1", reason="build.unknown"))
    registry.audit_append(audit.entry("attestation", "node2", verdict="trusted"))  # not subscribed by default
    registry.audit_append(audit.entry("key-release", "node2", "vm-1", request="r1"))
    registry.audit_append(audit.entry("enrollment.refused", "rogue", reason="ek.untrusted-manufacturer"))
    registry.audit_append(audit.entry("node.release", "node1", note="fan replaced"))


def add(registry: Registry, url: str, events: list[str] | None = None, name: str = "soc") -> str:
    secret = webhooks.new_secret()
    assert registry.add_webhook(name, url, secret, events or webhooks.DEFAULT_EVENTS, registry.audit_head())
    return secret


def drain(deliverer: webhooks.Deliverer, registry: Registry, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        deliverer.round()
        if all(s["pending"] == 0 and s["attempts"] == 0 for s in webhooks.status(registry)):
            return
        time.sleep(0.02)
    raise AssertionError(webhooks.status(registry))


def test_events_arrive_in_order_as_signed_cloudevents_with_a_checkpoint(registry, receiver):
    r = receiver()
    secret = add(registry, r.url)
    decisions(registry)
    drain(webhooks.Deliverer(registry, SOURCE, "tc-a", first_backoff=0.01), registry)
    events = r.events()
    assert [e["type"] for e in events] == [
        "dev.tccdeploy.node.quarantined", "dev.tccdeploy.key.released", "dev.tccdeploy.refused",
        "dev.tccdeploy.node.released", "dev.tccdeploy.audit.checkpoint"]
    first = events[0]
    assert first["specversion"] == "1.0" and first["source"] == SOURCE and first["subject"] == "node1"
    assert first["data"]["reason"] == "build.unknown" and first["data"]["kind"] == "quarantine"
    assert first["time"].endswith("Z") and first["datacontenttype"] == "application/json"
    assert events[2]["data"]["reason"] == "ek.untrusted-manufacturer"
    head = registry.audit_entries()[-1]
    assert events[-1]["data"] == {"count": head["id"], "head": head["hash"], "signature": head["signature"]}
    for headers, body in r.accepted:
        assert headers["content-type"] == "application/cloudevents+json"
        assert webhooks.verify(secret, headers, body)
        assert not webhooks.verify(secret, headers, body + b" ")  # a changed body does not verify
        assert not webhooks.verify(webhooks.new_secret(), headers, body)
    assert len({json.loads(b)["id"] for _, b in r.accepted}) == len(r.accepted)


def test_a_receiver_that_refuses_drops_and_delays_gets_everything_in_order_with_backoff(registry, receiver):
    r = receiver(drop=1, fail=2, delay=0.05)
    add(registry, r.url, ["*"])
    decisions(registry)
    deliverer = webhooks.Deliverer(registry, SOURCE, "tc-a", first_backoff=0.05)
    deliverer.round()
    state = webhooks.status(registry)[0]
    assert state["attempts"] == 1 and state["pending"] == 5 and state["last_error"]
    assert state["next_attempt"] > time.time()  # backing off, not hammering
    deliverer.round()
    assert r.attempts == 1  # not before its time
    drain(deliverer, registry)
    assert [e["data"]["audit_id"] for e in r.events()[:-1]] == [e["id"] for e in registry.audit_entries()]
    assert r.attempts == 3 + 6  # three failed attempts of the first event, then each once (and the checkpoint)


def test_backoff_doubles_up_to_five_minutes():
    assert [webhooks.backoff(n) for n in (1, 2, 3, 4)] == [1.0, 2.0, 4.0, 8.0]
    assert webhooks.backoff(30) == webhooks.BACKOFF_MAX == 300.0


def test_a_crash_between_delivery_and_bookkeeping_sends_the_same_event_again(registry, receiver):
    """At least once: the TC dies after the receiver took the event, before the cursor moved."""
    r = receiver()
    add(registry, r.url)
    decisions(registry)

    deliverer = webhooks.Deliverer(registry, SOURCE, "tc-a", first_backoff=0.01)
    real = registry.webhook_progress
    registry.webhook_progress = lambda *a, **k: (_ for _ in ()).throw(RuntimeError("power cut"))  # type: ignore[method-assign]
    with pytest.raises(RuntimeError):
        deliverer.round()
    registry.webhook_progress = real  # type: ignore[method-assign]
    drain(webhooks.Deliverer(registry, SOURCE, "tc-a", first_backoff=0.01), registry)
    ids = [e["id"] for e in r.events()]
    assert len(ids) > len(set(ids))  # redelivered, with the same ids (receivers deduplicate on them)
    assert list(dict.fromkeys(ids)) == sorted(set(ids), key=ids.index)  # and in order, each first time
    assert [e["type"] for e in r.events()][-1] == "dev.tccdeploy.audit.checkpoint"


def test_one_replica_delivers_at_a_time(registry, receiver):
    r = receiver()
    add(registry, r.url)
    decisions(registry)
    assert registry.lease_webhook("soc", "tc-b", 30)
    assert webhooks.Deliverer(registry, SOURCE, "tc-a").round() == 0 and r.attempts == 0
    assert webhooks.Deliverer(registry, SOURCE, "tc-b").round() == 5


def test_only_subscribed_types_are_sent_and_a_new_webhook_starts_at_the_head(registry, receiver):
    decisions(registry)  # before the webhook: not sent
    r = receiver()
    add(registry, r.url, ["node.quarantined"])
    registry.audit_append(audit.entry("quarantine", "node3", reason="pcr.mismatch"))
    registry.audit_append(audit.entry("launch", "node2", "vm-2"))
    drain(webhooks.Deliverer(registry, SOURCE, "tc-a"), registry)
    assert [(e["type"], e["subject"]) for e in r.events()] == [("dev.tccdeploy.node.quarantined", "node3")]


def test_a_lease_held_by_a_process_of_this_machine_that_is_gone_is_taken_back_at_once(registry, receiver):
    import socket

    r = receiver()
    add(registry, r.url)
    decisions(registry)
    alive = f"{socket.gethostname()}:{os.getpid()}"  # this test's own process: it runs
    assert registry.lease_webhook("soc", alive, 300)
    assert webhooks.Deliverer(registry, SOURCE, "tc-b").round() == 0 and r.attempts == 0
    child = subprocess.Popen(["true"])
    child.wait()  # a PID of this machine that no longer runs
    assert registry.lease_webhook("soc", alive, 0) and registry.lease_webhook("soc", f"{socket.gethostname()}:{child.pid}", 300)
    assert webhooks.Deliverer(registry, SOURCE, "tc-b").round() == 5


@pytest.mark.parametrize("name, url, events, message", [
    ("soc", "ftp://x", ["refused"], "http:// or https://"),
    ("s o c", "https://x", ["refused"], "letters, digits"),
    ("soc", "https://x", ["node.exploded"], "unknown event type"),
])
def test_a_bad_webhook_is_refused_by_name(name, url, events, message):
    with pytest.raises(webhooks.WebhookError, match=message):
        webhooks.check(name, url, events)


def test_the_operator_adds_a_webhook_its_secret_goes_to_a_0600_file_and_status_shows_the_backlog(tmp_path, receiver):
    env = dict(os.environ, TCCDEPLOY_STATE=str(tmp_path / "tc"), NO_COLOR="1")

    def tc(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([str(BIN / "tccdeploy"), "tc", *args], env=env, capture_output=True, text=True, timeout=60)

    assert tc("init").returncode == 0
    r = receiver(fail=1000)
    secret_file = tmp_path / "soc.secret"
    added = tc("webhooks", "add", "soc", r.url, "--secret-file", str(secret_file), "--events", "roster.added,refused")
    assert added.returncode == 0, added.stderr
    secret = secret_file.read_text().strip()
    assert secret.startswith("whsec_") and secret not in added.stdout + added.stderr
    assert os.stat(secret_file).st_mode & 0o777 == 0o600
    again = tc("webhooks", "add", "soc", r.url, "--secret-file", str(tmp_path / "other.secret"))
    assert again.returncode == 2 and "exists" in again.stderr and not (tmp_path / "other.secret").exists()
    roster = tc("roster", "add", "site1", "sha256:" + "cd" * 32, "--name", "n9", "-m", str(REPO / "examples"))
    assert roster.returncode == 0, roster.stderr
    status = json.loads(tc("webhooks", "status", "--json").stdout)
    assert status[0]["pending"] == 1 and status[0]["name"] == "soc" and "secret" not in status[0]
    assert "soc" in tc("webhooks").stdout
    bad = tc("webhooks", "add", "x", "https://x", "--secret-file", str(tmp_path / "x"), "--events", "nope")
    assert bad.returncode == 2 and "unknown event type" in bad.stderr
    assert tc("webhooks", "remove", "soc").returncode == 0
    assert json.loads(tc("webhooks", "status", "--json").stdout) == []
