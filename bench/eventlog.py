#!/usr/bin/env python3
"""Parse and replay real machines' event logs (tests/vectors/eventlogs/) against tpm2_eventlog on
the same files, each doing the whole job: read the file, parse every event, replay every bank.

    .venv/bin/python bench/eventlog.py [--repeat N] [--json]

tpm2_eventlog is a process per log (as an operator or Keylime-style tooling runs it), so its
figure includes process start; tccdeploy's is the in-process call the verifier makes, and the
process start of `python -c` is printed beside it for a fair reading.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tccdeploy.eventlog import parse  # noqa: E402

CORPUS = ROOT / "tests" / "vectors" / "eventlogs"
LOGS = ["go-tpm-tools/gdc-host.bin", "go-tpm-tools/ubuntu-2404-amd-sevsnp.bin", "go-tpm-tools/ubuntu-2104-no-dbx.bin"]


def ours(raw: bytes) -> int:
    log = parse(raw)
    for bank in log.banks:
        log.replay(bank)
    return len(log.events)


def per_call_ms(fn, repeat: int) -> float:  # type: ignore[no-untyped-def]
    best = float("inf")
    for _ in range(3):
        start = time.perf_counter()
        for _ in range(repeat):
            fn()
        best = min(best, (time.perf_counter() - start) / repeat)
    return best * 1000


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeat", type=int, default=200, help="calls per timing of tccdeploy (default 200)")
    parser.add_argument("--json", action="store_true", help="print the result as JSON (for bench/run)")
    args = parser.parse_args()
    rows = []
    for name in LOGS:
        path = CORPUS / name
        raw = path.read_bytes()
        log = parse(raw)
        events = ours(raw)
        ms = per_call_ms(lambda path=path: ours(path.read_bytes()), args.repeat)
        t2e = per_call_ms(lambda path=path: subprocess.run(["tpm2_eventlog", str(path)], capture_output=True, check=True),
                          max(3, args.repeat // 20))
        rows.append({"log": name, "bytes": len(raw), "events": events, "banks": len(log.banks),
                     "tccdeploy_ms": round(ms, 3), "tpm2_eventlog_ms": round(t2e, 2), "ratio": round(t2e / ms, 1)})
    python_start = per_call_ms(lambda: subprocess.run([sys.executable, "-c", "pass"], check=True), 5)
    result = {"rows": rows, "python_start_ms": round(python_start, 1)}
    if args.json:
        print(json.dumps(result))
        return 0
    print(f"{'log':45} {'events':>6} {'banks':>5} {'tccdeploy':>10} {'tpm2_eventlog':>14} ratio")
    for r in rows:
        print(f"{r['log']:45} {r['events']:>6} {r['banks']:>5} {r['tccdeploy_ms']:>8.3f}ms {r['tpm2_eventlog_ms']:>12.2f}ms "
              f"{r['ratio']}x faster")
    print(f"(a python process start alone: {result['python_start_ms']} ms)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
