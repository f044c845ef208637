"""The exact forms the signatures and the key wrapping commit to (issue 16): a label, a domain
tag or a key's spelling that drifted would still round-trip inside tccdeploy while the TPM, a
customer's older client or another implementation disagreed; so each is pinned to its bytes."""

from __future__ import annotations

import base64
import hashlib
import json
import math
import os
import stat

import pytest
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ed25519, padding, rsa

from tccdeploy.crypto import canonical, customer, wrap

RSA = rsa.generate_private_key(public_exponent=65537, key_size=2048)


# -- wrap: RSA-OAEP-SHA256 with a label, as the TPM computes it -------------------------------
def test_labels_are_these_bytes():
    assert wrap.sealed_label("0123abcd", "ffee") == b"tccdeploy-sealed-vm:0123abcd:customer:ffee"


def test_wrapping_is_oaep_sha256_with_the_label_and_the_nul_the_tpm_adds():
    wrapped = wrap.wrap(RSA.public_key(), b"k" * 32, b"tccdeploy-vm:x")
    tpm = padding.OAEP(padding.MGF1(hashes.SHA256()), hashes.SHA256(), b"tccdeploy-vm:x\x00")  # TPM2_RSA_Decrypt's label
    assert RSA.decrypt(wrapped, tpm) == b"k" * 32
    for other in (b"tccdeploy-vm:x", b"tccdeploy-vm:y\x00"):
        with pytest.raises(ValueError):
            RSA.decrypt(wrapped, padding.OAEP(padding.MGF1(hashes.SHA256()), hashes.SHA256(), other))
    sha1 = padding.OAEP(padding.MGF1(hashes.SHA1()), hashes.SHA1(), b"tccdeploy-vm:x\x00")  # noqa: S303
    with pytest.raises(ValueError):
        RSA.decrypt(wrapped, sha1)
    made_by_the_tpm_side = RSA.public_key().encrypt(b"s" * 32, tpm)
    assert wrap.unwrap(RSA, made_by_the_tpm_side, b"tccdeploy-vm:x") == b"s" * 32
    with pytest.raises(ValueError):
        wrap.unwrap(RSA, made_by_the_tpm_side, b"tccdeploy-vm:y")


# -- canonical JSON and domain tags -------------------------------------------------------------
def test_canonical_json_is_sorted_compact_utf8():
    assert canonical.canonical({"b": 1, "a": ["é", {"d": None, "c": True}]}) == \
        '{"a":["é",{"c":true,"d":null}],"b":1}'.encode()
    with pytest.raises(ValueError):
        canonical.canonical({"x": math.nan})
    with pytest.raises(ValueError):
        canonical.canonical({"x": math.inf})


def test_each_kind_of_signed_document_has_its_own_domain_tag():
    kinds = [canonical.SEALED_IMAGE, canonical.PLACEMENT_REQUEST, canonical.CUSTOMER_QUERY, canonical.LAUNCH_RECEIPT,
             canonical.AUDIT_CHECKPOINT]
    assert kinds == ["sealed-image", "placement-request", "customer-query", "launch-receipt", "audit-checkpoint"]
    assert canonical.signed_bytes("launch-receipt", {"a": 1}) == b'tccdeploy/launch-receipt\x00{"a":1}'


def test_base64_has_one_spelling():
    assert canonical.b64decode_canonical("AAE=") == b"\x00\x01"
    with pytest.raises(ValueError, match="^not base64 in its canonical form$"):
        canonical.b64decode_canonical("AAF=")  # the padding's spare bits set: a second spelling of b"\x00\x01"
    for text in ("AAE", "AA E=", "AAE=\n", "*AE="):  # no padding, a space, a newline, not the alphabet
        with pytest.raises(ValueError, match="^not base64: "):
            canonical.b64decode_canonical(text)


# -- the customer's key ---------------------------------------------------------------------------
def test_a_customer_key_is_spelled_ed25519_base64_and_its_id_is_the_first_128_bits_of_its_sha256():
    key = ed25519.Ed25519PrivateKey.from_private_bytes(bytes(range(32)))
    raw = key.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    text = customer.public_text(key.public_key())
    assert text == "ed25519:" + base64.b64encode(raw).decode()
    assert customer.key_id(key.public_key()) == hashlib.sha256(raw).hexdigest()[:32]
    assert customer.parse_public("  " + text + "\n").public_bytes(serialization.Encoding.Raw,
                                                                  serialization.PublicFormat.Raw) == raw
    for bad in ("ed448:" + text.split(":")[1], "ed25519:" + base64.b64encode(raw[:31]).decode(), "ed25519:!!",
                text.split(":")[1]):
        with pytest.raises(customer.CustomerKeyError):
            customer.parse_public(bad)


def test_a_customer_key_file_is_made_0600_once_and_refused_when_others_can_read_it(tmp_path):
    path = tmp_path / "keys" / "acme.key"
    key, made = customer.init(str(path))
    assert made and stat.S_IMODE(os.stat(path).st_mode) == 0o600
    again, made = customer.init(str(path))
    assert not made and customer.key_id(again.public_key()) == customer.key_id(key.public_key())
    os.chmod(path, 0o640)
    with pytest.raises(customer.CustomerKeyError, match="readable by others"):
        customer.load(str(path))
    with pytest.raises(customer.CustomerKeyError, match="customer init"):
        customer.load(str(tmp_path / "none.key"))
    other = tmp_path / "rsa.key"
    other.write_bytes(RSA.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                        serialization.NoEncryption()))
    os.chmod(other, 0o600)
    with pytest.raises(customer.CustomerKeyError, match="not an Ed25519 key"):
        customer.load(str(other))
    assert json.dumps(customer.public_text(key.public_key()))  # (the registration form is plain text)


def test_the_runtime_pcr_is_extended_and_quoted_as_these_bytes():
    """Service and TC share crypto/runtime.py, so a change there would agree with itself: the bytes
    are pinned here, written out from the format (tag, canonical JSON, sha256 extend from zero)."""
    from tccdeploy.crypto import runtime

    event = {"event": "launched", "vm_id": "ab" * 16, "ticket": "cd" * 16}
    wire = b'{"event":"launched","ticket":"' + b"cd" * 16 + b'","vm_id":"' + b"ab" * 16 + b'"}'
    digest = hashlib.sha256(b"tccdeploy-runtime-event\x00" + wire).digest()
    assert runtime.event_digest(event) == digest
    assert runtime.replay([]) == bytes(32)
    first = hashlib.sha256(bytes(32) + digest).digest()
    assert runtime.replay([event]) == first
    assert runtime.replay([event, event]) == hashlib.sha256(first + digest).digest()
    assert runtime.qualifier("cd" * 16) == hashlib.sha256(b"tccdeploy-runtime-evidence\x00" + b"cd" * 16).digest()


def test_a_ticket_label_and_the_tk_pin_are_these_bytes():
    from tccdeploy.crypto import ticket

    bound = hashlib.sha256(b"launch\x00kvm\x00" + b"ab" * 16 + b"\x00" + b"ef" * 8 + b"\x00" + b"cd" * 16).digest()
    assert ticket.label("launch", "kvm", "ab" * 16, "ef" * 8, "cd" * 16) == \
        b"tccdeploy-ticket:" + base64.urlsafe_b64encode(bound).rstrip(b"=")
    assert ticket.pin_qualifier(b"n" * 32, b"der") == hashlib.sha256(
        b"tccdeploy-tk-pin\x00" + b"n" * 32 + hashlib.sha256(b"der").digest()).digest()


# -- a customer's ids, made from its key id and a salt -------------------------------------------
def test_a_customers_ids_are_a_tagged_digest_of_its_key_id_and_salt_per_kind():
    from tccdeploy.crypto import customer as cust

    # sha256("tccdeploy-vm-id" NUL key-id NUL salt-bytes), first 32 hex digits (computed by hand)
    assert cust.bound_id("vm", "0" * 32, "11" * 16) == "3783030f34ddf705f31bed2842874aba"
    assert cust.bound_id("request", "0" * 32, "11" * 16) == "e4390e46e8cc735d2cc4db6308f7b8ae"
    key = ed25519.Ed25519PrivateKey.generate().public_key()
    made, salt = cust.new_id("vm", key)
    assert len(salt) == 32 and made == cust.bound_id("vm", cust.key_id(key), salt)
    assert cust.is_bound("vm", cust.key_id(key), made, salt)
    assert not cust.is_bound("request", cust.key_id(key), made, salt)  # the kind is in it
    assert not cust.is_bound("vm", "1" * 32, made, salt)  # and the key id
    for value, bad_salt in [(made, None), (None, salt), (made, salt[:-2]), (made, salt + "00"), (made, "zz" * 16)]:
        assert not cust.is_bound("vm", cust.key_id(key), value, bad_salt), (value, bad_salt)
    with pytest.raises(ValueError):
        cust.bound_id("vm", "0" * 32, "11" * 15)
