"""Webhooks' pure parts, each check with a test that fails without it (mutation testing found
them untested): the signature (Standard Webhooks' own reference vector), what verify refuses
(missing or bad headers, an old or future timestamp at the tolerance's edge, another id or
body), the names, URLs and types a webhook takes, the CloudEvent and checkpoint fields one by
one, the secret's form, delivery bookkeeping (status codes, backoff, leases) and the status."""

from __future__ import annotations

import base64
import json
import os
import socket
import subprocess
import time

import pytest

from tccdeploy.coordinator import audit, webhooks
from tccdeploy.coordinator.store import Registry

# Standard Webhooks' reference vector (the spec's libraries test it; standard-webhooks/standard-webhooks).
SECRET = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"
ID, TS, BODY = "msg_p5jXN8AQM9LWM0D4loKWxJek", 1614265330, b'{"test": 2432232314}'
SIGNATURE = "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE="


def headers(**changes: str) -> dict[str, str]:
    out = {"webhook-id": ID, "webhook-timestamp": str(TS), "webhook-signature": SIGNATURE}
    out.update(changes)
    return {k: v for k, v in out.items() if v != "-"}


def test_the_signature_is_standard_webhooks_reference_vector():
    assert webhooks.sign(SECRET, ID, TS, BODY) == SIGNATURE
    assert webhooks.sign(SECRET.removeprefix("whsec_"), ID, TS, BODY) == SIGNATURE  # the prefix is optional


@pytest.mark.parametrize("changed, ok", [
    ({}, True),
    ({"webhook-signature": f"v1,bm90LXRoaXM= {SIGNATURE}"}, True),  # one of several (a rotated secret)
    ({"webhook-signature": "-"}, False),
    ({"webhook-signature": ""}, False),
    ({"webhook-id": "-"}, False),
    ({"webhook-timestamp": "-"}, False),
    ({"webhook-timestamp": "soon"}, False),
    ({"webhook-id": "msg_other"}, False),
    ({"webhook-timestamp": str(TS + 1)}, False),
    ({"webhook-signature": SIGNATURE.replace("v1,", "v2,")}, False),
])
def test_verify_takes_only_a_signature_of_this_id_time_and_body(changed, ok):
    assert webhooks.verify(SECRET, headers(**changed), BODY, now=TS) is ok


def test_verify_refuses_another_body_or_secret():
    assert not webhooks.verify(SECRET, headers(), BODY + b" ", now=TS)
    assert not webhooks.verify(webhooks.new_secret(), headers(), BODY, now=TS)


def test_verify_refuses_a_delivery_outside_the_tolerance_either_way_and_takes_one_at_its_edge():
    assert webhooks.verify(SECRET, headers(), BODY, tolerance=300, now=TS + 300)
    assert webhooks.verify(SECRET, headers(), BODY, tolerance=300, now=TS - 300)
    assert not webhooks.verify(SECRET, headers(), BODY, tolerance=300, now=TS + 301)  # a replay of an old one
    assert not webhooks.verify(SECRET, headers(), BODY, tolerance=300, now=TS - 301)
    assert not webhooks.verify(SECRET, headers(), BODY)  # now: the clock, years after TS


def test_a_new_secret_is_32_random_bytes_in_the_standard_form():
    first, second = webhooks.new_secret(), webhooks.new_secret()
    assert first.startswith("whsec_") and first != second
    assert len(base64.b64decode(first.removeprefix("whsec_"), validate=True)) == 32


@pytest.mark.parametrize("name, url, events, ok", [
    ("soc-1_a.b", "https://siem.example/in", ["refused"], True),
    ("soc", "http://127.0.0.1:8080/", ["*"], True),
    ("", "https://x", ["refused"], False),
    ("s o c", "https://x", ["refused"], False),
    ("soc/x", "https://x", ["refused"], False),
    ("soc", "ftp://x", ["refused"], False),
    ("soc", "https://", ["refused"], False),
    ("soc", "http://", ["refused"], False),
    ("soc", "siem.example", ["refused"], False),
    ("soc", "https://x", ["node.quarantined", "nope"], False),
    ("soc", "https://x", ["**"], False),
])
def test_check_takes_names_urls_and_types_as_documented(name, url, events, ok):
    if ok:
        webhooks.check(name, url, events)
    else:
        with pytest.raises(webhooks.WebhookError):
            webhooks.check(name, url, events)


def test_an_unknown_type_is_named_with_the_list_of_types():
    with pytest.raises(webhooks.WebhookError, match=r"unknown event type\(s\) a, b; types are: audit\.checkpoint, build"):
        webhooks.check("soc", "https://x", ["a", "b"])


def test_event_types_map_audit_kinds_and_every_refusal():
    assert webhooks.event_type("quarantine") == "node.quarantined"
    assert webhooks.event_type("key-release.refused") == "refused"
    assert webhooks.event_type("launch") == "vm.launched"
    assert webhooks.event_type("something.else") is None


ENTRY = {"id": 42, "time": 1700000000.5, "kind": "quarantine", "node": "node3", "vm": "vm-9", "hash": "ab" * 32,
         "signature": "k:sig", "data": {"reason": "pcr.mismatch"}}
SOURCE = "urn:tccdeploy:tc:" + "0123456789abcdef" * 4


def test_a_cloudevent_carries_each_field_of_the_audit_entry():
    assert webhooks.cloudevent(ENTRY, SOURCE) == {
        "specversion": "1.0", "id": "0123456789abcdef-42", "source": SOURCE, "type": "dev.tccdeploy.node.quarantined",
        "subject": "node3", "time": "2023-11-14T22:13:20.500000Z", "datacontenttype": "application/json",
        "data": {"audit_id": 42, "kind": "quarantine", "node": "node3", "vm": "vm-9", "hash": "ab" * 32,
                 "reason": "pcr.mismatch"}}


def test_the_subject_is_the_node_else_the_vm_else_the_tc_and_an_unmapped_kind_keeps_its_name():
    assert webhooks.cloudevent(dict(ENTRY, node=None), SOURCE)["subject"] == "vm-9"
    assert webhooks.cloudevent(dict(ENTRY, node=None, vm=None), SOURCE)["subject"] == "tc"
    assert webhooks.cloudevent(dict(ENTRY, kind="other.kind"), SOURCE)["type"] == "dev.tccdeploy.other.kind"
    assert webhooks.cloudevent(dict(ENTRY, data=None), SOURCE)["data"]["audit_id"] == 42


def test_a_checkpoint_event_carries_the_signed_head():
    assert webhooks.checkpoint_event(ENTRY, SOURCE) == {
        "specversion": "1.0", "id": "0123456789abcdef-checkpoint-42", "source": SOURCE,
        "type": "dev.tccdeploy.audit.checkpoint", "subject": "audit", "time": "2023-11-14T22:13:20.500000Z",
        "datacontenttype": "application/json", "data": {"count": 42, "head": "ab" * 32, "signature": "k:sig"}}


class Receiver:
    """An in-process post function: answers from a script of status codes (or raises)."""

    def __init__(self, *answers: int | Exception):
        self.answers = list(answers)
        self.calls: list[tuple[str, bytes, dict[str, str]]] = []

    def __call__(self, url: str, body: bytes, headers: dict[str, str]) -> int:
        self.calls.append((url, body, headers))
        answer = self.answers.pop(0) if self.answers else 204
        if isinstance(answer, Exception):
            raise answer
        return answer


def hook(registry: Registry, events: list[str] | None = None, name: str = "soc") -> str:
    secret = webhooks.new_secret()
    assert registry.add_webhook(name, "https://siem.example/in", secret, events or ["*"], registry.audit_head())
    return secret


@pytest.mark.parametrize("status, delivered", [(200, True), (204, True), (299, True), (199, False), (300, False),
                                               (404, False), (503, False)])
def test_only_a_2xx_answer_counts_as_delivered(registry, status, delivered):
    hook(registry, ["node.quarantined"])
    registry.audit_append(audit.entry("quarantine", "n1", reason="x"))
    post = Receiver(status)
    sent = webhooks.Deliverer(registry, SOURCE, "tc-a", post=post).round()
    (state,) = webhooks.status(registry)
    assert sent == (1 if delivered else 0) and state["pending"] == (0 if delivered else 1)
    assert state["last_error"] == (None if delivered else f"HTTP {status}")


def test_each_delivery_has_the_standard_headers_and_a_body_that_verifies(registry):
    secret = hook(registry, ["node.quarantined"])
    registry.audit_append(audit.entry("quarantine", "n1", reason="x"))
    post = Receiver()
    before = int(time.time())
    webhooks.Deliverer(registry, SOURCE, "tc-a", post=post).round()
    ((url, body, sent),) = post.calls
    event = json.loads(body)
    assert url == "https://siem.example/in" and sent["content-type"] == "application/cloudevents+json"
    assert sent["webhook-id"] == event["id"] and before <= int(sent["webhook-timestamp"]) <= int(time.time())
    assert webhooks.verify(secret, sent, body)
    assert body == json.dumps(event, sort_keys=True, separators=(",", ":")).encode()


def test_a_transport_error_is_kept_short_and_retried_after_the_backoff(registry):
    hook(registry, ["node.quarantined"])
    registry.audit_append(audit.entry("quarantine", "n1", reason="x"))
    post = Receiver(ConnectionError("x" * 1000), ConnectionError("down"))
    deliverer = webhooks.Deliverer(registry, SOURCE, "tc-a", post=post, first_backoff=10.0)
    start = time.time()
    deliverer.round()
    (state,) = webhooks.status(registry)
    assert state["last_error"].startswith("ConnectionError: xxx") and len(state["last_error"]) == 300
    assert state["attempts"] == 1 and start + 9.5 <= state["next_attempt"] <= time.time() + 10.5
    assert deliverer.round() == 0 and len(post.calls) == 1  # not before its time
    assert deliverer.round(now=time.time() + 11) == 0 and len(post.calls) == 2
    (state,) = webhooks.status(registry)
    assert state["attempts"] == 2 and state["next_attempt"] >= time.time() + 19  # doubled
    assert deliverer.round(now=time.time() + 25) == 1
    (state,) = webhooks.status(registry)
    assert state["attempts"] == 0 and state["last_error"] is None and state["next_attempt"] is None


def test_what_was_delivered_before_a_failure_is_kept_and_attempts_start_again(registry):
    hook(registry, ["node.quarantined"])
    for n in ("n1", "n2", "n3"):
        registry.audit_append(audit.entry("quarantine", n, reason="x"))
    post = Receiver(204, 503)
    webhooks.Deliverer(registry, SOURCE, "tc-a", post=post).round()
    (state,) = webhooks.status(registry)
    assert state["delivered"] == 1 and state["pending"] == 2 and state["attempts"] == 1


def test_unsubscribed_entries_move_the_cursor_without_a_delivery(registry):
    hook(registry, ["vm.launched"])
    registry.audit_append(audit.entry("quarantine", "n1", reason="x"))
    post = Receiver()
    assert webhooks.Deliverer(registry, SOURCE, "tc-a", post=post).round() == 0 and not post.calls
    (state,) = webhooks.status(registry)
    assert state["cursor"] == state["audit_head"] and state["pending"] == 0


def test_a_checkpoint_is_sent_once_for_a_new_head_and_then_at_most_once_a_minute(registry):
    hook(registry, ["audit.checkpoint"])
    registry.audit_append(audit.entry("quarantine", "n1", reason="x"))
    post = Receiver()
    deliverer = webhooks.Deliverer(registry, SOURCE, "tc-a", post=post)
    assert deliverer.round() == 1 and deliverer.round() == 0  # the first head; none again without a new one
    registry.audit_append(audit.entry("quarantine", "n2", reason="x"))
    assert deliverer.round() == 0  # a new head, but within the minute
    eager = webhooks.Deliverer(registry, SOURCE, "tc-a", post=post, checkpoint_seconds=0.0)
    assert eager.round() == 1
    assert [json.loads(b)["data"]["count"] for _, b, _ in post.calls] == [1, 2]


def test_a_thousand_entries_bring_a_checkpoint_within_the_minute(registry, monkeypatch):
    monkeypatch.setattr(webhooks, "CHECKPOINT_ENTRIES", 3)
    hook(registry, ["audit.checkpoint"])
    registry.audit_append(audit.entry("quarantine", "n0", reason="x"))
    post = Receiver()
    deliverer = webhooks.Deliverer(registry, SOURCE, "tc-a", post=post)
    assert deliverer.round() == 1
    for n in range(2):
        registry.audit_append(audit.entry("quarantine", f"n{n + 1}", reason="x"))
    assert deliverer.round() == 0  # two entries on: not yet
    registry.audit_append(audit.entry("quarantine", "n3", reason="x"))
    assert deliverer.round() == 1  # three
    assert [json.loads(b)["data"]["count"] for _, b, _ in post.calls] == [1, 4]


def test_a_checkpoint_whose_sending_failed_is_sent_in_a_later_round(registry):
    hook(registry, ["audit.checkpoint"])
    registry.audit_append(audit.entry("quarantine", "n1", reason="x"))
    post = Receiver(503, 204)
    deliverer = webhooks.Deliverer(registry, SOURCE, "tc-a", post=post, first_backoff=0.0)
    assert deliverer.round() == 0
    assert deliverer.round(now=time.time() + 1) == 1
    assert [json.loads(b)["type"] for _, b, _ in post.calls] == ["dev.tccdeploy.audit.checkpoint"] * 2


def test_a_lease_held_by_another_live_replica_is_respected_and_ones_own_is_kept(registry):
    hook(registry, ["node.quarantined"])
    registry.audit_append(audit.entry("quarantine", "n1", reason="x"))
    assert registry.lease_webhook("soc", f"{socket.gethostname()}:{os.getpid()}", 300)
    post = Receiver()
    assert webhooks.Deliverer(registry, SOURCE, "tc-b", post=post).round() == 0 and not post.calls
    assert webhooks.Deliverer(registry, SOURCE, webhooks.owner_name(), post=post).round() == 1


def test_a_holder_is_gone_only_when_it_is_a_dead_process_of_this_machine():
    here = socket.gethostname()
    child = subprocess.Popen(["true"])
    child.wait()
    assert webhooks._gone(f"{here}:{child.pid}") == f"{here}:{child.pid}"
    assert webhooks._gone(f"{here}:{os.getpid()}") is None  # alive
    assert webhooks._gone(f"elsewhere:{child.pid}") is None  # another machine: cannot tell
    assert webhooks._gone(f"{here}:notapid") is None
    assert webhooks._gone(None) is None and webhooks._gone("") is None
    assert webhooks.owner_name() == f"{here}:{os.getpid()}"


def test_status_reports_the_backlog_of_subscribed_types_and_its_age(registry):
    hook(registry, ["node.quarantined"])
    registry.audit_append(audit.entry("quarantine", "n1", reason="x"))
    registry.audit_append(audit.entry("launch", "n1", "vm-1"))
    oldest = registry.audit_entries()[-2]["time"]
    (state,) = webhooks.status(registry, now=oldest + 12.34)
    assert state == {"name": "soc", "url": "https://siem.example/in", "events": ["node.quarantined"], "cursor": 0,
                     "audit_head": 2, "pending": 1, "delivered": 0, "oldest_pending_age": 12.3, "attempts": 0,
                     "next_attempt": None, "last_error": None}
    webhooks.Deliverer(registry, SOURCE, "tc-a", post=Receiver()).round()
    (state,) = webhooks.status(registry)
    assert state["pending"] == 0 and state["oldest_pending_age"] is None and state["delivered"] == 1


def test_backoff_starts_at_the_first_delay():
    assert webhooks.backoff(0) == webhooks.backoff(1) == 1.0
    assert webhooks.backoff(3, first=0.5) == 2.0


def test_a_webhook_backing_off_or_leased_elsewhere_does_not_hold_the_others_back(registry):
    hook(registry, ["node.quarantined"], name="a-slow")
    hook(registry, ["node.quarantined"], name="b-leased")
    hook(registry, ["node.quarantined"], name="c-fine")
    hook(registry, ["node.quarantined"], name="d-fine")
    registry.audit_append(audit.entry("quarantine", "n1", reason="x"))
    assert registry.lease_webhook("a-slow", "tc-a", 0)
    registry.webhook_failed("a-slow", "tc-a", "HTTP 503", time.time() + 300)
    assert registry.lease_webhook("b-leased", f"{socket.gethostname()}:{os.getpid()}", 300)
    post = Receiver()
    assert webhooks.Deliverer(registry, SOURCE, "tc-a", post=post).round() == 2  # c and d, one each
    assert sorted(s["name"] for s in webhooks.status(registry) if s["pending"] == 0) == ["c-fine", "d-fine"]


def test_a_checkpoint_is_not_sent_twice_for_the_same_head(registry):
    hook(registry, ["audit.checkpoint"])
    registry.audit_append(audit.entry("quarantine", "n1", reason="x"))
    post = Receiver()
    eager = webhooks.Deliverer(registry, SOURCE, "tc-a", post=post, checkpoint_seconds=0.0)
    assert eager.round() == 1 and eager.round() == 0 and len(post.calls) == 1


def test_a_failed_checkpoint_records_why(registry):
    hook(registry, ["audit.checkpoint"])
    registry.audit_append(audit.entry("quarantine", "n1", reason="x"))
    webhooks.Deliverer(registry, SOURCE, "tc-a", post=Receiver(502)).round()
    assert webhooks.status(registry)[0]["last_error"] == "HTTP 502"


def test_after_progress_a_failure_backs_off_from_the_first_delay_again(registry):
    hook(registry, ["node.quarantined"])
    registry.audit_append(audit.entry("quarantine", "n1", reason="x"))
    deliverer = webhooks.Deliverer(registry, SOURCE, "tc-a", post=Receiver(503, 503, 503), first_backoff=10.0)
    now = time.time()
    for step in range(3):
        deliverer.round(now=now + 1000 * step)
    assert webhooks.status(registry)[0]["attempts"] == 3
    registry.audit_append(audit.entry("quarantine", "n2", reason="x"))
    deliverer.post = Receiver(204, 503)  # the first goes through, the next fails
    before = time.time()
    deliverer.round(now=now + 10_000)
    state = webhooks.status(registry)[0]
    assert state["delivered"] == 1 and state["attempts"] == 1
    assert state["next_attempt"] <= before + 10.5  # backoff(1), not backoff(4) = 80 s
