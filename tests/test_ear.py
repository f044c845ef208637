"""The TC's verdicts as EAT Attestation Results (coordinator/ear.py): the claims of each stored
verdict, the AR4SI claim each reason code lowers, and a token a relying party verifies with a
JOSE library tccdeploy does not use itself (PyJWT), after checking the certificate in x5c chains
to the TC CA it pins, for exactly the `ear` purpose."""

from __future__ import annotations

import base64
import json

import jwt
import pytest
from cryptography import x509

from tccdeploy import __version__
from tccdeploy.coordinator import ear
from tccdeploy.coordinator.keybroker import Refused
from tccdeploy.crypto.purpose import purpose_certificate
from tccdeploy.reasons import REASONS

VERDICT_PREFIXES = ("quote", "eventlog", "evidence", "node", "perimeter", "nonce", "runtime", "build", "platform", "clock")
NOT_VERDICTS = {"node.leased"}  # under a verdict's prefix, but a refusal of an engine's action (issue 20's leases)


def relying_party(token: str, ca: x509.Certificate) -> dict:
    """What a security team's system does with an EAR: the x5c leaf must be the TC CA's `ear`
    certificate, then PyJWT checks the ES256 signature, iat and exp, and the profile."""
    header = jwt.get_unverified_header(token)
    leaf = purpose_certificate(base64.b64decode(header["x5c"][0]), ca, "ear")
    claims = jwt.decode(token, leaf.public_key(), algorithms=["ES256"], options={"require": ["iat", "exp"]})
    assert claims["eat_profile"] == "tag:github.com,2023:veraison/ear"
    return claims


def _record(verdict: str = "trusted", reasons: tuple[str, ...] = (), warnings: tuple[str, ...] = ()) -> dict:
    return {"id": 7, "node": "n1", "time": 1_800_000_000.5, "nonce": base64.b64encode(bytes(range(32))).decode(),
            "verdict": verdict, "reasons": [{"code": c, "message": "m"} for c in reasons],
            "warnings": [{"code": c, "message": "m"} for c in warnings], "build": "b", "platform": "p", "pcr_digest": "d"}


def test_a_trusted_verdict_is_an_affirming_ear_the_relying_party_verifies(broker_world):
    broker_world.node("n1")
    result = broker_world.tc.ear("n1")
    assert result["media_type"] == 'application/eat-jwt; eat_profile="tag:github.com,2023:veraison/ear"'
    claims = relying_party(result["token"], broker_world.tc.identity().certificate)
    appraisal = claims["submods"]["tvmm"]
    assert appraisal["ear.status"] == "affirming" and claims["sub"] == "n1"
    assert appraisal["ear.trustworthiness-vector"] == {
        "instance-identity": 2, "configuration": 2, "executables": 2, "file-system": 0, "hardware": 2,
        "runtime-opaque": 0, "storage-opaque": 0, "sourced-data": 0}
    assert appraisal["ear.appraisal-policy-id"] == f"tccdeploy:perimeter/{broker_world.tc.perimeter.name}"
    assert claims["ear.verifier-id"]["developer"] == "tccdeploy"
    latest = broker_world.tc.registry.attestations("n1", limit=1)[0]
    assert claims["tccdeploy.verdict"]["attestation"] == latest["id"] == result["attestation"]
    assert claims["iat"] == int(latest["time"]) and claims["exp"] == claims["iat"] + broker_world.tc.perimeter.attestation.interval
    assert base64.urlsafe_b64decode(claims["eat_nonce"] + "=") == base64.b64decode(latest["nonce"])
    assert jwt.get_unverified_header(result["token"])["kid"] == broker_world.tc.identity().purpose("ear").key_id


def test_a_tampered_boot_is_a_contraindicated_ear_naming_the_executables(broker_world):
    broker_world.node("n1")
    first = broker_world.tc.registry.attestations("n1", limit=1)[0]["id"]
    verdict, _ = broker_world.attest("n1", log_extra=[(4, b"a rogue module")])
    assert not verdict.trusted
    claims = relying_party(broker_world.tc.ear("n1")["token"], broker_world.tc.identity().certificate)
    appraisal = claims["submods"]["tvmm"]
    assert appraisal["ear.status"] == "contraindicated"
    assert appraisal["ear.trustworthiness-vector"]["executables"] == 33  # an unrecognized boot
    assert "build.unknown" in claims["tccdeploy.verdict"]["reasons"]
    older = relying_party(broker_world.tc.ear("n1", first)["token"], broker_world.tc.identity().certificate)
    assert older["submods"]["tvmm"]["ear.status"] == "affirming"  # the earlier verdict, as it was


def test_no_ear_for_a_node_or_verdict_the_tc_does_not_hold(broker_world):
    broker_world.node("n1")
    broker_world.node("n2")
    with pytest.raises(Refused) as unknown:
        broker_world.tc.ear("nobody")
    assert unknown.value.reason == "node.unknown"
    other = broker_world.tc.registry.attestations("n2", limit=1)[0]["id"]
    with pytest.raises(Refused) as foreign:
        broker_world.tc.ear("n1", other)  # n2's verdict is not n1's
    assert foreign.value.reason == "ear.no-verdict"
    with pytest.raises(Refused) as missing:
        broker_world.tc.ear("n1", 10**9)
    assert missing.value.reason == "ear.no-verdict"


@pytest.mark.parametrize("code", sorted(ear.CLAIMS))
def test_each_reason_code_lowers_its_ar4si_claim(code):
    claim, value = ear.CLAIMS[code]
    trust = ear.vector(_record("untrusted", reasons=(code,)))
    assert trust[claim] == value
    assert all(trust[k] == v for k, v in ear.TRUSTED.items() if k != claim)
    assert ear.status(_record("untrusted", reasons=(code,)), trust) == "contraindicated"


@pytest.mark.parametrize("code", sorted(ear.EVIDENCE_FAILED))
def test_evidence_that_failed_affirms_no_claim(code):
    trust = ear.vector(_record("untrusted", reasons=(code,)))
    assert {k: trust[k] for k in ear.TRUSTED} == dict.fromkeys(ear.TRUSTED, 99)
    assert all(trust[k] == 0 for k in ear.VECTOR_KEYS if k not in ear.TRUSTED)


def test_warnings_of_a_trusted_verdict_are_a_warning_status_and_informational_ones_are_not():
    deprecated = _record(warnings=("build.deprecated", "platform.deprecated"))
    trust = ear.vector(deprecated)
    assert (trust["executables"], trust["configuration"]) == (32, 32)
    assert ear.status(deprecated, trust) == "warning"
    candidate = _record(warnings=("build.candidate", "platform.candidate", "node.rebooted"))
    assert ear.vector(candidate) == ear.vector(_record()) and ear.status(candidate, ear.vector(candidate)) == "affirming"


def test_an_untrusted_verdict_is_contraindicated_whatever_its_codes():
    record = _record("untrusted", reasons=("some.future-code",))
    assert ear.status(record, ear.vector(record)) == "contraindicated"


def test_the_worst_value_wins_within_a_claim():
    for order in (("perimeter.address", "node.not-enrolled"), ("node.not-enrolled", "perimeter.address")):
        assert ear.vector(_record("untrusted", reasons=order))["instance-identity"] == 97
    for order in (("build.deprecated", "build.revoked"), ("build.revoked", "build.deprecated")):
        assert ear.vector(_record("untrusted", reasons=order))["executables"] == 96
    trust = ear.vector(_record("untrusted", reasons=("build.unknown", "build.revoked")))
    assert trust["executables"] == 96
    assert ear.vector(_record(warnings=("build.deprecated",)))["executables"] == 32


@pytest.mark.parametrize(("value", "tier"), [(-1, 0), (0, 0), (1, 0), (2, 2), (31, 2), (-2, 2), (-32, 2), (32, 32), (95, 32),
                                             (-33, 32), (-96, 32), (96, 96), (127, 96), (-97, 96), (-128, 96)])
def test_ar4si_tiers(value, tier):
    assert ear.tier(value) == tier


def test_every_code_a_verdict_can_carry_has_its_place_in_the_table():
    placed = set(ear.CLAIMS) | ear.EVIDENCE_FAILED | ear.INFORMATIONAL
    assert not placed - set(REASONS)  # no code the catalogue does not know
    assert [c for c in REASONS if c.startswith(tuple(p + "." for p in VERDICT_PREFIXES)) and c not in placed | NOT_VERDICTS] == []


def test_the_token_is_compact_es256_with_the_purpose_chain(broker_world):
    broker_world.node("n1")
    token = broker_world.tc.ear("n1")["token"]
    header = json.loads(base64.urlsafe_b64decode(token.split(".")[0] + "=="))
    assert header["alg"] == "ES256" and header["typ"] == "JWT" and len(header["x5c"]) == 2
    assert len(base64.urlsafe_b64decode(token.split(".")[2] + "==")) == 64  # JOSE's r || s, not DER
    ca = x509.load_der_x509_certificate(base64.b64decode(header["x5c"][1]))
    assert ca == broker_world.tc.identity().certificate


def test_status_names():
    assert [ear.status_name(t) for t in (0, 2, 32, 96)] == ["none", "affirming", "warning", "contraindicated"]


def test_the_claims_carry_the_verdict_as_the_tc_recorded_it():
    record = _record("untrusted", reasons=("build.unknown",), warnings=("node.rebooted",))
    claims = ear.claims(record, "lab", 60)
    assert claims["tccdeploy.verdict"] == {"attestation": 7, "verdict": "untrusted", "reasons": ["build.unknown"],
                                           "warnings": ["node.rebooted"], "build": "b", "platform": "p", "pcr_digest": "d"}
    assert claims["ear.verifier-id"] == {"developer": "tccdeploy", "build": f"tccdeploy {__version__} trusted coordinator"}
    assert (claims["iat"], claims["exp"], claims["sub"]) == (1_800_000_000, 1_800_000_060, "n1")
    assert claims["eat_nonce"] == base64.urlsafe_b64encode(bytes(range(32))).rstrip(b"=").decode()
    assert "eat_nonce" not in ear.claims(dict(record, nonce=None), "lab", 60)


def test_the_token_is_unpadded_compact_json_in_a_canonical_order(broker_world):
    broker_world.node("n1")
    token = broker_world.tc.ear("n1")["token"]
    assert "=" not in token and token.count(".") == 2
    for part in token.split(".")[:2]:
        raw = base64.urlsafe_b64decode(part + "=" * (-len(part) % 4))
        assert raw == json.dumps(json.loads(raw), separators=(",", ":"), sort_keys=True).encode()


@pytest.mark.parametrize("data", [b"", b"\x00", b"\xff\xfe", b"\x17\x17\x17", bytes(range(64))])  # FxcX: a last character of X
def test_base64url_without_padding_keeps_every_character(data):
    encoded = ear._b64url(data)
    assert "=" not in encoded and base64.urlsafe_b64decode(encoded + "=" * (-len(encoded) % 4)) == data
