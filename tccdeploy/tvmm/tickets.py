"""The service's side of TC tickets: one is honoured only if the TC CA pinned with this node's
trusted key signed it with its ticket key, it names this node and this TK, it has not expired,
and it was never used here before (the used ids are kept in the service's state, so a ticket
replayed after a restart is still refused).

The record is read, changed and written under one lock across the service's processes (one per
engine session): two sessions spending at once each wrote back what it had read, and one
ticket's record was lost, spendable again within its life (found in review). Ids are kept a week
past their expiry; the newest expiry ever forgotten is kept for good (the horizon), and a ticket
expiring at or before it is refused whatever the clock says: the node's clock is the provider's
to move, forward to have an id forgotten and back to spend it again. The same record keeps what
may happen once per request or suspension on this node (`remember`)."""

from __future__ import annotations

import fcntl
import json
import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

from ..crypto.files import atomic_write
from ..crypto.ticket import TicketError, verify
from . import config
from .interface import ServiceError
from .tpm import trusted_key

USED_FILE = "tickets-used.json"
LOCK_FILE = "tickets.lock"
KEEP_AFTER_EXPIRY = 7 * 24 * 3600  # an expired ticket is refused anyway; its id is kept a while longer
FOREVER = 2**62  # an expiry for what is remembered for good (a launch, a resume): another ticket of the
# same request or suspension may expire after the one that did it, past any horizon (found in review)


@dataclass
class _Record:
    used: dict[str, int] = field(default_factory=dict)  # ticket id -> its expiry
    once: dict[str, int] = field(default_factory=dict)  # what happened once here -> the expiry it is kept by
    horizon: int = 0  # the newest expiry forgotten: tickets expiring no later are refused

    def prune(self, now: float) -> None:
        for table in (self.used, self.once):
            for key, expires in list(table.items()):
                if expires <= now - KEEP_AFTER_EXPIRY:
                    del table[key]
                    self.horizon = max(self.horizon, int(expires))

    def encode(self) -> bytes:
        return json.dumps({"v": 2, "used": self.used, "once": self.once, "horizon": self.horizon}).encode()


def _read() -> _Record:
    data = config.read_record(USED_FILE, "used tickets")
    if data is None:
        return _Record()
    try:
        if isinstance(data, dict) and data.get("v") == 2:
            return _Record({str(k): int(v) for k, v in data["used"].items()},
                           {str(k): int(v) for k, v in data["once"].items()}, int(data["horizon"]))
        if isinstance(data, dict):  # the first form: ids and expiries only
            return _Record({str(k): int(v) for k, v in data.items()})
    except (KeyError, TypeError, ValueError, AttributeError):
        pass
    raise ServiceError("tvmm.state", "the service's record of used tickets is unreadable")


@contextmanager
def _locked() -> Iterator[_Record]:
    """The record, read under the lock every writer takes; what the block changes is written
    back (durably, 0600) before the lock goes."""
    fd = os.open(config.current().path(LOCK_FILE), os.O_CREAT | os.O_RDWR | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        record = _read()
        before = record.encode()
        yield record
        if record.encode() != before:
            atomic_write(config.current().path(USED_FILE), record.encode(), 0o600)
    finally:
        os.close(fd)


def check(envelope: dict[str, Any], kind: str) -> dict[str, Any]:
    """The ticket's body if this node may act on it now; ServiceError with the reason otherwise."""
    tk_name, ca = trusted_key()
    try:
        body = verify(envelope, ca)
    except TicketError as exc:
        raise ServiceError(exc.reason, str(exc)) from None
    if body["kind"] != kind:
        raise ServiceError("ticket.kind", f"a {body['kind']} ticket does not allow a {kind}")
    if body["node"] != config.current().node:
        raise ServiceError("ticket.node", f"the ticket is for {body['node']}, not for this node")
    if bytes.fromhex(body["tk_name"]) != tk_name:
        raise ServiceError("ticket.tk", "the ticket is for another trusted key than this node's")
    _unused(_read(), body)
    return body


def _unused(record: _Record, body: dict[str, Any]) -> None:
    if body["id"] in record.used:
        raise ServiceError("ticket.replayed", "this ticket was used on this node already")
    if int(body["expires"]) <= record.horizon:
        raise ServiceError("ticket.horizon", "this ticket expires before tickets this node no longer lists as used: "
                                             "it may have been used (is the node's clock right?)")


def spend(body: dict[str, Any]) -> None:
    """Record the ticket as used, before its key is unwrapped."""
    with _locked() as record:
        _unused(record, body)
        record.prune(time.time())
        record.used[body["id"]] = int(body["expires"])


def remembered(key: str) -> bool:
    """Whether key was remembered here (and not forgotten a week after its expiry)."""
    return key in _read().once


def remember(key: str, expires: int) -> None:
    """Keep key (something done once here) until a week past expires (FOREVER: for good, as a
    request launched and a suspension resumed are kept); ServiceError tvmm.done if it is kept
    already (another session did it)."""
    with _locked() as record:
        if key in record.once:
            raise ServiceError("tvmm.done", f"{key} was done on this node already")
        record.prune(time.time())
        record.once[key] = int(expires)
