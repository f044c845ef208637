"""Encrypted launch, as the engine carries it out.

The engine never sees a VM key in clear: it moves the encrypted disk (into the node's TVMM
service, resumable, digest checked there) and the key wrapped by the TC to the chosen node's TK. The TC accepts the
request, the node is re-attested with a fresh nonce right before the release, the TC releases
the key only to it, the node's TPM unwraps it, QEMU opens the disk, the TC signs the receipt.
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from .. import progress
from ..coordinator.interface import TC
from ..coordinator.keybroker import Refused
from ..crypto import bundle as bundles
from . import bulk
from .attestation import attest
from .helper import RemoteError
from .lifecycle import end_vm
from .placement import Candidate, rank
from .runner import Engine, Session

CHUNK = 1 << 20


@dataclass
class LaunchResult:
    receipt: dict[str, Any] | None
    node: str | None
    candidates: list[Candidate]
    attempts: list[dict[str, str]] = field(default_factory=list)
    # Where the time went, in seconds, in order: what the engine did and waited for, and inside
    # the node's launch what the TVMM service reports of its own steps ("node: ...").
    steps: dict[str, float] = field(default_factory=dict)


@contextlib.contextmanager
def _step(steps: dict[str, float], name: str) -> Iterator[None]:
    began = time.perf_counter()
    try:
        yield
    finally:
        steps[name] = steps.get(name, 0.0) + time.perf_counter() - began


def upload_disk(session: Session, vm_id: str, local: str, sha256: str) -> dict[str, Any]:
    """Copy the encrypted disk into the node's TVMM service (the admin login cannot reach the VM
    folders), resuming a partial copy; the service checks the digest before it keeps the disk.
    The bytes go through OpenSSH's client pinned to the node's verified host key where there is
    one (bulk.py), else through the session's own connection."""
    state = session.tvmm("disk_state", {"vm_id": vm_id})
    if not state["complete"]:
        size = os.path.getsize(local)
        offset = min(int(state["partial_size"]), size)
        stream = bulk.service(session.service_connection)
        try:
            with open(local, "rb") as src, progress.transfer(f"upload to {session.host.name}", size - offset) as advance:
                src.seek(offset)

                def blocks() -> Iterator[bytes]:
                    for chunk in iter(lambda: src.read(CHUNK), b""):
                        advance(len(chunk))
                        yield chunk

                args = {"vm_id": vm_id, "offset": offset}
                if stream is not None:
                    stream.stream_to("disk_receive", blocks(), args, timeout=300)
                else:
                    session.tvmm_stream_to("disk_receive", blocks(), args, timeout=300)
        finally:
            if stream is not None:
                stream.close()
    return session.tvmm("disk_commit", {"vm_id": vm_id, "sha256": sha256}, timeout=300)


def launch(engine: Engine, coordinator: TC, envelope: dict[str, Any], bundle_dir: str) -> LaunchResult:
    """Place and start the VM a signed request asks for; Refused when it cannot be."""
    began = time.perf_counter()
    bundle = bundles.load(bundle_dir)  # refused here, before anything goes to a node
    record = coordinator.accept_request(envelope, bundle)
    accepted = time.perf_counter() - began
    result = launch_accepted(engine, coordinator, record, bundle_dir, bundle)
    result.steps = {"accept": accepted, **result.steps}
    return result


def launch_accepted(engine: Engine, coordinator: TC, record: dict[str, Any], bundle_dir: str,
                    bundle: dict[str, Any] | None = None) -> LaunchResult:
    """Place and start a request the TC accepted already (a customer submitted it to a served
    TC); the provider has the sealed image in bundle_dir."""
    if bundle is None:
        bundle = bundles.load(bundle_dir)
        if bundle["descriptor"]["vm_id"] != record["vm_id"] or bundle["descriptor"]["disk"]["sha256"] != record["image_sha256"]:
            raise Refused("request.image", f"{bundle_dir} is not the image request {record['id']} names")
    steps: dict[str, float] = {}
    with _step(steps, "placement"):
        hosts = {h.name: h for h in engine.hosts}
        capacities = {name: int(h.vars.get("tcc_capacity", 4)) for name, h in hosts.items()}
        nodes = [n for n in coordinator.nodes() if n.name in hosts]
        candidates = rank(record["spec"], nodes, coordinator.vms(), capacities, coordinator.builds, record["customer"])
    result = LaunchResult(None, None, candidates, steps=steps)
    for candidate in (c for c in candidates if c.eligible):
        host = hosts[candidate.node]
        with _step(steps, "attestation"):
            check = engine.run(attest(coordinator), [host])[0]  # a fresh verdict, never a cached one
        if check.status not in ("ok", "changed"):
            result.attempts.append({"node": candidate.node, "reason": check.reason or "attestation failed"})
            continue
        session = engine.session(host)
        descriptor = bundle["descriptor"]
        try:
            # The ciphertext first, the key after: a ticket lives minutes, an upload may take longer.
            with _step(steps, "upload"):
                upload_disk(session, record["vm_id"], os.path.join(bundle_dir, descriptor["disk"]["file"]),
                            record["image_sha256"])
            try:
                with _step(steps, "key release"):
                    release = coordinator.release_key(record["id"], candidate.node)
            except Refused:
                with contextlib.suppress(RemoteError):  # the unused copy goes; the refusal is the news
                    session.tvmm("migrate_in_discard", {"vm_id": record["vm_id"]})
                raise
            with _step(steps, "node launch"):
                status = session.tvmm("launch", {"ticket": release["ticket"]}, timeout=120)
            for name, seconds in (status.get("timings") or {}).items():
                if isinstance(seconds, int | float) and not isinstance(seconds, bool):
                    steps[f"node: {name}"] = float(seconds)  # the service's own account, for the breakdown only
        except RemoteError as exc:
            coordinator.fail_request(record["id"])
            raise Refused("launch.node", f"{candidate.node} could not start the VM: {exc}") from None
        try:
            with _step(steps, "receipt"):
                result.receipt = coordinator.record_launch(release, candidate.node, status)
        except Refused:
            # The TC did not believe the launch (its evidence did not hold): the VM must not run
            # unrecorded. Stop it and give its disk up; the request is failed.
            try:
                end_vm(session, coordinator, record["vm_id"], candidate.node, "destroy")
            finally:
                coordinator.fail_request(record["id"])
            raise
        result.node = candidate.node
        return result
    coordinator.fail_request(record["id"])
    why = "; ".join(f"{c.node}: {', '.join(c.reasons)}" for c in candidates) or "no admitted node in the inventory"
    tried = "; ".join(f"{a['node']}: {a['reason']}" for a in result.attempts)
    raise Refused("placement.none", f"no trusted node can run {record['vm']} ({why}{'; re-attestation: ' + tried if tried else ''})")
