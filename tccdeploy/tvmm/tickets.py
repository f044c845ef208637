"""The service's side of TC tickets: one is honoured only if the TC CA pinned with this node's
trusted key signed it with its ticket key, it names this node and this TK, it has not expired,
and it was never used here before (the used ids are kept in the service's state, so a ticket
replayed after a restart is still refused)."""

from __future__ import annotations

import json
import time
from typing import Any

from ..crypto.files import atomic_write
from ..crypto.ticket import TicketError, verify
from . import config
from .interface import ServiceError
from .tpm import trusted_key

USED_FILE = "tickets-used.json"
KEEP_AFTER_EXPIRY = 7 * 24 * 3600  # an expired ticket is refused anyway; its id is kept a while longer


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
    if body["id"] in _used():
        raise ServiceError("ticket.replayed", "this ticket was used on this node already")
    return body


def spend(body: dict[str, Any]) -> None:
    """Record the ticket as used, before its key is unwrapped."""
    used = _used()
    if body["id"] in used:
        raise ServiceError("ticket.replayed", "this ticket was used on this node already")
    now = time.time()
    used = {k: v for k, v in used.items() if v > now - KEEP_AFTER_EXPIRY}
    used[body["id"]] = int(body["expires"])
    atomic_write(config.current().path(USED_FILE), json.dumps(used).encode(), 0o600)


def _used() -> dict[str, int]:
    data = config.read_record(USED_FILE, "used tickets")
    return data if isinstance(data, dict) else {}
