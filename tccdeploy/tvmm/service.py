"""`tccdeploy-tvmm serve`: the service's loop on the node, one engine session per process.

The engine reaches it only through the forced command of the TVMM user's `authorized_keys`
(`restrict,command="tccdeploy-tvmm serve --config ..."`): whatever command the engine asks
SSH for, this runs. Each request names an operation of the interface and its arguments, which
must satisfy the operation's schema; anything else is refused with a reason, before any code
of the operation runs.
"""

from __future__ import annotations

import json
import sys
import traceback
from collections.abc import Callable
from dataclasses import replace
from typing import Any

from ..node.protocol import Answer, Incoming, Outgoing, failure, own_digest, serve
from . import PROTOCOL, config, daemon, migrate, runtime, suspend, tpm, vm  # noqa: F401 - they register their operations
from .interface import HANDLERS, OPERATIONS, ServiceError, problems

USAGE = """usage: tccdeploy-tvmm serve [--config FILE]
       tccdeploy-tvmm daemon --socket PATH [--config FILE]
       tccdeploy-tvmm schemas

The TVMM service, the node side of TCCP in the measured TVMM build. `serve` speaks the service's
protocol (one JSON request per line on stdin) and is what the TVMM user's authorized_keys forces;
`daemon` is the same service started once at boot: it listens on PATH (in a folder of the TVMM
user's with mode 0700) and forks one process per session, which runs what `serve` runs; the
forced command joins each SSH session to it. `schemas` prints the JSON schema of every operation.
FILE (root-owned) sets the node name, the TPM (TCTI), the state directory and the firmware event
log; without it, a real node's defaults."""


def _guarded(rid: Any, work: Callable[..., dict[str, Any]]) -> Callable[[Any], dict[str, Any]]:
    """A streaming operation's second half, answered as every operation is (a refusal by reason,
    never a dead session)."""

    def run(channel: Any) -> dict[str, Any]:
        try:
            return {"id": rid, "ok": True, "result": work(channel)}
        except ServiceError as exc:
            return failure(rid, "Refused", str(exc), reason=exc.reason)
        except Exception as exc:  # noqa: BLE001 - as handle() below
            return failure(rid, type(exc).__name__, str(exc)[:500], traceback.format_exc(limit=-3))

    return run


def handle(request: dict[str, Any]) -> Answer:
    rid = request.get("id")
    name, arguments = request.get("op"), request.get("args", {})
    unknown = set(request) - {"id", "op", "args"}
    if unknown:
        return failure(rid, "Refused", f"unknown field(s) {', '.join(sorted(map(str, unknown)))[:200]}",
                       reason="tvmm.request")
    if not isinstance(name, str) or name not in HANDLERS:
        return failure(rid, "Refused", f"the service has no operation {str(name)[:64]!r}", reason="tvmm.unknown-op")
    wrong = problems(OPERATIONS[name], arguments)
    if wrong:
        return failure(rid, "Refused", f"{name}: {'; '.join(wrong[:5])}", reason="tvmm.args")
    try:
        result = HANDLERS[name](**arguments)
    except ServiceError as exc:
        return failure(rid, "Refused", str(exc), reason=exc.reason)
    except Exception as exc:  # noqa: BLE001 - reported, never a dead session; no values, only the code path
        return failure(rid, type(exc).__name__, str(exc)[:500], traceback.format_exc(limit=-3))
    if isinstance(result, Outgoing):
        return replace(result, line={"id": rid, "ok": True, "result": result.line}, produce=_guarded(rid, result.produce))
    if isinstance(result, Incoming):
        return replace(result, line={"id": rid, "ok": True, "result": result.line}, consume=_guarded(rid, result.consume))
    return {"id": rid, "ok": True, "result": result}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["schemas"]:
        print(json.dumps(OPERATIONS, indent=2, sort_keys=True))
        return 0
    options = dict(zip(argv[1::2], argv[2::2], strict=False))
    allowed = {"serve": {"--config"}, "daemon": {"--config", "--socket"}}.get(argv[0] if argv else "")
    if allowed is None or len(argv) % 2 != 1 or len(options) != len(argv) // 2 or set(options) - allowed \
            or (argv[0] == "daemon" and "--socket" not in options):
        print(USAGE, file=sys.stderr)
        return 2
    try:
        settings = config.load(options.get("--config"))
    except config.ConfigError as exc:
        print(f"tccdeploy-tvmm: {exc}", file=sys.stderr)
        return 2
    config.use(settings)
    hello = {"hello": "tccdeploy-tvmm", "protocol": PROTOCOL, "node": settings.node, "digest": own_digest()}
    if argv[0] == "daemon":
        try:
            return daemon.run(options["--socket"], hello, handle)
        except daemon.DaemonError as exc:
            print(f"tccdeploy-tvmm: {exc}", file=sys.stderr)
            return 2
    return serve(hello, handle)
