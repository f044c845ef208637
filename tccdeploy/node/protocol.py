"""The wire the admin helper and the TVMM service share: one JSON request per line on stdin,
one JSON response per line on stdout, a greeting line first.

Kept in one place so both ends frame, answer and fail the same way; what each side accepts is
its own business (the admin helper is the provider's tool; the service checks every argument).
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from typing import Any, BinaryIO

MAX_REQUEST = 8 * 1024 * 1024  # one line; a migration chunk is at most 4 MiB of base64

Handler = Callable[[dict[str, Any]], dict[str, Any]]


def own_digest() -> str:
    """The sha256 of the file this program runs from (the helper's upload; the service's measured
    artifact), for its greeting."""
    import hashlib

    try:
        with open(sys.argv[0], "rb") as fh:
            return hashlib.sha256(fh.read()).hexdigest()
    except OSError:
        return ""


def failure(rid: Any, kind: str, message: str, traceback: str = "", reason: str = "") -> dict[str, Any]:
    error = {"type": kind, "message": message, "traceback": traceback}
    if reason:
        error["reason"] = reason
    return {"id": rid, "ok": False, "error": error}


def serve(hello: dict[str, Any], handle: Handler, stdin: BinaryIO | None = None, stdout: BinaryIO | None = None) -> int:
    """Greet, then answer each request line until stdin closes. stdout carries nothing but the
    protocol: anything else the process prints goes to stderr."""
    out = stdout or sys.stdout.buffer
    source = stdin or sys.stdin.buffer
    sys.stdout = sys.stderr
    out.write(json.dumps(hello).encode() + b"\n")
    out.flush()
    while True:
        line = source.readline(MAX_REQUEST + 1)
        if not line:
            return 0
        if len(line) > MAX_REQUEST and not line.endswith(b"\n"):
            while line and not line.endswith(b"\n"):  # skip the rest of the oversized line
                line = source.readline(MAX_REQUEST)
            response = failure(None, "BadRequest", f"a request is at most {MAX_REQUEST} bytes")
        elif not line.strip():
            continue
        else:
            try:
                request = json.loads(line)
                if not isinstance(request, dict):
                    raise ValueError("a request is a JSON object")
            except (ValueError, RecursionError) as exc:
                response = failure(None, "BadRequest", str(exc)[:200])
            else:
                response = handle(request)
        out.write(json.dumps(response, default=str).encode() + b"\n")
        out.flush()
