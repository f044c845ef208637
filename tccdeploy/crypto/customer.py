"""A customer's signing identity: an Ed25519 key (0600) whose public half the provider registers
with the TC. Bundles and placement requests are signed with it."""

from __future__ import annotations

import base64
import hashlib
import os

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey


class CustomerKeyError(Exception):
    pass


def public_text(key: Ed25519PublicKey) -> str:
    """The registration form: 'ed25519:<base64 raw public key>'."""
    raw = key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return "ed25519:" + base64.b64encode(raw).decode()


def parse_public(text: str) -> Ed25519PublicKey:
    kind, _, data = text.strip().partition(":")
    try:
        if kind != "ed25519":
            raise ValueError("not ed25519")
        return Ed25519PublicKey.from_public_bytes(base64.b64decode(data, validate=True))
    except ValueError as exc:
        raise CustomerKeyError(f"not a customer public key (expected ed25519:BASE64): {exc}") from None


def key_id(key: Ed25519PublicKey) -> str:
    raw = key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return hashlib.sha256(raw).hexdigest()[:32]


# A customer's VM ids and request ids are made from its key id and a random salt it signs beside
# them, so no other customer can claim one first: ids chosen freely were first come, first served
# at the TC, and another customer (the provider is one) that saw a request or a bundle on its way
# could take its ids and have the owner's own request refused (found in review).
def bound_id(kind: str, key_id_hex: str, salt: str) -> str:
    """The id of kind ("vm" or "request") that the customer with key id key_id_hex makes from salt
    (32 hex digits): 32 hex digits of a tagged sha256. ValueError for a salt that is not hex."""
    if len(salt) != 32:
        raise ValueError("a salt is 32 hex digits")
    raw = bytes.fromhex(salt)
    return hashlib.sha256(b"tccdeploy-" + kind.encode() + b"-id\x00" + key_id_hex.encode() + b"\x00" + raw).hexdigest()[:32]


def new_id(kind: str, key: Ed25519PublicKey) -> tuple[str, str]:
    """A fresh (id, salt) of kind for this customer key."""
    salt = os.urandom(16).hex()
    return bound_id(kind, key_id(key), salt), salt


def is_bound(kind: str, key_id_hex: str, value: object, salt: object) -> bool:
    """Whether value is the id of kind this customer makes from salt (False for anything malformed).
    (Ids are public: a plain comparison.)"""
    if not isinstance(value, str) or not isinstance(salt, str):
        return False
    try:
        return bound_id(kind, key_id_hex, salt) == value
    except ValueError:
        return False


def init(path: str) -> tuple[Ed25519PrivateKey, bool]:
    if os.path.exists(path):
        return load(path), False
    os.makedirs(os.path.dirname(os.path.abspath(path)), mode=0o700, exist_ok=True)
    key = Ed25519PrivateKey.generate()
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as fh:
        fh.write(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                   serialization.NoEncryption()))
    return key, True


def load(path: str) -> Ed25519PrivateKey:
    try:
        mode = os.stat(path).st_mode & 0o777
    except FileNotFoundError:
        raise CustomerKeyError(f"no customer key at {path}: run `tccdeploy customer init --key {path}`") from None
    if mode & 0o077:
        raise CustomerKeyError(f"{path} is readable by others (mode {mode:o}); chmod 600 it")
    with open(path, "rb") as fh:
        key = serialization.load_pem_private_key(fh.read(), None)
    if not isinstance(key, Ed25519PrivateKey):
        raise CustomerKeyError(f"{path} is not an Ed25519 key")
    return key
