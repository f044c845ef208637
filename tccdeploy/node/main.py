"""The admin helper's loop: the provider's own tool on its node (ping, command, copy, build
staging). It has no way to the TPM, the VMs or their keys: those belong to the TVMM service."""

from __future__ import annotations

import sys
import traceback
from typing import Any

from . import PROTOCOL, files  # noqa: F401 - files registers its operations
from .ops import OPS, OpError
from .protocol import failure, own_digest, serve


def handle(request: dict[str, Any]) -> dict[str, Any]:
    rid = request.get("id")
    name = request.get("op")
    func = OPS.get(name) if isinstance(name, str) else None
    if func is None:
        return failure(rid, "UnknownOp", f"unknown operation {name!r}")
    args = request.get("args") or {}
    if not isinstance(args, dict):
        return failure(rid, "BadRequest", "args is a JSON object")
    try:
        result = func(**args)
    except OpError as exc:
        return failure(rid, "OpError", str(exc))
    except Exception as exc:  # noqa: BLE001 - the engine gets every failure, with its traceback
        return failure(rid, type(exc).__name__, str(exc), traceback.format_exc())
    return {"id": rid, "ok": True, "result": result}


def main() -> int:
    hello = {"hello": "tccdeploy-node", "protocol": PROTOCOL, "digest": own_digest(),
             "python": sys.version.split()[0]}
    return serve(hello, handle)
