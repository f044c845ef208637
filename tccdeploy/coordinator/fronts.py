"""`tc serve --fronts N`: TLS, HTTP and the body checks in N front processes, every decision in
the serving process.

Why: a served decision costs the TC's one Python process the decision itself plus TLS, HTTP
parsing, JSON and schema checks, and under one GIL these take turns however many cores the
machine has (bench/tc_service.py: the served TC sat at one core, 0.7x of the same decisions
embedded). Fronts take that second half to other cores. The decisions stay in one process, so
everything they keep in memory (nonces, challenges, the manifests a SIGHUP reloads, the TC's
keys) stays one copy, and one writer meets the database as before.

It also keeps the TC's CA and key-wrapping keys out of the memory of the processes that parse
what the network sends (a memory-disclosure bug in the TLS, HTTP or JSON code has no key to
show), and their environment holds no database URL; they can ask the decision process only for
the calls `CALLS` lists. It is not a boundary against a front that runs other code: the fronts
run as the TC's user, who can read the key files, so a subverted front is a subverted TC.

The channel: socket pairs made by the serving process and inherited by the fronts it starts (no
path in the filesystem, nothing another process can connect to), one per front decision thread,
each carrying one call at a time: (name, args, kwargs) pickled one way, ("ok", value) or
("raise", exception) back. Pickle is safe here only because both ends are this TC's own
processes started from its own code; the fronts pickle values they built, never bytes a client
sent.
"""

from __future__ import annotations

import argparse
import json
import os
import pickle
import queue
import signal
import socket
import subprocess
import sys
import threading
import time
import traceback
from collections.abc import Callable
from dataclasses import asdict
from multiprocessing.connection import Connection
from typing import Any

from ..crypto.reasoned import Reasoned
from .api import Metrics
from .db import StoreFailure, store_failure
from .refusals import engine_revoked
from .store import RegistryError

# The coordinator's methods the API calls (api.Api: `self.tc.<name>(...)`); nothing else runs.
CALLS = frozenset({
    "accept_request", "admission_challenge", "admission_finish", "admission_needed", "audit_entries",
    "build_list", "check_ek", "customer_receipt", "customer_status", "ear", "engine_allowed", "engine_policy",
    "enrollment_challenge", "enrollment_finish", "fail_request", "identity_summary", "last_trusted_time",
    "lease_nodes", "migration_begin", "migration_end", "migration_settlement", "migrations", "node_counts",
    "node_history", "nodes", "nonce", "perimeter_problems", "public_summary", "quarantine", "ready",
    "record_enforcement", "record_launch", "release_key", "release_leases", "request_record", "resume_begin",
    "resume_end", "set_vm_state", "suspend_begin", "suspend_end", "verify", "vm", "vm_end_ticket", "vm_ended",
    "vms",
})
METRICS_MERGE, METRICS_RENDER = "metrics_merge", "metrics_render"  # a front's counts in, every front's out
AS_ENGINE = "as_engine"  # (engine, serial), call, args: the engine's certificate checked, then the call
_PORTABLE = (Reasoned, RegistryError, ValueError, LookupError)  # exceptions the API answers by type


class DecisionFailed(RuntimeError):
    """The decision process failed on a call for a reason of its own (its log has the traceback)."""


# -- the decision process's side --------------------------------------------------------------
def _portable(exc: BaseException) -> BaseException:
    """What crosses back for an exception: the API's own kinds as they are, a store outage as its
    reason (the API answers 503 from it), anything else as a bare failure (details stay in this
    process's log, as the API keeps a 500's details out of its answer)."""
    if isinstance(exc, DecisionFailed):  # a call the decision process does not take: said as it is
        print(f"tc serve: a front asked for what the API never calls: {exc}", file=sys.stderr, flush=True)
        return exc
    reason = store_failure(exc)
    if reason is not None:
        return StoreFailure(reason, type(exc).__name__)
    if isinstance(exc, _PORTABLE):
        try:
            pickle.loads(pickle.dumps(exc))
            return exc
        except Exception:  # noqa: BLE001 - an exception of the API's kinds that does not travel
            pass
    print(f"tc serve: a decision failed\n{''.join(traceback.format_exception(exc))}", file=sys.stderr, flush=True)
    return DecisionFailed("the TC's decision process failed on this call; its log says why")


def answer(coordinator: Any, connection: Connection, metrics: Metrics) -> None:
    """Take calls on one front's connection until the front closes it."""
    def as_engine(engine: tuple[str, int], name: str, *args: Any) -> Any:
        if name not in CALLS:
            raise DecisionFailed(f"no call {name!r} in the decision process")
        if not coordinator.engine_allowed(engine[1]):
            raise engine_revoked(engine[0])
        return getattr(coordinator, name)(*args)

    special: dict[str, Callable[..., Any]] = {METRICS_MERGE: metrics.merge, METRICS_RENDER: metrics.render,
                                              AS_ENGINE: as_engine}
    while True:
        try:
            name, args, kwargs = pickle.loads(connection.recv_bytes())
        except (EOFError, OSError):
            return
        try:
            if name in CALLS:
                reply: tuple[str, Any] = ("ok", getattr(coordinator, name)(*args, **kwargs))
            elif name in special:
                reply = ("ok", special[name](*args, **kwargs))
            else:
                raise DecisionFailed(f"no call {name!r} in the decision process")
        except Exception as exc:  # noqa: BLE001 - every failure goes back to the front that asked
            reply = ("raise", _portable(exc))
        try:
            data = pickle.dumps(reply, protocol=pickle.HIGHEST_PROTOCOL)
        except Exception as exc:  # noqa: BLE001 - a result that does not pickle is this code's bug
            data = pickle.dumps(("raise", _portable(exc)))
        try:
            connection.send_bytes(data)
        except OSError:
            return


class Fronts:
    """The front processes of one `tc serve` and the threads that answer them."""

    def __init__(self, coordinator: Any, listeners: list[socket.socket], threads: int, options: dict[str, Any]) -> None:
        self.processes: list[subprocess.Popen[bytes]] = []
        self._threads: list[threading.Thread] = []
        self.metrics = Metrics()
        for listener in listeners:
            ours, theirs = zip(*(socket.socketpair() for _ in range(threads)), strict=True)
            fds = [listener.fileno(), *(s.fileno() for s in theirs)]
            # -P and cwd "/": the installed tccdeploy, never code a working folder holds
            argv = [sys.executable, "-P", "-m", "tccdeploy.coordinator.fronts", "--listen-fd", str(fds[0]),
                    "--decision-fds", ",".join(str(fd) for fd in fds[1:]), "--parent", str(os.getpid()),
                    "--options", json.dumps(options)]
            self.processes.append(subprocess.Popen(argv, pass_fds=fds, env=_front_environment(), cwd="/"))
            listener.close()  # the front's alone: when it stops, new connections are refused, not left waiting
            for s in theirs:
                s.close()
            for s in ours:
                connection = Connection(s.detach())
                thread = threading.Thread(target=answer, args=(coordinator, connection, self.metrics), daemon=True,
                                          name=f"tc-decision-{len(self._threads)}")
                thread.start()
                self._threads.append(thread)

    def wait(self, stop: threading.Event, grace: float = 15.0) -> int:
        """Until stop is set or a front exits (then all stop: a TC serving from fewer fronts than
        asked would not say so); the fronts finish their requests in flight, whose decisions this
        process still takes."""
        code = 0
        while not stop.wait(0.2):
            ended = [p for p in self.processes if p.poll() is not None]
            if ended:
                code = ended[0].returncode or 1
                print(f"tc serve: a front process (pid {ended[0].pid}) exited with {ended[0].returncode}; stopping",
                      file=sys.stderr, flush=True)
                break
        self.stop(grace)
        return code

    def stop(self, grace: float = 15.0) -> None:
        for p in self.processes:
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + grace
        for p in self.processes:
            try:
                p.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()


def _front_environment() -> dict[str, str]:
    """This process's environment without what only decisions need (the registry's URL, which may
    carry the database's password)."""
    return {k: v for k, v in os.environ.items() if k not in ("TCCDEPLOY_REGISTRY", "PGPASSWORD", "PGPASSFILE")}


# -- a front's side ---------------------------------------------------------------------------
class Remote:
    """The coordinator as the API in a front process sees it: each call runs in the decision
    process, on one of this front's connections (one call at a time on each)."""

    def __init__(self, connections: list[Connection], on_gone: Callable[[], None] | None = None) -> None:
        self._free: queue.SimpleQueue[Connection] = queue.SimpleQueue()
        for c in connections:
            self._free.put(c)
        self.gone = False  # the decision process closed a connection: it exited or was killed
        self._on_gone = on_gone or (lambda: os.kill(os.getpid(), signal.SIGTERM))  # the front stops

    def _call(self, name: str, *args: Any, **kwargs: Any) -> Any:
        connection = self._free.get()
        try:
            if self.gone:
                raise EOFError
            connection.send_bytes(pickle.dumps((name, args, kwargs), protocol=pickle.HIGHEST_PROTOCOL))
            kind, value = pickle.loads(connection.recv_bytes())
        except (EOFError, OSError):
            # this front can decide nothing any more: every call now fails at once (503), so the
            # requests in flight end and the stop below is not held by one waiting for ever
            if not self.gone:
                self.gone = True
                self._on_gone()
            raise StoreFailure("service.decision-lost", "the TC's decision process is gone") from None
        finally:
            self._free.put(connection)
        if kind == "ok":
            return value
        if kind == "raise":
            raise value
        raise DecisionFailed(f"the decision process answered {kind!r}, which is no answer")

    def __getattr__(self, name: str) -> Any:
        if name in CALLS:
            return RemoteCall(self, name)
        raise AttributeError(f"the decision process takes no call {name!r} (fronts.CALLS)")


class RemoteCall:
    """One of the coordinator's methods, as a front calls it."""

    def __init__(self, remote: Remote, name: str) -> None:
        self.remote, self.name = remote, name

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self.remote._call(self.name, *args, **kwargs)

    def as_engine(self, engine: tuple[str, int], *args: Any) -> Any:
        """The call for an engine whose certificate the decision process checks first (refused
        `auth.engine-revoked` when the registry no longer lists it): one round trip, not two."""
        return self.remote._call(AS_ENGINE, engine, self.name, *args)


class FrontMetrics(Metrics):
    """A front's counts, handed to the decision process every second and before each render, so
    `/metrics` from any front shows every front's sum (a scrape lands on one front at random)."""

    def __init__(self, remote: Remote, interval: float = 1.0) -> None:
        super().__init__()
        self._remote = remote
        self._stop = threading.Event()
        threading.Thread(target=self._hand_over, args=(interval,), name="tc-metrics", daemon=True).start()

    def flush(self) -> None:
        taken = self.take()
        if not taken[0] and not taken[1]:
            return
        try:
            self._remote._call(METRICS_MERGE, taken)
        except Exception:  # noqa: BLE001 - kept for the next hand-over
            self.merge(taken)
            raise

    def render(self) -> str:
        self.flush()
        return str(self._remote._call(METRICS_RENDER))

    def _hand_over(self, interval: float) -> None:
        while not self._stop.wait(interval):
            try:
                self.flush()
            except Exception:  # noqa: BLE001 - the decision process is gone; this front is stopping
                return


def _die_with_parent(parent: int) -> None:
    """SIGTERM when the decision process dies, however it dies (Linux's PR_SET_PDEATHSIG): a front
    without it can decide nothing, and must not hold the port."""
    import ctypes

    pr_set_pdeathsig = 1
    ctypes.CDLL(None, use_errno=True).prctl(pr_set_pdeathsig, signal.SIGTERM)
    if os.getppid() != parent:  # it died before the line above
        sys.exit(1)


def front(argv: list[str]) -> int:
    """A front process: the API over a Remote, on the listening socket the serving process made."""
    from .. import logs
    from .server import Limits, serve_api

    parser = argparse.ArgumentParser(prog="tccdeploy tc serve (front)")
    parser.add_argument("--listen-fd", type=int, required=True)
    parser.add_argument("--decision-fds", required=True)
    parser.add_argument("--parent", type=int, required=True)
    parser.add_argument("--options", required=True)
    args = parser.parse_args(argv)
    _die_with_parent(args.parent)
    options = json.loads(args.options)
    logs.configure(options["log_format"])
    signal.signal(signal.SIGHUP, signal.SIG_IGN)  # the manifests live in the decision process
    listener = socket.socket(fileno=args.listen_fd)
    remote = Remote([Connection(int(fd)) for fd in args.decision_fds.split(",")])
    metrics = FrontMetrics(remote)
    try:
        serve_api(remote, listener, options["files"], options["log_level"], Limits(**options["limits"]), metrics)
    finally:
        try:
            metrics.flush()
        except Exception:  # noqa: BLE001 - the decision process is gone with them
            pass
    return 0


def front_options(files: dict[str, str], log_level: str, limits: Any) -> dict[str, Any]:
    from .. import logs

    return {"files": files, "log_level": log_level, "limits": asdict(limits),
            "log_format": "json" if logs.is_json() else "text"}


if __name__ == "__main__":
    sys.exit(front(sys.argv[1:]))
