"""Fan-out: the same work on many hosts at once, each bounded by its own timeouts.

An Engine holds one Session (connection + helper) per host for a whole run. `run` calls a work
function per host in a thread pool of `forks` workers and reports each HostResult as soon as it
is known; a slow or hung host only ever costs its own timeout. Ctrl-C closes every connection,
which unblocks every worker, and the run ends at once.
"""

from __future__ import annotations

import dataclasses
import os
import threading
import time
from collections.abc import Callable, Iterable
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from typing import Any, Literal

from .. import progress
from ..config import state_dir
from ..inventory import Host
from .connection import DEFAULT_TIMEOUT, Connection, Target, Unreachable
from .helper import Helper, HelperError, RemoteError, Service, StreamFrom

Status = Literal["ok", "changed", "failed", "unreachable", "skipped"]


@dataclass
class HostResult:
    host: str
    status: Status
    msg: str = ""
    data: dict[str, Any] = field(default_factory=dict)
    elapsed: float = 0.0
    reason: str = ""
    traceback: str = ""

    def as_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"name": self.host, "state": self.status, "elapsed": round(self.elapsed, 3)}
        if self.msg:
            out["msg"] = self.msg
        if self.reason:
            out["reason"] = self.reason
        if self.data:
            out["result"] = self.data
        return out


DEFAULT_TVMM_USER = "tvmm"


class Session:
    """One host's two logins, each opened on first use and kept for the run: the admin login
    (the engine's helper) and the TVMM user (the node's TVMM service, `tcc_tvmm_user`)."""

    def __init__(self, host: Host, target: Target, own_known_hosts: str, trust_new: bool):
        self.host = host
        self.target = target
        self.connection = Connection(target, own_known_hosts, trust_new)
        service_target = dataclasses.replace(target, user=str(host.vars.get("tcc_tvmm_user", DEFAULT_TVMM_USER)))
        self.service_connection = Connection(service_target, own_known_hosts, trust_new)
        self._helper: Helper | None = None
        self._service: Service | None = None
        self._connected = False
        self._service_connected = False
        self._lock = threading.Lock()

    def connect(self) -> Connection:
        with self._lock:
            if not self._connected:
                self.connection.connect()
                self._connected = True
        return self.connection

    @property
    def helper(self) -> Helper:
        self.connect()
        if self._helper is None:
            self._helper = Helper(self.connection, self.target.python)
        return self._helper

    def call(self, op: str, args: dict[str, Any] | None = None, timeout: float | None = None) -> dict[str, Any]:
        """An operation of the admin helper (ping, command, files, build staging)."""
        return self.helper.call(op, args, timeout)

    @property
    def service(self) -> Service:
        with self._lock:
            if not self._service_connected:
                self.service_connection.connect()
                self._service_connected = True
            if self._service is None:
                self._service = Service(self.service_connection)
        return self._service

    def tvmm(self, op: str, args: dict[str, Any] | None = None, timeout: float | None = None) -> dict[str, Any]:
        """An operation of the node's TVMM service (TPM evidence, admission, VMs, migration)."""
        return self.service.call(op, args, timeout)

    def tvmm_stream_from(self, op: str, args: dict[str, Any] | None = None, timeout: float | None = None) -> StreamFrom:
        """An operation of the service whose answer goes on as a byte stream (a migration's ciphertext)."""
        return self.service.stream_from(op, args, timeout)

    def tvmm_stream_to(self, op: str, blocks: Iterable[bytes], args: dict[str, Any] | None = None,
                       timeout: float | None = None) -> dict[str, Any]:
        """An operation of the service that takes a byte stream after its answer."""
        return self.service.stream_to(op, blocks, args, timeout)

    def close(self) -> None:
        if self._helper is not None:
            self._helper.close()
        if self._service is not None:
            self._service.close()
        self.connection.close()
        self.service_connection.close()


Work = Callable[[Session], HostResult | dict[str, Any]]


class Engine:
    """Sessions for a set of hosts, and parallel work over them."""

    def __init__(
        self,
        hosts: Iterable[Host],
        forks: int = 20,
        timeout: float = DEFAULT_TIMEOUT,
        trust_new_host_keys: bool = False,
        state: str | None = None,
    ):
        self.hosts = list(hosts)
        self.forks = max(1, forks)
        self.timeout = timeout
        self.state = state_dir(state)
        self.own_known_hosts = os.path.join(self.state, "known_hosts")
        self.trust_new = trust_new_host_keys
        self.sessions: dict[str, Session] = {}
        self._sessions_lock = threading.Lock()
        self._cancelled = threading.Event()

    def session(self, host: Host) -> Session:
        with self._sessions_lock:  # two threads may ask for one host's (a task delegated to it)
            if host.name not in self.sessions:
                target = Target.from_vars(host.name, host.vars, self.state, self.timeout)
                self.sessions[host.name] = Session(host, target, self.own_known_hosts, self.trust_new)
            return self.sessions[host.name]

    def _one(self, host: Host, work: Work) -> HostResult:
        start = time.monotonic()
        if self._cancelled.is_set():
            return HostResult(host.name, "failed", "cancelled", reason="cancelled")
        try:
            outcome = work(self.session(host))
        except Unreachable as exc:
            result = HostResult(host.name, "unreachable", str(exc), reason=exc.reason)
        except RemoteError as exc:
            result = HostResult(host.name, "failed", f"{exc.kind}: {exc}" if exc.traceback else str(exc),
                                reason="remote-error", traceback=exc.traceback)
        except HelperError as exc:
            result = HostResult(host.name, "failed", str(exc), reason="helper")
        except TimeoutError as exc:
            result = HostResult(host.name, "failed", str(exc), reason="timeout")
        except Exception as exc:  # noqa: BLE001 - one host's surprise must not stop the others
            code = getattr(exc, "reason", None)
            if self._cancelled.is_set():
                result = HostResult(host.name, "failed", "cancelled", reason="cancelled")
            elif isinstance(code, str) and code:  # a decision refused (the TC's Refused): its reason code leads
                result = HostResult(host.name, "failed", f"refused: {code}: {exc}", reason=code)
            else:
                result = HostResult(host.name, "failed", f"{type(exc).__name__}: {exc}", reason="unexpected")
        else:
            if isinstance(outcome, HostResult):
                result = outcome
            else:
                data = dict(outcome)
                status: Status = "failed" if data.get("failed") else ("changed" if data.get("changed") else "ok")
                result = HostResult(host.name, status, str(data.pop("msg", "")), data)
        result.elapsed = time.monotonic() - start
        if result.status == "unreachable":
            self.sessions[host.name].close() if host.name in self.sessions else None
        return result

    def run(self, work: Work, hosts: Iterable[Host] | None = None,
            on_result: Callable[[HostResult], None] | None = None, label: str | None = None) -> list[HostResult]:
        """Run work on every host (default: all of the engine's), forks at a time; label: show
        the hosts done on the progress display (a fleet round)."""
        targets = list(self.hosts if hosts is None else hosts)
        if label is not None:
            with progress.hosts(label, len(targets)) as advance:
                def counted(result: HostResult) -> None:
                    advance(1)
                    if on_result is not None:
                        on_result(result)

                return self.run(work, targets, counted)
        results: dict[str, HostResult] = {}
        pool = ThreadPoolExecutor(max_workers=min(self.forks, max(1, len(targets))), thread_name_prefix="tcc-host")
        futures: dict[Future, Host] = {pool.submit(self._one, host, work): host for host in targets}
        pending = set(futures)
        try:
            while pending:
                done, pending = wait(pending, timeout=0.2, return_when=FIRST_COMPLETED)
                for future in done:
                    result = future.result()
                    results[result.host] = result
                    if on_result is not None:
                        on_result(result)
        except KeyboardInterrupt:
            self.cancel()
            pool.shutdown(wait=False, cancel_futures=True)
            raise
        pool.shutdown(wait=True)
        return [results[h.name] for h in targets if h.name in results]

    def cancel(self) -> None:
        """Stop: close every connection so blocked workers return now."""
        self._cancelled.set()
        for session in list(self.sessions.values()):
            session.close()

    def close(self) -> None:
        for session in list(self.sessions.values()):
            session.close()
        self.sessions.clear()

    def __enter__(self) -> Engine:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def exit_code(results: list[HostResult]) -> int:
    """ansible's: 4 when a host was unreachable, else 2 when one failed, else 0."""
    if any(r.status == "unreachable" for r in results):
        return 4
    if any(r.status == "failed" for r in results):
        return 2
    return 0
