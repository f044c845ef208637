"""A TPM manufacturer in software, for fast tests of enrollment: CAs, EK certificates made with
`cryptography`, an EK's key, and TPM2_ActivateCredential written from the specification (apart
from tccdeploy's MakeCredential, so a mistake in one is not mirrored in the other)."""

from __future__ import annotations

import dataclasses
import datetime
import functools
import hmac
import struct
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms
from cryptography.x509.oid import NameOID

from tccdeploy.coordinator import tpm2
from tccdeploy.manifest.loader import load_manifests
from tccdeploy.manifest.models import ManufacturerCA, Perimeter

from .conftest import REPO

try:  # CFB lives in "decrepit" from cryptography 47 on
    from cryptography.hazmat.decrepit.ciphers.modes import CFB
except ImportError:  # pragma: no cover - older cryptography
    from cryptography.hazmat.primitives.ciphers.modes import CFB  # type: ignore[attr-defined,no-redef]

NOW = datetime.datetime.now(datetime.UTC)
DAY = datetime.timedelta(days=1)


@functools.cache
def key() -> rsa.RSAPrivateKey:
    """An EK's key, made once: RSA generation is what would make these tests slow."""
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


def name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def ca(cn: str, signer: tuple | None = None, is_ca: bool = True, cert_sign: bool = True,
       not_after: datetime.datetime = NOW + 3650 * DAY, not_before: datetime.datetime = NOW - DAY,
       key: Any = None):  # type: ignore[no-untyped-def]
    """A CA certificate and its key (ECDSA P-256 unless key is given: real EK CAs are often RSA)."""
    own = key or ec.generate_private_key(ec.SECP256R1())
    issuer_name, issuer_key = (signer[0].subject, signer[1]) if signer else (name(cn), own)
    cert = (x509.CertificateBuilder().subject_name(name(cn)).issuer_name(issuer_name).public_key(own.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(not_before).not_valid_after(not_after)
            .add_extension(x509.BasicConstraints(ca=is_ca, path_length=None), critical=True)
            .add_extension(x509.KeyUsage(False, False, False, False, False, cert_sign, True, False, False), critical=True)
            .sign(issuer_key, hashes.SHA256()))
    return cert, own


def ek_cert(signer, ek: Any, *, is_ca: bool = False, encipher: bool = True, eku: list | None = None,
            not_after: datetime.datetime = NOW + 3650 * DAY, not_before: datetime.datetime = NOW - DAY,
            issuer: x509.Name | None = None) -> bytes:  # type: ignore[no-untyped-def]
    builder = (x509.CertificateBuilder().subject_name(x509.Name([])).issuer_name(issuer or signer[0].subject)
               .public_key(ek.public_key()).serial_number(x509.random_serial_number())
               .not_valid_before(not_before).not_valid_after(not_after)
               .add_extension(x509.SubjectAlternativeName([x509.DirectoryName(name("tpm"))]), critical=True)
               .add_extension(x509.BasicConstraints(ca=is_ca, path_length=None), critical=True)
               .add_extension(x509.KeyUsage(False, False, encipher, False, not encipher, False, False, False, False),
                              critical=True))
    if eku is not None:
        builder = builder.add_extension(x509.ExtendedKeyUsage(eku), critical=False)
    return builder.sign(signer[1], hashes.SHA256()).public_bytes(serialization.Encoding.DER)


def pem(*certs: x509.Certificate) -> bytes:
    return b"".join(c.public_bytes(serialization.Encoding.PEM) for c in certs)



def vendor_perimeter(folder: Path) -> tuple[Perimeter, tuple, tuple]:  # type: ignore[type-arg]
    """The example perimeter with one manufacturer: a root and an intermediate under it, in folder."""
    root = ca("Vendor EK Root")
    intermediate = ca("Vendor EK Intermediate", root)
    (folder / "root.pem").write_bytes(pem(root[0]))
    (folder / "intermediates.pem").write_bytes(pem(intermediate[0]))
    perimeter = load_manifests([str(REPO / "examples")]).perimeter
    assert perimeter is not None
    perimeter = dataclasses.replace(perimeter, manufacturer_cas=(
        ManufacturerCA("vendor", str(folder / "root.pem"), intermediates=str(folder / "intermediates.pem")),))
    return perimeter, root, intermediate


def ek_public(key: rsa.RSAPrivateKey, name_alg: int = tpm2.ALG_SHA256, sym: tuple[int, int, int] | None = None) -> bytes:
    """TPM2B_PUBLIC of an RSA 2048 storage key shaped as the TCG's default EK template."""
    alg, bits, mode = sym or (tpm2.ALG_AES, 128, tpm2.ALG_CFB)
    n = key.public_key().public_numbers().n.to_bytes(256, "big")
    area = struct.pack(">HHI", tpm2.ALG_RSA, name_alg, 0x000300B2) + struct.pack(">H", 32) + bytes(32)
    area += struct.pack(">HHHHHI", alg, bits, mode, tpm2.ALG_NULL, 2048, 0) + struct.pack(">H", 256) + n
    return struct.pack(">H", len(area)) + area


class ActivationFailed(Exception):
    pass


def kdfa_sha256(key: bytes, label: bytes, u: bytes, v: bytes, bits: int) -> bytes:
    """SP 800-108 counter-mode KDF with HMAC-SHA256, as TPM 2.0 Part 1, 11.4.10.2 writes it."""
    out = b""
    for i in range(1, 1 + (bits + 255) // 256):
        out += hmac.new(key, i.to_bytes(4, "big") + label + b"\0" + u + v + bits.to_bytes(4, "big"), "sha256").digest()
    return out[: bits // 8]


def activate(key: rsa.RSAPrivateKey, blob: bytes, encrypted_seed: bytes, ak_name: bytes) -> bytes:
    """TPM2_ActivateCredential for an EK with nameAlg SHA-256 and AES-128-CFB, in software."""
    try:
        seed = key.decrypt(encrypted_seed, padding.OAEP(padding.MGF1(hashes.SHA256()), hashes.SHA256(), b"IDENTITY\0"))
    except ValueError:
        raise ActivationFailed("the seed does not open under this EK with the label IDENTITY") from None
    size = int.from_bytes(blob[:2], "big")
    integrity, enc_identity = blob[2:2 + size], blob[2 + size:]
    expected = hmac.new(kdfa_sha256(seed, b"INTEGRITY", b"", b"", 256), enc_identity + ak_name, "sha256").digest()
    if not hmac.compare_digest(integrity, expected):
        raise ActivationFailed("the integrity HMAC does not hold for this object's name")
    decryptor = Cipher(algorithms.AES(kdfa_sha256(seed, b"STORAGE", ak_name, b"", 128)), CFB(bytes(16))).decryptor()
    plain = decryptor.update(enc_identity) + decryptor.finalize()
    if int.from_bytes(plain[:2], "big") != len(plain) - 2:
        raise ActivationFailed("the credential's size field is wrong")
    return plain[2:]
