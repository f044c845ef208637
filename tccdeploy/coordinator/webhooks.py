"""Webhooks: the TC's decisions delivered to the systems a security team already runs.

Events are the TC's own audit log, nothing else: every decision is written there in its own
transaction, so an event cannot be lost between a decision and its delivery, and no caller
(the provider's engine least of all) can add, hold back or reorder one. Each webhook keeps a
cursor into the log in the registry and delivers what follows it, oldest first, one event at a
time: at least once (a TC that stops between a delivery and its cursor's update sends that
event again, with the same id), in order (a failing receiver holds back the later events, with
backoff, 1 s doubling to 5 min), across restarts, and by one replica at a time (a lease).

Format: CloudEvents 1.0, structured JSON (`application/cloudevents+json`). Signature: the
Standard Webhooks scheme, HMAC-SHA256 over `id.timestamp.body` with the webhook's secret
(`webhook-id`, `webhook-timestamp`, `webhook-signature: v1,<base64>`), which receivers verify
with the standardwebhooks libraries or a few lines of their own.
"""

from __future__ import annotations

import base64
import datetime
import hashlib
import hmac
import json
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from .store import Registry

SPEC = "1.0"
CONTENT_TYPE = "application/cloudevents+json"
TYPE_PREFIX = "dev.tccdeploy."
# audit entry kind -> event type (after TYPE_PREFIX). Refusals (kind.refused) are "refused".
TYPES: dict[str, str] = {
    "quarantine": "node.quarantined",
    "node.release": "node.released",
    "node.replace-tpm": "node.tpm-replaced",
    "attestation": "node.attested",
    "key-release": "key.released",
    "release.expired": "key.release-expired",
    "launch": "vm.launched",
    "vm.state": "vm.state",
    "vm.off-by-reboot": "vm.off",
    "vm.enforce": "vm.enforced",
    "migration.start": "vm.migration.started",
    "migration.commit": "vm.migration.committed",
    "migration.abort": "vm.migration.aborted",
    "build.revoked": "build.revoked",
    "roster.add": "roster.added",
    "roster.remove": "roster.removed",
}
REFUSED = "refused"
CHECKPOINT = "audit.checkpoint"
# What a webhook gets unless told otherwise: what issue 19 names (quarantine, release, key release,
# launch, migration, build revoked, audit checkpoint) and every refusal.
DEFAULT_EVENTS = ["node.quarantined", "node.released", "key.released", "vm.launched", "vm.migration.started",
                  "vm.migration.committed", "vm.migration.aborted", "build.revoked", CHECKPOINT, REFUSED]
ALL_EVENTS = sorted({*TYPES.values(), REFUSED, CHECKPOINT})
BACKOFF_FIRST, BACKOFF_MAX = 1.0, 300.0
BATCH = 100
# A checkpoint event (the signed head) at most once a minute, or after this many entries: enough
# for a receiver to hold the TC to its chain, without one per delivery round.
CHECKPOINT_SECONDS, CHECKPOINT_ENTRIES = 60.0, 1000
LEASE = 15.0  # renewed before each event; longer than one POST's timeout (10 s)


class WebhookError(ValueError):
    """A webhook that cannot be added as asked: a bad URL, name or event type."""


def event_type(kind: str) -> str | None:
    if kind.endswith(".refused"):
        return REFUSED
    return TYPES.get(kind)


def new_secret() -> str:
    return "whsec_" + base64.b64encode(secrets.token_bytes(32)).decode()


def check(name: str, url: str, events: list[str]) -> None:
    if not name or not all(c.isalnum() or c in "-_." for c in name):
        raise WebhookError(f"webhook name {name!r}: use letters, digits, '-', '_' and '.'")
    if not url.startswith(("https://", "http://")) or "://" not in url or not url.split("://", 1)[1]:
        raise WebhookError(f"webhook URL {url!r} must be an http:// or https:// URL")
    unknown = [e for e in events if e != "*" and e not in ALL_EVENTS]
    if unknown:
        raise WebhookError(f"unknown event type(s) {', '.join(unknown)}; types are: {', '.join(ALL_EVENTS)} (or *)")


def cloudevent(entry: dict[str, Any], source: str) -> dict[str, Any]:
    """An audit entry as a CloudEvent: its id is the TC's and the entry's, stable across retries."""
    kind = str(entry["kind"])
    return {
        "specversion": SPEC, "id": f"{source.rsplit(':', 1)[-1][:16]}-{entry['id']}", "source": source,
        "type": TYPE_PREFIX + (event_type(kind) or kind), "subject": entry.get("node") or entry.get("vm") or "tc",
        "time": _rfc3339(float(entry["time"])), "datacontenttype": "application/json",
        "data": {"audit_id": int(entry["id"]), "kind": kind, "node": entry.get("node"), "vm": entry.get("vm"),
                 "hash": entry.get("hash"), **dict(entry.get("data") or {})},
    }


def checkpoint_event(entry: dict[str, Any], source: str) -> dict[str, Any]:
    """The signed head of the audit chain after a batch: receivers can hold the TC to it."""
    return {
        "specversion": SPEC, "id": f"{source.rsplit(':', 1)[-1][:16]}-checkpoint-{entry['id']}", "source": source,
        "type": TYPE_PREFIX + CHECKPOINT, "subject": "audit", "time": _rfc3339(float(entry["time"])),
        "datacontenttype": "application/json",
        "data": {"count": int(entry["id"]), "head": entry.get("hash"), "signature": entry.get("signature")},
    }


def _rfc3339(when: float) -> str:
    return datetime.datetime.fromtimestamp(when, datetime.UTC).isoformat().replace("+00:00", "Z")


def sign(secret: str, event_id: str, timestamp: int, body: bytes) -> str:
    """Standard Webhooks' v1 signature."""
    key = base64.b64decode(secret.removeprefix("whsec_"))
    mac = hmac.new(key, f"{event_id}.{timestamp}.".encode() + body, hashlib.sha256).digest()
    return "v1," + base64.b64encode(mac).decode()


def verify(secret: str, headers: dict[str, str], body: bytes, tolerance: float = 300.0, now: float | None = None) -> bool:
    """What a receiver checks (here for tests and for receivers written in Python): the signature,
    compared in constant time, and a timestamp close to now (no replay of an old delivery)."""
    try:
        timestamp = int(headers["webhook-timestamp"])
        expected = sign(secret, headers["webhook-id"], timestamp, body)
    except (KeyError, ValueError):
        return False
    if abs((time.time() if now is None else now) - timestamp) > tolerance:
        return False
    return any(hmac.compare_digest(expected, given) for given in headers.get("webhook-signature", "").split())


def backoff(attempts: int, first: float = BACKOFF_FIRST) -> float:
    return min(first * (2 ** max(attempts - 1, 0)), BACKOFF_MAX)


Post = Callable[[str, bytes, dict[str, str]], int]


def _post(url: str, body: bytes, headers: dict[str, str]) -> int:
    import httpx

    return httpx.post(url, content=body, headers=headers, timeout=10.0).status_code


@dataclass
class Deliverer:
    """One replica's delivery loop over every webhook (`tc serve` runs it in a thread)."""

    registry: Registry
    source: str
    owner: str
    post: Post = _post
    first_backoff: float = BACKOFF_FIRST
    checkpoint_seconds: float = CHECKPOINT_SECONDS

    def round(self, now: float | None = None) -> int:
        """Deliver what is due; the number of events delivered."""
        sent = 0
        for hook in self.registry.webhooks():
            if hook["next_at"] > (time.time() if now is None else now):
                continue
            if not self.registry.lease_webhook(hook["name"], self.owner, LEASE, _gone(hook.get("lease_owner"))):
                continue
            sent += self._deliver(hook)
        return sent

    def _deliver(self, hook: dict[str, Any]) -> int:
        wanted = set(hook["events"])
        cursor, delivered = int(hook["cursor"]), 0
        entries = self.registry.audit_after(cursor, BATCH)
        for entry in entries:
            kind_type = event_type(str(entry["kind"]))
            if "*" in wanted or kind_type in wanted:
                if not self.registry.lease_webhook(hook["name"], self.owner, LEASE):
                    break  # another replica took over (this one stalled): it delivers from the cursor
                error = self._send(hook, cloudevent(entry, self.source))
                if error is not None:
                    self._failed(hook, cursor, delivered, error)
                    return delivered
                delivered += 1
            cursor = int(entry["id"])
        if ("*" in wanted or CHECKPOINT in wanted) and self._checkpoint_due(int(hook["checkpoint"]), cursor):
            head = self.registry.audit_after(cursor - 1, 1)[0]  # the head the receiver got last
            error = self._send(hook, checkpoint_event(head, self.source))
            if error is not None:
                self._failed(hook, cursor, delivered, error)
                return delivered
            delivered += 1
            self.registry.webhook_progress(hook["name"], self.owner, cursor, delivered, checkpoint=cursor)
        elif entries:
            self.registry.webhook_progress(hook["name"], self.owner, cursor, delivered)
        return delivered

    def _checkpoint_due(self, previous: int, cursor: int) -> bool:
        """A new head to sign for, and a minute (or CHECKPOINT_ENTRIES entries) since the last one."""
        if cursor <= previous:
            return False
        if previous == 0 or cursor - previous >= CHECKPOINT_ENTRIES:
            return True
        before = self.registry.audit_after(previous - 1, 1)
        return not before or time.time() - float(before[0]["time"]) >= self.checkpoint_seconds

    def release(self) -> None:
        """Give up this replica's leases (a clean stop), so the next one delivers at once."""
        self.registry.release_webhook_leases(self.owner)

    def _failed(self, hook: dict[str, Any], cursor: int, delivered: int, error: str) -> None:
        if cursor > int(hook["cursor"]):  # keep what was delivered before the failure
            self.registry.webhook_progress(hook["name"], self.owner, cursor, delivered)
        attempts = int(hook["attempts"]) + 1 if cursor == int(hook["cursor"]) else 1
        self.registry.webhook_failed(hook["name"], self.owner, error, time.time() + backoff(attempts, self.first_backoff))

    def _send(self, hook: dict[str, Any], event: dict[str, Any]) -> str | None:
        body = json.dumps(event, sort_keys=True, separators=(",", ":")).encode()
        timestamp = int(time.time())
        headers = {"content-type": CONTENT_TYPE, "webhook-id": event["id"], "webhook-timestamp": str(timestamp),
                   "webhook-signature": sign(hook["secret"], event["id"], timestamp, body)}
        try:
            status = self.post(hook["url"], body, headers)
        except Exception as exc:  # noqa: BLE001 - any transport failure: retried with backoff
            return f"{type(exc).__name__}: {exc}"[:300]
        return None if 200 <= status < 300 else f"HTTP {status}"


def owner_name() -> str:
    """This process, as a lease holder: its machine and PID."""
    import os
    import socket

    return f"{socket.gethostname()}:{os.getpid()}"


def _gone(holder: str | None) -> str | None:
    """holder when it is a process of this machine that no longer runs (a TC stopped or killed
    and started again takes its webhooks back at once, not when the lease runs out)."""
    import os
    import socket

    if not holder or holder.rpartition(":")[0] != socket.gethostname():
        return None
    try:
        pid = int(holder.rpartition(":")[2])
        os.kill(pid, 0)
    except ProcessLookupError:
        return holder
    except (ValueError, PermissionError):
        return None
    return None


def status(registry: Registry, now: float | None = None) -> list[dict[str, Any]]:
    """Each webhook's delivery state, for `tc webhooks status`: what is pending and why."""
    head = registry.audit_head()
    out = []
    for hook in registry.webhooks():
        pending_entries = registry.audit_after(int(hook["cursor"]), 100000)
        wanted = set(hook["events"])
        pending = [e for e in pending_entries if "*" in wanted or event_type(str(e["kind"])) in wanted]
        oldest = float(pending[0]["time"]) if pending else None
        out.append({
            "name": hook["name"], "url": hook["url"], "events": hook["events"], "cursor": int(hook["cursor"]),
            "audit_head": head, "pending": len(pending), "delivered": int(hook["delivered"]),
            "oldest_pending_age": None if oldest is None else round((time.time() if now is None else now) - oldest, 1),
            "attempts": int(hook["attempts"]), "next_attempt": float(hook["next_at"]) or None,
            "last_error": hook["last_error"],
        })
    return out


__all__ = ["ALL_EVENTS", "DEFAULT_EVENTS", "Deliverer", "WebhookError", "check", "cloudevent", "new_secret", "sign",
           "status", "verify"]
