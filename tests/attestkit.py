"""Evidence built in software, for unit tests of the verifier's pure logic.

A software ECDSA key stands in for a TPM's AK and signs TPMS_ATTEST structures marshalled here
exactly as the TPM 2.0 specification lays them out; the event log comes from the lab's boot
sequence. Integration tests use real swtpm evidence; these cover the forgeries a real TPM would
never produce.
"""

from __future__ import annotations

import base64
import hashlib
import struct
from dataclasses import dataclass, field

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature

from tccdeploy.coordinator import tpm2
from tccdeploy.coordinator.verifier import Evidence
from tccdeploy.eventlog import EventLogWriter, image_load_event
from tccdeploy.lab.builds import DEFAULT_MODEL, POLICY_PCRS, boot_events

AK_ATTRIBUTES = tpm2.RESTRICTED | tpm2.SIGN | tpm2.FIXED_TPM | tpm2.FIXED_PARENT | tpm2.SENSITIVE_DATA_ORIGIN | tpm2.USER_WITH_AUTH


def tpm2b(data: bytes) -> bytes:
    return struct.pack(">H", len(data)) + data


def ecc_public(key: ec.EllipticCurvePrivateKey, attributes: int = AK_ATTRIBUTES) -> bytes:
    """TPM2B_PUBLIC of an ECC P-256 ECDSA-SHA256 signing key."""
    numbers = key.public_key().public_numbers()
    area = struct.pack(">HHI", tpm2.ALG_ECC, tpm2.ALG_SHA256, attributes) + tpm2b(b"")
    area += struct.pack(">HHHHH", tpm2.ALG_NULL, tpm2.ALG_ECDSA, tpm2.ALG_SHA256, 0x0003, tpm2.ALG_NULL)
    area += tpm2b(numbers.x.to_bytes(32, "big")) + tpm2b(numbers.y.to_bytes(32, "big"))
    return tpm2b(area)


def selection(bank: str, pcrs: list[int]) -> bytes:
    return tpm2.selection_bytes(bank, pcrs)


def quote_attest(nonce: bytes, bank: str, pcrs: list[int], digest: bytes, reset: int = 1, restart: int = 0,
                 magic: int = tpm2.TPM_GENERATED, kind: int = tpm2.ST_ATTEST_QUOTE) -> bytes:
    body = struct.pack(">IH", magic, kind) + tpm2b(b"\x00\x0b" + bytes(32)) + tpm2b(nonce)
    body += struct.pack(">QIIB", 123456, reset, restart, 1) + struct.pack(">Q", 0x2000)
    return body + selection(bank, pcrs) + tpm2b(digest)


def sign(key: ec.EllipticCurvePrivateKey, message: bytes) -> bytes:
    r, s = decode_dss_signature(key.sign(message, ec.ECDSA(hashes.SHA256())))
    return struct.pack(">HH", tpm2.ALG_ECDSA, tpm2.ALG_SHA256) + tpm2b(r.to_bytes(32, "big")) + tpm2b(s.to_bytes(32, "big"))


def boot_log(build: str = "tvmm-2026.1", extra: list[tuple[int, bytes]] | None = None,
             model: str = DEFAULT_MODEL) -> tuple[bytes, dict[int, bytes]]:
    """The lab's boot of `build` on hardware `model` as an event log, and the sha256 PCR values
    it replays to."""
    writer = EventLogWriter(["sha1", "sha256"])
    pcrs: dict[int, bytes] = {p: bytes(32) for p in POLICY_PCRS}
    steps = boot_events(build, model)
    for pcr, measured in extra or []:
        steps.append((pcr, "EV_EFI_BOOT_SERVICES_APPLICATION", measured, image_load_event(len(measured))))
    for pcr, kind, measured, data in steps:
        digests = writer.digests_of(measured)
        writer.add_digests(pcr, kind, digests, data)
        pcrs[pcr] = hashlib.sha256(pcrs[pcr] + digests["sha256"]).digest()
    return writer.to_bytes(), pcrs


@dataclass
class Node:
    """A node's software TPM: an AK, and evidence for a nonce."""

    key: ec.EllipticCurvePrivateKey = field(default_factory=lambda: ec.generate_private_key(ec.SECP256R1()))
    build: str = "tvmm-2026.1"
    reset: int = 1
    restart: int = 0
    host_key: str = "SHA256:host"  # the node's SSH host key fingerprint, as enrollment pins it
    model: str = DEFAULT_MODEL  # the hardware model whose firmware PCR 0 shows

    @property
    def ak_public(self) -> bytes:
        return ecc_public(self.key)

    def identity(self) -> dict:
        return {"ak_public": self.ak_public, "ssh_host_key": self.host_key}

    def runtime_evidence(self, ticket: dict, events: list[dict] | None = None, pcr: int = 15,
                         quoted_for: str | None = None) -> dict:
        """What the node's service answers a launch with: the launched event (or events) in the
        runtime PCR, quoted by the AK for the ticket (or, to forge, for quoted_for)."""
        from tccdeploy.crypto.runtime import qualifier, replay

        body = ticket["ticket"]
        if events is None:
            events = [{"event": "launched", "vm_id": body["vm_id"], "image_sha256": body["image_sha256"],
                       "ticket": body["id"], "vcpus": body["vcpus"], "memory_mib": body["memory_mib"]}]
        if body.get("tk_name"):  # the service names the ticket's TK in each event (unless the test chose one)
            events = [e if "tk" in e else {**e, "tk": body["tk_name"]} for e in events]
        value = replay(events)
        attest = quote_attest(qualifier(quoted_for or body["id"]), "sha256", [pcr], hashlib.sha256(value).digest(),
                              self.reset, self.restart)
        return {"attest": base64.b64encode(attest).decode(), "signature": base64.b64encode(sign(self.key, attest)).decode(),
                "pcr": pcr, "value": value.hex(), "events": events}

    def evidence(self, nonce: bytes, pcrs: list[int] | None = None, log_extra: list[tuple[int, bytes]] | None = None,
                 tag: AssetTag | None = None) -> Evidence:
        log, values = boot_log(self.build, log_extra, self.model)
        chosen = sorted(pcrs if pcrs is not None else POLICY_PCRS)
        digest = hashlib.sha256(b"".join(values[p] for p in chosen)).digest()
        attest = quote_attest(nonce, "sha256", chosen, digest, self.reset, self.restart)
        evidence = Evidence(attest, sign(self.key, attest), dict(values), log, nonce, ssh_host_key=self.host_key)
        if tag is not None:
            nv_public, nv_attest = tag.certify(nonce)
            evidence.asset_attest, evidence.asset_signature = nv_attest, sign(self.key, nv_attest)
            evidence.asset_nv_public = nv_public
        return evidence


PLATFORM_TAG = tpm2.NV_PLATFORMCREATE | tpm2.NV_PPWRITE | tpm2.NV_WRITEDEFINE | tpm2.NV_WRITELOCKED | tpm2.NV_WRITTEN


@dataclass
class AssetTag:
    """An NV index holding an asset tag, and TPM2_NV_Certify of it, as a TPM would make them.

    The defaults are what the TC accepts (platform-created, written, write-locked, certified
    whole over the quote's nonce); each field is a way to forge one."""

    index: int = 0x01500001
    value: bytes = b"site2-rack-a"
    attributes: int = PLATFORM_TAG
    offset: int = 0
    size: int | None = None  # certified size (default: all of it)
    nonce: bytes | None = None  # the nonce certified over (default: the quote's)
    name_of: int | None = None  # certify another index's name (default: this one's)

    def nv_public(self, index: int | None = None) -> bytes:
        area = struct.pack(">IHI", self.index if index is None else index, tpm2.ALG_SHA256, self.attributes)
        return tpm2b(area + tpm2b(b"") + struct.pack(">H", len(self.value)))

    def certify(self, nonce: bytes) -> tuple[bytes, bytes]:
        public = self.nv_public()
        certified = tpm2.parse_nv_public(self.nv_public(self.name_of) if self.name_of is not None else public).name
        size = len(self.value) if self.size is None else self.size
        body = struct.pack(">IH", tpm2.TPM_GENERATED, tpm2.ST_ATTEST_NV) + tpm2b(b"\x00\x0b" + bytes(32))
        body += tpm2b(self.nonce if self.nonce is not None else nonce)
        body += struct.pack(">QIIB", 1, 1, 0, 1) + struct.pack(">Q", 0x2000)
        body += tpm2b(certified) + struct.pack(">H", self.offset) + tpm2b(self.value[self.offset:self.offset + size])
        return public, body


TK_ATTRIBUTES = tpm2.FIXED_TPM | tpm2.FIXED_PARENT | tpm2.SENSITIVE_DATA_ORIGIN | tpm2.DECRYPT | tpm2.NO_DA


def rsa_public(key, attributes: int = TK_ATTRIBUTES, policy: bytes = b"", scheme: int = tpm2.ALG_OAEP) -> bytes:  # type: ignore[no-untyped-def]
    """TPM2B_PUBLIC of an RSA-2048 decrypt key (a TK) with the given attributes, authPolicy and scheme."""
    n = key.public_key().public_numbers().n.to_bytes(256, "big")
    area = struct.pack(">HHI", tpm2.ALG_RSA, tpm2.ALG_SHA256, attributes) + tpm2b(policy)
    area += struct.pack(">HH", tpm2.ALG_NULL, scheme) + (struct.pack(">H", tpm2.ALG_SHA256) if scheme != tpm2.ALG_NULL else b"")
    area += struct.pack(">HI", 2048, 0) + tpm2b(n)
    return tpm2b(area)


def certify_attest(nonce: bytes, name: bytes, magic: int = tpm2.TPM_GENERATED) -> bytes:
    body = struct.pack(">IH", magic, tpm2.ST_ATTEST_CERTIFY) + tpm2b(b"\x00\x0b" + bytes(32)) + tpm2b(nonce)
    body += struct.pack(">QIIB", 1, 1, 0, 1) + struct.pack(">Q", 0x2000)
    return body + tpm2b(name) + tpm2b(name)


def enroll_software_node(registry, name: str, node: Node, site: str = "site1", address: str = "127.0.1.7") -> None:  # type: ignore[no-untyped-def]
    """Put a software node straight into a registry, as the TC's operator (roster) and a finished
    enrollment would: for tests of what comes after enrollment."""
    ek = hashlib.sha256(name.encode()).hexdigest()
    registry.roster_add("sha256:" + ek, site, name, None)
    registry.enroll(name, site, address, {"ek_certificate": b"c", "ek_fingerprint": ek, "ek_public": b"e",
                                          "ak_public": node.ak_public, "ak_name": tpm2.parse_public(node.ak_public).name,
                                          "ssh_host_key": node.host_key, "manufacturer": "software"})
