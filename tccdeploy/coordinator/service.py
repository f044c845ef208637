"""The trusted coordinator, embedded: the one object the engine talks to.

It holds the registry, the perimeter and the builds (from the manifests), and takes every
decision itself from evidence it checks: enrollment, nonces, verdicts. The engine only carries
what nodes answer. `tc serve` (api.py) offers the same methods over HTTPS, and client.py is the
engine's side of that: code that takes a Coordinator runs unchanged with either.
"""

from __future__ import annotations

import base64
import functools
import hashlib
import os
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

from cryptography import x509
from cryptography.hazmat.primitives import serialization

from ..config import state_dir, state_path
from ..crypto import ticket as tickets
from ..crypto import wrap
from ..crypto.runtime import redact
from ..manifest.models import NodeRoster, Perimeter, Platform, TVMMBuild
from . import (
    admission,
    audit,
    ear,
    enrollment,
    identity,
    keybroker,
    lifecycle,
    receipts,
    references,
    roster,
    runtime,
    suspension,
    verifier,
)
from .records import IdentitySummary, MigrationRecord, NodeRecord, RequestRecord, VMRecord
from .refusals import Refused
from .store import LOCAL_ENGINE, Conflict, Registry, RegistryError

REGISTRY_FILE = "registry.sqlite"
LEASE_MAX = 600.0  # seconds: a node lease covers one enforcement round
LEASE_BATCH = 20_000  # nodes leased or released in one call
REGISTRY_ENV = "TCCDEPLOY_REGISTRY"


def registry_location(state: str | None = None, create: bool = True) -> str:
    """Where the registry is: $TCCDEPLOY_REGISTRY (a postgresql:// URL, for replicas), else the
    SQLite file in the state directory (made, unless not create: a command that only reads)."""
    return os.environ.get(REGISTRY_ENV) or os.path.join((state_dir if create else state_path)(state), REGISTRY_FILE)


@dataclass(frozen=True)
class Standing:
    """A node's identity as the TC's records give it: the enrolled EK (None: not enrolled) and
    the roster entry that EK is on, or the roster's objections."""

    known: dict[str, Any] | None
    entry: roster.RosterEntry | None
    failures: list[tuple[str, str]]

    def rollout_identity(self, node: str) -> tuple[str | None, tuple[str, ...]]:
        if self.known is None:
            return None, ()
        named = node if self.entry is not None and not self.failures and self.entry.name == node else None
        return named, roster.enrolled_identities(self.known)


def node_summaries(registry: Registry) -> list[NodeRecord]:
    """Every node with its last verdict and reasons (the TC's own view, and `nodes` on its machine)."""
    out = []
    for node in registry.nodes():
        last = registry.attestations(node["name"], limit=1)
        out.append(NodeRecord.from_row(node | ({
            "last_attestation": last[0]["time"], "verdict": last[0]["verdict"],
            "reasons": [r["code"] for r in last[0]["reasons"]]} if last else {})))
    return out


class Coordinator:
    def __init__(self, perimeter: Perimeter, builds: list[TVMMBuild], state: str | None = None,
                 registry: str | None = None, rosters: list[NodeRoster] | tuple[NodeRoster, ...] = (),
                 platforms: list[Platform] | tuple[Platform, ...] = ()):
        self.state = state_dir(state)
        self.perimeter = perimeter
        self.builds = builds
        self.platforms = list(platforms)
        self.rosters = list(rosters)
        self.registry = Registry(registry or registry_location(self.state))
        self.registry.auditor = self._audit_link
        self._identity: identity.Identity | None = None
        self._auditor: audit.Auditor | None = None

    @classmethod
    def from_manifests(cls, loaded: Any, state: str | None = None, registry: str | None = None) -> Coordinator:
        """The TC governed by a manifests' LoadResult: its Perimeter, TVMMBuilds, Platforms and NodeRosters."""
        return cls(loaded.perimeter, loaded.builds, state, registry, loaded.rosters, getattr(loaded, "platforms", ()))

    def reload(self, loaded: Any) -> None:
        """Take new manifests (SIGHUP): a build revoked or a machine taken off the roster counts
        from the next decision on. A build that may no longer run is audited (build.revoked), so
        the security team's webhooks hear of it."""
        before = {b.name for b in self.builds if b.admissible}
        after = {b.name for b in loaded.builds if b.admissible}
        for name in sorted(before - after):
            audit.append(self.registry, "build.revoked", build=name)
        self.perimeter, self.builds, self.rosters = loaded.perimeter, loaded.builds, list(loaded.rosters)
        self.platforms = list(getattr(loaded, "platforms", ()))
        self._identity = self._auditor = None  # and the TC's keys, which `tc rotate` may have changed

    def identity(self) -> identity.Identity:
        """The TC's keys, loaded once: parsing (and validating) the RSA-3072 key costs more than
        the key release that uses it."""
        if self._identity is None:
            self._identity = identity.init(self.state)[0]
        return self._identity

    def _audit_link(self, prev: str, entry: dict[str, Any]) -> tuple[str, str]:
        if self._auditor is None:
            self._auditor = audit.Auditor(self.identity())
        return self._auditor(prev, entry)

    def close(self) -> None:
        self.registry.close()

    # -- the roster (the TC operator's) ---------------------------------------------------
    def roster_entries(self, eks: tuple[str, ...] | None = None,
                       rows: list[dict[str, Any]] | None = None) -> list[roster.RosterEntry]:
        """The manifests' NodeRosters and the operator's `tc roster add` entries; eks: only the
        entries for these EK names (a decision about one node reads its own, not the fleet's);
        rows: the operator's entries for eks, when the caller has read them."""
        out = [n for r in self.rosters for n in r.nodes if eks is None or n.ek in eks]
        out += [roster.RosterEntry(row["ek"], row["site"], row["name"], row["capacity"])
                for row in (self.registry.roster(eks) if rows is None else rows)]
        return out

    def roster_add(self, ek: str, site: str, name: str | None = None, capacity: int | None = None) -> roster.RosterEntry:
        ek = roster.normalize(ek)
        if self.perimeter.site(site) is None:
            raise Refused("roster.unknown-site", f"site {site!r} is not in perimeter {self.perimeter.name!r}; sites: "
                                                 f"{', '.join(s.name for s in self.perimeter.sites)}")
        clash = [e for e in self.roster_entries() if e.ek == ek or (name is not None and e.name == name)]
        if clash:
            raise Refused("roster.duplicate", f"the roster has {clash[0].ek} as {clash[0].name or '(unnamed)'} in site "
                                              f"{clash[0].site} already ({clash[0].source}); remove it first")
        try:
            self.registry.roster_add(ek, site, name, capacity,
                                     audit.entry("roster.add", name, ek=ek, site=site, capacity=capacity))
        except Conflict as exc:
            raise Refused(exc.reason, str(exc)) from None
        return roster.RosterEntry(ek, site, name, capacity)

    def roster_remove(self, ek: str) -> bool:
        """Take a machine off the roster: it fails attestation (`perimeter.not-in-roster`) from the next round."""
        ek = roster.normalize(ek)
        if any(e.ek == ek and e.source != "registry" for e in self.roster_entries()):
            raise Refused("roster.in-manifest", f"{ek} is listed in a NodeRoster manifest; remove it there and reload "
                                                "the TC's manifests")
        return self.registry.roster_remove(ek, audit.entry("roster.remove", ek=ek))

    def _roster_of(self, node: str, claimed_site: str | None, known: dict[str, Any] | None = None,
                   rows: list[dict[str, Any]] | None = None) -> tuple[roster.RosterEntry | None, list[tuple[str, str]]]:
        """The roster entry for node's enrolled EK, or the roster's objection. known, rows: node's
        identity row and the operator's roster entries for it, when the caller has read them
        (Registry.identity_and_roster)."""
        if known is None:
            known, rows = self.registry.identity_and_roster(node)
        if known is None:
            return None, []
        identities = roster.enrolled_identities(known)
        try:
            entry = roster.check(self.roster_entries(identities, rows), node, identities, None)
        except Refused as exc:
            return None, [(exc.reason, str(exc))]
        if claimed_site is not None and claimed_site != entry.site:  # the claim is wrong; the roster still places it
            return entry, [("perimeter.roster-site", f"{node} claims site {claimed_site!r}, but the roster puts its TPM "
                                                     f"in site {entry.site!r}")]
        return entry, []

    def _standing(self, node: str) -> Standing:
        """What the TC's records say of node's identity: its enrolled EK and its roster entry."""
        known, rows = self.registry.identity_and_roster(node)
        entry, failures = self._roster_of(node, None, known, rows) if known is not None else (None, [])
        return Standing(known, entry, failures)

    def rollout_identity(self, node: str) -> tuple[str | None, tuple[str, ...]]:
        """How a candidate's rollout may name node, from the TC's records only: its enrolled EK's
        fingerprints, and its name only where the roster gives the EK that name (an unnamed
        roster entry's node is named by the engine at enrollment, which proves nothing)."""
        return self._standing(node).rollout_identity(node)

    def baseline(self, standing: Callable[[str], Standing] | None = None) -> references.Baseline:
        """The reference values as the manifests stand now, for decisions after the verdict.
        standing: how to read a node's standing (one decision reads it once: _decision_standing)."""
        look = standing or self._standing
        return references.Baseline(self.builds, self.platforms, lambda node: look(node).rollout_identity(node))

    def _decision_standing(self) -> Callable[[str], Standing]:
        """A node's standing read once per decision, however many of its checks ask."""
        return functools.lru_cache(maxsize=4)(self._standing)

    def capacity(self, node: str, standing: Callable[[str], Standing] | None = None) -> int | None:
        """How many VMs the roster lets node run (None: the roster declares no limit)."""
        entry = (standing or self._standing)(node).entry
        return entry.capacity if entry else None

    # -- enrollment -----------------------------------------------------------------------
    def _refusals(self, kind: str, node: str | None = None, vm: str | None = None):  # type: ignore[no-untyped-def]
        """Record a refusal in the audit log on its way out (the refused decision wrote nothing)."""
        coordinator = self

        class _Audited:
            def __enter__(self) -> None:
                return None

            def __exit__(self, kind_, exc, tb) -> Literal[False]:
                if isinstance(exc, Refused):
                    audit.append(coordinator.registry, kind + ".refused", node, vm if isinstance(vm, str) else None,
                                 reason=exc.reason, message=str(exc))
                return False

        return _Audited()

    def enrollment_challenge(self, node: str, ek_certificate: bytes, ek_public: bytes, ak_public: bytes,
                             ssh_host_key: str, site: str | None = None, address: str = "") -> enrollment.Challenge | None:
        """A credential challenge, or None: node is enrolled with this TPM already (a no-op)."""
        with self._refusals("enrollment", node):
            return enrollment.begin(self.registry, self.perimeter, self.roster_entries, node, ek_certificate, ek_public,
                                    ak_public, ssh_host_key, site, address)

    def enrollment_finish(self, node: str, answer: bytes) -> dict[str, Any]:
        with self._refusals("enrollment", node):
            return enrollment.finish(self.registry, node, answer, lambda r: audit.entry(
                "enrollment", node, manufacturer=r["manufacturer"], ek_fingerprint=r["ek_fingerprint"], site=r["site"]))

    # -- what the engine asks the node for --------------------------------------------------
    def quote_policy(self) -> tuple[str, list[int]]:
        """(bank, PCRs) a quote must cover; the engine asks the node for exactly these."""
        policy = self.perimeter.attestation
        return policy.bank, list(policy.pcrs)

    def runtime_pcr(self) -> int:
        """The PCR the nodes' TVMM services extend with VM events (their evidence)."""
        return self.perimeter.attestation.runtime_pcr

    def grace_period(self) -> float:
        """How long an admitted node may be unreachable before enforcement quarantines it."""
        return float(self.perimeter.attestation.grace_period)

    def enforce_interval(self) -> float:
        return float(self.perimeter.attestation.interval)

    def on_failure(self) -> str:
        """What enforcement does with the VMs of a node that lost trust: evacuate, stop or quarantine."""
        return str(self.perimeter.attestation.on_failure)

    def engine_policy(self) -> dict[str, Any]:
        """What an engine asks before a round (`GET /v1/policy`): the quote's bank and PCRs, the
        timings, what a failure means, and each site's asset-tag NV index."""
        bank, pcrs = self.quote_policy()
        return {"bank": bank, "pcrs": pcrs, "grace_period": self.grace_period(), "on_failure": self.on_failure(),
                "interval": self.enforce_interval(), "runtime_pcr": self.runtime_pcr(),
                "asset_tags": {s.name: s.asset_tag.nv_index for s in self.perimeter.sites if s.asset_tag is not None}}

    def public_summary(self) -> dict[str, str]:
        """What anybody may read of the TC: its CA fingerprint, the bundle customers seal against,
        and the perimeter's name (never a key)."""
        ident = self.identity()
        return {"fingerprint": ident.fingerprint, "bundle_pem": ident.bundle_pem, "perimeter": self.perimeter.name}

    def build_list(self) -> list[dict[str, Any]]:
        return [{"name": b.name, "version": b.version, "status": b.status} for b in self.builds]

    def asset_tag_index(self, site: str | None) -> int | None:
        """The NV index of the site's asset tag, which the node must certify, if the site has one."""
        site_def = self.perimeter.site(site) if site else None
        return site_def.asset_tag.nv_index if site_def is not None and site_def.asset_tag is not None else None

    # -- attestation ----------------------------------------------------------------------
    def nonce(self, node: str, purpose: str = "quote") -> bytes:
        value = secrets.token_bytes(32)
        self.registry.new_nonce(node, purpose, base64.b64encode(value).decode(), self.perimeter.attestation.nonce_ttl)
        return value

    def verify(self, node: str, site: str | None, address: str, evidence: verifier.Evidence) -> tuple[verifier.Verdict, int]:
        """Check evidence, record the verdict (with every reason), return it and its id.

        site is the engine's claim: the perimeter is judged in the site the TC's roster gives
        the node's EK, and a claim that differs is itself a failure."""
        nonce = base64.b64encode(evidence.nonce).decode()
        sent = hashlib.sha256(evidence.attest + b"\0" + evidence.signature).hexdigest()
        evidence.nonce_check = self.registry.check_nonce(node, "quote", nonce)
        if evidence.nonce_check.reason == "nonce.replayed":
            earlier = self._verdict_of(node, nonce, sent)
            if earlier is not None:
                return earlier  # the same evidence again (a retry whose answer was lost): its verdict, no new one
        known, rows = self.registry.identity_and_roster(node)
        last = self.registry.attestations(node, limit=1, trusted_only=True)
        entry, roster_failures = self._roster_of(node, site, known, rows) if known is not None else (None, [])
        verdict = verifier.verify(evidence, self.perimeter, self.builds, known, entry.site if entry else None, address,
                                  last[0] if last else None, roster_failures, self.platforms,
                                  node if entry is not None and entry.name == node else None)
        if known is None:
            return verdict, 0
        record = verdict.as_dict() | {"nonce": nonce, "evidence_sha256": sent}
        if verdict.trusted:
            record["pcr_values"] = {str(p): evidence.pcrs[p].hex() for p in self.perimeter.attestation.pcrs}
        try:
            attestation_id = self.registry.add_attestation(
                node, record,
                audit.entry("attestation", node, verdict=record["verdict"], reasons=[r["code"] for r in verdict.reasons],
                            warnings=[w["code"] for w in verdict.warnings], build=verdict.build,
                            platform=verdict.platform, pcr_digest=verdict.pcr_digest),
                # Fail closed: an admitted node that fails loses its certificate in the same transaction.
                None if verdict.trusted else audit.entry("quarantine", node, reason=verdict.reasons[0]["code"]),
                lambda gone: audit.entry("vm.off-by-reboot", node, vms=gone, reset_count=verdict.reset_count),
                use_nonce=nonce if evidence.nonce_check.ok else None)
        except Conflict as exc:  # the same evidence came in twice at once: the one that won is the verdict
            earlier = self._verdict_of(node, nonce, sent)
            if earlier is not None:
                return earlier
            with self._refusals("attestation", node):
                raise Refused(exc.reason, str(exc)) from None
        return verdict, attestation_id

    def _verdict_of(self, node: str, nonce: str, sent: str) -> tuple[verifier.Verdict, int] | None:
        row = self.registry.attestation_of(node, nonce, sent)
        if row is None:
            return None
        return verifier.Verdict(row["verdict"] == "trusted", row["reasons"], row["warnings"], row["build"],
                                row["pcr_digest"], row["reset_count"], row["restart_count"],
                                row["platform"]), int(row["id"])

    def quarantine(self, node: str, reason: str, engine: str = LOCAL_ENGINE) -> bool:
        """An engine's quarantine (unreachable past the grace period, not in its inventory);
        node.leased while another engine leases node for its round."""
        with self._refusals("quarantine", node):
            try:
                return self.registry.quarantine(node, audit.entry("quarantine", node, reason=reason, engine=engine),
                                                engine)
            except Conflict as exc:
                raise Refused(exc.reason, str(exc)) from None

    # -- node leases (engines sharing the fleet) ----------------------------------------------
    def lease_nodes(self, nodes: list[str], seconds: float, engine: str = LOCAL_ENGINE) -> dict[str, Any]:
        """Lease nodes to engine for its round: {"granted": {node: until}, "held": {node: {engine,
        until}}, "unknown": [node]} (held: another engine's lease stands; unknown: not in the
        registry). Leases coordinate engines; they decide no trust (a failed verdict quarantines a
        node whoever leases it)."""
        if not 0 < seconds <= LEASE_MAX:
            raise Refused("lease.duration", f"a lease lasts more than 0 and at most {LEASE_MAX:g} s (a round's); "
                                            f"asked {seconds:g} s")
        if len(nodes) > LEASE_BATCH:
            raise Refused("lease.too-many", f"at most {LEASE_BATCH} nodes a call; asked {len(nodes)}")
        out: dict[str, Any] = {"granted": {}, "held": {}, "unknown": []}
        try:
            leases = self.registry.lease_nodes(engine, list(dict.fromkeys(nodes)), seconds)
        except Conflict as exc:
            raise Refused(exc.reason, str(exc)) from None
        for node, lease in leases.items():
            if not lease["engine"]:
                out["unknown"].append(node)
            elif lease["engine"] == engine:
                out["granted"][node] = lease["until"]
            else:
                out["held"][node] = {"engine": lease["engine"], "until": lease["until"]}
        return out

    def release_leases(self, nodes: list[str], engine: str = LOCAL_ENGINE) -> int:
        """End engine's own leases on nodes (its round is over); another engine's stay."""
        if len(nodes) > LEASE_BATCH:
            raise Refused("lease.too-many", f"at most {LEASE_BATCH} nodes a call; asked {len(nodes)}")
        return self.registry.release_leases(engine, list(dict.fromkeys(nodes)))

    # -- admission ------------------------------------------------------------------------
    def admission_challenge(self, node: str, attestation_id: int, tk_public: bytes, certify_attest: bytes,
                            certify_signature: bytes, nonce: bytes) -> bytes:
        check = self.registry.consume_nonce(node, "certify", base64.b64encode(nonce).decode())
        with self._refusals("admission", node):
            return admission.begin(self.registry, self.perimeter, node, attestation_id, tk_public, certify_attest,
                                   certify_signature, nonce, check.ok,
                                   self.identity().certificate.public_bytes(serialization.Encoding.DER))

    def ca_certificate_pem(self) -> str:
        """The TC's CA certificate: what a node's TVMM service pins with its trusted key."""
        return self.identity().certificate.public_bytes(serialization.Encoding.PEM).decode()

    def admission_finish(self, node: str, answer_hex: str) -> dict[str, Any]:
        with self._refusals("admission", node):
            return admission.finish(self.registry, self.perimeter, self.identity(), node, answer_hex, lambda r: audit.entry(
                "admission", node, certificate_serial=r["serial"], build=r["build"], not_after=r["not_after"]))

    # -- the TC operator's decisions about nodes ---------------------------------------------
    def release_node(self, node: str, operator_note: str = "") -> bool:
        """Let a quarantined node back in: it must then be attested and admitted afresh."""
        return self.registry.release_node(node, audit.entry("node.release", node, note=operator_note))

    def replace_tpm(self, node: str, operator_note: str = "") -> bool:
        """The node's TPM changed (the operator checked the hardware): it enrolls again."""
        return self.registry.replace_tpm(node, audit.entry("node.replace-tpm", node, note=operator_note))

    # -- customers, requests, key release, launches -------------------------------------
    def add_customer(self, name: str, key_text: str) -> dict[str, Any]:
        from ..crypto import customer

        public = customer.parse_public(key_text)
        self.registry.add_customer(name, customer.public_text(public), customer.key_id(public))
        return {"name": name, "key_id": customer.key_id(public)}

    def accept_request(self, envelope: dict[str, Any], bundle: dict[str, Any]) -> dict[str, Any]:
        descriptor = bundle.get("descriptor") if isinstance(bundle, dict) else None
        vm = descriptor.get("vm_id") if isinstance(descriptor, dict) else None
        with self._refusals("request", vm=vm):
            return keybroker.accept(self.registry, self.identity(), envelope, bundle, lambda r: audit.entry(
                "request", vm=r["vm_id"], request=r["id"], customer=r["customer"], name=r["vm"],
                image_sha256=r["image_sha256"]))

    def release_key(self, request_id: str, node: str) -> dict[str, Any]:
        """Kvm re-wrapped to node's TK (once per request); what the engine carries to the node."""
        request, owner = self.registry.request_and_owner(request_id)
        vm_id = request["vm_id"] if request else None
        standing = self._decision_standing()
        with self._refusals("key-release", node, vm_id):
            release = keybroker.release(
                self.registry, self.identity(), self.perimeter, self.baseline(standing), request_id, node,
                self.capacity(node, standing),
                lambda att, cert, ticket: audit.entry("key-release", node, vm_id, request=request_id,
                                                      attestation=att["id"], certificate_serial=cert["serial"],
                                                      ticket=ticket),
                self.expire_releases, request, owner)
        return {"request": request_id, "vm_id": release["request"]["vm_id"], "node": node,
                "ticket": release["ticket"], "certificate_serial": release["certificate_serial"],
                "attestation": release["attestation"]["id"]}

    def expire_releases(self, request: str | None = None) -> list[str]:
        """Requests (every one, or the one named) whose key release no launch settled in time go
        back to 'accepted' (audited): a release lost in flight does not hold its request for ever.
        Returns their ids."""
        return self.registry.expire_releases(
            time.time() - keybroker.RELEASE_EXPIRY,
            lambda row: audit.entry("release.expired", row["node"], row["vm_id"], request=row["request"],
                                    ticket=row["ticket"]), request)

    def record_launch(self, release: dict[str, Any], node: str, status: dict[str, Any]) -> dict[str, Any]:
        """The VM runs on node: record it and sign the customer's receipt (kept for `receipt fetch`).

        Everything in the receipt comes from the TC's own rows (the request, the release and
        the attestation and certificate it was made on), nothing from the engine's report; the
        launch is recorded once (released -> launched), a replay is refused."""
        request_id = str(release["request"])
        request = self.registry.request(request_id)
        vm_id = request["vm_id"] if request else None
        with self._refusals("launch", node, vm_id):
            made = [r for r in self.registry.releases(vm_id) if r["request"] == request_id] if vm_id else []
            if request is None or not made or made[-1]["node"] != node:
                raise Refused("launch.no-release", f"no key release of request {request_id} to {node}")
            made_release = made[-1]
            attestation = self.registry.attestation(int(made_release["attestation"]))
            assert attestation is not None
            if request["state"] != "released":  # (the registry's conditional write decides; this names it early)
                raise Refused("launch.replayed", f"request {request_id} is {request['state']}: a launch is recorded once")
            evidence, boot = self._launch_evidence(node, request, made_release, attestation, status.get("evidence"))
            spec = request["spec"]
            vm = {"vm_id": request["vm_id"], "name": request["vm"], "customer": request["customer"], "node": node,
                  "boot": boot,
                  "state": "running" if status.get("running") else "starting", "image_sha256": request["image_sha256"],
                  "request": request["id"], "vcpus": spec["vcpus"], "memory_mib": spec["memoryMiB"],
                  "anti_affinity": (spec.get("constraints") or {}).get("antiAffinityGroup")}

            key_id = lifecycle.customer_of(self.registry, request["vm_id"], "launch.evidence-missing")

            def receipt() -> dict[str, Any]:
                return receipts.sign(self.identity(), {
                    "vm": request["vm"], "vm_id": request["vm_id"], "customer": request["customer"],
                    "customer_key_id": key_id, "node": node,
                    "node_certificate_serial": made_release["certificate_serial"], "tvmm_build": attestation["build"],
                    "attestation": {"id": attestation["id"], "time": attestation["time"],
                                    "pcr_digest": attestation["pcr_digest"]},
                    "image_sha256": request["image_sha256"], "request": request["id"], "time": time.time(),
                    "launch_evidence": evidence,
                })

            try:
                return self.registry.record_launch(request_id, vm, receipt, audit.entry(
                    "launch", node, request["vm_id"], request=request_id, running=bool(status.get("running"))))
            except Conflict as exc:
                raise Refused(exc.reason, str(exc)) from None

    # -- migration ------------------------------------------------------------------------
    def migration_begin(self, vm_name: str, destination: str, engine: str = LOCAL_ENGINE) -> dict[str, Any]:
        """Check the destination is trusted now and meets the VM's constraints, record the
        migration, and issue its two tickets: a fresh Kmig made here, wrapped to the source's TK
        (migrate-out, naming the destination the TC chose) and to the destination's with Kvm
        (migrate-in, naming the source). Only the two TVMM services can open them, so only the
        source can make the stream and only the destination read it. Refused for a destination
        that does not qualify, whoever asks. node.leased while another engine leases the VM's node."""
        vm = self.registry.vm(vm_name)
        if vm is None or vm["node"] is None:
            raise Refused("migrate.unknown-vm", f"no VM {vm_name!r}")
        if vm["node"] == destination:
            raise Refused("migrate.same-node", f"{vm['name']} already runs on {destination}")
        request = self.registry.request(vm["request"])
        assert request is not None
        source = self.registry.last_certificate(vm["node"])
        owner = self.registry.image_owner(vm["vm_id"])
        customer_id = owner["key_id"] if owner else ""
        in_id, out_id = tickets.new_id(), tickets.new_id()
        with self._refusals("migration", destination, vm["vm_id"]):
            if source is None:
                raise Refused("migrate.source-unknown", f"{vm['node']} holds no trusted key the TC certified")
            standing = self._decision_standing()
            latest, certificate, rewrapped, guard = keybroker.rewrap_for(
                self.registry, self.identity(), self.perimeter, self.baseline(standing), request, destination,
                self.capacity(destination, standing), tickets.label("migrate-in", "kvm", vm["vm_id"], customer_id, in_id))
            try:
                migration = self.registry.start_migration(vm["vm_id"], vm["node"], destination, audit.entry(
                    "migration.start", destination, vm["vm_id"], source=vm["node"], attestation=latest["id"],
                    certificate_serial=certificate["serial"], tickets=[out_id, in_id]), (out_id, in_id), engine, guard)
            except Conflict as exc:
                raise Refused(exc.reason, str(exc)) from None
        kmig = secrets.token_bytes(32)
        signer, now = self.identity().purpose("ticket"), int(time.time())
        common = {"v": 1, "vm_id": vm["vm_id"], "customer": customer_id, "migration": str(migration), "issued": now,
                  "expires": now + tickets.TTL}

        def wrapped(cert_pem: str, kind: str, what: str, ticket_id: str, secret: bytes) -> str:
            public = x509.load_pem_x509_certificate(cert_pem.encode()).public_key()
            return base64.b64encode(wrap.wrap(public, secret, tickets.label(  # type: ignore[arg-type]
                kind, what, vm["vm_id"], customer_id, ticket_id))).decode()

        out_ticket = tickets.issue(signer.key, signer.certificate, common | {
            "kind": "migrate-out", "id": out_id, "node": vm["node"], "node_serial": source["serial"],
            "tk_name": source["tk_name"], "destination": destination, "destination_tk_name": certificate["tk_name"],
            "kmig": wrapped(source["pem"], "migrate-out", "kmig", out_id, kmig)})
        spec = request["spec"]
        in_ticket = tickets.issue(signer.key, signer.certificate, common | {
            "kind": "migrate-in", "id": in_id, "node": destination, "node_serial": certificate["serial"],
            "tk_name": certificate["tk_name"], "source": vm["node"], "name": vm["name"],
            "image_sha256": request["image_sha256"], "vcpus": int(spec["vcpus"]), "memory_mib": int(spec["memoryMiB"]),
            "kvm": base64.b64encode(rewrapped).decode(), "kmig": wrapped(certificate["pem"], "migrate-in", "kmig", in_id, kmig),
            "runtime_pcr": self.perimeter.attestation.runtime_pcr})
        del kmig
        return {"migration": migration, "vm": vm, "request": {k: v for k, v in request.items() if k != "wrapped_key"},
                "out_ticket": out_ticket, "in_ticket": in_ticket}

    def migration_end(self, migration: int, vm_id: str, commit: bool, reason: str = "",
                      evidence: dict[str, Any] | None = None, engine: str = LOCAL_ENGINE) -> dict[str, Any]:
        """Commit (the VM now lives on the destination) or abort, once; returns the settle tickets
        that carry the outcome to each end (migration_settlement). A commit needs the
        destination's TPM evidence that the VM arrived there from this migration's ticket, and
        the destination still admitted with a fresh trusted attestation of an approved build."""
        row = self.registry.migration(migration)
        if row is None or row["vm_id"] != vm_id or row["state"] != "started":
            raise RegistryError(f"migration {migration} of VM {vm_id} is not under way")
        boot = None
        with self._refusals("migration", row["destination"], vm_id):
            if commit:
                node = self.registry.node(row["destination"])
                latest = self.registry.attestations(row["destination"], limit=1)
                if node is None or node["state"] != "admitted" or not latest or latest[0]["verdict"] != "trusted" \
                        or self.baseline().admits(row["destination"], latest[0]["build"], latest[0].get("platform")) \
                        or time.time() - latest[0]["time"] > self.perimeter.attestation.max_quote_age:
                    raise Refused("migrate.destination-untrusted", f"{row['destination']} is not trusted now: the "
                                                                   "migration cannot be committed; abort it")
                boot = self._arrival_evidence(row, evidence)
            try:
                self.registry.end_migration(migration, commit, reason, audit.entry(
                    "migration.commit" if commit else "migration.abort", vm=vm_id, migration=migration, reason=reason,
                    engine=engine), boot=boot, engine=engine)
            except Conflict as exc:
                raise Refused(exc.reason, str(exc)) from None
        return self.migration_settlement(migration)

    def migration_settlement(self, migration: int) -> dict[str, Any]:
        """The settle tickets of an ended migration, for each end: the source resumes only on an
        abort, the destination runs only on a commit (a repair asks again after a crash)."""
        row = self.registry.migration(migration)
        if row is None:
            raise Refused("migrate.unknown", f"no migration {migration}")
        return lifecycle.settlements(self.registry, self.identity(), row, self.perimeter.attestation.runtime_pcr)

    # -- a VM's end ------------------------------------------------------------------------
    def vm_end_ticket(self, vm_id: str, node: str, action: str) -> dict[str, Any]:
        """An end ticket (poweroff or destroy) for the copy of vm_id on node: what the node's
        service acts on, and the question its TPM's evidence answers (vm_ended)."""
        with self._refusals("vm-end", node, vm_id):
            return lifecycle.end_ticket(self.registry, self.identity(), vm_id, node, action,
                                        self.perimeter.attestation.runtime_pcr)

    def vm_ended(self, ticket: dict[str, Any], evidence: dict[str, Any]) -> dict[str, Any]:
        """Record a VM's end (off or destroyed) from its node's TPM evidence; Refused otherwise."""
        body = ticket.get("ticket") if isinstance(ticket, dict) else None
        node = body.get("node") if isinstance(body, dict) else None
        vm_id = body.get("vm_id") if isinstance(body, dict) else None
        with self._refusals("vm-end", node if isinstance(node, str) else None, vm_id if isinstance(vm_id, str) else None):
            return lifecycle.ended(self.registry, self.identity(), ticket, evidence, self.perimeter.attestation.runtime_pcr)

    def customer_status(self, request_id: str, when: str, signature: str) -> dict[str, Any]:
        """A request's state, for the customer who signed it (signed query, used once)."""
        request = keybroker.check_customer_query(self.registry, request_id, "status", when, signature)
        vm = next((v for v in self.registry.vms(include_destroyed=True) if v["request"] == request_id), None)
        return {"request": request_id, "vm": request["vm"], "vm_id": request["vm_id"], "state": request["state"],
                "vm_state": vm["state"] if vm else None, "node": vm["node"] if vm else None,
                "receipt": self.registry.receipt(request_id) is not None}

    def customer_receipt(self, request_id: str, when: str, signature: str) -> dict[str, Any] | None:
        keybroker.check_customer_query(self.registry, request_id, "receipt", when, signature)
        return self.registry.receipt(request_id)

    def _arrival_evidence(self, row: dict[str, Any], evidence: Any) -> int:
        """The destination's TPM evidence that the VM arrived there through this migration's
        migrate-in ticket (and has not left since): the only ground for a commit. Returns the TPM
        resetCount it arrived in."""
        identity_row = self.registry.identity(row["destination"])
        if identity_row is None or not row.get("in_ticket"):
            raise Refused("migrate.evidence-event", f"migration {row['id']} has no migrate-in ticket to check evidence against")
        checked = runtime.verify(evidence, identity_row["ak_public"], self.perimeter.attestation.runtime_pcr, row["in_ticket"])
        last = runtime.last_event_of(checked.events, row["vm_id"])
        if last.get("event") != "migrated-in" or last.get("ticket") != row["in_ticket"]:
            raise Refused("migrate.evidence-event", "the destination's runtime events do not show the VM arrived through "
                                                    "this migration (and still there)")
        lifecycle.under_certified_tk(self.registry, row["destination"], last)
        lifecycle.trusted_boot(self.registry, row["destination"], checked.boot, reason="migrate.evidence-boot")
        return checked.reset_count

    def _launch_evidence(self, node: str, request: dict[str, Any], release: dict[str, Any], attestation: dict[str, Any],
                         evidence: Any) -> tuple[dict[str, Any], int]:
        """The node's TPM evidence that it launched this VM from this release's ticket, in the boot
        the release relied on (what the receipt carries, so a customer can check it too), and that
        boot's TPM resetCount."""
        identity_row = self.registry.identity(node)
        issued = [t for t in [release.get("ticket"), *str(release.get("superseded") or "").split()] if t]
        if identity_row is None or not issued:
            raise Refused("launch.evidence-missing", f"no ticket was issued for request {request['id']} on {node}")
        pcr = self.perimeter.attestation.runtime_pcr
        # (a release asked for again has superseded tickets: the node took whichever reached it)
        for ticket_id in issued:
            try:
                checked = runtime.verify(evidence, identity_row["ak_public"], pcr, ticket_id)
                break
            except Refused as exc:
                if exc.reason != "runtime.nonce" or ticket_id == issued[-1]:
                    raise
        last = runtime.last_event_of(checked.events, request["vm_id"])  # others' launches may have come after
        if last.get("event") != "launched" or last.get("ticket") != ticket_id or last.get("image_sha256") != request["image_sha256"]:
            raise Refused("launch.evidence-event", "the node's last runtime event is not this VM launched from this ticket")
        lifecycle.under_certified_tk(self.registry, node, last)
        if attestation.get("reset_count") is not None and checked.boot != (attestation["reset_count"],
                                                                           attestation.get("restart_count") or 0):
            raise Refused("launch.evidence-reboot", f"{node}'s TPM was reset (or restarted) since the attestation the key "
                                                    "release relied on")
        return {"quote": evidence["attest"], "signature": evidence["signature"], "runtime_pcr": pcr,
                "pcr_value": checked.value.hex(), "events": redact(checked.events, request["vm_id"]),
                "ak_public": base64.b64encode(identity_row["ak_public"]).decode(), "ticket": ticket_id}, checked.reset_count

    def fail_request(self, request_id: str) -> None:
        request = self.registry.request(request_id)
        self.registry.fail_request(request_id, audit.entry("request.failed", vm=request["vm_id"] if request else None,
                                                           request=request_id))

    def record_enforcement(self, node: str, vm_id: str, policy: str, result: str) -> None:
        """What enforcement did to a VM of a node that lost trust, in the audit log."""
        audit.append(self.registry, "vm.enforce", node, vm_id, policy=policy, result=result)

    # -- suspension ------------------------------------------------------------------------
    def suspend_begin(self, vm_name: str) -> dict[str, Any]:
        """A suspension of a running VM, and its suspend ticket (a fresh Ksus for its node's TK)."""
        vm = self.registry.vm(vm_name)
        with self._refusals("suspension", vm["node"] if vm else None, vm["vm_id"] if vm else None):
            return suspension.begin(self.registry, self.identity(), vm_name, self.perimeter.attestation.runtime_pcr)

    def suspend_end(self, suspension_id: int, evidence: dict[str, Any] | None, saved: bool = True) -> dict[str, Any]:
        """The VM is suspended (on its node's TPM evidence), or the suspension dropped (not saved)."""
        row = self.registry.suspension(suspension_id)
        with self._refusals("suspension", row["node"] if row else None, row["vm_id"] if row else None):
            return suspension.end(self.registry, suspension_id, evidence, self.perimeter.attestation.runtime_pcr, saved)

    def resume_begin(self, vm_name: str, node: str | None = None) -> dict[str, Any]:
        """A resume ticket for a suspended VM, to node (default: where it was suspended), checked as
        a key release is; a suspension resumes on one node only."""
        vm = self.registry.vm(vm_name)
        with self._refusals("resume", node, vm["vm_id"] if vm else None):
            target = node or None
            standing = self._decision_standing()
            return suspension.resume_ticket(self.registry, self.identity(), self.perimeter, self.baseline(standing), vm_name,
                                            target, lambda chosen: self.capacity(chosen, standing))

    def resume_end(self, suspension_id: int, evidence: dict[str, Any]) -> dict[str, Any]:
        """The VM runs again, on the resume node's TPM evidence."""
        row = self.registry.suspension(suspension_id)
        with self._refusals("resume", row["resume_node"] if row else None, row["vm_id"] if row else None):
            return suspension.resumed(self.registry, suspension_id, evidence, self.perimeter.attestation.runtime_pcr)

    def set_vm_state(self, vm_id: str, state: str) -> None:
        """A VM paused (stopped) or running again, as the engine reports it. That is all the
        engine's word moves: an end needs the node's evidence (vm_ended); anything else is
        refused (`vm.state-transition`)."""
        vm = self.registry.vm(vm_id)
        with self._refusals("vm-state", vm["node"] if vm else None, vm_id):
            if not self.registry.set_vm_state(vm_id, state, audit.entry("vm.state", vm["node"] if vm else None, vm_id,
                                                                        state=state)):
                raise Refused("vm.state-transition", f"VM {vm_id} is {vm['state'] if vm else 'unknown'}: it cannot become "
                                                     f"{state}")

    # -- predictions and idempotency: questions that change nothing -------------------------
    def identity_summary(self, node: str) -> IdentitySummary | None:
        """Which TPM the node is enrolled with (EK fingerprint, vendor), or None."""
        known = self.registry.identity(node)
        return IdentitySummary.from_row(known) if known else None

    def check_ek(self, ek_certificate: bytes, ek_public: bytes, node: str | None = None,
                 site: str | None = None) -> dict[str, Any]:
        """Would this TPM be enrolled (as node, claiming site)? {manufacturer, ek_fingerprint},
        or EnrollmentRefused. No state."""
        from . import tpm2

        try:
            ek = tpm2.parse_public(ek_public)
        except tpm2.TPMFormatError as exc:
            raise enrollment.EnrollmentRefused("evidence.malformed", f"malformed EK from the node: {exc}") from None
        manufacturer = enrollment.check_ek_certificate(self.perimeter, ek_certificate, ek)
        if node is not None:
            try:
                identities = roster.ek_identities(enrollment.load_certificate_der(ek_certificate))
                roster.check(self.roster_entries(identities), node, identities, site)
            except Refused as exc:
                raise enrollment.EnrollmentRefused(exc.reason, str(exc)) from None
        return {"manufacturer": manufacturer,
                "ek_fingerprint": enrollment.fingerprint(enrollment.load_certificate_der(ek_certificate))}

    def perimeter_problems(self, site: str | None, address: str) -> list[tuple[str, str]]:
        return verifier.perimeter_problems(self.perimeter, site, address)

    def admission_needed(self, node: str, attestation_id: int) -> str | None:
        """Why node must be admitted (again) after the trusted attestation attestation_id, or
        None while its admission holds: a valid certificate (a quarter of its lifetime left)
        whose TK is bound to the PCR values just verified."""
        row = self.registry.node(node)
        if row is None or row["state"] != "admitted":
            return f"node is {row['state'] if row else 'unknown'}"
        certificate = self.registry.certificate(node)
        if certificate is None:
            return "no valid certificate"
        if certificate["not_after"] - time.time() < self.perimeter.attestation.certificate_lifetime / 4:
            return "certificate expires soon"
        bound = self.registry.attestation(certificate["attestation"]) if certificate["attestation"] else None
        now = self.registry.attestation(attestation_id)
        if bound is None or now is None or bound.get("pcr_values") != now.get("pcr_values"):
            return "boot measurements changed since the trusted key was made"
        return None

    def customer_name(self, key_text: str) -> str | None:
        owner = self.registry.customer_by_key(key_text)
        return str(owner["name"]) if owner else None

    # -- what the service asks (api.py calls these, never the registry) ------------------------
    def engine_allowed(self, serial: str) -> bool:
        """Whether an engine certificate with this serial is one the operator issued and has not removed."""
        return self.registry.engine_by_serial(serial) is not None

    def ready(self) -> None:
        """Raises when the registry does not take a write (the service cannot decide)."""
        self.registry.probe()

    def node_counts(self) -> dict[str, int]:
        counts: dict[str, int] = {}
        for node in self.registry.nodes():
            counts[node["state"]] = counts.get(node["state"], 0) + 1
        return counts

    def node_history(self, name: str, limit: int = 20) -> tuple[dict[str, Any] | None, list[dict[str, Any]]]:
        row = self.registry.node(name)
        return row, self.registry.attestations(name, limit) if row else []

    def audit_entries(self, node: str | None = None, vm: str | None = None, since: float | None = None) -> list[dict[str, Any]]:
        return self.registry.audit_entries(node, vm, since)

    # -- reading (the engine's view; the same over HTTPS) -----------------------------------
    def node(self, name: str) -> NodeRecord | None:
        row = self.registry.node(name)
        return NodeRecord.from_row(row) if row else None

    def ear(self, node: str, attestation: int | None = None) -> dict[str, Any]:
        """The node's latest verdict (or the one with id attestation) as a signed EAR (coordinator/ear.py),
        made from the TC's own record of it."""
        if self.registry.node(node) is None:
            raise Refused("node.unknown", f"no node {node!r} in the registry")
        if attestation is None:
            found = self.registry.attestations(node, limit=1)
            record = found[0] if found else None
        else:
            record = self.registry.attestation(attestation)
            record = record if record is not None and record["node"] == node else None
        if record is None:
            raise Refused("ear.no-verdict", f"{node} has no verdict" + (f" with id {attestation}" if attestation else "")
                          + ": attest it first (tccdeploy attest)")
        identity = self.identity()
        key = identity.purpose("ear")
        token = ear.sign(ear.claims(record, self.perimeter.name, self.perimeter.attestation.interval),
                         key.key, [key.certificate, identity.certificate], key.key_id)
        return {"token": token, "media_type": ear.MEDIA_TYPE, "attestation": record["id"]}

    def last_trusted_time(self, node: str) -> float | None:
        last = self.registry.attestations(node, limit=1, trusted_only=True)
        return float(last[0]["time"]) if last else None

    def vm(self, name_or_id: str) -> VMRecord | None:
        row = self.registry.vm(name_or_id)
        return VMRecord.from_row(row) if row else None

    def vms(self, include_destroyed: bool = False) -> list[VMRecord]:
        return [VMRecord.from_row(row) for row in self.registry.vms(include_destroyed)]

    def request_record(self, request_id: str) -> RequestRecord | None:
        """A request as the engine may see it: no wrapped key (it is the TC's to unwrap)."""
        record = self.registry.request(request_id)
        return RequestRecord.from_row(record) if record else None

    def migrations(self, state: str | None = None) -> list[MigrationRecord]:
        return [MigrationRecord.from_row(row) for row in self.registry.migrations(state)]

    def nodes(self) -> list[NodeRecord]:
        return node_summaries(self.registry)
