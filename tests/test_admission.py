"""Admission without a lab: a software node (AK, TK) against the TC's checks and a real SQLite
registry. Each refusal is asserted by its reason code; a successful admission is checked down
to the node certificate's every field, since the key broker trusts exactly those. The same
flow on real swtpm TPMs is in tests/test_attestation.py."""

from __future__ import annotations

import dataclasses
import datetime
import hashlib
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa

from tccdeploy.coordinator import admission, identity, tpm2
from tccdeploy.coordinator.admission import AdmissionRefused
from tccdeploy.coordinator.store import Registry
from tccdeploy.crypto.ticket import pin_qualifier, pinned_policy
from tccdeploy.manifest.loader import load_manifests

from .attestkit import TK_ATTRIBUTES, Node, certify_attest, ecc_public, quote_attest, rsa_public, sign

REPO = Path(__file__).resolve().parent.parent
PCRS = [0, 4, 8, 9, 11]
VALUES = {str(p): bytes([p]) * 32 for p in PCRS}
TC_CA = b"the TC's CA certificate (DER)"
NONCE = b"c" * 32
TK_KEY = rsa.generate_private_key(65537, 2048)


@pytest.fixture
def registry(tmp_path: Path) -> Registry:
    r = Registry(str(tmp_path / "registry.sqlite"))
    yield r
    r.close()


@pytest.fixture
def setup(registry: Registry):  # type: ignore[no-untyped-def]
    """n1 enrolled (software AK) with a trusted attestation of VALUES."""
    manifests = load_manifests([str(REPO / "examples")])
    node = Node()
    registry.enroll("n1", "site1", "127.0.1.7", {
        "ek_certificate": b"c", "ek_fingerprint": "f", "ek_public": b"e", "ak_public": node.ak_public,
        "ak_name": tpm2.parse_public(node.ak_public).name, "ssh_host_key": "h", "manufacturer": "m"})
    attestation = registry.add_attestation("n1", {"verdict": "trusted", "build": "tvmm-2026.1", "reset_count": 3,
                                                  "pcr_values": {k: v.hex() for k, v in VALUES.items()}})
    return manifests.perimeter, node, attestation


@pytest.fixture(scope="module")
def tc(tmp_path_factory) -> identity.Identity:  # type: ignore[no-untyped-def]
    made, _ = identity.init(str(tmp_path_factory.mktemp("tc")))
    return made


def _tk(node: Node, attributes: int = TK_ATTRIBUTES, policy: bytes | None = None, nonce: bytes = NONCE,
        name_of: bytes | None = None, scheme: int = tpm2.ALG_OAEP, pinned: bytes = TC_CA, key: rsa.RSAPrivateKey = TK_KEY):
    if policy is None:
        policy = pinned_policy(admission.policy_pcr_digest("sha256", PCRS, [VALUES[str(p)] for p in PCRS]), TC_CA)
    public = rsa_public(key, attributes, policy, scheme)
    name = tpm2.parse_public(name_of or public).name
    attest = certify_attest(pin_qualifier(nonce, pinned), name)  # the AK certifies over the nonce and the pin
    return public, attest, sign(node.key, attest)


def _begin(registry, perimeter, attestation, tk, nonce=NONCE, nonce_ok=True):  # type: ignore[no-untyped-def]
    public, attest, signature = tk
    return admission.begin(registry, perimeter, "n1", attestation, public, attest, signature, nonce, nonce_ok, TC_CA)


def _answer(ciphertext: bytes, key: rsa.RSAPrivateKey = TK_KEY) -> str:
    """What the node's service answers (tvmm tk_check): the challenge decrypted with TK (OAEP-SHA256,
    the check label), and only its SHA-256, so the answer is of no use as a decryption of anything."""
    return hashlib.sha256(key.decrypt(ciphertext, padding.OAEP(padding.MGF1(hashes.SHA256()), hashes.SHA256(),
                                                               b"tccdeploy-tk-check\0"))).hexdigest()


def _refusal(call, *args, **kwargs) -> str:  # type: ignore[no-untyped-def]
    with pytest.raises(AdmissionRefused) as info:
        call(*args, **kwargs)
    assert str(info.value)
    return info.value.reason


def _clock(monkeypatch, start: float = 2_000_000_000.0) -> list[float]:  # type: ignore[no-untyped-def]
    now = [start]
    monkeypatch.setattr(admission, "time", type("Clock", (), {"time": staticmethod(lambda: now[0])}))
    return now


def test_policy_pcr_digest_is_the_tpms_policy_digest():
    """TPM 2.0 Part 3, 23.7: policyDigest' = H(0...0 || TPM_CC_PolicyPCR || pcrs || H(values))."""
    selection = bytes.fromhex("00000001" "000b" "03" "110b00")  # sha256, PCRs 0 4 8 9 11
    expected = hashlib.sha256(bytes(32) + bytes.fromhex("0000017f") + selection
                              + hashlib.sha256(b"".join(VALUES[str(p)] for p in PCRS)).digest()).digest()
    assert admission.policy_pcr_digest("sha256", PCRS, [VALUES[str(p)] for p in PCRS]) == expected


def test_a_proper_tk_gets_a_challenge_only_it_can_open(registry: Registry, setup):
    perimeter, node, attestation = setup
    ciphertext = _begin(registry, perimeter, attestation, _tk(node))
    assert len(ciphertext) == 256 and len(bytes.fromhex(_answer(ciphertext))) == 32
    assert len(TK_KEY.decrypt(ciphertext, padding.OAEP(padding.MGF1(hashes.SHA256()), hashes.SHA256(),
                                                       b"tccdeploy-tk-check\0"))) == 32  # a 256-bit challenge
    assert bytes(registry.backend.db.execute("SELECT challenge_hash FROM admissions").fetchone()[0]) == \
        hashlib.sha256(bytes.fromhex(_answer(ciphertext))).digest()  # the TC keeps a hash of the answer only
    with pytest.raises(ValueError):  # another label (another purpose) does not open it
        TK_KEY.decrypt(ciphertext, padding.OAEP(padding.MGF1(hashes.SHA256()), hashes.SHA256(), b"tccdeploy-tk-check"))


@pytest.mark.parametrize("change, reason", [
    ("no-policy", "tk.policy"),
    ("other-pcr-values", "tk.policy"),
    ("pcr-only", "tk.policy"),  # PolicyPCR alone: the pin kept beside the TK, where a boot as root rewrote it
    ("other-ca-in-policy", "tk.policy"),  # the certify names the TC's CA, the policy an engine's
    ("fixedtpm-cleared", "tk.attributes"),
    ("fixedparent-cleared", "tk.attributes"),
    ("imported", "tk.attributes"),
    ("not-decrypt", "tk.attributes"),
    ("restricted", "tk.attributes"),
    ("userwithauth", "tk.attributes"),
    ("signing", "tk.attributes"),
    ("raw-rsa", "tk.scheme"),
    ("oaep-sha1", "tk.scheme"),
    ("other-name", "tk.name"),
    ("other-signer", "tk.certify-signature"),
    ("not-tpm-generated", "tk.certify-type"),
    ("a-quote-not-a-certify", "tk.certify-type"),
    ("garbage", "tk.malformed"),
    ("wrong-nonce", "tk.certify-nonce"),
    ("bare-nonce", "tk.certify-nonce"),
    ("other-ca-pinned", "tk.certify-nonce"),
    ("used-nonce", "tk.certify-nonce"),
    ("stale-attestation", "admit.not-trusted"),
    ("older-attestation", "admit.not-trusted"),
])
def test_a_bad_tk_is_refused_with_its_reason(registry: Registry, setup, change: str, reason: str):
    perimeter, node, attestation = setup
    kwargs: dict = {}
    tk = _tk(node)
    attributes = {"fixedtpm-cleared": TK_ATTRIBUTES & ~tpm2.FIXED_TPM, "fixedparent-cleared": TK_ATTRIBUTES & ~tpm2.FIXED_PARENT,
                  "imported": TK_ATTRIBUTES & ~tpm2.SENSITIVE_DATA_ORIGIN, "not-decrypt": TK_ATTRIBUTES & ~tpm2.DECRYPT,
                  "restricted": TK_ATTRIBUTES | tpm2.RESTRICTED, "userwithauth": TK_ATTRIBUTES | tpm2.USER_WITH_AUTH,
                  "signing": TK_ATTRIBUTES | tpm2.SIGN}
    if change in attributes:
        tk = _tk(node, attributes=attributes[change])
    elif change == "no-policy":
        tk = _tk(node, policy=b"")
    elif change == "other-pcr-values":
        tk = _tk(node, policy=pinned_policy(admission.policy_pcr_digest("sha256", PCRS, [bytes(32)] * 5), TC_CA))
    elif change == "pcr-only":
        tk = _tk(node, policy=admission.policy_pcr_digest("sha256", PCRS, [VALUES[str(p)] for p in PCRS]))
    elif change == "other-ca-in-policy":
        tk = _tk(node, policy=pinned_policy(admission.policy_pcr_digest("sha256", PCRS, [VALUES[str(p)] for p in PCRS]),
                                            b"the engine's CA"))
    elif change == "raw-rsa":
        tk = _tk(node, scheme=tpm2.ALG_NULL)
    elif change == "oaep-sha1":
        public, _, _ = tk
        public = public.replace(tpm2.ALG_OAEP.to_bytes(2, "big") + tpm2.ALG_SHA256.to_bytes(2, "big"),
                                tpm2.ALG_OAEP.to_bytes(2, "big") + tpm2.ALG_SHA1.to_bytes(2, "big"), 1)
        attest = certify_attest(pin_qualifier(NONCE, TC_CA), tpm2.parse_public(public).name)
        tk = (public, attest, sign(node.key, attest))
    elif change == "other-name":
        tk = _tk(node, name_of=rsa_public(rsa.generate_private_key(65537, 2048)))
    elif change == "other-signer":
        public, attest, _ = tk
        tk = (public, attest, sign(Node().key, attest))
    elif change == "not-tpm-generated":
        public, _, _ = tk
        attest = certify_attest(pin_qualifier(NONCE, TC_CA), tpm2.parse_public(public).name, magic=0x12345678)
        tk = (public, attest, sign(node.key, attest))
    elif change == "a-quote-not-a-certify":
        public, _, _ = tk  # the AK's quote over the admission nonce, passed off as a certification
        attest = quote_attest(pin_qualifier(NONCE, TC_CA), "sha256", PCRS, bytes(32))
        tk = (public, attest, sign(node.key, attest))
    elif change == "garbage":
        tk = (b"\x00\x04junk", tk[1], tk[2])
    elif change == "wrong-nonce":
        kwargs["nonce"] = b"d" * 32
    elif change == "bare-nonce":  # certified over the nonce alone: no CA pinned with this TK
        public, _, _ = tk
        attest = certify_attest(NONCE, tpm2.parse_public(public).name)
        tk = (public, attest, sign(node.key, attest))
    elif change == "other-ca-pinned":  # the engine handed the node its own CA to pin
        tk = _tk(node, pinned=b"the engine's CA certificate (DER)")
    elif change == "used-nonce":
        kwargs["nonce_ok"] = False
    elif change == "stale-attestation":
        registry.add_attestation("n1", {"verdict": "untrusted", "reasons": [{"code": "build.unknown"}]})
    elif change == "older-attestation":  # a trusted one, but not the latest
        registry.add_attestation("n1", {"verdict": "trusted", "build": "tvmm-2026.1",
                                        "pcr_values": {k: v.hex() for k, v in VALUES.items()}})
    assert _refusal(_begin, registry, perimeter, attestation, tk, **kwargs) == reason
    assert registry.backend.db.execute("SELECT COUNT(*) FROM admissions").fetchone()[0] == 0


def test_a_tk_that_is_not_rsa_2048_with_a_sha256_name_is_refused():
    key = ec.generate_private_key(ec.SECP256R1())
    good = tpm2.parse_public(rsa_public(TK_KEY, TK_ATTRIBUTES, b"p" * 32))
    admission.check_tk(good)
    for bad in (tpm2.parse_public(ecc_public(key, TK_ATTRIBUTES)), dataclasses.replace(good, rsa_bits=3072),
                dataclasses.replace(good, name_alg=tpm2.ALG_SHA1)):
        with pytest.raises(AdmissionRefused) as info:
            admission.check_tk(bad)
        assert info.value.reason == "tk.attributes"


def test_a_tk_whose_policy_the_tc_cannot_compute_is_refused(registry: Registry, setup):
    """An attestation missing one of the policy's PCR values: no policy can match it (not even an empty one)."""
    perimeter, node, _ = setup
    partial = registry.add_attestation("n1", {"verdict": "trusted", "build": "tvmm-2026.1",
                                              "pcr_values": {k: v.hex() for k, v in VALUES.items() if k != "11"}})
    empty = hashlib.sha256(b"").digest()
    for policy in (b"", empty, admission.policy_pcr_digest("sha256", PCRS[:-1], [VALUES[str(p)] for p in PCRS[:-1]])):
        assert _refusal(_begin, registry, perimeter, partial, _tk(node, policy=policy)) == "tk.policy"


def test_an_unenrolled_node_cannot_be_admitted(registry: Registry, setup):
    perimeter, node, attestation = setup
    public, attest, signature = _tk(node)
    assert _refusal(admission.begin, registry, perimeter, "n2", attestation, public, attest, signature, NONCE, True,
                    TC_CA) == "admit.not-trusted"


def test_an_attestation_is_fresh_for_max_quote_age_and_not_a_moment_more(registry: Registry, setup, monkeypatch):
    perimeter, node, attestation = setup
    recorded = registry.attestation(attestation)["time"]
    now = _clock(monkeypatch, recorded + perimeter.attestation.max_quote_age)
    assert len(_begin(registry, perimeter, attestation, _tk(node))) == 256
    now[0] += 0.001
    assert _refusal(_begin, registry, perimeter, attestation, _tk(node)) == "admit.not-trusted"


def _admit(registry, perimeter, tc, node, attestation, audit=lambda r: None):  # type: ignore[no-untyped-def]
    ciphertext = _begin(registry, perimeter, attestation, _tk(node))
    return admission.finish(registry, perimeter, tc, "n1", _answer(ciphertext), audit)


def _extension(cert: x509.Certificate, oid: x509.ObjectIdentifier) -> str:
    """A UTF8String extension value, decoded as DER (short and long length forms)."""
    raw = cert.extensions.get_extension_for_oid(oid).value.value
    assert raw[0] == 0x0C
    length, start = (raw[1], 2) if raw[1] < 0x80 else (int.from_bytes(raw[2:2 + (raw[1] & 0x7F)], "big"), 2 + (raw[1] & 0x7F))
    assert len(raw) == start + length
    return raw[start:].decode()


def test_the_node_certificate_says_exactly_what_the_tc_verified(registry: Registry, setup, tc):
    perimeter, node, attestation = setup
    audited = []
    before = datetime.datetime.now(datetime.UTC).replace(microsecond=0)
    result = _admit(registry, perimeter, tc, node, attestation, audited.append)
    cert = x509.load_pem_x509_certificate(result["certificate"].encode())
    cert.verify_directly_issued_by(tc.certificate)
    assert cert.issuer == tc.certificate.subject
    assert cert.subject.rfc4514_string() == "OU=site1,CN=n1"
    assert cert.public_key().public_numbers() == TK_KEY.public_key().public_numbers()
    lifetime = datetime.timedelta(seconds=perimeter.attestation.certificate_lifetime)
    assert before - datetime.timedelta(minutes=1, seconds=1) <= cert.not_valid_before_utc <= before
    assert before + lifetime <= cert.not_valid_after_utc <= before + lifetime + datetime.timedelta(seconds=5)
    constraints = cert.extensions.get_extension_for_class(x509.BasicConstraints)
    assert constraints.critical and constraints.value.ca is False
    usage = cert.extensions.get_extension_for_class(x509.KeyUsage)
    assert usage.critical and usage.value.key_encipherment
    assert not (usage.value.digital_signature or usage.value.key_cert_sign or usage.value.crl_sign
                or usage.value.data_encipherment or usage.value.content_commitment or usage.value.key_agreement)
    eku = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage)
    assert eku.critical and list(eku.value) == [admission.OID_NODE_TK]
    assert _extension(cert, admission.OID_SITE) == "site1"
    assert _extension(cert, admission.OID_BUILD) == "tvmm-2026.1"
    assert _extension(cert, admission.OID_ATTESTATION) == str(attestation)
    for oid in (admission.OID_SITE, admission.OID_BUILD, admission.OID_ATTESTATION):  # informative: others may ignore them
        assert cert.extensions.get_extension_for_oid(oid).critical is False
    assert result["serial"] == f"{cert.serial_number:x}" and result["build"] == "tvmm-2026.1"
    assert result["not_after"] == pytest.approx(cert.not_valid_after_utc.timestamp(), abs=1)
    record = registry.certificate("n1")
    assert record["serial"] == result["serial"] and record["tk_name"] == tpm2.parse_public(_tk(node)[0]).name.hex()
    assert record["attestation"] == attestation and record["pem"] == result["certificate"]
    assert registry.node("n1")["state"] == "admitted" and registry.node("n1")["build"] == "tvmm-2026.1"
    assert audited == [{"serial": result["serial"], "not_after": result["not_after"], "build": "tvmm-2026.1"}]


@pytest.mark.parametrize("length", [127, 128, 200])
def test_a_long_build_name_is_still_a_well_formed_utf8string(registry: Registry, setup, tc, length):
    """DER's short length form ends at 127 bytes; from 128 on the long form (0x81 LL)."""
    perimeter, node, _ = setup
    long_name = "tvmm-" + "x" * (length - 5)
    attestation = registry.add_attestation("n1", {"verdict": "trusted", "build": long_name,
                                                  "pcr_values": {k: v.hex() for k, v in VALUES.items()}})
    result = _admit(registry, perimeter, tc, node, attestation)
    cert = x509.load_pem_x509_certificate(result["certificate"].encode())
    assert _extension(cert, admission.OID_BUILD) == long_name
    raw = cert.extensions.get_extension_for_oid(admission.OID_BUILD).value.value
    assert raw[:2] == (b"\x0c" + bytes([length]) if length < 128 else b"\x0c\x81")


def test_admission_needs_the_tk_to_answer(registry: Registry, setup, tc):
    perimeter, node, attestation = setup
    _begin(registry, perimeter, attestation, _tk(node))
    assert _refusal(admission.finish, registry, perimeter, tc, "n1", "00" * 32) == "tk.check-failed"
    assert registry.node("n1")["state"] == "enrolled" and registry.certificate("n1") is None
    ciphertext = _begin(registry, perimeter, attestation, _tk(node))
    assert _refusal(admission.finish, registry, perimeter, tc, "n1", "not hex") == "tk.check-failed"
    # the challenge is used up by a wrong answer: the right one afterwards does not admit
    assert _refusal(admission.finish, registry, perimeter, tc, "n1", _answer(ciphertext)) == "tk.check-failed"
    assert registry.certificate("n1") is None


def test_an_answer_comes_within_the_challenges_time_or_not_at_all(registry: Registry, setup, tc, monkeypatch):
    perimeter, node, attestation = setup
    now = _clock(monkeypatch, registry.attestation(attestation)["time"])
    ciphertext = _begin(registry, perimeter, attestation, _tk(node))
    now[0] += admission.CHALLENGE_TTL
    assert admission.finish(registry, perimeter, tc, "n1", _answer(ciphertext))["build"] == "tvmm-2026.1"
    ciphertext = _begin(registry, perimeter, attestation, _tk(node))
    now[0] += admission.CHALLENGE_TTL + 0.001
    assert _refusal(admission.finish, registry, perimeter, tc, "n1", _answer(ciphertext)) == "tk.check-failed"


def test_finishing_without_a_challenge_is_refused(registry: Registry, setup, tc):
    perimeter, *_ = setup
    assert _refusal(admission.finish, registry, perimeter, tc, "n1", "00" * 32) == "tk.check-failed"


def test_a_node_quarantined_between_challenge_and_answer_is_not_admitted(registry: Registry, setup, tc):
    perimeter, node, attestation = setup
    _admit(registry, perimeter, tc, node, attestation)
    ciphertext = _begin(registry, perimeter, attestation, _tk(node))  # re-admission under way
    assert registry.quarantine("n1")
    with pytest.raises(AdmissionRefused, match="is quarantined") as info:
        admission.finish(registry, perimeter, tc, "n1", _answer(ciphertext))
    assert info.value.reason == "admit.quarantined"
    assert registry.node("n1")["state"] == "quarantined"


def test_a_node_whose_tpm_was_replaced_is_not_admitted_on_its_old_attestation(registry: Registry, setup):
    """The operator's replace-tpm drops the node's identity; its old trusted attestation is still
    there, and must not carry a TK certified by an AK the TC no longer holds."""
    perimeter, node, attestation = setup
    assert registry.replace_tpm("n1")
    assert _refusal(_begin, registry, perimeter, attestation, _tk(node)) == "admit.not-trusted"


def test_a_quarantined_node_comes_back_only_by_the_operator_or_a_reboot_where_the_perimeter_allows(
        registry: Registry, setup, tc):
    perimeter, node, attestation = setup
    _admit(registry, perimeter, tc, node, attestation)
    registry.quarantine("n1")
    values = {k: v.hex() for k, v in VALUES.items()}
    same_boot = registry.add_attestation("n1", {"verdict": "trusted", "build": "tvmm-2026.1", "reset_count": 3,
                                                "pcr_values": values})
    with pytest.raises(AdmissionRefused, match="tc nodes release n1`$"):  # the operator's way out, and only that
        _begin(registry, perimeter, same_boot, _tk(node))
    after_reboot = dataclasses.replace(perimeter, attestation=dataclasses.replace(perimeter.attestation,
                                                                                  readmit="after-reboot"))
    with pytest.raises(AdmissionRefused, match="or it reboots into an approved build$") as info:  # no reset since
        _begin(registry, after_reboot, same_boot, _tk(node))
    assert info.value.reason == "admit.quarantined"
    rebooted = registry.add_attestation("n1", {"verdict": "trusted", "build": "tvmm-2026.1", "reset_count": 4,
                                               "pcr_values": values})
    assert _refusal(_begin, registry, perimeter, rebooted, _tk(node)) == "admit.quarantined"  # operator's perimeter
    assert admission.finish(registry, after_reboot, tc, "n1",
                            _answer(_begin(registry, after_reboot, rebooted, _tk(node))))["build"] == "tvmm-2026.1"
    assert registry.node("n1")["state"] == "admitted"


def test_a_quote_without_a_reset_count_never_proves_a_reboot(registry: Registry, setup, tc):
    perimeter, node, _ = setup
    after_reboot = dataclasses.replace(perimeter, attestation=dataclasses.replace(perimeter.attestation,
                                                                                  readmit="after-reboot"))
    values = {k: v.hex() for k, v in VALUES.items()}
    first = registry.add_attestation("n1", {"verdict": "trusted", "build": "tvmm-2026.1", "reset_count": 0,
                                            "pcr_values": values})
    _admit(registry, after_reboot, tc, node, first)
    registry.quarantine("n1")  # quarantined in boot 0
    unknown = registry.add_attestation("n1", {"verdict": "trusted", "build": "tvmm-2026.1", "pcr_values": values})
    assert _refusal(_begin, registry, after_reboot, unknown, _tk(node)) == "admit.quarantined"
