"""Key wrapping: RSA-OAEP-SHA256 with a label that binds what the key is for.

A key wrapped for one use cannot be replayed as another's: the TPM (or the TC) checks the label
while decrypting. Sealed to the TC, the label names the VM and its customer (`sealed_label`);
re-wrapped to a node's TK, it names the ticket that carries it (`crypto.ticket.label`).
"""

from __future__ import annotations

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import padding, rsa


def sealed_label(vm_id: str, customer_key_id: str) -> bytes:
    """The OAEP label of a Kvm sealed to the TC: the VM *and* the customer whose key signed the
    descriptor, so a wrapped key copied into another customer's descriptor does not open."""
    return f"tccdeploy-sealed-vm:{vm_id}:customer:{customer_key_id}".encode()


def _oaep(label: bytes) -> padding.OAEP:
    # (the TPM adds a trailing NUL to the label it is given; so does this, for both sides to agree)
    return padding.OAEP(padding.MGF1(hashes.SHA256()), hashes.SHA256(), label + b"\x00")


def wrap(public: rsa.RSAPublicKey, secret: bytes, label: bytes) -> bytes:
    return public.encrypt(secret, _oaep(label))


def unwrap(private: rsa.RSAPrivateKey, ciphertext: bytes, label: bytes) -> bytes:
    return private.decrypt(ciphertext, _oaep(label))
