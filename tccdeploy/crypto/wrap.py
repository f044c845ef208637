"""Key wrapping: RSA-OAEP-SHA256 with a label that binds what the key is for.

A VM key wrapped for one VM cannot be replayed as another VM's: the TPM (or the TC) checks the
label while decrypting.
"""

from __future__ import annotations

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import padding, rsa


def vm_label(vm_id: str) -> bytes:
    """The OAEP label binding a wrapped Kvm to its VM (the TPM adds the trailing NUL itself)."""
    return f"tccdeploy-vm:{vm_id}".encode()


def _oaep(label: bytes) -> padding.OAEP:
    return padding.OAEP(padding.MGF1(hashes.SHA256()), hashes.SHA256(), label + b"\x00")


def wrap(public: rsa.RSAPublicKey, secret: bytes, label: bytes) -> bytes:
    return public.encrypt(secret, _oaep(label))


def unwrap(private: rsa.RSAPrivateKey, ciphertext: bytes, label: bytes) -> bytes:
    return private.decrypt(ciphertext, _oaep(label))
