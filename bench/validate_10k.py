"""Benchmark: `tccdeploy validate` on a 10,000-host inventory against check-jsonschema.

Generates a perimeter (4 sites), the example TVMM builds and a 10,000-host Ansible YAML
inventory with group_vars/, then times, as whole commands, in the same run:
  - tccdeploy validate DIR      (YAML + schemas + cross-references)
  - check-jsonschema            (the same files against the same schemas; no cross-references)
Run: .venv/bin/python bench/validate_10k.py [--hosts N] [--repeat R]
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent


def generate(root: Path, hosts: int) -> dict[str, list[Path]]:
    sites = 4
    (root / "inventory" / "group_vars").mkdir(parents=True)
    (root / "builds").mkdir()
    ca = REPO / "examples" / "ca" / "example-tpm-vendor-ca.pem"
    shutil.copy(ca, root / "ca.pem")
    site_lines = "".join(f"    - name: site{s}\n      networks: [127.{s}.0.0/16]\n" for s in range(1, sites + 1))
    (root / "perimeter.yml").write_text(
        "apiVersion: tccdeploy/v1\nkind: Perimeter\nmetadata: {name: bench}\nspec:\n  sites:\n" + site_lines
        + "  manufacturerCAs: [{name: vendor, certificate: ca.pem}]\n"
        "  attestation: {bank: sha256, pcrs: [0, 4, 8, 9, 11], intervalSeconds: 60}\n"
    )
    for build in (REPO / "examples" / "builds").glob("*.yml"):
        shutil.copy(build, root / "builds" / build.name)
    lines = ["all:\n  children:\n"]
    per_site = hosts // sites
    n = 0
    for s in range(1, sites + 1):
        lines.append(f"    site{s}:\n      vars:\n        tcc_site: site{s}\n      hosts:\n")
        for i in range(per_site if s < sites else hosts - n):
            n += 1
            addr = f"127.{s}.{i // 250}.{i % 250 + 1}"
            lines.append(
                f"        node{n}:\n          ansible_host: {addr}\n"
                f"          tcc_tpm: \"swtpm:host={addr},port=2321\"\n          tcc_capacity: {4 + n % 4}\n"
            )
    (root / "inventory" / "hosts.yml").write_text("".join(lines))
    (root / "inventory" / "group_vars" / "all.yml").write_text(
        "ansible_user: tccnode\nansible_port: 2222\ntcc_build: tvmm-2026.1\n"
    )
    return {
        "perimeter": [root / "perimeter.yml"],
        "tvmmbuild": sorted((root / "builds").glob("*.yml")),
        "inventory": [root / "inventory" / "hosts.yml"],
        "hostvars": [root / "inventory" / "group_vars" / "all.yml"],
    }


def timed(cmd: list[str], expect_ok: bool = True) -> float:
    start = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    elapsed = time.perf_counter() - start
    if expect_ok and proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd[:3])}... failed:\n{proc.stdout[-2000:]}{proc.stderr[-2000:]}")
    return elapsed


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--hosts", type=int, default=10_000)
    parser.add_argument("--repeat", type=int, default=3, help="runs of each; the best is reported")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="tccdeploy-bench-") as tmp:
        root = Path(tmp)
        files = generate(root, args.hosts)
        size = (root / "inventory" / "hosts.yml").stat().st_size
        ours = min(timed([str(BIN / "tccdeploy"), "validate", "-q", str(root)]) for _ in range(args.repeat))
        peer_cmds = [
            [str(BIN / "check-jsonschema"), "--schemafile", str(REPO / "schemas" / f"{kind}.schema.json"), *map(str, paths)]
            for kind, paths in files.items()
        ]
        peer = min(sum(timed(cmd) for cmd in peer_cmds) for _ in range(args.repeat))
    result = {
        "benchmark": "validate",
        "hosts": args.hosts,
        "inventory_bytes": size,
        "tccdeploy_s": round(ours, 3),
        "check_jsonschema_s": round(peer, 3),
        "ratio": round(peer / ours, 2),
    }
    if args.json:
        print(json.dumps(result))
    else:
        print(f"validate {args.hosts} hosts ({size / 1e6:.1f} MB inventory), best of {args.repeat}:")
        print(f"  tccdeploy validate   {ours:7.3f} s  (schemas + cross-references)")
        print(f"  check-jsonschema     {peer:7.3f} s  (schemas only)")
        print(f"  ratio                {peer / ours:7.2f}x faster than check-jsonschema")
    return 0


if __name__ == "__main__":
    sys.exit(main())
