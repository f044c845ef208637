"""A trusted coordinator over the example manifests with software nodes and customers, for fast
tests of the TC's decisions (no lab): nodes enrolled through the roster, attested with software
evidence the verifier checks for real, and admitted with a software trusted key; customers whose
sealed images are made here (the descriptor and the wrapped key, without a disk)."""

from __future__ import annotations

import base64
import datetime
import secrets
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ed25519, rsa
from cryptography.x509.oid import NameOID

from tccdeploy.coordinator import tpm2
from tccdeploy.coordinator.identity import init as tc_init
from tccdeploy.coordinator.service import Coordinator
from tccdeploy.crypto import customer, wrap
from tccdeploy.crypto.canonical import PLACEMENT_REQUEST, SEALED_IMAGE, signed_bytes
from tccdeploy.manifest.loader import load_manifests

from .attestkit import AssetTag, Node, enroll_software_node, rsa_public
from .conftest import live_examples

ADDRESSES = {"site1": "127.0.1.7", "site2": "127.0.2.7"}


_TK_KEYS: list[rsa.RSAPrivateKey] = []
_IDENTITY: dict[str, bytes] = {}


def _tk_key() -> rsa.RSAPrivateKey:
    """RSA-2048 keys take a while to make: the tests share a few (each node's own TPM key is not the point here)."""
    if len(_TK_KEYS) < 4:
        _TK_KEYS.append(rsa.generate_private_key(public_exponent=65537, key_size=2048))
        return _TK_KEYS[-1]
    return _TK_KEYS[secrets.randbelow(4)]


def _tc_state(state: str) -> None:
    """A TC identity in state: made once per test run (RSA-3072 is slow), copied for each world."""
    import os
    import shutil
    import tempfile

    if not _IDENTITY:
        made = tempfile.mkdtemp(prefix="tccdeploy-tc-identity-")
        tc_init(made)
        for name in os.listdir(made):
            with open(os.path.join(made, name), "rb") as fh:
                _IDENTITY[name] = fh.read()
        shutil.rmtree(made)
    os.makedirs(state, mode=0o700, exist_ok=True)
    for name, data in _IDENTITY.items():
        fd = os.open(os.path.join(state, name), os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)


@dataclass
class SoftwareNode:
    name: str
    site: str
    tpm: Node = field(default_factory=Node)
    tk: rsa.RSAPrivateKey = field(default_factory=_tk_key)


class World:
    def __init__(self, root: Path, registry: str | None = None):
        state = str(root / "tc")
        _tc_state(state)
        self.state, self.manifests = state, str(live_examples(root))
        self.tc = Coordinator.from_manifests(load_manifests([self.manifests]), state, registry)
        self.nodes: dict[str, SoftwareNode] = {}
        self.keys: dict[str, ed25519.Ed25519PrivateKey] = {}

    def close(self) -> None:
        self.tc.close()

    # -- nodes -----------------------------------------------------------------------------
    def node(self, name: str, site: str = "site1", admit: bool = True, address: str | None = None,
             host_key: str = "SHA256:host") -> SoftwareNode:
        node = SoftwareNode(name, site, Node(host_key=host_key))
        self.nodes[name] = node
        enroll_software_node(self.tc.registry, name, node.tpm, site, address or ADDRESSES[site])
        if admit:
            self.admit(name)
        return node

    def attest(self, name: str, claimed_site: str | None = None, **evidence_args: Any) -> tuple[Any, int]:
        node = self.nodes[name]
        evidence_args.setdefault("tag", AssetTag() if node.site == "site2" else None)
        evidence = node.tpm.evidence(self.tc.nonce(name), **evidence_args)
        return self.tc.verify(name, claimed_site or node.site, self.tc.registry.node(name)["address"], evidence)

    def admit(self, name: str) -> None:
        """A fresh trusted attestation, and the node certificate admission would issue for its TK."""
        verdict, attestation = self.attest(name)
        assert verdict.trusted, verdict.reasons
        node = self.nodes[name]
        subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
        now = datetime.datetime.now(datetime.UTC)
        pem = (x509.CertificateBuilder().subject_name(subject).issuer_name(self.tc.identity().certificate.subject)
               .public_key(node.tk.public_key()).serial_number(x509.random_serial_number())
               .not_valid_before(now).not_valid_after(now + datetime.timedelta(hours=1))
               .sign(self.tc.identity().key, hashes.SHA256()).public_bytes(serialization.Encoding.PEM).decode())
        tk_name = tpm2.parse_public(rsa_public(node.tk)).name.hex()  # the TK's TPM name, as admission records it
        self.tc.registry.admit(name, {"serial": secrets.token_hex(8), "attestation": attestation, "tk_name": tk_name,
                                      "pem": pem, "not_after": (now + datetime.timedelta(hours=1)).timestamp(),
                                      "build": verdict.build},
                              self.tc.perimeter.attestation.readmit == "after-reboot")

    # -- customers ---------------------------------------------------------------------------
    def customer(self, name: str) -> ed25519.Ed25519PrivateKey:
        key = ed25519.Ed25519PrivateKey.generate()
        self.keys[name] = key
        self.tc.add_customer(name, customer.public_text(key.public_key()))
        return key

    def image(self, owner: str, kvm: bytes | None = None, version: int = 3) -> dict[str, Any]:
        """owner's sealed image: a signed descriptor whose key is wrapped to the TC for owner."""
        key = self.keys[owner]
        vm_id, vm_salt = customer.new_id("vm", key.public_key())
        wrap_cert = self.tc.identity().wrap_certificate
        kvm = kvm or secrets.token_bytes(32)
        descriptor = {
            "type": "tccdeploy-sealed-image", "version": version, "vm_id": vm_id, "vm_salt": vm_salt, "name": "img",
            "disk": {"file": "disk.qcow2", "sha256": secrets.token_hex(32), "size": 1, "virtual_size": 1,
                     "format": "qcow2+luks"},
            "wrapped_key": base64.b64encode(wrap.wrap(wrap_cert.public_key(), kvm,  # type: ignore[arg-type]
                                                      wrap.sealed_label(vm_id, customer.key_id(key.public_key())))).decode(),
            "customer": {"key": customer.public_text(key.public_key()), "id": customer.key_id(key.public_key())},
        }
        return {"descriptor": descriptor, "signature": base64.b64encode(key.sign(signed_bytes(SEALED_IMAGE, descriptor))).decode()}

    def request(self, owner: str, bundle: dict[str, Any], name: str | None = None,
                constraints: dict[str, Any] | None = None, created: datetime.datetime | None = None,
                signer: str | None = None) -> dict[str, Any]:
        """owner's signed placement request for bundle (signed by signer's key, default owner's)."""
        key = self.keys[signer or owner]
        descriptor = bundle["descriptor"]
        spec: dict[str, Any] = {"image": "x.sealed", "vcpus": 1, "memoryMiB": 64}
        if constraints:
            spec["constraints"] = constraints
        request = {"manifest": {"apiVersion": "tccdeploy/v1", "kind": "PlacementRequest",
                                "metadata": {"name": name or f"vm-{secrets.token_hex(3)}"}, "spec": spec},
                   **dict(zip(("id", "salt"), customer.new_id("request", self.keys[owner].public_key()), strict=True)),
                   "created": (created or datetime.datetime.now(datetime.UTC)).isoformat(timespec="seconds"),
                   "customer": customer.public_text(self.keys[owner].public_key()),
                   "image": {"vm_id": descriptor["vm_id"], "sha256": descriptor["disk"]["sha256"]}}
        return {"request": request, "signature": base64.b64encode(key.sign(signed_bytes(PLACEMENT_REQUEST, request))).decode()}

    def accepted(self, owner: str, **request_args: Any) -> dict[str, Any]:
        bundle = self.image(owner)
        return self.tc.accept_request(self.request(owner, bundle, **request_args), bundle)

    def launched(self, owner: str, node: str, **request_args: Any) -> dict[str, Any]:
        record = self.accepted(owner, **request_args)
        release = self.tc.release_key(record["id"], node)
        self.tc.record_launch(release, node, self.started(node, release))
        return record

    def started(self, node: str, release: dict[str, Any]) -> dict[str, Any]:
        """What node's TVMM service answers the launch ticket with: running, and its TPM's evidence."""
        return {"running": True, "evidence": self.nodes[node].tpm.runtime_evidence(release["ticket"])}


def reason(call, *args, **kwargs) -> str:  # type: ignore[no-untyped-def]
    """The reason code call is refused with (it must be refused)."""
    import pytest

    from tccdeploy.coordinator.refusals import Refused

    with pytest.raises(Refused) as info:
        call(*args, **kwargs)
    message = str(info.value)
    assert message and message[0].isprintable() and not message.isupper() and message != "None", \
        f"{info.value.reason}: no clear message"
    return info.value.reason
