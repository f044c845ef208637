"""Benchmark: a fleet's attestation round through a served TC on PostgreSQL.

10,000 synthetic nodes, each with a software AK (as the verifier tests use) enrolled in the
TC's registry and on its roster, are re-attested in rounds: N concurrent clients (the engine
side) take the nodes in turn, ask the TC for a nonce, make the node's quote over the lab boot's
PCRs and its TCG log, and submit it; the TC checks it and records the verdict with its audit
entry. A round is every node once. Then the same with two `tc serve` replicas on the one
database, the clients spread over them.

Figures: verdicts per second, the p50/p99 latency of one verdict (nonce and evidence), the
round's time for the whole fleet, and the CPU each verdict cost the TC (its processes) and
PostgreSQL (its server and backends), read from /proc. The engine side's CPU (evidence made in
software, the HTTPS client) is this process's and shares the machine's cores with the TC.
Printed beside them, as anchors (their sizing claims, not measured here): Intel SecL-DC's HVS
and Keylime's verifier.

PostgreSQL and `tc serve` are real processes started here and stopped by PID; PostgreSQL runs
with fsync off (tests/pgserver.py), as the other TC benchmarks do.
Run: .venv/bin/python bench/fleet.py [--nodes 10000] [--clients 32] [--rounds 1]
"""

from __future__ import annotations

import argparse
import json
import os
import queue
import shutil
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from machine import cpu_seconds, with_children  # noqa: E402
from tc_service import ADDRESS, SITE, remote_clients, roster_ek, start_and_time  # noqa: E402

from tccdeploy.coordinator import tpm2  # noqa: E402
from tccdeploy.coordinator.store import Registry  # noqa: E402
from tests.attestkit import Node  # noqa: E402
from tests.pgserver import PostgresServer, skip_reason  # noqa: E402
from tests.tcservice import Service  # noqa: E402

ANCHORS = [  # (whose, what they claim); printed beside the figures, not measured here
    ("Intel SecL-DC HVS sizing", "2,000 hosts by default; 100,000 on 16 vCPU at a 24 h validity (~1.2/s)"),
    ("Keylime verifier", "~2,500 quote checks/s per verifier"),
    ("10,000 nodes at a 60 s interval", "167 verdicts/s sustained"),
]


def enroll_fleet(location: str, count: int, progress: bool) -> dict[str, Node]:
    """count nodes on the roster and enrolled with a software AK (setup, not timed)."""
    nodes = {f"fleet-{i:05d}": Node() for i in range(count)}
    names = list(nodes)
    done = [0]
    lock = threading.Lock()

    def work(part: list[str]) -> None:
        registry = Registry(location)
        try:
            for name in part:
                node = nodes[name]
                registry.roster_add(roster_ek(name), SITE, name, None)
                registry.enroll(name, SITE, ADDRESS, {
                    "ek_certificate": b"c", "ek_fingerprint": roster_ek(name)[7:], "ek_public": b"e",
                    "ak_public": node.ak_public, "ak_name": tpm2.parse_public(node.ak_public).name,
                    "ssh_host_key": node.host_key, "manufacturer": "software"})
                with lock:
                    done[0] += 1
                    if progress and done[0] % 1000 == 0:
                        print(f"  enrolled {done[0]}/{count}", file=sys.stderr, flush=True)
        finally:
            registry.close()

    threads = [threading.Thread(target=work, args=(names[i::4],)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if done[0] != count:
        raise SystemExit(f"enrolling the fleet failed after {done[0]} of {count} nodes")
    return nodes


def postgres_pids(postmaster: int) -> list[int]:
    """The PostgreSQL server and its live backends."""
    return with_children(postmaster)


def one_round(make_tc, nodes: dict[str, Node], clients: int) -> dict:  # type: ignore[no-untyped-def]
    """Every node attested once by clients threads taking them in turn; latencies and time."""
    work: queue.SimpleQueue[str] = queue.SimpleQueue()
    for name in nodes:
        work.put(name)
    latencies: list[float] = []
    failures: list[str] = []
    lock = threading.Lock()
    start = threading.Barrier(clients + 1)

    def client() -> None:
        tc = make_tc()
        tc.connect()  # the engine's connection, opened beforehand
        mine = []
        start.wait()
        try:
            while True:
                try:
                    name = work.get_nowait()
                except queue.Empty:
                    break
                began = time.perf_counter()
                verdict, _ = tc.verify(name, SITE, ADDRESS, nodes[name].evidence(tc.nonce(name)))
                mine.append(time.perf_counter() - began)
                if not verdict.trusted:
                    failures.append(f"{name}: {verdict.reasons}")
        finally:
            with lock:
                latencies.extend(mine)
            tc.close()

    elapsed = start_and_time([threading.Thread(target=client) for _ in range(clients)], start)
    if failures or len(latencies) != len(nodes):
        raise SystemExit(f"{len(failures)} verdicts not trusted, {len(nodes) - len(latencies)} missing: {failures[:3]}")
    latencies.sort()
    return {"round_s": round(elapsed, 2), "verdicts_per_s": round(len(latencies) / elapsed, 1),
            "p50_ms": round(1000 * statistics.median(latencies), 1),
            "p99_ms": round(1000 * latencies[int(len(latencies) * 0.99)], 1)}


def measure(count: int, clients: int, rounds: int) -> dict:
    reason = skip_reason()
    if reason:
        raise SystemExit(f"bench/fleet.py needs PostgreSQL: {reason}")
    pg = PostgresServer()
    state = Path(tempfile.mkdtemp(prefix="tccdeploy-bench-fleet-"))
    rows = []
    try:
        location = pg.new_database()
        services = [Service(state, str(ROOT / "examples"), registry=location)]
        try:
            began = time.perf_counter()
            nodes = enroll_fleet(location, count, progress=True)
            enroll_s = time.perf_counter() - began
            print(f"  {count} nodes enrolled in {enroll_s:.1f} s (setup)", file=sys.stderr, flush=True)
            for replicas in (1, 2):
                if len(services) < replicas:
                    services.append(Service(state, str(ROOT / "examples"), registry=location, setup=False))
                for number in range(1, rounds + 1):
                    tc_pids = [pid for s in services[:replicas] for pid in with_children(s.proc.pid)]  # and fronts
                    tc_before, pg_before, me_before = cpu_seconds(tc_pids), cpu_seconds(postgres_pids(pg.proc.pid)), \
                        sum(os.times()[:2])
                    result = one_round(remote_clients(services[:replicas]), nodes, clients)
                    verdicts = len(nodes)
                    result |= {
                        "replicas": replicas, "round": number,
                        "tc_cpu_ms_per_verdict": round(1000 * (cpu_seconds(tc_pids) - tc_before) / verdicts, 2),
                        "postgres_cpu_ms_per_verdict": round(
                            1000 * (cpu_seconds(postgres_pids(pg.proc.pid)) - pg_before) / verdicts, 2),
                        "engine_side_cpu_ms_per_verdict": round(1000 * (sum(os.times()[:2]) - me_before) / verdicts, 2)}
                    rows.append(result)
                    print(f"  {replicas} replica(s), round {number}: {result}", file=sys.stderr, flush=True)
        finally:
            for service in services:
                service.stop()
    finally:
        pg.stop()
        shutil.rmtree(state, ignore_errors=True)
    return {"nodes": count, "clients": clients, "enroll_s": round(enroll_s, 1), "rows": rows, "anchors": ANCHORS}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--nodes", type=int, default=10_000)
    parser.add_argument("--clients", type=int, default=32, help="concurrent engine-side clients (default 32)")
    parser.add_argument("--rounds", type=int, default=1, help="rounds per configuration (default 1)")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    result = measure(args.nodes, args.clients, args.rounds)
    if args.json:
        print(json.dumps({"benchmark": "fleet", **result}))
        return 0
    print(f"{args.nodes} nodes re-attested through a served TC on PostgreSQL, {args.clients} clients:")
    for r in result["rows"]:
        print(f"  {r['replicas']} replica(s), round {r['round']}: {r['round_s']:>6.1f} s a round  "
              f"{r['verdicts_per_s']:>7.1f} verdicts/s  p50 {r['p50_ms']:.0f} ms  p99 {r['p99_ms']:.0f} ms  "
              f"CPU/verdict: TC {r['tc_cpu_ms_per_verdict']:.2f} ms, PostgreSQL {r['postgres_cpu_ms_per_verdict']:.2f} ms, "
              f"engine side {r['engine_side_cpu_ms_per_verdict']:.2f} ms")
    print("anchors (their claims, not measured here):")
    for whose, claim in result["anchors"]:
        print(f"  {whose}: {claim}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
