"""The TC's HTTPS API (`tc serve`): the embedded coordinator's methods as versioned routes.

Engines authenticate with client certificates the TC issued (`tc engines add`), checked on
every request against the registry, so a removed engine is refused at once. Every body is
checked before anything else happens: size (413), content type (415), JSON (400), schema with
unknown fields refused (400); a refusal by the TC is a 403 carrying its reason code; nothing of
this changes state, and no error is a 500 unless the TC itself is broken.

When the TC cannot decide, it says so instead of failing bare: a database outage or a full disk
is a 503 with `store.unavailable` or `store.full` and a Retry-After (with `--fronts`, a decision
process gone is `service.decision-lost`), and so is every state change
while the wall clock is behind a time the service saw (`clock.backwards`); `/readyz` answers
from a real write and from those, so a balancer sends work to a replica that can take it.
"""

from __future__ import annotations

import asyncio
import binascii
import functools
import json
import re
import threading
import time
from collections import defaultdict
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import fastjsonschema
from cryptography import x509
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse as StarletteJSON
from starlette.responses import PlainTextResponse, Response

from .. import __version__
from .admission import AdmissionRefused
from .db import store_failure
from .enrollment import EnrollmentRefused
from .health import Health, retry_after
from .keybroker import Refused
from .refusals import engine_revoked
from .routing import Dispatch
from .service import Coordinator
from .store import RegistryError
from .tls import engine_name
from .wire import SCHEMAS, b64, evidence_from_wire, unb64

MAX_BODY = 8 * 1024 * 1024  # an event log of a real machine is well under 1 MiB
MAX_DEPTH = 400  # every body the TC takes is a few levels deep; deeper is only an attack on the parser
_STRUCTURE = re.compile(rb'[\[\]{}"\\]')


# What a 503 says for each outage: whether anything was decided, and what the client does
OUTAGES = {
    "store.unavailable": "the TC's database does not answer: nothing was decided; try again",
    "store.full": "the TC's disk is full: nothing was decided; the operator frees space",
    "service.decision-lost": "the TC's decision process stopped while this request was in it or waiting for it: it "
                             "may have been decided before it stopped; ask again once the TC is back, which answers "
                             "from its records (what was decided stands)",
}
INT_LIMIT = 1 << 63  # what a BIGINT holds: larger numbers are refused before they meet the database


def hostile_value(value: Any) -> tuple[str, str] | None:
    """(reason, message) when a parsed value holds what no field of the TC takes and the
    databases or the UTF-8 encoders choke on: a lone surrogate or a NUL in any text (keys
    included), or an integer beyond 64 bits; None otherwise. Checked before any code reads it."""
    stack = [value]
    while stack:
        item = stack.pop()
        if isinstance(item, str):
            if "\x00" in item:
                return "request.text", "text with a NUL character"
            try:
                item.encode("utf-8")
            except UnicodeEncodeError:
                return "request.text", "text with a lone surrogate (not Unicode text)"
        elif isinstance(item, bool):
            continue
        elif isinstance(item, int):
            if not -INT_LIMIT < item < INT_LIMIT:
                return "request.integer", "an integer beyond 64 bits"
        elif isinstance(item, dict):
            stack.extend(item.keys())
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)
    return None


def too_deep(body: bytes, limit: int) -> bool:
    """Whether JSON text nests arrays and objects deeper than limit (strings skipped), checked
    before parsing so no parser recurses into it. Only bodies with that many brackets at all
    are scanned, and the scan stops at the first level past the limit."""
    if body.count(b"[") + body.count(b"{") <= limit:
        return False
    depth, in_string, escaped_at = 0, False, -1
    for match in _STRUCTURE.finditer(body):
        char, at = match.group(), match.start()
        if in_string:
            if at == escaped_at:  # the character after a backslash, whatever it is
                continue
            if char == b"\\":
                escaped_at = at + 1
            elif char == b'"':
                in_string = False
            continue
        if char == b'"':
            in_string = True
        elif char in (b"[", b"{"):
            depth += 1
            if depth > limit:
                return True
        elif char in (b"]", b"}"):
            depth -= 1
    return False


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a JSON number")
BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)


@functools.lru_cache(maxsize=256)
def _engine_of(der: bytes) -> tuple[str | None, str]:
    """(engine name or None, serial in hex) of a client certificate TLS verified, parsed once
    per certificate rather than on every request of its connection."""
    cert = x509.load_der_x509_certificate(der)
    return engine_name(cert), format(cert.serial_number, "x")


class JSONResponse(StarletteJSON):
    """JSON out, with anything else (timestamps from the registry, say) as text rather than a 500."""

    def render(self, content: Any) -> bytes:
        return json.dumps(content, default=str, separators=(",", ":")).encode()


class ApiError(Exception):
    def __init__(self, status: int, code: str, message: str, retry_after: int | None = None):
        super().__init__(message)
        self.status, self.code, self.retry_after = status, code, retry_after


class Metrics:
    """Prometheus counters and latency histograms, kept in memory (one service process)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.counters: dict[tuple[str, tuple[tuple[str, str], ...]], float] = defaultdict(float)
        self.latency: dict[str, list[float]] = {}

    def count(self, name: str, value: float = 1.0, **labels: str) -> None:
        with self._lock:
            self.counters[(name, tuple(sorted(labels.items())))] += value

    def observe(self, route: str, seconds: float) -> None:
        with self._lock:
            entry = self.latency.setdefault(route, [0.0] * (len(BUCKETS) + 2))
            for i, bound in enumerate(BUCKETS):
                if seconds <= bound:
                    entry[i] += 1
            entry[-2] += 1
            entry[-1] += seconds

    def take(self) -> tuple[dict[Any, float], dict[str, list[float]]]:
        """What was counted since the last take, and start again (a `tc serve` front hands it to
        its decision process, which renders every front's sum: fronts.FrontMetrics)."""
        with self._lock:
            taken = dict(self.counters), self.latency
            self.counters, self.latency = defaultdict(float), {}
        return taken

    def merge(self, taken: tuple[dict[Any, float], dict[str, list[float]]]) -> None:
        counters, latency = taken
        with self._lock:
            for key, value in counters.items():
                self.counters[key] += value
            for route, entry in latency.items():
                mine = self.latency.setdefault(route, [0.0] * (len(BUCKETS) + 2))
                for i, value in enumerate(entry):
                    mine[i] += value

    def render(self) -> str:
        lines = []
        with self._lock:
            names = sorted({name for name, _ in self.counters})
            for name in names:
                lines.append(f"# TYPE {name} counter")
                for (n, labels), value in sorted(self.counters.items()):
                    if n == name:
                        text = ",".join(f'{k}="{v}"' for k, v in labels)
                        lines.append(f"{name}{{{text}}} {value:g}" if text else f"{name} {value:g}")
            lines.append("# TYPE tccdeploy_http_request_seconds histogram")
            for route, entry in sorted(self.latency.items()):
                for i, bound in enumerate(BUCKETS):
                    lines.append(f'tccdeploy_http_request_seconds_bucket{{route="{route}",le="{bound}"}} {entry[i]:g}')
                lines.append(f'tccdeploy_http_request_seconds_bucket{{route="{route}",le="+Inf"}} {entry[-2]:g}')
                lines.append(f'tccdeploy_http_request_seconds_count{{route="{route}"}} {entry[-2]:g}')
                lines.append(f'tccdeploy_http_request_seconds_sum{{route="{route}"}} {entry[-1]:.6f}')
        return "\n".join(lines) + "\n"


# The scope key under which the server's protocol puts the client certificate (DER) its TLS
# verified for the request's own connection (server.protocol_for), or None.
CLIENT_CERTIFICATE = "tccdeploy.client_certificate"
Handler = Callable[[Request], Awaitable[Any]]
_VALIDATORS = {name: fastjsonschema.compile(schema) for name, schema in SCHEMAS.items()}


class Api:
    """The routes, over one Coordinator (its registry is shared by the worker threads)."""

    def __init__(self, coordinator: Coordinator, max_body: int = MAX_BODY, threads: int = 4):
        self.tc = coordinator
        # Decisions run on a few threads, first in, first out: they all wait on one database and
        # one GIL, and forty threads (anyio's default) take turns where a decision's latency grows
        # with everybody else's. A plain executor, not anyio's: a fifth of the hop's cost.
        self._threads = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="tc-decision")
        self.max_body = max_body
        self.metrics = Metrics()
        self.health = Health()
        self.routes: list[tuple[str, str, str, str | None, bool, Handler]] = [
            # (method, path, summary, body schema, engine only, handler)
            ("GET", "/healthz", "liveness: the process answers", None, False, self.healthz),
            ("GET", "/readyz", "readiness: the registry answers", None, False, self.readyz),
            ("GET", "/metrics", "Prometheus metrics", None, False, self.prometheus),
            ("GET", "/openapi.json", "this API's OpenAPI description", None, False, self.openapi),
            ("GET", "/v1/status", "the TC's fingerprint, version and node counts", None, False, self.status),
            ("GET", "/v1/certificate", "the TC's CA and key-wrapping certificates (PEM), for customers", None, False,
             self.certificate),
            ("GET", "/v1/policy", "what a quote must cover, and the sites' asset-tag NV indices", None, True, self.policy),
            ("POST", "/v1/enrollments", "begin enrollment: EK certificate checked, credential for the AK", "EnrollmentBegin",
             True, self.enrollment_begin),
            ("POST", "/v1/enrollments/finish", "finish enrollment with the activated credential", "EnrollmentFinish", True,
             self.enrollment_finish),
            ("POST", "/v1/nonces", "a fresh single-use nonce for a node", "NonceRequest", True, self.nonce),
            ("POST", "/v1/attestations", "submit evidence; the TC's verdict with every reason", "Attestation", True,
             self.attestation),
            ("POST", "/v1/admissions", "begin admission: the TK checked, a challenge only it can open", "AdmissionBegin",
             True, self.admission_begin),
            ("POST", "/v1/admissions/finish", "finish admission: the node certificate", "AdmissionFinish", True,
             self.admission_finish),
            ("GET", "/v1/nodes", "the registry's nodes with their last verdicts", None, True, self.nodes),
            ("POST", "/v1/enrollments/check", "would this TPM be enrolled? (changes nothing)", "EkCheck", True, self.ek_check),
            ("POST", "/v1/perimeter/check", "is this site and address inside the perimeter? (changes nothing)",
             "PerimeterCheck", True, self.perimeter_check),
            ("GET", "/v1/nodes/{name}/identity", "which TPM a node is enrolled with", None, True, self.identity),
            ("GET", "/v1/nodes/{name}/ear", "the node's latest verdict (?attestation=ID: that one) as an EAR: a JWT "
             "signed by the TC's ear key (RATS EAT Attestation Result, AR4SI trust vector)", None, True, self.ear),
            ("GET", "/v1/nodes/{name}/admission", "does the node need admitting again after ?attestation=ID", None, True,
             self.admission_needed),
            ("GET", "/v1/audit", "audit log entries (?node=, ?vm=, ?since=), to verify the chain client-side", None, True,
             self.audit),
            ("GET", "/v1/builds", "the TVMM builds the TC knows: name, version, status", None, True, self.builds),
            ("GET", "/v1/vms", "VMs (?all=1: with destroyed ones)", None, True, self.vms),
            ("GET", "/v1/vms/{name}", "one VM", None, True, self.vm),
            ("POST", "/v1/vms/{vm_id}/state", "record a VM paused (stopped) or running again", "VmState", True,
             self.vm_state),
            ("POST", "/v1/vms/{vm_id}/end-ticket", "an end ticket (poweroff, destroy) for the VM's copy on a node",
             "VmEndTicket", True, self.vm_end_ticket),
            ("POST", "/v1/vms/{vm_id}/ended", "the VM ended: its node's TPM evidence answering the end ticket", "VmEnded",
             True, self.vm_ended),
            ("POST", "/v1/vms/{vm_id}/enforcement", "record what enforcement did to a VM", "Enforcement", True,
             self.enforcement),
            ("POST", "/v1/requests", "submit a signed placement request with its signed image descriptor", "RequestSubmit",
             False, self.request_submit),
            ("GET", "/v1/requests/{id}", "a request as the engine sees it (no key)", None, True, self.request_get),
            ("POST", "/v1/requests/{id}/release", "release the VM key to a trusted node's TK, once", "Release", True,
             self.release),
            ("POST", "/v1/requests/{id}/launched", "the VM runs: record it and sign the receipt", "Launched", True,
             self.launched),
            ("POST", "/v1/requests/{id}/failed", "the launch failed", "Empty", True, self.request_failed),
            ("POST", "/v1/requests/{id}/status", "the customer: the request's state (signed query)", "CustomerQuery", False,
             self.customer_status),
            ("POST", "/v1/requests/{id}/receipt", "the customer: the signed receipt (signed query)", "CustomerQuery", False,
             self.customer_receipt),
            ("GET", "/v1/migrations", "migrations (?state=started)", None, True, self.migrations),
            ("POST", "/v1/migrations", "begin a migration: destination checked, key re-wrapped to its TK", "MigrationBegin",
             True, self.migration_begin),
            ("POST", "/v1/migrations/{id}/end", "commit or abort a migration: the settle tickets for its two ends",
             "MigrationEnd", True, self.migration_end),
            ("GET", "/v1/migrations/{id}/settlement", "an ended migration's settle tickets, again", None, True,
             self.migration_settlement),
            ("POST", "/v1/suspensions", "suspend a VM: its suspend ticket (a fresh Ksus for its node's TK)",
             "SuspendBegin", True, self.suspend_begin),
            ("POST", "/v1/suspensions/{id}/end", "the VM saved (its node's TPM evidence), or the suspension dropped",
             "SuspendEnd", True, self.suspend_end),
            ("POST", "/v1/resumes", "a resume ticket for a suspended VM, to one trusted node, once", "ResumeBegin", True,
             self.resume_begin),
            ("POST", "/v1/suspensions/{id}/resumed", "the VM runs again: the resume node's TPM evidence", "Resumed",
             True, self.resumed),
            ("GET", "/v1/nodes/{name}", "one node and its attestation history", None, True, self.node),
            ("POST", "/v1/nodes/{name}/quarantine", "quarantine a node (its certificate revoked)", "Quarantine", True,
             self.quarantine),
            ("POST", "/v1/leases", "lease nodes to the calling engine for its round (engines sharing a fleet)",
             "NodeLeases", True, self.lease_nodes),
            ("POST", "/v1/leases/end", "end the calling engine's leases on nodes", "NodeLeasesEnd", True,
             self.release_leases),
        ]

    # -- plumbing --------------------------------------------------------------------------
    def app(self) -> Dispatch:
        return Dispatch([(method, path, self._wrap(method, path, schema, engine_only, handler))
                         for method, path, _, schema, engine_only, handler in self.routes])

    def _wrap(self, method: str, path: str, schema: str | None, engine_only: bool, handler: Handler):  # type: ignore[no-untyped-def]
        acts = method == "POST" and not path.endswith("/check")  # a state change (the checks change nothing)

        async def endpoint(request: Request) -> Response:
            start = time.perf_counter()
            try:
                clock = self.health.clock() if acts else None
                if clock is not None:
                    self.metrics.count("tccdeploy_refusals_total", reason=clock.reason)
                    raise ApiError(503, clock.reason, clock.message, clock.retry_after)
                for where, value in [*request.path_params.items(), *request.query_params.multi_items()]:
                    problem = hostile_value(value)
                    if problem:
                        raise ApiError(400, problem[0], f"{where}: {problem[1]}")
                request.state.engine_unchecked = None
                if engine_only:
                    request.state.engine = self._engine(request)
                try:
                    if schema is not None:
                        request.state.body = await self._body(request, schema)
                    result = await handler(request)
                finally:
                    if request.state.engine_unchecked is not None:  # no decision ran (or it failed before): check now
                        await self._run(self._engine_allowed, request)
                response = result if isinstance(result, Response) else JSONResponse(result)
                if acts:
                    self.health.store_wrote()
            except ApiError as exc:
                response = JSONResponse({"error": exc.code, "message": str(exc)}, status_code=exc.status)
                if exc.retry_after is not None:
                    response.headers["Retry-After"] = str(exc.retry_after)
            except (EnrollmentRefused, AdmissionRefused, Refused) as exc:
                self.metrics.count("tccdeploy_refusals_total", reason=exc.reason)
                response = JSONResponse({"error": exc.reason, "message": str(exc)}, status_code=403)
            except Exception as exc:  # noqa: BLE001 - the store failing is news for the client; anything else is a bug
                response = self._failure(method, path, exc)
            self.metrics.observe(path, time.perf_counter() - start)
            self.metrics.count("tccdeploy_http_requests_total", route=path, status=str(response.status_code))
            return response

        return endpoint

    def _failure(self, method: str, path: str, exc: Exception) -> Response:
        """503 with its reason and Retry-After when the store cannot take the request now (nothing
        was decided: the decision and its audit entry were one transaction) or the decision process
        is gone (which may have decided first); else a 500 that says only that it is the TC's
        fault (the details go to the service's log, not to the client)."""
        import sys
        import traceback

        reason = store_failure(exc)
        if reason is None:
            self.metrics.count("tccdeploy_internal_errors_total", route=path)
            print(f"tc serve: {method} {path}: internal error\n{traceback.format_exc()}", file=sys.stderr, flush=True)
            return JSONResponse({"error": "internal", "message": "the TC failed on this request; its log says why"},
                                status_code=500)
        message = OUTAGES.get(reason, OUTAGES["store.unavailable"])
        self.health.store_failed(reason, f"{type(exc).__name__}")
        self.metrics.count("tccdeploy_store_failures_total", reason=reason)
        print(f"tc serve: {method} {path}: {reason} ({type(exc).__name__})", file=sys.stderr, flush=True)
        response = JSONResponse({"error": reason, "message": message}, status_code=503)
        response.headers["Retry-After"] = str(retry_after(reason))
        return response

    def _engine(self, request: Request) -> str:
        """The engine's name from its verified client certificate. Whether the registry still
        lists the certificate is a database read, so it is left to the worker thread that runs the
        request's decision, just before it (`_decide`), or to the end of a route that has none:
        on the event loop it would hold every other connection for a database round trip (and
        for the connection timeout when the database is down)."""
        der = request.scope.get(CLIENT_CERTIFICATE)
        if not der:
            raise ApiError(401, "auth.engine-certificate", "this route needs an engine's client certificate "
                                                           "(tccdeploy tc engines add NAME)")
        name, serial = _engine_of(der)
        if name is None:
            raise ApiError(403, "auth.not-an-engine", "the client certificate is not an engine certificate of this TC")
        request.state.engine_unchecked = (name, serial)
        return name

    def _engine_allowed(self, request: Request) -> None:
        """In a worker thread: refuse an engine certificate the operator removed (or never issued)."""
        pending = request.state.engine_unchecked
        if pending is None:
            return
        name, serial = pending
        if not self.tc.engine_allowed(serial):
            raise engine_revoked(name)
        request.state.engine_unchecked = None

    async def _run(self, work: Callable[..., Any], *args: Any) -> Any:
        """work(*args) on a decision thread, its result or exception back on the event loop."""
        return await asyncio.get_running_loop().run_in_executor(self._threads, functools.partial(work, *args))

    async def _decide(self, request: Request, decision: Callable[..., Any], *args: Any) -> Any:
        """Run a decision of the TC in a worker thread, the engine's certificate checked against
        the registry first in that same thread (one hop, off the event loop)."""

        def checked() -> Any:
            pending = request.state.engine_unchecked
            as_engine = getattr(decision, "as_engine", None)
            if pending is None or as_engine is None:
                self._engine_allowed(request)
                return decision(*args)
            # a front (fronts.RemoteCall): the check and the decision in one round trip
            try:
                result = as_engine(pending, *args)
            except Refused as exc:
                if exc.reason != "auth.engine-revoked":  # checked, then refused for itself
                    request.state.engine_unchecked = None
                raise
            request.state.engine_unchecked = None
            return result

        return await self._run(checked)

    async def _body(self, request: Request, schema: str) -> dict[str, Any]:
        kind = request.headers.get("content-type", "").split(";")[0].strip().lower()
        if kind != "application/json":
            raise ApiError(415, "request.content-type", f"send application/json, not {kind or 'nothing'}")
        declared = request.headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_body:
            raise ApiError(413, "request.too-large", f"the body is {declared} bytes; the limit is {self.max_body}")
        chunks, size = [], 0
        try:
            async for chunk in request.stream():
                size += len(chunk)
                if size > self.max_body:
                    raise ApiError(413, "request.too-large", f"the body exceeds the limit of {self.max_body} bytes")
                chunks.append(chunk)
        except ClientDisconnect:
            raise ApiError(408, "request.timeout", "the body did not arrive in time (or the client left)") from None
        body = b"".join(chunks)
        if too_deep(body, MAX_DEPTH):
            raise ApiError(400, "request.json-depth", f"the body nests deeper than {MAX_DEPTH} levels")
        try:
            data = json.loads(body, parse_constant=_no_constant)
        except (ValueError, UnicodeDecodeError, RecursionError) as exc:
            raise ApiError(400, "request.json", f"the body is not JSON: {exc}") from None
        problem = hostile_value(data)
        if problem:
            raise ApiError(400, problem[0], f"the body: {problem[1]}")
        try:
            _VALIDATORS[schema](data)
        except fastjsonschema.JsonSchemaValueException as exc:
            raise ApiError(400, "request.schema", f"{schema}: {exc.message}") from None
        return data  # type: ignore[no-any-return]

    @staticmethod
    def _bytes(value: str, field: str) -> bytes:
        try:
            return unb64(value)
        except (binascii.Error, ValueError):
            raise ApiError(400, "request.base64", f"{field} is not base64") from None

    # -- public ---------------------------------------------------------------------------
    async def healthz(self, request: Request) -> dict[str, Any]:
        return {"ok": True}

    async def readyz(self, request: Request) -> Response:
        """Ready when this replica can decide: its clock is not behind, no write failed lately,
        and a write to the registry goes through now."""
        problem = self.health.clock() or self.health.store()
        if problem is None:
            try:
                await self._run(self.tc.ready)
                self.health.store_wrote()
            except Exception as exc:  # noqa: BLE001 - not ready, and why
                reason = store_failure(exc) or "store.unavailable"
                self.health.store_failed(reason, type(exc).__name__)
                problem = self.health.store()
        if problem is not None:
            response = JSONResponse({"ready": False, "error": problem.reason, "message": problem.message},
                                    status_code=503)
            response.headers["Retry-After"] = str(problem.retry_after)
            return response
        return JSONResponse({"ready": True})

    async def prometheus(self, request: Request) -> Response:
        store = self.health.store()
        extra = ["# TYPE tccdeploy_clock_behind_seconds gauge",
                 f"tccdeploy_clock_behind_seconds {self.health.clock_behind():.3f}",
                 "# TYPE tccdeploy_clock_backwards_checks_total counter",
                 f"tccdeploy_clock_backwards_checks_total {self.health.clock_steps_back}",
                 "# TYPE tccdeploy_store_up gauge", f"tccdeploy_store_up {0 if store else 1}"]
        rendered = await self._run(self.metrics.render)  # a front's asks its decision process for every front's
        return PlainTextResponse(rendered + "\n".join(extra) + "\n", media_type="text/plain; version=0.0.4")

    async def status(self, request: Request) -> dict[str, Any]:
        counts = await self._decide(request, self.tc.node_counts)
        summary = await self._run(self.tc.public_summary)
        return {"version": __version__, "fingerprint": summary["fingerprint"], "perimeter": summary["perimeter"],
                "nodes": dict(counts)}

    async def certificate(self, request: Request) -> Response:
        summary = await self._run(self.tc.public_summary)
        return PlainTextResponse(summary["bundle_pem"], media_type="application/x-pem-file")

    async def openapi(self, request: Request) -> dict[str, Any]:
        paths: dict[str, Any] = {}
        for method, path, summary, schema, engine_only, _ in self.routes:
            op: dict[str, Any] = {"summary": summary, "responses": {
                "200": {"description": "done"}, "400": {"description": "malformed request"},
                "403": {"description": "refused by the TC (body: error = reason code)"}}}
            if schema:
                op["requestBody"] = {"required": True, "content": {"application/json": {
                    "schema": {"$ref": f"#/components/schemas/{schema}"}}}}
                op["responses"] |= {"413": {"description": "body too large"}, "415": {"description": "not JSON"}}
            if engine_only:
                op["security"] = [{"engineCertificate": []}]
                op["responses"]["401"] = {"description": "no engine client certificate"}
            paths.setdefault(path, {})[method.lower()] = op
        return {"openapi": "3.1.0", "info": {"title": "tccdeploy trusted coordinator", "version": __version__},
                "paths": paths, "components": {"schemas": SCHEMAS, "securitySchemes": {
                    "engineCertificate": {"type": "mutualTLS", "description": "a client certificate from `tc engines add`"}}}}

    # -- engines ----------------------------------------------------------------------------
    async def policy(self, request: Request) -> dict[str, Any]:
        return await self._decide(request, self.tc.engine_policy)  # type: ignore[no-any-return]

    async def enrollment_begin(self, request: Request) -> dict[str, Any]:
        b = request.state.body
        challenge = await self._decide(request,
            self.tc.enrollment_challenge, b["node"], self._bytes(b["ek_certificate"], "ek_certificate"),
            self._bytes(b["ek_public"], "ek_public"), self._bytes(b["ak_public"], "ak_public"), b["ssh_host_key"],
            b.get("site"), b["address"])
        if challenge is None:
            return {"enrolled": True}
        return {"credential": b64(challenge.credential), "secret": b64(challenge.secret)}

    async def enrollment_finish(self, request: Request) -> dict[str, Any]:
        b = request.state.body
        return await self._decide(request, self.tc.enrollment_finish, b["node"], self._bytes(b["answer"], "answer"))

    async def nonce(self, request: Request) -> dict[str, Any]:
        b = request.state.body
        value = await self._decide(request, self.tc.nonce, b["node"], b.get("purpose", "quote"))
        return {"nonce": b64(value)}

    async def attestation(self, request: Request) -> dict[str, Any]:
        b = request.state.body
        try:
            evidence = evidence_from_wire(b["evidence"])
        except (binascii.Error, ValueError) as exc:
            raise ApiError(400, "request.base64", f"evidence: {exc}") from None
        verdict, attestation_id = await self._decide(request, self.tc.verify, b["node"], b.get("site"), b["address"], evidence)
        self.metrics.count("tccdeploy_attestations_total", verdict="trusted" if verdict.trusted else "untrusted")
        for reason in verdict.reasons:
            self.metrics.count("tccdeploy_verdict_reasons_total", reason=reason["code"])
        return verdict.as_dict() | {"attestation": attestation_id}

    async def admission_begin(self, request: Request) -> dict[str, Any]:
        b = request.state.body
        challenge = await self._decide(request,
            self.tc.admission_challenge, b["node"], int(b["attestation"]), self._bytes(b["tk_public"], "tk_public"),
            self._bytes(b["certify_attest"], "certify_attest"), self._bytes(b["certify_signature"], "certify_signature"),
            self._bytes(b["nonce"], "nonce"))
        return {"challenge": b64(challenge)}

    async def admission_finish(self, request: Request) -> dict[str, Any]:
        b = request.state.body
        result = await self._decide(request, self.tc.admission_finish, b["node"], b["answer"])
        self.metrics.count("tccdeploy_admissions_total")
        return result

    async def nodes(self, request: Request) -> list[dict[str, Any]]:
        return [n.as_dict() for n in await self._decide(request, self.tc.nodes)]

    async def node(self, request: Request) -> dict[str, Any]:
        name = request.path_params["name"]
        try:
            limit = max(1, min(1000, int(request.query_params.get("limit", "20"))))
        except ValueError:
            raise ApiError(400, "request.query", "limit is a number") from None
        row, history = await self._decide(request, self.tc.node_history, name, limit)
        if row is None:
            raise ApiError(404, "node.unknown", f"no node {name!r} in the registry")
        return {"node": row, "attestations": history, "last_trusted": await self._decide(request, self.tc.last_trusted_time, name)}

    async def ek_check(self, request: Request) -> dict[str, Any]:
        b = request.state.body
        return await self._decide(request, self.tc.check_ek, self._bytes(b["ek_certificate"], "ek_certificate"),
                                       self._bytes(b["ek_public"], "ek_public"), b.get("node"), b.get("site"))

    async def perimeter_check(self, request: Request) -> dict[str, Any]:
        b = request.state.body
        problems = await self._decide(request, self.tc.perimeter_problems, b.get("site"), b["address"])
        return {"inside": not problems, "problems": [{"code": c, "message": m} for c, m in problems]}

    async def ear(self, request: Request) -> dict[str, Any]:
        raw = request.query_params.get("attestation")
        try:
            attestation = None if raw is None else int(raw)
        except ValueError:
            raise ApiError(400, "request.query", "attestation is a verdict's id (a number)") from None
        try:
            return await self._decide(request, self.tc.ear, request.path_params["name"], attestation)
        except Refused as exc:  # nothing to issue: no such node or verdict
            raise ApiError(404, exc.reason, str(exc)) from None

    async def identity(self, request: Request) -> dict[str, Any]:
        summary = await self._decide(request, self.tc.identity_summary, request.path_params["name"])
        if summary is None:
            raise ApiError(404, "node.not-enrolled", f"{request.path_params['name']} is not enrolled")
        return summary.as_dict()

    async def admission_needed(self, request: Request) -> dict[str, Any]:
        try:
            attestation = int(request.query_params["attestation"])
        except (KeyError, ValueError):
            raise ApiError(400, "request.query", "give ?attestation=ID") from None
        return {"needed": await self._decide(request, self.tc.admission_needed, request.path_params["name"], attestation)}

    async def audit(self, request: Request) -> list[dict[str, Any]]:
        q = request.query_params
        try:
            since = float(q["since"]) if "since" in q else None
        except ValueError:
            raise ApiError(400, "request.query", "since is a Unix time") from None
        return await self._decide(request, self.tc.audit_entries, q.get("node"), q.get("vm"), since)

    async def builds(self, request: Request) -> list[dict[str, Any]]:
        return await self._decide(request, self.tc.build_list)  # type: ignore[no-any-return]

    async def vms(self, request: Request) -> list[dict[str, Any]]:
        return [v.as_dict() for v in await self._decide(request, self.tc.vms, request.query_params.get("all") in ("1", "true"))]

    async def vm(self, request: Request) -> dict[str, Any]:
        row = await self._decide(request, self.tc.vm, request.path_params["name"])
        if row is None:
            raise ApiError(404, "vm.unknown", f"no VM {request.path_params['name']!r}")
        return row.as_dict()

    async def vm_state(self, request: Request) -> dict[str, Any]:
        await self._decide(request, self.tc.set_vm_state, request.path_params["vm_id"], request.state.body["state"])
        return {"vm_id": request.path_params["vm_id"], "state": request.state.body["state"]}

    async def vm_end_ticket(self, request: Request) -> dict[str, Any]:
        b = request.state.body
        return await self._decide(request, self.tc.vm_end_ticket, request.path_params["vm_id"], b["node"], b["action"])

    async def vm_ended(self, request: Request) -> dict[str, Any]:
        b = request.state.body
        if b["ticket"]["ticket"]["vm_id"] != request.path_params["vm_id"]:
            raise ApiError(400, "vm.end-ticket", "the end ticket is for another VM than the path names")
        return await self._decide(request, self.tc.vm_ended, b["ticket"], b["evidence"])

    async def enforcement(self, request: Request) -> dict[str, Any]:
        b = request.state.body
        await self._decide(request, self.tc.record_enforcement, b["node"], request.path_params["vm_id"], b["policy"], b["result"])
        return {"recorded": True}

    async def request_submit(self, request: Request) -> dict[str, Any]:
        from ..crypto.bundle import BundleError, verify_descriptor

        b = request.state.body
        try:
            verify_descriptor(b["bundle"])
        except BundleError as exc:
            raise ApiError(400, exc.reason, str(exc)) from None
        record = await self._decide(request, self.tc.accept_request, b["request"], b["bundle"])
        self.metrics.count("tccdeploy_requests_accepted_total")
        return {"id": record["id"], "vm": record["vm"], "vm_id": record["vm_id"], "customer": record["customer"],
                "state": "accepted"}

    async def request_get(self, request: Request) -> dict[str, Any]:
        record = await self._decide(request, self.tc.request_record, request.path_params["id"])
        if record is None:
            raise ApiError(404, "request.unknown", f"no request {request.path_params['id']!r}")
        return record.as_dict()

    async def release(self, request: Request) -> dict[str, Any]:
        result = await self._decide(request, self.tc.release_key, request.path_params["id"], request.state.body["node"])
        self.metrics.count("tccdeploy_key_releases_total")
        return result

    async def launched(self, request: Request) -> dict[str, Any]:
        b = request.state.body
        return await self._decide(request, self.tc.record_launch, {"request": request.path_params["id"]}, b["node"], b["status"])

    async def request_failed(self, request: Request) -> dict[str, Any]:
        await self._decide(request, self.tc.fail_request, request.path_params["id"])
        return {"request": request.path_params["id"], "state": "failed"}

    async def customer_status(self, request: Request) -> dict[str, Any]:
        b = request.state.body
        return await self._decide(request, self.tc.customer_status, request.path_params["id"], b["time"], b["signature"])

    async def customer_receipt(self, request: Request) -> dict[str, Any]:
        b = request.state.body
        receipt = await self._decide(request, self.tc.customer_receipt, request.path_params["id"], b["time"], b["signature"])
        if receipt is None:
            raise ApiError(404, "receipt.not-yet", "the VM has not been launched yet: no receipt")
        return receipt

    async def migrations(self, request: Request) -> list[dict[str, Any]]:
        return [m.as_dict() for m in await self._decide(request, self.tc.migrations, request.query_params.get("state"))]

    async def migration_begin(self, request: Request) -> dict[str, Any]:
        b = request.state.body
        return await self._decide(request, self.tc.migration_begin, b["vm"], b["destination"], request.state.engine)

    async def migration_end(self, request: Request) -> dict[str, Any]:
        b = request.state.body
        try:
            return await self._decide(request, self.tc.migration_end, self._migration_id(request), b["vm_id"],
                                      bool(b["commit"]), b.get("reason", ""), b.get("evidence"), request.state.engine)
        except (ValueError, RegistryError) as exc:
            raise ApiError(409, "migration.not-under-way", str(exc)) from None

    async def migration_settlement(self, request: Request) -> dict[str, Any]:
        return await self._decide(request, self.tc.migration_settlement, self._migration_id(request))

    async def suspend_begin(self, request: Request) -> dict[str, Any]:
        return await self._decide(request, self.tc.suspend_begin, request.state.body["vm"])

    async def suspend_end(self, request: Request) -> dict[str, Any]:
        b = request.state.body
        return await self._decide(request, self.tc.suspend_end, self._migration_id(request), b.get("evidence"),
                                       bool(b["saved"]))

    async def resume_begin(self, request: Request) -> dict[str, Any]:
        b = request.state.body
        return await self._decide(request, self.tc.resume_begin, b["vm"], b.get("node"))

    async def resumed(self, request: Request) -> dict[str, Any]:
        return await self._decide(request, self.tc.resume_end, self._migration_id(request), request.state.body["evidence"])

    @staticmethod
    def _migration_id(request: Request) -> int:
        text = request.path_params["id"]  # (a migration's or a suspension's: both are small integers)
        if not text.isdigit() or len(text) > 18:
            raise ApiError(404, "migrate.unknown", f"no migration or suspension {text[:40]!r}")
        return int(text)

    async def quarantine(self, request: Request) -> dict[str, Any]:
        name = request.path_params["name"]
        changed = await self._decide(request, self.tc.quarantine, name, request.state.body["reason"], request.state.engine)
        return {"node": name, "quarantined": changed}

    async def lease_nodes(self, request: Request) -> dict[str, Any]:
        b = request.state.body
        return await self._decide(request, self.tc.lease_nodes, b["nodes"], float(b["seconds"]), request.state.engine)

    async def release_leases(self, request: Request) -> dict[str, Any]:
        ended = await self._decide(request, self.tc.release_leases, request.state.body["nodes"], request.state.engine)
        return {"ended": ended}
