"""MakeCredential, the TC's proof that an AK lives in the TPM that owns an EK, against references.

The TC encrypts a secret to the EK, bound to the AK's name (TPM 2.0 Part 1, 24: the seed under
RSA-OAEP with the label "IDENTITY", the secret under AES-CFB with a key derived from the seed and
the AK name, an HMAC over both). A mistake here (another label, the name left out of the HMAC)
would still give blobs of the right length; only activating them shows it. So the blob is
activated here in software, by code written from the specification apart from tccdeploy's
(its own KDFa), and that code is first proven on tpm2-tools' own `tpm2_makecredential`
output. A real swtpm activates the TC's blobs in the slow enrollment tests.
"""

from __future__ import annotations

import hashlib
import shutil
import struct
import subprocess
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric import rsa

from tccdeploy.coordinator import tpm2

from .ekkit import ActivationFailed, activate, ek_public, kdfa_sha256

EK_KEY = rsa.generate_private_key(65537, 2048)
AK_NAME = b"\x00\x0b" + hashlib.sha256(b"an AK's public area").digest()
SECRET = bytes(range(32))


def tpm2_tools_credential(tmp_path: Path, ek: bytes, secret: bytes, name: bytes) -> tuple[bytes, bytes]:
    """(credentialBlob, encrypted seed) made by tpm2-tools without a TPM (`--tcti none`)."""
    (tmp_path / "ek.pub").write_bytes(ek)
    (tmp_path / "secret").write_bytes(secret)
    subprocess.run(["tpm2_makecredential", "--tcti", "none", "-u", str(tmp_path / "ek.pub"), "-s", str(tmp_path / "secret"),
                    "-n", name.hex(), "-o", str(tmp_path / "cred")], check=True, capture_output=True)
    raw = (tmp_path / "cred").read_bytes()
    # tpm2-tools' file: magic 0xBADCC0DE, version 1, TPM2B_ID_OBJECT, TPM2B_ENCRYPTED_SECRET
    magic, version = struct.unpack(">II", raw[:8])
    assert (magic, version) == (0xBADCC0DE, 1)
    size = int.from_bytes(raw[8:10], "big")
    blob, rest = raw[10:10 + size], raw[10 + size:]
    return blob, rest[2:2 + int.from_bytes(rest[:2], "big")]


@pytest.mark.skipif(shutil.which("tpm2_makecredential") is None, reason="tpm2-tools is not installed (scripts/install)")
def test_the_software_activation_opens_what_tpm2_tools_makes(tmp_path):
    blob, seed = tpm2_tools_credential(tmp_path, ek_public(EK_KEY), SECRET, AK_NAME)
    assert activate(EK_KEY, blob, seed, AK_NAME) == SECRET
    with pytest.raises(ActivationFailed, match="HMAC"):
        activate(EK_KEY, blob, seed, AK_NAME[:-1] + b"\x01")


def test_kdfa_is_the_specifications_counter_mode_kdf():
    for bits in (128, 256, 384, 520):
        assert tpm2.kdfa(tpm2.ALG_SHA256, b"k" * 32, b"STORAGE", b"u", b"v", bits) == kdfa_sha256(b"k" * 32, b"STORAGE", b"u", b"v", bits)


def test_only_the_ek_owner_with_that_ak_name_recovers_the_secret():
    ek = tpm2.parse_public(ek_public(EK_KEY))
    blob, seed = tpm2.make_credential(ek, SECRET, AK_NAME)
    assert activate(EK_KEY, blob, seed, AK_NAME) == SECRET
    with pytest.raises(ActivationFailed, match="HMAC"):  # the name is bound: another AK cannot activate it
        activate(EK_KEY, blob, seed, b"\x00\x0b" + hashlib.sha256(b"another AK").digest())
    with pytest.raises(ActivationFailed, match="IDENTITY"):  # another EK cannot open the seed
        activate(rsa.generate_private_key(65537, 2048), blob, seed, AK_NAME)
    again, other_seed = tpm2.make_credential(ek, SECRET, AK_NAME)
    assert other_seed != seed and again != blob  # a fresh seed each time


def test_an_ek_other_than_rsa_with_aes_cfb_is_refused_by_name():
    from cryptography.hazmat.primitives.asymmetric import ec

    from .attestkit import ecc_public

    with pytest.raises(tpm2.TPMFormatError, match="only RSA"):
        tpm2.make_credential(tpm2.parse_public(ecc_public(ec.generate_private_key(ec.SECP256R1()))), SECRET, AK_NAME)
    for sym in ((0x0013, 128, tpm2.ALG_CFB), (tpm2.ALG_AES, 128, 0x0040)):  # SM4-CFB, AES-CTR
        ek = tpm2.parse_public(ek_public(EK_KEY, sym=sym))
        with pytest.raises(tpm2.TPMFormatError, match="not AES-CFB"):
            tpm2.make_credential(ek, SECRET, AK_NAME)
