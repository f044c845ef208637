"""Benchmark: the TC's verdict and key-release throughput and latency with 32 concurrent
clients, embedded in the engine's process versus served over HTTPS (`tc serve`), on SQLite
versus PostgreSQL.

A verdict is what an engine does per node and attestation: ask the TC for a nonce, then submit
the evidence (a software AK's quote over the lab boot's PCRs and its TCG log) and get the
verdict, which the TC records with the audit entry. A key release is the TC checking the node
is admitted, freshly trusted and certified, unwrapping the request's Kvm with its RSA-3072 key
and re-wrapping it to the node's key, recording the release once, with its audit entry. 32
software nodes; each of 32 client threads works for its node --ops times, on one connection it
opened (and handshook) before the clock starts, as an engine keeps its connection, after one
operation of each kind untimed (a running TC's database connections have planned its statements
already). Served is `tc serve --fronts 1` (TLS and HTTP in a front process, decisions in the
serving one; --fronts sets it); "1 process" is `--fronts 0`, all in one; on PostgreSQL "2
replicas" runs two of those on the one database, the clients spread over them.
Figures: operations per second, the p50/p99 latency of one operation, and how many of the
machine's cores were busy while the clock ran (bench/machine.py): the clients share this
machine's cores with the TC, and a row near all of them busy is bound by the machine. Then what
a new connection costs: 200 pairs opened one after another, each for one call, one with a full
TLS handshake, the next with the TLS session resumed (the engine's client offers a ticket an
earlier connection received). The PostgreSQL server and `tc serve` are real processes started here and
stopped by PID.
Run: .venv/bin/python bench/tc_service.py [--clients 32] [--ops 50] [--repeat 3]
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import shutil
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from machine import Busy, cpu_seconds, with_children  # noqa: E402

from tccdeploy.coordinator import tpm2  # noqa: E402
from tccdeploy.coordinator.client import RemoteCoordinator  # noqa: E402
from tccdeploy.coordinator.identity import init as tc_init  # noqa: E402
from tccdeploy.coordinator.service import Coordinator  # noqa: E402
from tccdeploy.coordinator.store import Registry  # noqa: E402
from tccdeploy.manifest.loader import load_manifests  # noqa: E402
from tests.attestkit import Node  # noqa: E402
from tests.pgserver import PostgresServer, skip_reason  # noqa: E402
from tests.tcservice import Service  # noqa: E402

SITE, ADDRESS = "site1", "127.0.1.7"
CORES = os.cpu_count() or 1


def roster_ek(name: str) -> str:
    """A software node's EK name, as the roster holds it."""
    import hashlib

    return "sha256:" + hashlib.sha256(name.encode()).hexdigest()


def enroll(location: str, clients: int) -> dict[str, Node]:
    nodes = {f"bench-{i}": Node() for i in range(clients)}
    registry = Registry(location)
    try:
        for name, node in nodes.items():
            registry.roster_add(roster_ek(name), SITE, name, None)  # the TC operator racked it
            registry.enroll(name, SITE, ADDRESS, {"ek_certificate": b"c", "ek_fingerprint": roster_ek(name)[7:], "ek_public": b"e",
                                                  "ak_public": node.ak_public,
                                                  "ak_name": tpm2.parse_public(node.ak_public).name,
                                                  "ssh_host_key": "SHA256:host", "manufacturer": "software"})
    finally:
        registry.close()
    return nodes


def prepare_releases(location: str, state: str, manifests, clients: int, ops: int) -> dict[str, list[str]]:  # type: ignore[no-untyped-def]
    """Admitted software nodes and ops accepted requests each (setup, not timed): node -> request ids."""
    import base64
    import datetime
    import secrets

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ed25519, rsa
    from cryptography.x509.oid import NameOID

    from tccdeploy.coordinator.identity import load as tc_load
    from tccdeploy.crypto import customer as customers
    from tccdeploy.crypto import wrap
    from tccdeploy.crypto.canonical import PLACEMENT_REQUEST, signed_bytes

    tc_key = tc_load(state)
    node_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "bench node TK")])
    now = datetime.datetime.now(datetime.UTC)
    pem = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(node_key.public_key())
           .serial_number(1).not_valid_before(now).not_valid_after(now + datetime.timedelta(days=1))
           .sign(node_key, hashes.SHA256()).public_bytes(serialization.Encoding.PEM).decode())
    key = ed25519.Ed25519PrivateKey.generate()
    public = customers.public_text(key.public_key())
    tc = Coordinator.from_manifests(manifests, state, registry=location)
    out: dict[str, list[str]] = {}
    try:
        tc.add_customer("bench", public)
        for n in range(clients):
            node = f"rel-{n}"
            tc.registry.roster_add(roster_ek(node), SITE, node, None)
            tc.registry.enroll(node, SITE, ADDRESS, {"ek_certificate": b"c", "ek_fingerprint": roster_ek(node)[7:], "ek_public": b"e",
                                                     "ak_public": b"a", "ak_name": b"n", "ssh_host_key": "h",
                                                     "manufacturer": "software"})
            attestation = tc.registry.add_attestation(node, {"verdict": "trusted", "build": "tvmm-2026.1",
                                                             "platform": "lab-model-a"})
            tc.registry.admit(node, {"serial": f"{n:x}", "attestation": attestation, "tk_name": "tk", "pem": pem,
                                     "not_after": time.time() + 3600, "build": "tvmm-2026.1"})
            out[node] = []
            for i in range(ops):
                vm_id, vm_salt = customers.new_id("vm", key.public_key())
                request_id, salt = customers.new_id("request", key.public_key())
                descriptor = {"vm_id": vm_id, "vm_salt": vm_salt, "disk": {"sha256": "00" * 32}, "version": 3,
                              "wrapped_key": base64.b64encode(wrap.wrap(
                                  tc_key.wrap_certificate.public_key(), secrets.token_bytes(32),  # type: ignore[arg-type]
                                  wrap.sealed_label(vm_id, customers.key_id(key.public_key())))).decode(),
                              "customer": {"key": public}}
                request = {"manifest": {"metadata": {"name": f"vm-{n}-{i}"}, "spec": {"vcpus": 1, "memoryMiB": 64}},
                           "id": request_id, "salt": salt, "created": now.isoformat(timespec="seconds"), "customer": public,
                           "image": {"vm_id": vm_id, "sha256": "00" * 32}}
                envelope = {"request": request, "signature": base64.b64encode(key.sign(signed_bytes(PLACEMENT_REQUEST, request))).decode()}
                out[node].append(tc.accept_request(envelope, {"descriptor": descriptor})["id"])
    finally:
        tc.close()
    return out


def start_and_time(threads: list[threading.Thread], start: threading.Barrier, busy: Busy | None = None) -> float:
    """Start the client threads, let them go together (each waits at start once ready), and
    time them until the last ends (busy, if given: how busy the machine's cores were meanwhile). What this process holds by then (the enrolled nodes, the
    prepared requests, the embedded TC) is frozen out of the collector's sight while the clock
    runs, as `tc serve` freezes its own (server.freeze_heap): a full collection of it stopped every
    client thread here 15-25 ms, a pause the embedded TC's figures and the served TC's latencies
    would otherwise both carry."""
    for t in threads:
        t.start()
    gc.collect()
    gc.freeze()
    start.wait()
    began = time.perf_counter()
    if busy is not None:
        busy.start()
    try:
        for t in threads:
            t.join()
        return time.perf_counter() - began
    finally:
        if busy is not None:
            busy.stop()
        gc.unfreeze()  # (collectable again: the next row's setup does not keep this one's)


def run_clients(make_tc, work: dict[str, list], operation) -> dict:  # type: ignore[no-untyped-def]
    """One thread per key of work, each with its own TC client, calling operation(tc, key, item)
    for each of its items (a failure message or None); operations per second and p50/p99. Each
    client's first item is its warm-up, before the clock: the TC's first decision of a kind on
    each of its database connections plans every statement and loads its tables' catalogs there
    (a TC started a second ago on a database made a second before), which a running TC has behind
    it; the rest are timed."""
    latencies: list[float] = []
    failures: list[str] = []
    lock = threading.Lock()
    start = threading.Barrier(len(work) + 1)

    def client(key: str, items: list) -> None:  # type: ignore[type-arg]
        tc = make_tc()
        remote = isinstance(tc, RemoteCoordinator)
        if remote:  # an engine keeps its connection: the handshake is not an operation's
            tc.connect()
        failure = operation(tc, key, items[0])
        if failure:
            failures.append(failure)
        mine = []
        start.wait()
        for item in items[1:]:
            began = time.perf_counter()
            failure = operation(tc, key, item)
            mine.append(time.perf_counter() - began)
            if failure:
                failures.append(failure)
        with lock:
            latencies.extend(mine)
        if remote:
            tc.close()

    busy = Busy()
    elapsed = start_and_time([threading.Thread(target=client, args=item) for item in work.items()], start, busy)
    if failures or len(latencies) != sum(len(v) - 1 for v in work.values()):
        raise SystemExit(f"operations failed in the benchmark: {failures[:3]}")
    latencies.sort()
    return {"ops": len(latencies), "ops_per_s": round(len(latencies) / elapsed, 1),
            "p50_ms": round(1000 * statistics.median(latencies), 2),
            "p99_ms": round(1000 * latencies[min(len(latencies) - 1, int(len(latencies) * 0.99))], 2),
            "cores_busy": round(busy.cores, 2)}


def remote_clients(services: list[Service]):  # type: ignore[no-untyped-def]
    """A client per thread, the threads spread over the replicas in turn (what a balancer in
    front of them, or engines each given one, would do)."""
    turn = iter(range(1 << 30))
    lock = threading.Lock()

    def make() -> RemoteCoordinator:
        with lock:
            service = services[next(turn) % len(services)]
        return RemoteCoordinator(service.url, str(services[0].engine_dir))

    return make


def verdicts(make_tc, nodes: dict[str, Node], ops: int) -> dict:  # type: ignore[no-untyped-def]
    def attest(tc, name: str, node: Node) -> str | None:  # type: ignore[no-untyped-def]
        verdict, _ = tc.verify(name, SITE, ADDRESS, node.evidence(tc.nonce(name)))
        return None if verdict.trusted else f"{name}: {verdict.reasons}"

    return run_clients(make_tc, {name: [node] * (ops + 1) for name, node in nodes.items()}, attest)


def releases_timed(make_tc, work: dict[str, list[str]]) -> dict:  # type: ignore[no-untyped-def]
    def release(tc, node: str, request_id: str) -> None:  # type: ignore[no-untyped-def]
        tc.release_key(request_id, node)

    return run_clients(make_tc, work, release)


def new_connections(count: int) -> dict:
    """What a new connection costs the engine and the TC: 2 x count connections opened one after
    another to `tc serve` (one front: each front process has a ticket key of its own, so with N
    fronts about 1 new connection in N resumes), each for one nonce, taking turns: a full
    handshake (no ticket offered), then one with the TLS session resumed (the ticket from the
    connection before). Wall time and CPU (this process; `tc serve` with its front) a connection,
    the call included."""
    state = Path(tempfile.mkdtemp(prefix="tccdeploy-bench-tc-"))
    service = Service(state, str(ROOT / "examples"), options=("--fronts", "1"))
    tc = RemoteCoordinator(service.url, str(service.engine_dir))
    where = ("127.0.0.1", service.port)
    spent = {kind: [0.0, 0.0, 0.0] for kind in ("full", "resumed")}  # wall, client CPU, TC CPU
    try:
        tc.nonce("bench-0")  # (the TC's first call, and a ticket in hand)
        pids = with_children(service.proc.pid)
        for _ in range(count):
            for kind in ("full", "resumed"):
                for connection in tc.http._idle.pop(where, []):
                    connection.close()  # (as the TC closes an idle one)
                if kind == "full":
                    tc.http._tickets.pop(where, None)
                theirs, mine = cpu_seconds(pids), time.process_time()
                began = time.perf_counter()
                tc.nonce("bench-0")
                elapsed = time.perf_counter() - began
                mine, theirs = time.process_time() - mine, cpu_seconds(pids) - theirs
                for i, value in enumerate((elapsed, mine, theirs)):
                    spent[kind][i] += value
        if tc.http.handshakes != {"full": count + 1, "resumed": count}:
            raise SystemExit(f"the connections' handshakes were {tc.http.handshakes}, not {count} of each")
    finally:
        tc.close()
        service.stop()
        shutil.rmtree(state, ignore_errors=True)
    return {"count": count, **{kind: {"ms": round(1000 * wall / count, 3), "client_cpu_ms": round(1000 * cpu / count, 3),
                                      "tc_cpu_ms": round(1000 * tc_cpu / count, 3)}
                               for kind, (wall, cpu, tc_cpu) in spent.items()}}


def measure(clients: int, ops: int, repeat: int = 1, fronts: int = 1) -> dict:
    """Every row repeat times, the rounds interleaved (embedded, served, ... then again), so a
    slow minute of the machine falls on both sides; each figure is the median of its rounds,
    and `ratios` keeps each round's ratio to the embedded TC of the same round."""
    pg = None if skip_reason() else PostgresServer()
    try:
        rounds = []
        for number in range(repeat):
            if repeat > 1:
                print(f"round {number + 1} of {repeat}", file=sys.stderr, flush=True)
            rounds.append(measure_once(clients, ops, pg, fronts))
    finally:
        if pg is not None:
            pg.stop()
    connections = new_connections(200)
    rows = []
    for i, first in enumerate(rounds[0]):
        same = [r[i] for r in rounds]
        base = [next(b for b in r if b["mode"] == "embedded" and b["database"] == first["database"]
                     and b["operation"] == first["operation"]) for r in rounds]
        rows.append({**{k: first[k] for k in ("mode", "database", "operation")}, "ops": first["ops"],
                     **{k: round(statistics.median(x[k] for x in same), 2) for k in ("ops_per_s", "p50_ms", "p99_ms", "cores_busy")},
                     "ratios": [round(x["ops_per_s"] / b["ops_per_s"], 2) for x, b in zip(same, base, strict=True)]})
    return {"clients": clients, "ops_per_client": ops, "repeat": repeat, "fronts": fronts, "rows": rows,
            "new_connections": connections}


def measure_once(clients: int, ops: int, pg: PostgresServer | None, fronts: int = 1) -> list[dict]:
    manifests = load_manifests([str(ROOT / "examples")])
    rows = []
    folders = []
    try:
        for database in ["sqlite", "postgresql"] if pg else ["sqlite"]:
            for mode in ("embedded", "served", "1 process", "2 replicas") if database == "postgresql" else \
                    ("embedded", "served", "1 process"):
                replicas = 2 if mode == "2 replicas" else 1
                state = Path(tempfile.mkdtemp(prefix="tccdeploy-bench-tc-"))
                folders.append(state)
                location = pg.new_database() if database == "postgresql" and pg else str(state / "registry.sqlite")
                if mode == "embedded":
                    tc_init(str(state))
                    nodes = enroll(location, clients)
                    releases = prepare_releases(location, str(state), manifests, clients, ops + 1)
                    shared = Coordinator.from_manifests(manifests, str(state), registry=location)
                    try:
                        result = verdicts(lambda shared=shared: shared, nodes, ops)
                        released = releases_timed(lambda shared=shared: shared, releases)
                    finally:
                        shared.close()
                else:
                    options = ("--fronts", str(fronts if mode == "served" else 0))
                    services = [Service(state, str(ROOT / "examples"), registry=location if database == "postgresql" else None,
                                        options=options)]
                    try:
                        services += [Service(state, str(ROOT / "examples"), registry=location, setup=False, options=options)
                                     for _ in range(replicas - 1)]
                        nodes = enroll(location, clients)
                        releases = prepare_releases(location, str(state), manifests, clients, ops + 1)
                        result = verdicts(remote_clients(services), nodes, ops)
                        released = releases_timed(remote_clients(services), releases)
                    finally:
                        for service in services:
                            service.stop()
                if database == "postgresql" and pg:
                    pg.drop_database(location)
                rows.append({"mode": mode, "database": database, "operation": "verdict", **result})
                rows.append({"mode": mode, "database": database, "operation": "key release", **released})
                print(f"  {mode:<8} {database:<10} verdicts {result}; key releases {released}", file=sys.stderr, flush=True)
    finally:
        for folder in folders:
            shutil.rmtree(folder, ignore_errors=True)
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clients", type=int, default=32)
    parser.add_argument("--ops", type=int, default=50)
    parser.add_argument("--repeat", type=int, default=3, help="rounds of every row, interleaved; figures are medians")
    parser.add_argument("--fronts", type=int, default=1,
                        help="`tc serve --fronts N` for the served rows (0: TLS, HTTP and decisions in one process)")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    result = measure(args.clients, args.ops, args.repeat, args.fronts)
    if args.json:
        print(json.dumps({"benchmark": "tc_service", **result}))
        return 0
    print(f"{args.clients} concurrent clients x {args.ops} operations each, medians of {args.repeat} interleaved rounds "
          f"(served: `tc serve --fronts {args.fronts}`; 1 process: `--fronts 0`; 2 replicas: two of those on one "
          "PostgreSQL, the clients spread over them):")
    base = {(r["database"], r["operation"]): r for r in result["rows"] if r["mode"] == "embedded"}
    for r in result["rows"]:
        ratio = r["ops_per_s"] / base[(r["database"], r["operation"])]["ops_per_s"]
        print(f"  {r['operation']:<11} {r['mode']:<8} {r['database']:<10} {r['ops_per_s']:>8.1f} ops/s  "
              f"p50 {r['p50_ms']:>7.2f} ms  p99 {r['p99_ms']:>7.2f} ms  {r['cores_busy']:.2f} of {CORES} cores busy  "
              f"({ratio:.2f}x embedded; rounds {', '.join(f'{x:.2f}' for x in r['ratios'])})")
    new = result["new_connections"]
    print(f"  a new connection and one call, {new['count']} one after another: full handshake {new['full']['ms']:.2f} ms "
          f"(client CPU {new['full']['client_cpu_ms']:.2f} ms, TC {new['full']['tc_cpu_ms']:.2f} ms), session resumed "
          f"{new['resumed']['ms']:.2f} ms (client {new['resumed']['client_cpu_ms']:.2f} ms, TC "
          f"{new['resumed']['tc_cpu_ms']:.2f} ms): {new['full']['ms'] / new['resumed']['ms']:.2f}x faster")
    single = {(r["database"], r["operation"]): r for r in result["rows"] if r["mode"] == "1 process"}
    for r in [r for r in result["rows"] if r["mode"] == "2 replicas"]:
        print(f"  2 replicas / 1 process: {r['operation']}s "
              f"{r['ops_per_s'] / single[(r['database'], r['operation'])]['ops_per_s']:.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
