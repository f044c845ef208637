"""Placement: which admitted node runs a VM. Deterministic, and every choice explained.

A node qualifies when it is admitted in the TC's registry, in one of the requested sites,
booted one of the requested builds (or a build at least the minimum version), has capacity
left (tcc_capacity minus its VMs) and runs no VM of the same anti-affinity group. Among those,
the one with the fewest VMs wins, then the name: the same inputs give the same node.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ..coordinator import constraints
from ..coordinator.records import NodeRecord, VMRecord

DEFAULT_CAPACITY = 4


@dataclass(frozen=True)
class Candidate:
    node: str
    eligible: bool
    reasons: tuple[str, ...]
    load: int


def rank(spec: dict[str, Any], nodes: list[NodeRecord], vms: list[VMRecord], capacities: dict[str, int],
         builds: list[Any], customer: str) -> list[Candidate]:
    """A proposal only: the TC judges the chosen node again with the same constraints."""
    versions = {b.name: b.version for b in builds}
    out: list[Candidate] = []
    for node in sorted(nodes, key=lambda n: n.name):
        mine = [v for v in vms if v.node == node.name and v.state in constraints.LIVE]
        reasons: list[str] = [] if node.state == "admitted" else [f"not admitted ({node.state})"]
        reasons += constraints.problems(spec, node, vms, versions, customer, capacities.get(node.name, DEFAULT_CAPACITY))
        out.append(Candidate(node.name, not reasons, tuple(reasons) or ("eligible",), len(mine)))
    return sorted(out, key=lambda c: (not c.eligible, c.load, c.node))
