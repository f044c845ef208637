"""The served API's dispatch: a request's (method, path) to its endpoint, through a dict for the
fixed paths and one compiled pattern per templated path.

Starlette's Router tries each of the fifty routes' patterns in turn, and Starlette wraps the
router in two middlewares the API has no use for (its endpoints catch every exception
themselves and answer it with a reason): measured with `py-spy --gil` on bench/tc_service.py,
that was about a tenth of the event loop's time per request, on the one core a `tc serve`
process has. Requests and responses stay Starlette's.
"""

from __future__ import annotations

import re
from collections.abc import Awaitable, Callable
from typing import Any

from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response

Endpoint = Callable[[Request], Awaitable[Response]]
_PARAMETER = re.compile(r"\{([a-z_]+)\}")


def pattern(path: str) -> re.Pattern[str]:
    """/v1/nodes/{name} -> a pattern whose named groups are the path's parameters, each one
    segment (Starlette's `str` convertor: no slash)."""
    out, at = "", 0
    for match in _PARAMETER.finditer(path):
        out += re.escape(path[at:match.start()]) + f"(?P<{match.group(1)}>[^/]+)"
        at = match.end()
    return re.compile(out + re.escape(path[at:]))


class Dispatch:
    """An ASGI application over (method, path template, endpoint) triples. An unknown path is a
    404, a known one asked with another method a 405 with Allow (as Starlette answers); HEAD is
    served by GET's endpoint."""

    def __init__(self, routes: list[tuple[str, str, Endpoint]]):
        self._fixed: dict[str, dict[str, Endpoint]] = {}
        templated: dict[str, dict[str, Endpoint]] = {}
        for method, path, endpoint in routes:
            table = templated if _PARAMETER.search(path) else self._fixed
            methods = table.setdefault(path, {})
            if method in methods:
                raise ValueError(f"{method} {path} is routed twice")
            methods[method] = endpoint
        self._templated = [(pattern(path), methods) for path, methods in templated.items()]

    def resolve(self, method: str, path: str) -> tuple[dict[str, Endpoint] | None, dict[str, str]]:
        """The endpoints of the route path matches (by method) and its parameters."""
        methods = self._fixed.get(path)
        if methods is not None:
            return methods, {}
        for compiled, methods in self._templated:
            match = compiled.fullmatch(path)
            if match:
                return methods, match.groupdict()
        return None, {}

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":  # lifespan is off and there are no websockets
            return
        methods, parameters = self.resolve(scope["method"], scope["path"])
        if methods is None:
            response: Response = PlainTextResponse("Not Found", status_code=404)
        else:
            endpoint = methods.get(scope["method"]) or (methods.get("GET") if scope["method"] == "HEAD" else None)
            if endpoint is None:
                allowed = sorted({*methods, "HEAD"} if "GET" in methods else methods)
                response = PlainTextResponse("Method Not Allowed", status_code=405, headers={"Allow": ", ".join(allowed)})
            else:
                scope["path_params"] = parameters
                response = await endpoint(Request(scope, receive, send))
        await response(scope, receive, send)
