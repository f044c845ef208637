"""What a hostile engine (a valid engine certificate, any evidence it likes) can get out of the
TC's attestation results: an EAR is made only from the TC's own record of its verdict and signed
with a key for that purpose alone, so forged evidence gives a contraindicated result, an edited
result does not verify, an old one expires with the policy's re-attestation interval, and a
token signed with another TC key is not an EAR to a relying party that checks the purpose."""

from __future__ import annotations

import base64
import json
import time

import jwt
import pytest
from cryptography.hazmat.primitives import serialization

from tccdeploy.coordinator import ear

from ..test_ear import relying_party


def test_forged_evidence_gives_a_contraindicated_ear_with_no_claim_affirmed(broker_world):
    broker_world.node("n1")
    node = broker_world.nodes["n1"]
    evidence = node.tpm.evidence(broker_world.tc.nonce("n1"))
    evidence.signature = evidence.signature[:-1] + bytes([evidence.signature[-1] ^ 1])  # not the TPM's signature
    verdict, _ = broker_world.tc.verify("n1", "site1", broker_world.tc.registry.node("n1")["address"], evidence)
    assert not verdict.trusted
    claims = relying_party(broker_world.tc.ear("n1")["token"], broker_world.tc.identity().certificate)
    appraisal = claims["submods"]["tvmm"]
    assert appraisal["ear.status"] == "contraindicated" and "quote.signature" in claims["tccdeploy.verdict"]["reasons"]
    assert {k: appraisal["ear.trustworthiness-vector"][k] for k in ear.TRUSTED} == dict.fromkeys(ear.TRUSTED, 99)


def test_an_edited_ear_does_not_verify(broker_world):
    broker_world.node("n1")
    broker_world.attest("n1", log_extra=[(4, b"a rogue module")])
    header, body, signature = broker_world.tc.ear("n1")["token"].split(".")
    claims = json.loads(base64.urlsafe_b64decode(body + "=" * (-len(body) % 4)))
    assert claims["submods"]["tvmm"]["ear.status"] == "contraindicated"
    claims["submods"]["tvmm"]["ear.status"] = "affirming"
    forged = ".".join([header, base64.urlsafe_b64encode(json.dumps(claims).encode()).rstrip(b"=").decode(), signature])
    with pytest.raises(jwt.InvalidSignatureError):
        relying_party(forged, broker_world.tc.identity().certificate)


def test_a_trusted_verdict_older_than_the_re_attestation_interval_is_no_longer_an_ear_to_rely_on(broker_world):
    broker_world.node("n1")
    record = broker_world.tc.registry.attestations("n1", limit=1)[0]
    interval = broker_world.tc.perimeter.attestation.interval
    stale = dict(record, time=time.time() - interval - 5)  # replayed after the node should have been appraised again
    key = broker_world.tc.identity().purpose("ear")
    token = ear.sign(ear.claims(stale, "p", interval), key.key, [key.certificate, broker_world.tc.identity().certificate],
                     key.key_id)
    with pytest.raises(jwt.ExpiredSignatureError):
        relying_party(token, broker_world.tc.identity().certificate)


def test_a_token_signed_with_another_tc_key_is_not_an_ear(broker_world):
    """The receipt key signs what customers verify; a relying party that checks the `ear` purpose
    of the x5c certificate refuses a result signed with it."""
    broker_world.node("n1")
    record = broker_world.tc.registry.attestations("n1", limit=1)[0]
    receipt = broker_world.tc.identity().purpose("receipt")
    token = ear.sign(ear.claims(record, "p", 60), receipt.key, [receipt.certificate, broker_world.tc.identity().certificate],
                     receipt.key_id)
    assert jwt.decode(token, receipt.certificate.public_key(), algorithms=["ES256"])  # a valid JWS...
    with pytest.raises(ValueError, match="not for ear"):
        relying_party(token, broker_world.tc.identity().certificate)  # ...but not an EAR of this TC
    assert broker_world.tc.identity().purpose("ear").certificate.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo) != receipt.certificate.public_key(
        ).public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
