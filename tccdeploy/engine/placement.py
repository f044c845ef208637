"""Placement: which admitted node runs a VM. Deterministic, and every choice explained.

A node qualifies when it is admitted in the TC's registry, in one of the requested sites,
booted one of the requested builds (or a build at least the minimum version), has capacity
left (tcc_capacity minus its VMs) and runs no VM of the same anti-affinity group. Among those,
the one with the fewest VMs wins, then the name: the same inputs give the same node.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ..manifest.models import TVMMBuild, version_key

DEFAULT_CAPACITY = 4


@dataclass(frozen=True)
class Candidate:
    node: str
    eligible: bool
    reasons: tuple[str, ...]
    load: int


def rank(spec: dict[str, Any], nodes: list[dict[str, Any]], vms: list[dict[str, Any]], capacities: dict[str, int],
         builds: list[TVMMBuild], customer: str) -> list[Candidate]:
    constraints = spec.get("constraints") or {}
    sites = set(constraints.get("sites") or [])
    wanted_builds = set(constraints.get("builds") or [])
    minimum = constraints.get("minBuildVersion")
    group = constraints.get("antiAffinityGroup")
    versions = {b.name: b.version for b in builds}
    out: list[Candidate] = []
    for node in sorted(nodes, key=lambda n: n["name"]):
        reasons: list[str] = []
        mine = [v for v in vms if v["node"] == node["name"] and v["state"] in ("running", "starting", "stopped")]
        if node["state"] != "admitted":
            reasons.append(f"not admitted ({node['state']})")
        if sites and node["site"] not in sites:
            reasons.append(f"site {node['site'] or '-'} not in {sorted(sites)}")
        if wanted_builds and node["build"] not in wanted_builds:
            reasons.append(f"build {node['build'] or '-'} not in {sorted(wanted_builds)}")
        if minimum and (node["build"] not in versions or version_key(versions[node["build"]]) < version_key(minimum)):
            reasons.append(f"build {node['build'] or '-'} older than {minimum}")
        capacity = capacities.get(node["name"], DEFAULT_CAPACITY)
        if len(mine) >= capacity:
            reasons.append(f"full ({len(mine)}/{capacity} VMs)")
        if group and any(v["anti_affinity"] == group and v["customer"] == customer for v in mine):
            reasons.append(f"already runs a VM of anti-affinity group {group}")
        out.append(Candidate(node["name"], not reasons, tuple(reasons) or ("eligible",), len(mine)))
    return sorted(out, key=lambda c: (not c.eligible, c.load, c.node))
