"""Enrollment end to end without a lab: a software manufacturer (CA, EK certificate), a software
TPM (EK key, AK, ActivateCredential from the specification), the roster, and a real SQLite
registry. Each refusal is asserted by its reason code, and a refused step changes nothing.
The real-swtpm enrollment is in tests/test_attestation.py."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from tccdeploy.coordinator import enrollment, roster, tpm2
from tccdeploy.coordinator.enrollment import EnrollmentRefused
from tccdeploy.coordinator.store import Registry

from .attestkit import AK_ATTRIBUTES, ecc_public
from .ekkit import activate, ek_cert, ek_public, key, vendor_perimeter

HOST_KEY = "SHA256:the-node's-ssh-host-key"


@dataclass
class TPM:
    """A node's TPM in software: its EK (certified by the vendor) and an AK."""

    certificate: bytes
    ek: rsa.RSAPrivateKey = field(default_factory=key)
    ak: ec.EllipticCurvePrivateKey = field(default_factory=lambda: ec.generate_private_key(ec.SECP256R1()))
    ak_attributes: int = AK_ATTRIBUTES

    @property
    def ak_public(self) -> bytes:
        return ecc_public(self.ak, self.ak_attributes)

    @property
    def roster_name(self) -> str:
        return roster.ek_identities(self.certificate)[0]

    def answer(self, challenge: enrollment.Challenge) -> bytes:
        return activate(self.ek, challenge.credential, challenge.secret, tpm2.parse_public(self.ak_public).name)


@pytest.fixture
def lab(tmp_path: Path):  # type: ignore[no-untyped-def]
    perimeter, root, intermediate = vendor_perimeter(tmp_path)
    registry = Registry(str(tmp_path / "registry.sqlite"))

    class Lab:
        def __init__(self) -> None:
            self.perimeter, self.registry, self.roster = perimeter, registry, []

        def tpm(self, ek: rsa.RSAPrivateKey | None = None, **fields) -> TPM:  # type: ignore[no-untyped-def]
            ek = ek or key()
            return TPM(ek_cert(intermediate, ek), ek, **fields)

        def place(self, tpm: TPM, site: str = "site1", name: str | None = None) -> None:
            self.roster.append(roster.RosterEntry(tpm.roster_name, site, name, None))

        def begin(self, node: str, tpm: TPM, site: str | None = "site1", address: str = "127.0.1.9",
                  host_key: str = HOST_KEY, ek_public: bytes | None = None) -> enrollment.Challenge | None:
            return enrollment.begin(self.registry, self.perimeter, lambda eks: self.roster, node, tpm.certificate,
                                    ek_public or globals()["ek_public"](tpm.ek), tpm.ak_public, host_key, site, address)

        def enroll(self, node: str, tpm: TPM, **kwargs) -> dict:  # type: ignore[no-untyped-def,type-arg]
            challenge = self.begin(node, tpm, **kwargs)
            assert challenge is not None
            return enrollment.finish(self.registry, node, tpm.answer(challenge))

        def refusal(self, call, *args, **kwargs) -> str:  # type: ignore[no-untyped-def]
            with pytest.raises(EnrollmentRefused) as info:
                call(*args, **kwargs)
            assert str(info.value)
            return info.value.reason

    yield Lab()
    registry.close()


def test_a_genuine_tpm_on_the_roster_enrolls_and_the_tc_keeps_only_what_it_needs(lab):
    tpm = lab.tpm()
    lab.place(tpm, "site1", "n1")
    challenge = lab.begin("n1", tpm, site=None)  # no claimed site: the roster gives it
    pending = lab.registry.backend.db.execute("SELECT * FROM challenges WHERE node = 'n1'").fetchone()
    assert pending is not None and len(challenge.credential) == 2 + 32 + 2 + 32
    answer = tpm.answer(challenge)
    assert bytes(pending["secret_hash"]) == hashlib.sha256(answer).digest()  # the hash, never the secret
    result = enrollment.finish(lab.registry, "n1", answer)
    assert result == {"node": "n1", "manufacturer": "vendor", "ek_fingerprint": hashlib.sha256(tpm.certificate).hexdigest(),
                      "site": "site1"}
    identity = lab.registry.identity("n1")
    assert bytes(identity["ak_name"]) == tpm2.parse_public(tpm.ak_public).name
    assert identity["ssh_host_key"] == HOST_KEY and identity["manufacturer"] == "vendor"
    assert identity["ek_key_fingerprint"] == roster.ek_identities(tpm.certificate)[1]
    assert lab.registry.node("n1")["site"] == "site1" and lab.registry.node("n1")["address"] == "127.0.1.9"
    assert lab.begin("n1", tpm) is None  # the same TPM again: nothing to do, nothing reset


def test_the_roster_may_name_the_ek_by_its_public_key(lab):
    tpm = lab.tpm()
    lab.roster.append(roster.RosterEntry(roster.ek_identities(tpm.certificate)[1], "site1", None, None))
    assert lab.enroll("n1", tpm)["site"] == "site1"


def test_an_answer_from_a_tpm_without_that_ak_is_refused_and_the_challenge_is_gone(lab):
    tpm = lab.tpm()
    lab.place(tpm)
    challenge = lab.begin("n1", tpm)
    assert lab.refusal(enrollment.finish, lab.registry, "n1", tpm.answer(challenge)[:-1] + b"\0") == "ak.not-bound"
    assert lab.registry.identity("n1") is None
    assert lab.refusal(enrollment.finish, lab.registry, "n1", tpm.answer(challenge)) == "enroll.no-challenge"


def test_a_challenge_is_answered_until_it_expires_and_not_after(lab, monkeypatch):
    tpm = lab.tpm()
    lab.place(tpm)
    now = [1_000_000.0]
    monkeypatch.setattr(enrollment, "time", type("Clock", (), {"time": staticmethod(lambda: now[0])}))
    challenge = lab.begin("n1", tpm)
    now[0] += enrollment.CHALLENGE_TTL  # the last moment
    assert enrollment.finish(lab.registry, "n1", tpm.answer(challenge))["node"] == "n1"
    other = lab.tpm(rsa.generate_private_key(65537, 2048))
    lab.place(other)
    challenge = lab.begin("n2", other)
    now[0] += enrollment.CHALLENGE_TTL + 0.001
    assert lab.refusal(enrollment.finish, lab.registry, "n2", other.answer(challenge)) == "enroll.challenge-expired"
    assert lab.registry.identity("n2") is None


def test_finishing_without_a_challenge_is_refused(lab):
    assert lab.refusal(enrollment.finish, lab.registry, "n1", b"x" * 32) == "enroll.no-challenge"


@pytest.mark.parametrize("attributes", [
    AK_ATTRIBUTES & ~tpm2.RESTRICTED, AK_ATTRIBUTES & ~tpm2.SIGN, AK_ATTRIBUTES & ~tpm2.FIXED_TPM,
    AK_ATTRIBUTES & ~tpm2.FIXED_PARENT, AK_ATTRIBUTES & ~tpm2.SENSITIVE_DATA_ORIGIN, AK_ATTRIBUTES | tpm2.DECRYPT,
], ids=["not-restricted", "not-signing", "not-fixedtpm", "not-fixedparent", "imported", "also-decrypt"])
def test_an_ak_a_tpm_could_have_imported_or_that_decrypts_is_refused(lab, attributes):
    tpm = lab.tpm(ak_attributes=attributes)
    lab.place(tpm)
    assert lab.refusal(lab.begin, "n1", tpm) == "ak.attributes"
    assert lab.registry.backend.db.execute("SELECT COUNT(*) FROM challenges").fetchone()[0] == 0


def test_an_ak_named_with_another_hash_than_sha256_is_refused():
    ak = tpm2.parse_public(ecc_public(ec.generate_private_key(ec.SECP256R1())))
    enrollment.check_ak(ak)
    with pytest.raises(EnrollmentRefused, match="SHA-256") as info:
        enrollment.check_ak(tpm2.Public(**{**ak.__dict__, "name_alg": tpm2.ALG_SHA1}))
    assert info.value.reason == "ak.attributes"


def test_malformed_keys_and_a_missing_host_key_are_refused_by_name(lab):
    tpm = lab.tpm()
    lab.place(tpm)
    assert lab.refusal(lab.begin, "n1", tpm, ek_public=b"\x00\x05junk") == "evidence.malformed"
    assert lab.refusal(lab.begin, "n1", tpm, host_key="") == "node.ssh-host-key"
    garbled = TPM(b"\x30\x03\x02\x01\x00", tpm.ek, tpm.ak)
    assert lab.refusal(enrollment.begin, lab.registry, lab.perimeter, lambda eks: lab.roster, "n1", garbled.certificate,
                       ek_public(tpm.ek), tpm.ak_public, HOST_KEY, "site1", "127.0.1.9") == "ek.certificate-malformed"


def test_an_ek_the_certificate_is_not_for_is_refused(lab):
    tpm = lab.tpm()
    lab.place(tpm)
    assert lab.refusal(lab.begin, "n1", tpm, ek_public=ek_public(rsa.generate_private_key(65537, 2048))) == "ek.key-mismatch"


@pytest.mark.parametrize("site, name, claimed, address, reason", [
    (None, None, "site1", "127.0.1.9", "perimeter.not-in-roster"),
    ("site2", None, "site1", "127.0.1.9", "perimeter.roster-site"),
    ("site1", "n7", "site1", "127.0.1.9", "perimeter.roster-name"),
    ("site1", None, "site1", "127.0.2.9", "perimeter.address"),
    ("site1", None, None, "10.0.0.1", "perimeter.address"),
])
def test_the_roster_and_the_perimeter_decide_where_a_tpm_may_enroll(lab, site, name, claimed, address, reason):
    tpm = lab.tpm()
    if site is not None:
        lab.place(tpm, site, name)
    assert lab.refusal(lab.begin, "n1", tpm, site=claimed, address=address) == reason
    assert lab.registry.backend.db.execute("SELECT COUNT(*) FROM challenges").fetchone()[0] == 0


def test_a_tpm_on_two_sites_rosters_is_refused(lab):
    tpm = lab.tpm()
    lab.place(tpm, "site1")
    lab.place(tpm, "site2")
    assert lab.refusal(lab.begin, "n1", tpm, site=None) == "perimeter.roster-conflict"


def test_a_node_enrolled_with_one_tpm_cannot_enroll_with_another(lab):
    first, second = lab.tpm(), lab.tpm(rsa.generate_private_key(65537, 2048))
    lab.place(first)
    lab.place(second)
    lab.enroll("n1", first)
    assert lab.refusal(lab.begin, "n1", second) == "ek.changed"
    assert bytes(lab.registry.identity("n1")["ak_name"]) == tpm2.parse_public(first.ak_public).name


def test_one_tpm_is_one_node(lab):
    tpm = lab.tpm()
    lab.place(tpm)
    lab.enroll("n1", tpm)
    assert lab.refusal(lab.begin, "n2", tpm) == "ek.duplicate"


def test_two_enrollments_racing_with_one_tpm_bind_it_once(lab):
    """Both pass `begin` before either finishes: the registry's write decides, and the loser is
    refused with the reason, not a crash."""
    tpm = lab.tpm()
    lab.place(tpm)
    first, second = lab.begin("n1", tpm), lab.begin("n2", tpm)
    enrollment.finish(lab.registry, "n1", tpm.answer(first))
    with pytest.raises(EnrollmentRefused, match="this TPM is enrolled as n1") as info:
        enrollment.finish(lab.registry, "n2", tpm.answer(second))
    assert info.value.reason == "ek.duplicate"
    assert lab.registry.identity("n2") is None


def test_a_finished_enrollment_is_audited_with_its_result(lab):
    tpm = lab.tpm()
    lab.place(tpm)
    seen = []
    challenge = lab.begin("n1", tpm)
    enrollment.finish(lab.registry, "n1", tpm.answer(challenge), lambda result: seen.append(result))
    assert seen == [{"node": "n1", "manufacturer": "vendor", "ek_fingerprint": hashlib.sha256(tpm.certificate).hexdigest(),
                     "site": "site1"}]
