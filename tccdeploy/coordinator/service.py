"""The trusted coordinator, embedded: the one object the engine talks to.

It holds the registry, the perimeter and the builds (from the manifests), and takes every
decision itself from evidence it checks: enrollment, nonces, verdicts. The engine only carries
what nodes answer. `tc serve` (api.py) offers the same methods over HTTPS, and client.py is the
engine's side of that: code that takes a Coordinator runs unchanged with either.
"""

from __future__ import annotations

import base64
import os
import secrets
import time
from typing import Any

from ..config import state_dir
from ..manifest.models import Perimeter, TVMMBuild
from . import admission, audit, enrollment, identity, keybroker, receipts, verifier
from .store import Registry

REGISTRY_FILE = "registry.sqlite"
REGISTRY_ENV = "TCCDEPLOY_REGISTRY"


def registry_location(state: str | None = None) -> str:
    """Where the registry is: $TCCDEPLOY_REGISTRY (a postgresql:// URL, for replicas), else the
    SQLite file in the state directory."""
    return os.environ.get(REGISTRY_ENV) or os.path.join(state_dir(state), REGISTRY_FILE)


class Coordinator:
    def __init__(self, perimeter: Perimeter, builds: list[TVMMBuild], state: str | None = None,
                 registry: str | None = None):
        self.state = state_dir(state)
        self.perimeter = perimeter
        self.builds = builds
        self.registry = Registry(registry or registry_location(self.state))
        self._identity: identity.Identity | None = None

    def identity(self) -> identity.Identity:
        """The TC's keys, loaded once: parsing (and validating) the RSA-3072 key costs more than
        the key release that uses it."""
        if self._identity is None:
            self._identity = identity.init(self.state)[0]
        return self._identity

    def close(self) -> None:
        self.registry.close()

    # -- enrollment -----------------------------------------------------------------------
    def _refusals(self, kind: str, node: str | None = None, vm: str | None = None):  # type: ignore[no-untyped-def]
        """Record a refusal in the audit log on its way out."""
        coordinator = self

        class _Audited:
            def __enter__(self) -> None:
                return None

            def __exit__(self, kind_, exc, tb) -> bool:
                reason = getattr(exc, "reason", None)
                if exc is not None and reason is not None:
                    audit.append(coordinator.registry, kind + ".refused", node, vm, reason=reason, message=str(exc))
                return False

        return _Audited()

    def enrollment_challenge(self, node: str, ek_certificate: bytes, ek_public: bytes, ak_public: bytes,
                             ssh_host_key: str, force: bool = False) -> enrollment.Challenge:
        with self._refusals("enrollment", node):
            return enrollment.begin(self.registry, self.perimeter, node, ek_certificate, ek_public, ak_public,
                                    ssh_host_key, force)

    def enrollment_finish(self, node: str, answer: bytes, site: str | None, address: str) -> dict[str, Any]:
        with self._refusals("enrollment", node):
            result = enrollment.finish(self.registry, node, answer, site, address)
        audit.append(self.registry, "enrollment", node, manufacturer=result["manufacturer"],
                     ek_fingerprint=result["ek_fingerprint"])
        return result

    # -- what the engine asks the node for --------------------------------------------------
    def quote_policy(self) -> tuple[str, list[int]]:
        """(bank, PCRs) a quote must cover; the engine asks the node for exactly these."""
        policy = self.perimeter.attestation
        return policy.bank, list(policy.pcrs)

    def grace_period(self) -> float:
        """How long an admitted node may be unreachable before enforcement quarantines it."""
        return float(self.perimeter.attestation.grace_period)

    def enforce_interval(self) -> float:
        return float(self.perimeter.attestation.interval)

    def on_failure(self) -> str:
        """What enforcement does with the VMs of a node that lost trust: evacuate, stop or quarantine."""
        return str(self.perimeter.attestation.on_failure)

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
        """Check evidence, record the verdict (with every reason), return it and its id."""
        evidence.nonce_check = self.registry.consume_nonce(node, "quote", base64.b64encode(evidence.nonce).decode())
        identity = self.registry.identity(node)
        last = self.registry.attestations(node, limit=1, trusted_only=True)
        verdict = verifier.verify(evidence, self.perimeter, self.builds, identity, site, address, last[0] if last else None)
        if identity is None:
            return verdict, 0
        record = verdict.as_dict() | {"nonce": base64.b64encode(evidence.nonce).decode()}
        if verdict.trusted:
            record["pcr_values"] = {str(p): evidence.pcrs[p].hex() for p in self.perimeter.attestation.pcrs}
        attestation_id = self.registry.add_attestation(node, record)
        audit.append(self.registry, "attestation", node, id=attestation_id, verdict=record["verdict"],
                     reasons=[r["code"] for r in verdict.reasons], warnings=[w["code"] for w in verdict.warnings],
                     build=verdict.build, pcr_digest=verdict.pcr_digest)
        if not verdict.trusted:
            # Fail closed: an admitted node that fails loses its certificate at once.
            self.quarantine(node, verdict.reasons[0]["code"])
        return verdict, attestation_id

    def quarantine(self, node: str, reason: str) -> bool:
        if self.registry.quarantine(node):
            audit.append(self.registry, "quarantine", node, reason=reason)
            return True
        return False

    # -- admission ------------------------------------------------------------------------
    def admission_challenge(self, node: str, attestation_id: int, tk_public: bytes, certify_attest: bytes,
                            certify_signature: bytes, nonce: bytes) -> bytes:
        check = self.registry.consume_nonce(node, "certify", base64.b64encode(nonce).decode())
        with self._refusals("admission", node):
            return admission.begin(self.registry, self.perimeter, node, attestation_id, tk_public, certify_attest,
                                   certify_signature, nonce, check.ok)

    def admission_finish(self, node: str, answer_hex: str) -> dict[str, Any]:
        with self._refusals("admission", node):
            result = admission.finish(self.registry, self.perimeter, self.identity(), node, answer_hex)
        audit.append(self.registry, "admission", node, certificate_serial=result["serial"], build=result["build"],
                     not_after=result["not_after"])
        return result

    # -- customers, requests, key release, launches -------------------------------------
    def add_customer(self, name: str, key_text: str) -> dict[str, Any]:
        from ..crypto import customer

        public = customer.parse_public(key_text)
        self.registry.add_customer(name, customer.public_text(public), customer.key_id(public))
        return {"name": name, "key_id": customer.key_id(public)}

    def accept_request(self, envelope: dict[str, Any], bundle: dict[str, Any]) -> dict[str, Any]:
        vm = bundle.get("descriptor", {}).get("vm_id")
        with self._refusals("request", vm=vm):
            record = keybroker.accept(self.registry, envelope, bundle)
        audit.append(self.registry, "request", vm=record["vm_id"], request=record["id"], customer=record["customer"],
                     name=record["vm"], image_sha256=record["image_sha256"])
        return record

    def release_key(self, request_id: str, node: str) -> dict[str, Any]:
        """Kvm re-wrapped to node's TK (once per request); what the engine carries to the node."""
        request = self.registry.request(request_id)
        with self._refusals("key-release", node, request["vm_id"] if request else None):
            release = keybroker.release(self.registry, self.identity(), self.perimeter, request_id, node)
        audit.append(self.registry, "key-release", node, release["request"]["vm_id"], request=request_id,
                     attestation=release["attestation"]["id"], certificate_serial=release["certificate_serial"])
        return {"request": request_id, "vm_id": release["request"]["vm_id"], "node": node,
                "wrapped_key": release["wrapped_key"], "certificate_serial": release["certificate_serial"],
                "attestation": release["attestation"]["id"]}

    def record_launch(self, release: dict[str, Any], node: str, status: dict[str, Any]) -> dict[str, Any]:
        """The VM runs on node: record it and sign the customer's receipt (kept for `receipt fetch`)."""
        request = self.registry.request(str(release["request"]))
        attestation = self.registry.attestation(int(release["attestation"]))
        releases = self.registry.releases(request["vm_id"]) if request else []
        if request is None or attestation is None or not any(
                r["request"] == request["id"] and r["node"] == node and r["attestation"] == attestation["id"] for r in releases):
            raise keybroker.Refused("launch.no-release", f"no key release of request {release['request']} to {node}")
        spec = request["spec"]
        now = time.time()
        self.registry.upsert_vm({
            "vm_id": request["vm_id"], "name": request["vm"], "customer": request["customer"], "node": node,
            "state": "running" if status.get("running") else "starting", "image_sha256": request["image_sha256"],
            "request": request["id"], "vcpus": spec["vcpus"], "memory_mib": spec["memoryMiB"],
            "anti_affinity": (spec.get("constraints") or {}).get("antiAffinityGroup"), "launched": now,
        })
        self.registry.set_request_state(request["id"], "launched")
        audit.append(self.registry, "launch", node, request["vm_id"], request=request["id"], running=bool(status.get("running")))
        receipt = receipts.sign(self.identity(), {
            "vm": request["vm"], "vm_id": request["vm_id"], "customer": request["customer"], "node": node,
            "node_certificate_serial": release["certificate_serial"], "tvmm_build": attestation["build"],
            "attestation": {"id": attestation["id"], "time": attestation["time"], "pcr_digest": attestation["pcr_digest"]},
            "image_sha256": request["image_sha256"], "request": request["id"], "time": now,
        })
        self.registry.save_receipt(request["id"], receipt)
        return receipt

    # -- migration ------------------------------------------------------------------------
    def migration_begin(self, vm_name: str, destination: str) -> dict[str, Any]:
        """Check the destination is trusted now, re-wrap Kvm to its TK, record the migration.

        Refused for a destination that is not admitted and freshly attested, whoever asks."""
        vm = self.registry.vm(vm_name)
        if vm is None or vm["node"] is None:
            raise keybroker.Refused("migrate.unknown-vm", f"no VM {vm_name!r}")
        if vm["node"] == destination:
            raise keybroker.Refused("migrate.same-node", f"{vm['name']} already runs on {destination}")
        request = self.registry.request(vm["request"])
        assert request is not None
        with self._refusals("migration", destination, vm["vm_id"]):
            latest, certificate, rewrapped = keybroker.rewrap_for(
                self.registry, self.identity(), self.perimeter, request["wrapped_key"], vm["vm_id"], destination)
        migration = self.registry.start_migration(vm["vm_id"], vm["node"], destination)
        audit.append(self.registry, "migration.start", destination, vm["vm_id"], migration=migration, source=vm["node"],
                     attestation=latest["id"], certificate_serial=certificate["serial"])
        return {"migration": migration, "vm": vm, "request": {k: v for k, v in request.items() if k != "wrapped_key"},
                "certificate_pem": certificate["pem"], "wrapped_key": base64.b64encode(rewrapped).decode()}

    def migration_end(self, migration: int, vm_id: str, commit: bool, reason: str = "") -> None:
        self.registry.end_migration(migration, commit, reason)
        audit.append(self.registry, "migration.commit" if commit else "migration.abort", vm=vm_id, migration=migration,
                     reason=reason)

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

    def fail_request(self, request_id: str) -> None:
        self.registry.set_request_state(request_id, "failed")
        request = self.registry.request(request_id)
        audit.append(self.registry, "request.failed", vm=request["vm_id"] if request else None, request=request_id)

    def record_enforcement(self, node: str, vm_id: str, policy: str, result: str) -> None:
        """What enforcement did to a VM of a node that lost trust, in the audit log."""
        audit.append(self.registry, "vm.enforce", node, vm_id, policy=policy, result=result)

    def set_vm_state(self, vm_id: str, state: str) -> None:
        self.registry.set_vm_state(vm_id, state)

    # -- predictions and idempotency: questions that change nothing -------------------------
    def identity_summary(self, node: str) -> dict[str, Any] | None:
        """Which TPM the node is enrolled with (EK fingerprint, vendor), or None."""
        known = self.registry.identity(node)
        return {"ek_fingerprint": known["ek_fingerprint"], "manufacturer": known["manufacturer"]} if known else None

    def check_ek(self, ek_certificate: bytes, ek_public: bytes) -> dict[str, Any]:
        """Would this TPM be enrolled? {manufacturer, ek_fingerprint}, or EnrollmentRefused. No state."""
        from . import tpm2

        try:
            ek = tpm2.parse_public(ek_public)
        except tpm2.TPMFormatError as exc:
            raise enrollment.EnrollmentRefused("evidence.malformed", f"malformed EK from the node: {exc}") from None
        manufacturer = enrollment.check_ek_certificate(self.perimeter, ek_certificate, ek)
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

    # -- reading (the engine's view; the same over HTTPS) -----------------------------------
    def node(self, name: str) -> dict[str, Any] | None:
        return self.registry.node(name)

    def last_trusted_time(self, node: str) -> float | None:
        last = self.registry.attestations(node, limit=1, trusted_only=True)
        return float(last[0]["time"]) if last else None

    def vm(self, name_or_id: str) -> dict[str, Any] | None:
        return self.registry.vm(name_or_id)

    def vms(self, include_destroyed: bool = False) -> list[dict[str, Any]]:
        return self.registry.vms(include_destroyed)

    def request_record(self, request_id: str) -> dict[str, Any] | None:
        """A request as the engine may see it: no wrapped key (it is the TC's to unwrap)."""
        record = self.registry.request(request_id)
        return {k: v for k, v in record.items() if k != "wrapped_key"} if record else None

    def migrations(self, state: str | None = None) -> list[dict[str, Any]]:
        return self.registry.migrations(state)

    def nodes(self) -> list[dict[str, Any]]:
        out = []
        for node in self.registry.nodes():
            last = self.registry.attestations(node["name"], limit=1)
            entry = {"name": node["name"], "state": node["state"], "site": node["site"], "address": node["address"],
                     "build": node["build"]}
            if last:
                entry |= {"last_attestation": last[0]["time"], "verdict": last[0]["verdict"],
                          "reasons": [r["code"] for r in last[0]["reasons"]]}
            out.append(entry)
        return out
