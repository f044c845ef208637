"""The TC's keys per purpose, as their verifiers see them: one extended key usage of tccdeploy's
arc per purpose, and the check that a signing certificate was issued by the pinned TC CA for
exactly that purpose. Shared by customers (receipts), auditors (checkpoints) and the nodes'
TVMM service (tickets), none of which may import the TC itself.
"""

from __future__ import annotations

import datetime

from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec

# tccdeploy's OID arc (ITU-T X.667 UUID form); .10.x: what a TC key may be used for.
OID_ARC = "2.25.5221148118478671275721855852512125145"
PURPOSES = {"receipt": x509.ObjectIdentifier(OID_ARC + ".10.1"), "audit": x509.ObjectIdentifier(OID_ARC + ".10.2"),
            "ticket": x509.ObjectIdentifier(OID_ARC + ".10.4"),  # .10.3 is the nodes' trusted keys
            "ear": x509.ObjectIdentifier(OID_ARC + ".10.5")}  # attestation results (coordinator/ear.py)


def purpose_certificate(data: bytes | str, ca: x509.Certificate, purpose: str) -> x509.Certificate:
    """The certificate (PEM, or DER bytes) of a TC purpose key, if the pinned CA issued it for
    exactly that purpose and it is valid now; ValueError otherwise."""
    raw = data.encode() if isinstance(data, str) else data
    try:
        cert = (x509.load_pem_x509_certificate(raw) if raw.lstrip().startswith(b"-----BEGIN")
                else x509.load_der_x509_certificate(raw))
    except Exception:  # noqa: BLE001 - cryptography raises more than ValueError for damaged DER (InvalidVersion)
        raise ValueError("the signing certificate does not parse") from None
    ca_key = ca.public_key()
    if cert.issuer != ca.subject or not isinstance(ca_key, ec.EllipticCurvePublicKey):
        raise ValueError("the signing certificate is not issued by this TC")
    try:
        ca_key.verify(cert.signature, cert.tbs_certificate_bytes, ec.ECDSA(cert.signature_hash_algorithm))  # type: ignore[arg-type]
        usages = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    except Exception:  # noqa: BLE001 - any failure: not this TC's purpose certificate
        raise ValueError("the signing certificate is not issued by this TC") from None
    if list(usages) != [PURPOSES[purpose]]:
        raise ValueError(f"the signing certificate is not for {purpose} signatures")
    now = datetime.datetime.now(datetime.UTC)
    if not cert.not_valid_before_utc <= now <= cert.not_valid_after_utc:
        raise ValueError("the signing certificate is outside its validity dates")
    return cert
