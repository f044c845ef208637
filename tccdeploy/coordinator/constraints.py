"""A placement request's constraints, judged for one node: the one place this logic lives.

The TC judges every key release and every migration with it, from its own records (the node's
roster site, the build its fresh trusted attestation matched, its VM table, the roster's
capacity); the engine's placement (engine/placement.py) ranks candidates with the same
function to make its proposal, which the TC may refuse (`placement.constraint`).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

from ..manifest.models import version_key
from .records import NodeRecord, VMRecord

LIVE = ("running", "starting", "stopped")


def problems(spec: Mapping[str, Any], node: NodeRecord, vms: Iterable[VMRecord],
             versions: Mapping[str, str], customer: str, capacity: int | None) -> list[str]:
    """Why node cannot take this VM (nothing when it can).

    node: its name, site and build; vms: the VMs the registry holds; versions: build name -> version;
    capacity: None for no limit. A VM being migrated runs on its source, so it never counts against
    its destination."""
    constraints = spec.get("constraints") or {}
    sites = set(constraints.get("sites") or [])
    builds = set(constraints.get("builds") or [])
    minimum = constraints.get("minBuildVersion")
    group = constraints.get("antiAffinityGroup")
    out: list[str] = []
    # (only a limit or a group weighs the VMs: without them, a node's hundred are not even read)
    mine = [v for v in vms if v.node == node.name and v.state in LIVE] if capacity is not None or group else []
    if sites and node.site not in sites:
        out.append(f"site {node.site or '-'} not in {sorted(sites)}")
    if builds and node.build not in builds:
        out.append(f"build {node.build or '-'} not in {sorted(builds)}")
    if minimum:
        version = versions.get(node.build or "")
        if version is None or version_key(version) < version_key(minimum):
            out.append(f"build {node.build or '-'} older than {minimum}")
    if capacity is not None and len(mine) >= capacity:
        out.append(f"full ({len(mine)}/{capacity} VMs)")
    if group and any(v.anti_affinity == group and v.customer == customer for v in mine):
        out.append(f"already runs a VM of anti-affinity group {group}")
    return out
