"""Encrypted launch, as the engine carries it out.

The engine never sees a VM key in clear: it moves the encrypted disk (SFTP, resumable, digest
checked on the node) and the key wrapped by the TC to the chosen node's TK. The TC accepts the
request, the node is re-attested with a fresh nonce right before the release, the TC releases
the key only to it, the node's TPM unwraps it, QEMU opens the disk, the TC signs the receipt.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any

from ..coordinator.interface import TC
from ..coordinator.keybroker import Refused
from ..crypto import bundle as bundles
from .attestation import attest
from .helper import RemoteError
from .placement import Candidate, rank
from .runner import Engine, Session

CHUNK = 1 << 20


@dataclass
class LaunchResult:
    receipt: dict[str, Any] | None
    node: str | None
    candidates: list[Candidate]
    attempts: list[dict[str, str]] = field(default_factory=list)


def upload_disk(session: Session, vm_id: str, local: str, sha256: str) -> dict[str, Any]:
    """Copy the encrypted disk to the node, resuming a partial copy; the node checks the digest."""
    paths = session.call("vm_paths", {"vm_id": vm_id})
    if not paths["complete"]:
        sftp = session.connect().sftp()
        size = os.path.getsize(local)
        offset = min(int(paths["partial_size"]), size)
        with open(local, "rb") as src, sftp.open(paths["partial"], "ab") as dst:
            dst.set_pipelined(True)
            src.seek(offset)
            for chunk in iter(lambda: src.read(CHUNK), b""):
                dst.write(chunk)
    return session.call("vm_disk_commit", {"vm_id": vm_id, "sha256": sha256}, timeout=300)


def launch(engine: Engine, coordinator: TC, envelope: dict[str, Any], bundle_dir: str,
           vm_args: list[str] | None = None) -> LaunchResult:
    """Place and start the VM a signed request asks for; Refused when it cannot be."""
    bundle = bundles.load(bundle_dir)  # refused here, before anything goes to a node
    record = coordinator.accept_request(envelope, bundle)
    return launch_accepted(engine, coordinator, record, bundle_dir, vm_args, bundle)


def launch_accepted(engine: Engine, coordinator: TC, record: dict[str, Any], bundle_dir: str,
                    vm_args: list[str] | None = None, bundle: dict[str, Any] | None = None) -> LaunchResult:
    """Place and start a request the TC accepted already (a customer submitted it to a served
    TC); the provider has the sealed image in bundle_dir."""
    if bundle is None:
        bundle = bundles.load(bundle_dir)
        if bundle["descriptor"]["vm_id"] != record["vm_id"] or bundle["descriptor"]["disk"]["sha256"] != record["image_sha256"]:
            raise Refused("request.image", f"{bundle_dir} is not the image request {record['id']} names")
    hosts = {h.name: h for h in engine.hosts}
    capacities = {name: int(h.vars.get("tcc_capacity", 4)) for name, h in hosts.items()}
    nodes = [n for n in coordinator.nodes() if n.name in hosts]
    candidates = rank(record["spec"], nodes, coordinator.vms(), capacities, coordinator.builds, record["customer"])
    result = LaunchResult(None, None, candidates)
    for candidate in (c for c in candidates if c.eligible):
        host = hosts[candidate.node]
        check = engine.run(attest(coordinator), [host])[0]  # a fresh verdict, never a cached one
        if check.status not in ("ok", "changed"):
            result.attempts.append({"node": candidate.node, "reason": check.reason or "attestation failed"})
            continue
        release = coordinator.release_key(record["id"], candidate.node)
        session = engine.session(host)
        descriptor = bundle["descriptor"]
        try:
            upload_disk(session, record["vm_id"], os.path.join(bundle_dir, descriptor["disk"]["file"]), record["image_sha256"])
            status = session.call("vm_start", {
                "tcti": str(host.vars.get("tcc_tpm", "device:/dev/tpmrm0")), "vm_id": record["vm_id"], "name": record["vm"],
                "wrapped_key": release["wrapped_key"], "sha256": record["image_sha256"],
                "memory_mib": record["spec"]["memoryMiB"], "vcpus": record["spec"]["vcpus"], "extra_args": vm_args or [],
            }, timeout=120)
        except RemoteError as exc:
            coordinator.fail_request(record["id"])
            raise Refused("launch.node", f"{candidate.node} could not start the VM: {exc}") from None
        result.receipt = coordinator.record_launch(release, candidate.node, status)
        result.node = candidate.node
        return result
    coordinator.fail_request(record["id"])
    why = "; ".join(f"{c.node}: {', '.join(c.reasons)}" for c in candidates) or "no admitted node in the inventory"
    tried = "; ".join(f"{a['node']}: {a['reason']}" for a in result.attempts)
    raise Refused("placement.none", f"no trusted node can run {record['vm']} ({why}{'; re-attestation: ' + tried if tried else ''})")
