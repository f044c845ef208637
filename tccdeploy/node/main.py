"""The helper's loop: one JSON request per line in, one JSON response per line out."""

from __future__ import annotations

import hashlib
import json
import sys
import traceback
from typing import Any

from . import PROTOCOL, files, migrate, tpm, vm  # noqa: F401 - they register their operations
from .ops import OPS, OpError


def _own_digest() -> str:
    try:
        with open(sys.argv[0], "rb") as fh:
            return hashlib.sha256(fh.read()).hexdigest()
    except OSError:
        return ""


def handle(request: dict[str, Any]) -> dict[str, Any]:
    rid = request.get("id")
    name = request.get("op")
    func = OPS.get(name) if isinstance(name, str) else None
    if func is None:
        return {"id": rid, "ok": False, "error": {"type": "UnknownOp", "message": f"unknown operation {name!r}",
                                                  "traceback": ""}}
    try:
        result = func(**(request.get("args") or {}))
    except OpError as exc:
        return {"id": rid, "ok": False, "error": {"type": "OpError", "message": str(exc), "traceback": ""}}
    except Exception as exc:  # noqa: BLE001 - the engine gets every failure, with its traceback
        return {"id": rid, "ok": False, "error": {"type": type(exc).__name__, "message": str(exc),
                                                  "traceback": traceback.format_exc()}}
    return {"id": rid, "ok": True, "result": result}


def main() -> int:
    out = sys.stdout.buffer
    sys.stdout = sys.stderr  # nothing but protocol on the real stdout
    hello = {"hello": "tccdeploy-node", "protocol": PROTOCOL, "digest": _own_digest(),
             "python": sys.version.split()[0]}
    out.write(json.dumps(hello).encode() + b"\n")
    out.flush()
    for line in sys.stdin.buffer:
        if not line.strip():
            continue
        try:
            request = json.loads(line)
            if not isinstance(request, dict):
                raise ValueError("a request is a JSON object")
        except ValueError as exc:
            response = {"id": None, "ok": False, "error": {"type": "BadRequest", "message": str(exc), "traceback": ""}}
        else:
            response = handle(request)
        out.write(json.dumps(response, default=str).encode() + b"\n")
        out.flush()
    return 0
