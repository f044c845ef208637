"""The coordinator's registry, identity and admission checks (pure logic on real SQLite files)."""

from __future__ import annotations

import os
import sqlite3
import threading
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric import rsa

from tccdeploy.coordinator import admission, identity, tpm2
from tccdeploy.coordinator.admission import AdmissionRefused
from tccdeploy.coordinator.store import MIGRATIONS, Registry
from tccdeploy.crypto.ticket import pin_qualifier
from tccdeploy.manifest.loader import load_manifests

from .attestkit import TK_ATTRIBUTES, Node, certify_attest, rsa_public, sign

REPO = Path(__file__).resolve().parent.parent
PCRS = [0, 4, 8, 9, 11]
VALUES = {str(p): bytes([p]) * 32 for p in PCRS}


@pytest.fixture
def registry(tmp_path: Path) -> Registry:
    r = Registry(str(tmp_path / "registry.sqlite"))
    yield r
    r.close()


def test_registry_is_created_0600_in_wal_mode_at_the_latest_version(tmp_path: Path, registry: Registry):
    assert oct(os.stat(registry.path).st_mode & 0o777) == "0o600"
    assert registry.version == len(MIGRATIONS)
    assert registry.backend.db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert registry.backend.db.execute("PRAGMA foreign_keys").fetchone()[0] == 1


def test_an_older_registry_is_migrated_in_place(tmp_path: Path):
    path = tmp_path / "old.sqlite"
    db = sqlite3.connect(path)
    db.executescript(MIGRATIONS[0] + ";PRAGMA user_version=1;")
    db.execute("INSERT INTO nodes (name, state, created, updated) VALUES ('n1', 'enrolled', 0, 0)")
    db.commit()
    db.close()
    registry = Registry(str(path))
    assert registry.version == len(MIGRATIONS) and registry.node("n1")["state"] == "enrolled"
    registry.close()


def test_a_registry_from_a_newer_tccdeploy_is_refused(tmp_path: Path):
    path = tmp_path / "new.sqlite"
    db = sqlite3.connect(path)
    db.execute(f"PRAGMA user_version={len(MIGRATIONS) + 1}")
    db.close()
    with pytest.raises(Exception, match="schema version"):
        Registry(str(path))


def test_a_nonce_is_consumed_exactly_once_even_by_racing_threads(registry: Registry):
    registry.new_nonce("n1", "quote", "abc", ttl=30)
    results = []
    threads = [threading.Thread(target=lambda: results.append(registry.consume_nonce("n1", "quote", "abc"))) for _ in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sum(r.ok for r in results) == 1
    assert {r.reason for r in results if not r.ok} == {"nonce.replayed"}


def test_nonce_refusals_are_named(registry: Registry):
    registry.new_nonce("n1", "quote", "x", ttl=30)
    assert registry.consume_nonce("n2", "quote", "x").reason == "nonce.other-node"
    assert registry.consume_nonce("n1", "quote", "nope").reason == "nonce.unknown"
    registry.new_nonce("n1", "quote", "old", ttl=-1)
    assert registry.consume_nonce("n1", "quote", "old").reason == "nonce.expired"


def test_tc_identity_key_is_0600_and_created_once(tmp_path: Path):
    ident, created = identity.init(str(tmp_path))
    assert created and oct(os.stat(tmp_path / identity.KEY_FILE).st_mode & 0o777) == "0o600"
    again, created = identity.init(str(tmp_path))
    assert not created and again.fingerprint == ident.fingerprint
    os.chmod(tmp_path / identity.KEY_FILE, 0o644)
    with pytest.raises(PermissionError):
        identity.load(str(tmp_path))


# -- admission -------------------------------------------------------------------------------


@pytest.fixture
def admitted_setup(registry: Registry):
    manifests = load_manifests([str(REPO / "examples")])
    node = Node()
    registry.enroll("n1", "site1", "127.0.1.7", {
        "ek_certificate": b"c", "ek_fingerprint": "f", "ek_public": b"e", "ak_public": node.ak_public,
        "ak_name": tpm2.parse_public(node.ak_public).name, "ssh_host_key": "h", "manufacturer": "m"})
    attestation = registry.add_attestation("n1", {"verdict": "trusted", "build": "tvmm-2026.1", "pcr_values": {k: v.hex() for k, v in VALUES.items()}})
    return manifests.perimeter, node, attestation


TC_CA = b"the TC's CA certificate (DER)"


def _tk(node: Node, attributes: int = TK_ATTRIBUTES, policy: bytes | None = None, nonce: bytes = b"c" * 32,
        name_of: bytes | None = None, scheme: int = tpm2.ALG_OAEP, pinned: bytes = TC_CA):
    key = rsa.generate_private_key(65537, 2048)
    if policy is None:
        policy = admission.policy_pcr_digest("sha256", PCRS, [VALUES[str(p)] for p in PCRS])
    public = rsa_public(key, attributes, policy, scheme)
    name = tpm2.parse_public(name_of or public).name
    attest = certify_attest(pin_qualifier(nonce, pinned), name)  # the AK certifies over the nonce and the pin
    return public, attest, sign(node.key, attest)


def _begin(registry, perimeter, attestation, tk, nonce=b"c" * 32, nonce_ok=True):  # type: ignore[no-untyped-def]
    public, attest, signature = tk
    return admission.begin(registry, perimeter, "n1", attestation, public, attest, signature, nonce, nonce_ok, TC_CA)


def test_a_proper_tk_gets_a_challenge(registry: Registry, admitted_setup):
    perimeter, node, attestation = admitted_setup
    assert len(_begin(registry, perimeter, attestation, _tk(node))) == 256


@pytest.mark.parametrize("change, reason", [
    ("no-policy", "tk.policy"),
    ("other-pcr-values", "tk.policy"),
    ("fixedtpm-cleared", "tk.attributes"),
    ("userwithauth", "tk.attributes"),
    ("signing", "tk.attributes"),
    ("raw-rsa", "tk.scheme"),
    ("other-name", "tk.name"),
    ("other-signer", "tk.certify-signature"),
    ("wrong-nonce", "tk.certify-nonce"),
    ("bare-nonce", "tk.certify-nonce"),
    ("other-ca-pinned", "tk.certify-nonce"),
    ("used-nonce", "tk.certify-nonce"),
    ("stale-attestation", "admit.not-trusted"),
])
def test_a_bad_tk_is_refused_with_its_reason(registry: Registry, admitted_setup, change: str, reason: str):
    perimeter, node, attestation = admitted_setup
    kwargs: dict = {}
    tk = _tk(node)
    if change == "no-policy":
        tk = _tk(node, policy=b"")
    elif change == "other-pcr-values":
        tk = _tk(node, policy=admission.policy_pcr_digest("sha256", PCRS, [bytes(32)] * 5))
    elif change == "fixedtpm-cleared":
        tk = _tk(node, attributes=TK_ATTRIBUTES & ~tpm2.FIXED_TPM)
    elif change == "userwithauth":
        tk = _tk(node, attributes=TK_ATTRIBUTES | tpm2.USER_WITH_AUTH)
    elif change == "signing":
        tk = _tk(node, attributes=TK_ATTRIBUTES | tpm2.SIGN)
    elif change == "raw-rsa":
        tk = _tk(node, scheme=tpm2.ALG_NULL)
    elif change == "other-name":
        other = rsa_public(rsa.generate_private_key(65537, 2048))
        tk = _tk(node, name_of=other)
    elif change == "other-signer":
        public, attest, _ = tk
        tk = (public, attest, sign(Node().key, attest))
    elif change == "wrong-nonce":
        kwargs["nonce"] = b"d" * 32
    elif change == "bare-nonce":  # certified over the nonce alone: no CA pinned with this TK
        public, _, _ = tk
        attest = certify_attest(b"c" * 32, tpm2.parse_public(public).name)
        tk = (public, attest, sign(node.key, attest))
    elif change == "other-ca-pinned":  # the engine handed the node its own CA to pin
        tk = _tk(node, pinned=b"the engine's CA certificate (DER)")
    elif change == "used-nonce":
        kwargs["nonce_ok"] = False
    elif change == "stale-attestation":
        registry.add_attestation("n1", {"verdict": "untrusted", "reasons": [{"code": "build.unknown"}]})
    with pytest.raises(AdmissionRefused) as info:
        _begin(registry, perimeter, attestation, tk, **kwargs)
    assert info.value.reason == reason


def test_admission_needs_the_tk_to_answer(registry: Registry, admitted_setup, tmp_path: Path):
    perimeter, node, attestation = admitted_setup
    _begin(registry, perimeter, attestation, _tk(node))
    tc, _ = identity.init(str(tmp_path / "tc"))
    with pytest.raises(AdmissionRefused) as info:
        admission.finish(registry, perimeter, tc, "n1", "00" * 32)
    assert info.value.reason == "tk.check-failed"
    assert registry.node("n1")["state"] == "enrolled" and registry.certificate("n1") is None


def test_a_long_lived_connection_sees_other_processes_writes_after_its_own_transactions(tmp_path: Path):
    mine, other = Registry(str(tmp_path / "r.sqlite")), Registry(str(tmp_path / "r.sqlite"))
    mine.save_challenge("n1", secret_hash=b"h", ek_certificate=b"c", ek_fingerprint="f", ek_public=b"e",
                        ak_public=b"a", ssh_host_key="s", manufacturer="m", expires=0.0)
    mine.take_challenge("n1")  # a read inside a transaction must not pin an old snapshot
    other.add_customer("late", "ed25519:x", "id")
    assert [c["name"] for c in mine.customers()] == ["late"]
    mine.close()
    other.close()
