"""The engine's work against software nodes, for fast tests of its decisions (enforcement,
evacuation, migration and its rollback, repair) with the real TC of tests/brokerkit.py.

The double sits at the engine's boundary, the SSH session: `SoftwareEngine` is the real Engine
(its parallel runner, its error handling) whose sessions reach `SoftwareService`, a node's TVMM
service in software. The service answers as the real one does (tccdeploy/tvmm): it takes only
tickets the TC signed for this node, appends the same runtime events, and quotes them with the
node's software AK (tests/attestkit.py), so the TC checks real signatures over real event lists.
What it leaves out is QEMU and the disk: the VM is a state string. Faults are injected per
operation (`fail`), and a node can be cut off (`down`). The integration tests
(tests/test_enforce.py, tests/test_migrate.py) do the same on the lab's sshd, swtpm and QEMU.
"""

from __future__ import annotations

import base64
import dataclasses
import hashlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tccdeploy.coordinator.lifecycle import END_EVENTS
from tccdeploy.coordinator.records import VMRecord
from tccdeploy.crypto.ticket import verify as verify_ticket
from tccdeploy.engine.connection import Unreachable, fingerprint
from tccdeploy.engine.helper import RemoteError
from tccdeploy.engine.runner import Engine
from tccdeploy.inventory import Host

from .attestkit import Node
from .brokerkit import World


class HostKey:
    """What paramiko's transport gives for the node's SSH host key (its bytes are what is fingerprinted)."""

    def __init__(self, name: str):
        self._bytes = b"ssh-ed25519 host key of " + name.encode()

    def asbytes(self) -> bytes:
        return self._bytes


def host_key_of(name: str) -> str:
    return fingerprint(HostKey(name))  # type: ignore[arg-type]


@dataclass
class SoftwareService:
    """A node's TVMM service in software: its TPM (AK, boot), runtime event log and VMs."""

    name: str
    tpm: Node
    ca: Any  # the TC CA certificate the service pinned with its TK (tickets must chain to it)
    vms: dict[str, str] = field(default_factory=dict)  # vm_id -> running | paused | incoming | off | destroyed
    events: list[dict[str, Any]] = field(default_factory=list)
    pending: dict[str, dict[str, Any]] = field(default_factory=dict)  # vm_id -> {"migration", "role", "was_running"}
    used: set[str] = field(default_factory=set)
    calls: list[str] = field(default_factory=list)
    fail: dict[str, Exception] = field(default_factory=dict)  # op -> what it raises (every call)
    down: bool = False
    boot_extra: list[tuple[int, bytes]] = field(default_factory=list)  # what boots beyond the approved build

    # -- plumbing -----------------------------------------------------------------------------
    def call(self, op: str, args: dict[str, Any]) -> dict[str, Any]:
        if self.down:
            raise Unreachable("connect", f"{self.name}: connection refused")
        self.calls.append(op)
        if op in self.fail:
            raise self.fail[op]
        return getattr(self, "op_" + op)(**args)

    def _ticket(self, envelope: dict[str, Any], kind: str, vm_id: str | None = None) -> dict[str, Any]:
        body = verify_ticket(envelope, self.ca)
        if body["kind"] != kind or body["node"] != self.name or (vm_id is not None and body["vm_id"] != vm_id):
            raise RemoteError("ticket", f"{self.name} refuses a {body['kind']} ticket for {body['node']}/{body['vm_id']}")
        if body["id"] in self.used:
            raise RemoteError("ticket.replayed", "this ticket was used on this node already")
        self.used.add(body["id"])
        return body

    def _record(self, event: dict[str, Any], ticket: dict[str, Any]) -> dict[str, Any]:
        """Extend the runtime PCR with event and quote it for the ticket (its body), as
        tvmm/runtime.record: the event names the ticket and the TK it was for."""
        self.events.append({**event, "ticket": ticket["id"], "tk": ticket["tk_name"]})
        return self.evidence(ticket["id"])

    def evidence(self, ticket_id: str) -> dict[str, Any]:
        return self.tpm.runtime_evidence({"ticket": {"id": ticket_id}}, events=list(self.events))

    # -- the operations the engine's enforcement and migration use ------------------------------
    def op_quote(self, nonce: str, bank: str, pcrs: list[int]) -> dict[str, Any]:
        evidence = self.tpm.evidence(base64.b64decode(nonce), pcrs, log_extra=self.boot_extra or None)
        return {"attest": base64.b64encode(evidence.attest).decode(),
                "signature": base64.b64encode(evidence.signature).decode(),
                "pcrs": {str(k): v.hex() for k, v in evidence.pcrs.items()},
                "eventlog": base64.b64encode(evidence.eventlog).decode()}

    def op_vm_status(self, vm_id: str) -> dict[str, Any]:
        return {"status": self.vms.get(vm_id, "absent"), "migration": self.pending.get(vm_id)}

    def op_runtime_log(self, runtime_pcr: int, ticket: str) -> dict[str, Any]:
        return {"evidence": self.evidence(ticket)}

    def op_vm_end(self, ticket: dict[str, Any]) -> dict[str, Any]:
        body = self._ticket(ticket, "end")
        vm_id = body["vm_id"]
        self.vms[vm_id] = "off" if body["action"] == "poweroff" else "destroyed"
        return {"changed": True, "status": self.vms[vm_id],
                "evidence": self._record({"event": END_EVENTS[body["action"]], "vm_id": vm_id, "ticket": body["id"]},
                                         body)}

    def op_migrate_out_start(self, ticket: dict[str, Any]) -> dict[str, Any]:
        body = self._ticket(ticket, "migrate-out")
        vm_id = body["vm_id"]
        was_running = self.vms.get(vm_id) == "running"
        self.vms[vm_id] = "paused"
        self.pending[vm_id] = {"migration": body["migration"], "role": "source", "was_running": was_running}
        return {"changed": True, "was_running": was_running}

    def op_disk_state(self, vm_id: str, **_: Any) -> dict[str, Any]:
        return {"complete": False, "partial_size": 0}

    def op_disk_send(self, vm_id: str, offset: int, **_: Any) -> list[bytes]:
        return [b"ciphertext"[offset:]]  # the stream's blocks

    def op_disk_receive(self, vm_id: str, offset: int, blocks: Any, **_: Any) -> dict[str, Any]:
        return {"size": offset + sum(len(piece) for piece in blocks)}

    def op_disk_commit(self, vm_id: str, sha256: str, **_: Any) -> dict[str, Any]:
        return {"changed": True}

    def op_migrate_in_start(self, ticket: dict[str, Any]) -> dict[str, Any]:
        body = self._ticket(ticket, "migrate-in")
        self.vms[body["vm_id"]] = "incoming"
        self.pending[body["vm_id"]] = {"migration": body["migration"], "role": "destination", "ticket": body}
        return {"changed": True}

    def op_migrate_out_stream(self, vm_id: str) -> list[bytes]:
        return [b"guest memory, ", b"encrypted"]  # the stream's blocks

    def op_migrate_in_stream(self, vm_id: str, blocks: Any) -> dict[str, Any]:
        return {"bytes": sum(len(piece) for piece in blocks)}

    def op_migrate_in_finish(self, vm_id: str) -> dict[str, Any]:
        body = self.pending[vm_id]["ticket"]
        self.vms[vm_id] = "paused"
        evidence = self._record({"event": "migrated-in", "vm_id": vm_id, "migration": body["migration"],
                                 "source": body["source"], "ticket": body["id"], "image_sha256": body["image_sha256"]},
                                body)
        return {"changed": True, "running": False, "status": "paused", "evidence": evidence}

    def op_migrate_in_settle(self, vm_id: str, ticket: dict[str, Any], resume: bool) -> dict[str, Any]:
        body = self._ticket(ticket, "settle", vm_id)
        self.pending.pop(vm_id, None)
        if body["outcome"] == "commit":
            self.vms[vm_id] = "running" if resume else "paused"
        else:
            self.vms.pop(vm_id, None)
        return {"changed": True, "status": self.vms.get(vm_id, "absent"), "running": self.vms.get(vm_id) == "running"}

    def op_migrate_out_end(self, vm_id: str, ticket: dict[str, Any]) -> dict[str, Any]:
        body = self._ticket(ticket, "settle", vm_id)
        pending = self.pending.pop(vm_id, {})
        if body["outcome"] == "commit":
            self.vms.pop(vm_id, None)
            return {"changed": True, "status": "moved", "evidence": self._record(
                {"event": "migrated-out", "vm_id": vm_id, "migration": body["migration"], "ticket": body["id"]}, body)}
        self.vms[vm_id] = "running" if pending.get("was_running", True) else "paused"
        return {"changed": True, "status": self.vms[vm_id]}


class SoftwareStream:
    """What Service.stream_from gives: the blocks as they are iterated, then the outcome."""

    def __init__(self, blocks: list[bytes]):
        self.blocks, self.outcome, self.bytes = blocks, None, 0

    def __iter__(self) -> Any:
        for piece in self.blocks:
            self.bytes += len(piece)
            yield piece
        self.outcome = {"eof": True, "bytes": self.bytes}


class SoftwareSession:
    """The engine's session to a node, reaching its SoftwareService instead of sshd."""

    def __init__(self, host: Host, service: SoftwareService):
        self.host, self.service = host, service
        self.transport = self  # host_key(session) reads session.connect().transport.get_remote_server_key()

    def connect(self) -> SoftwareSession:
        if self.service.down:
            raise Unreachable("connect", f"{self.host.name}: connection refused")
        return self

    def get_remote_server_key(self) -> HostKey:
        return HostKey(self.host.name)

    def tvmm(self, op: str, args: dict[str, Any] | None = None, timeout: float | None = None) -> dict[str, Any]:
        return self.service.call(op, dict(args or {}))

    def tvmm_stream_from(self, op: str, args: dict[str, Any] | None = None, timeout: float | None = None) -> SoftwareStream:
        return SoftwareStream(self.service.call(op, dict(args or {})))  # type: ignore[arg-type]

    def tvmm_stream_to(self, op: str, blocks: Any, args: dict[str, Any] | None = None,
                       timeout: float | None = None) -> dict[str, Any]:
        return self.service.call(op, {**(args or {}), "blocks": blocks})

    def call(self, op: str, args: dict[str, Any] | None = None, timeout: float | None = None) -> dict[str, Any]:
        raise AssertionError(f"the engine's enforcement and migration use the TVMM service only, not the helper's {op}")

    def close(self) -> None:
        pass


class SoftwareEngine(Engine):
    """The real Engine; its sessions reach software services."""

    def __init__(self, services: dict[str, SoftwareService], state: str, capacity: int = 4):
        hosts = [Host(name, vars={"ansible_host": f"127.0.1.{10 + i}", "tcc_site": "site1", "tcc_capacity": capacity})
                 for i, name in enumerate(services)]
        super().__init__(hosts, forks=4, state=state)
        self.services = services

    def session(self, host: Host) -> SoftwareSession:  # type: ignore[override]
        if host.name not in self.sessions:
            self.sessions[host.name] = SoftwareSession(host, self.services[host.name])  # type: ignore[assignment]
        return self.sessions[host.name]  # type: ignore[return-value]


# The other engines the tests lease nodes for, beside this fleet's own (the embedded TC's "local").
OTHER_ENGINES = ("engine-a", "engine-b", "hostile")


class Fleet:
    """A TC (brokerkit.World) with admitted software nodes, their services and the engine over them."""

    def __init__(self, root: Path, nodes: list[str], capacity: int = 4, **policy: Any):
        """policy: AttestationPolicy fields to change (on_failure, grace_period, ...)."""
        self.world = World(root)
        self.tc = self.world.tc
        if policy:
            self.tc.perimeter = dataclasses.replace(self.tc.perimeter, attestation=dataclasses.replace(
                self.tc.perimeter.attestation, **policy))
        ca = self.tc.identity().certificate
        self.services: dict[str, SoftwareService] = {}
        for i, name in enumerate(nodes):
            node = self.world.node(name, address=f"127.0.1.{10 + i}", host_key=host_key_of(name))
            self.services[name] = SoftwareService(name, node.tpm, ca)
        self.world.customer("acme")
        self.engine = SoftwareEngine(self.services, str(root / "engine"), capacity)
        for i, other in enumerate(OTHER_ENGINES):  # engines sharing the fleet, as `tc engines add` records them
            self.tc.registry.add_engine(other, f"{0xE0 + i:x}", f"{i:064x}")

    def launch(self, node: str, name: str | None = None, owner: str = "acme") -> VMRecord:
        """A VM launched on node as the real service would: the launch event in its runtime log."""
        record = self.world.accepted(owner, name=name)
        release = self.tc.release_key(record["id"], node)
        body = release["ticket"]["ticket"]
        service = self.services[node]
        evidence = service._record({"event": "launched", "vm_id": body["vm_id"], "image_sha256": body["image_sha256"],
                                    "ticket": body["id"], "vcpus": body["vcpus"], "memory_mib": body["memory_mib"]},
                                   body)
        service.vms[body["vm_id"]] = "running"
        self.tc.record_launch(release, node, {"running": True, "evidence": evidence})
        vm = self.tc.vm(body["vm_id"])
        assert vm is not None
        return vm

    def where(self, vm: VMRecord) -> tuple[str | None, str]:
        """Where the TC's records put the VM, and its state there."""
        now = self.tc.vm(vm.vm_id)
        assert now is not None
        return now.node, now.state

    def close(self) -> None:
        self.engine.close()
        self.world.close()


def interrupted(fleet: Fleet, vm: VMRecord, arrived: bool) -> dict[str, Any]:
    """The engine's run dies mid-migration: begun at the TC, the VM paused on the source, and
    (arrived) the destination holding it, with nothing settled. Returns the TC's begin answer."""
    begin = fleet.tc.migration_begin(vm.name, "n2")
    source, destination = fleet.services["n1"], fleet.services["n2"]
    source.call("migrate_out_start", {"ticket": begin["out_ticket"]})
    destination.call("migrate_in_start", {"ticket": begin["in_ticket"]})
    if arrived:
        destination.call("migrate_in_finish", {"vm_id": vm.vm_id})
    return begin


def tampered_boot(service: SoftwareService) -> None:
    """The node now boots something else: a boot application the approved build does not have."""
    service.boot_extra = [(4, hashlib.sha256(b"a rootkit's loader").digest())]
