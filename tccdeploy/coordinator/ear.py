"""The TC's verdicts as EAT Attestation Results (EAR), for the systems a security team already runs.

An EAR (draft-fv-rats-ear-05, the claim names Veraison's `ear` library and `arc` use) is a JWT:
which verifier appraised what, when, and the result as an AR4SI trustworthiness vector
(draft-ietf-rats-ar4si-06) with a status that is the worst tier in it. The TC signs it with its
own `ear` purpose key (ES256, P-256), whose certificate, issued by the TC CA for that purpose
only, travels in the JOSE header (`x5c`), so a relying party that pins the TC CA checks the chain
and then verifies the token with any JOSE library.

An EAR is made from the TC's stored record of one verdict, never from anything a caller sends:
the same record always gives the same claims. Which AR4SI claim each reason code lowers, and to
what, is `CLAIMS` below: one table, documented in the README.

The vector claims only what the TC checks: `instance-identity` (an enrolled AK, on the operator's
roster, inside the perimeter), `hardware` (a TPM whose EK chains to a trusted manufacturer, at
enrollment; the quote is that TPM's signature), `executables` (the measured boot chain and the
runtime PCR replayed against an approved TVMM build) and `configuration` (the platform's firmware
and settings against an approved platform). The others stay 0 (no claim). A verdict that is
untrusted is contraindicated, whatever the vector says: TCCP fails closed.
"""

from __future__ import annotations

import base64
import json
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature

from .. import __version__

PROFILE = "tag:github.com,2023:veraison/ear"
MEDIA_TYPE = f'application/eat-jwt; eat_profile="{PROFILE}"'
SUBMOD = "tvmm"  # the appraised component: the node's measured TVMM boot and its runtime
EXTENSION = "tccdeploy.verdict"

# AR4SI tiers: 0 none, 2-31 affirming, 32-95 warning, 96-127 contraindicated.
NONE, AFFIRMING, WARNING, CONTRAINDICATED = 0, 2, 32, 96
CRYPTO_FAILED = 99  # every claim: "cryptographic validation of the Evidence has failed"
VECTOR_KEYS = ("instance-identity", "configuration", "executables", "file-system", "hardware", "runtime-opaque",
               "storage-opaque", "sourced-data")
TRUSTED = {"instance-identity": 2, "hardware": 2, "executables": 2, "configuration": 2}  # what a trusted verdict affirms

# The evidence itself failed (signature, freshness, integrity): no claim of it can be affirmed.
EVIDENCE_FAILED = frozenset({
    "evidence.malformed", "quote.signature", "quote.magic", "quote.type", "quote.nonce", "quote.pcr-selection",
    "quote.pcr-digest", "quote.counters-backwards", "nonce.unknown", "nonce.replayed", "nonce.expired",
    "nonce.other-node", "clock.backwards", "eventlog.malformed", "eventlog.bank-missing", "eventlog.replay",
    "runtime.missing", "runtime.malformed", "runtime.signature", "runtime.nonce", "runtime.pcr", "runtime.log", "runtime.tk",
})
# One claim lowered to one value (AR4SI's codepoints for that claim).
CLAIMS: dict[str, tuple[str, int]] = {
    "node.not-enrolled": ("instance-identity", 97),  # not recognized
    "node.unknown": ("instance-identity", 97),
    "node.ssh-host-key": ("instance-identity", 96),  # recognized, but answering from another host
    "perimeter.not-in-roster": ("instance-identity", 97),
    "perimeter.roster-site": ("instance-identity", 96),
    "perimeter.roster-name": ("instance-identity", 96),
    "perimeter.roster-conflict": ("instance-identity", 96),
    "perimeter.no-site": ("instance-identity", 96),
    "perimeter.unknown-site": ("instance-identity", 96),
    "perimeter.address": ("instance-identity", 96),
    "perimeter.asset-tag": ("instance-identity", 96),
    "perimeter.asset-tag-index": ("instance-identity", 96),
    "perimeter.asset-tag-nonce": ("instance-identity", 96),
    "build.unknown": ("executables", 33),  # unrecognized boot or runtime items
    "build.revoked": ("executables", 96),  # contraindicated
    "build.not-in-rollout": ("executables", 96),
    "build.deprecated": ("executables", 32),  # recognized, with known problems
    "platform.unknown": ("configuration", 96),  # a configuration the TC cannot support
    "platform.revoked": ("configuration", 96),
    "platform.not-in-rollout": ("configuration", 96),
    "platform.deprecated": ("configuration", 32),  # known vulnerabilities
}
INFORMATIONAL = frozenset({"node.rebooted", "build.candidate", "platform.candidate"})  # trusted as they are


def tier(value: int) -> int:
    """The AR4SI tier of a claim's value (non-standard negative values by their own ranges)."""
    if value in (-1, 0, 1):
        return NONE
    if 2 <= value <= 31 or -32 <= value <= -2:
        return AFFIRMING
    if 32 <= value <= 95 or -96 <= value <= -33:
        return WARNING
    return CONTRAINDICATED


def status_name(value: int) -> str:
    return {NONE: "none", AFFIRMING: "affirming", WARNING: "warning", CONTRAINDICATED: "contraindicated"}[value]


def vector(record: dict[str, Any]) -> dict[str, int]:
    """The trustworthiness vector of a stored verdict (all eight claims, 0 where none is made).

    A failure code this table does not know lowers nothing by itself; status() then still says
    contraindicated, because the verdict is untrusted."""
    codes = [r["code"] for r in record.get("reasons", [])] + [w["code"] for w in record.get("warnings", [])]
    out = dict.fromkeys(VECTOR_KEYS, NONE) | TRUSTED
    if any(code in EVIDENCE_FAILED for code in codes):
        return out | dict.fromkeys(TRUSTED, CRYPTO_FAILED)
    for code in codes:
        if code in CLAIMS:
            claim, value = CLAIMS[code]
            if tier(value) > tier(out[claim]) or (tier(value) == tier(out[claim]) and value > out[claim]):
                out[claim] = value
    return out


def status(record: dict[str, Any], trust: dict[str, int]) -> str:
    """The worst tier in the vector; contraindicated for any untrusted verdict."""
    worst = max((tier(v) for v in trust.values()), default=NONE)
    if record.get("verdict") != "trusted":
        worst = CONTRAINDICATED
    return status_name(worst)


def claims(record: dict[str, Any], perimeter: str, interval: int) -> dict[str, Any]:
    """The EAR claim set of one stored verdict. iat is when the TC appraised the evidence; exp is
    when the policy wants the node appraised again (a relying party must not use it longer)."""
    trust = vector(record)
    issued = int(record["time"])
    out: dict[str, Any] = {
        "eat_profile": PROFILE,
        "iat": issued,
        "exp": issued + interval,
        "sub": record["node"],
        "ear.verifier-id": {"developer": "tccdeploy", "build": f"tccdeploy {__version__} trusted coordinator"},
        "submods": {SUBMOD: {
            "ear.status": status(record, trust),
            "ear.trustworthiness-vector": trust,
            "ear.appraisal-policy-id": f"tccdeploy:perimeter/{perimeter}",
        }},
        EXTENSION: {
            "attestation": record["id"], "verdict": record["verdict"],
            "reasons": [r["code"] for r in record.get("reasons", [])],
            "warnings": [w["code"] for w in record.get("warnings", [])],
            "build": record.get("build"), "platform": record.get("platform"), "pcr_digest": record.get("pcr_digest"),
        },
    }
    if record.get("nonce"):
        out["eat_nonce"] = _b64url(base64.b64decode(record["nonce"]))
    return out


def sign(claims_set: dict[str, Any], key: ec.EllipticCurvePrivateKey, chain: list[x509.Certificate], key_id: str) -> str:
    """A compact JWS (ES256): header with typ, kid and x5c (the purpose certificate, then the CA)."""
    header = {"alg": "ES256", "typ": "JWT", "kid": key_id,
              "x5c": [base64.b64encode(c.public_bytes(serialization.Encoding.DER)).decode() for c in chain]}
    signing_input = _b64url(_json(header)) + "." + _b64url(_json(claims_set))
    r, s = decode_dss_signature(key.sign(signing_input.encode(), ec.ECDSA(hashes.SHA256())))
    return signing_input + "." + _b64url(r.to_bytes(32, "big") + s.to_bytes(32, "big"))


def _json(value: dict[str, Any]) -> bytes:
    return json.dumps(value, separators=(",", ":"), sort_keys=True).encode()


def _b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()
