"""The TPM 2.0 structures the TC parses from a node's evidence (coordinator/tpm2.py): each size
bound exactly at its limit and one past it, each kind of public area and signature, and which
signatures count. The evidence comes from an untrusted node, so a bound that is off by one is a
bug; these are the tests that say so."""

from __future__ import annotations

import hashlib
import struct

import pytest
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature

from tccdeploy.coordinator import tpm2
from tccdeploy.coordinator.tpm2 import TPMFormatError

from .attestkit import ecc_public, quote_attest, rsa_public, sign

RSA_KEY = rsa.generate_private_key(65537, 2048)
EC_KEY = ec.generate_private_key(ec.SECP256R1())


def b(data: bytes) -> bytes:
    return struct.pack(">H", len(data)) + data


def refused(call, *args) -> str:  # type: ignore[no-untyped-def]
    with pytest.raises(TPMFormatError) as info:
        call(*args)
    return str(info.value)


def test_a_sized_buffer_is_written_with_an_unsigned_16_bit_size():
    assert tpm2.tpm2b(b"x" * 40000)[:2] == b"\x9c\x40" and tpm2.tpm2b(b"")[:2] == b"\x00\x00"


# -- NV public areas ----------------------------------------------------------------------------
def nv_area(policy: bytes = b"", index: int = 0x01500001, size: int = 12) -> bytes:
    return struct.pack(">IHI", index, tpm2.ALG_SHA256, tpm2.NV_WRITTEN) + b(policy) + struct.pack(">H", size)


def test_an_nv_public_area_reads_back_and_its_bounds_are_exact():
    nv = tpm2.parse_nv_public(b(nv_area(b"p" * 64)))
    assert (nv.index, nv.name_alg, nv.attributes, nv.auth_policy, nv.data_size) == \
        (0x01500001, tpm2.ALG_SHA256, tpm2.NV_WRITTEN, b"p" * 64, 12)
    assert nv.name == b"\x00\x0b" + hashlib.sha256(nv_area(b"p" * 64)).digest()
    assert refused(tpm2.parse_nv_public, b(nv_area(b"p" * 65))) == "a 65-byte field where at most 64 fit"
    assert refused(tpm2.parse_nv_public, b(nv_area(b"p" * 498))) == "a 498-byte field where at most 64 fit"  # 512 in all
    assert refused(tpm2.parse_nv_public, b(nv_area(b"p" * 499))) == "a 513-byte field where at most 512 fit"
    assert refused(tpm2.parse_nv_public, b(nv_area()) + b"\0") == "1 unexpected trailing bytes"
    assert refused(tpm2.parse_nv_public, b(nv_area() + b"\0")) == "1 unexpected trailing bytes"
    assert "truncated" in refused(tpm2.parse_nv_public, b(nv_area())[:-1])
    area = struct.pack(">IHI", 1, tpm2.ALG_NULL, 0) + b(b"") + struct.pack(">H", 1)
    assert "0x0010 is not supported" in refused(lambda: tpm2.parse_nv_public(b(area)).name)


# -- PCR selections (in a quote) ----------------------------------------------------------------
def quote_with(selection: bytes) -> bytes:
    body = struct.pack(">IH", tpm2.TPM_GENERATED, tpm2.ST_ATTEST_QUOTE) + b(b"\x00\x0b" + bytes(32)) + b(b"n" * 32)
    return body + struct.pack(">QIIB", 1, 1, 0, 1) + struct.pack(">Q", 0) + selection + b(bytes(32))


def test_a_pcr_selection_takes_up_to_16_banks_of_up_to_8_bytes():
    sixteen = struct.pack(">I", 16) + b"".join(struct.pack(">HB", tpm2.ALG_SHA256, 8) + b"\xff" * 8 for _ in range(16))
    attest = tpm2.parse_attest(quote_with(sixteen))
    assert len(attest.pcr_selection) == 16 and attest.pcr_selection[0] == (tpm2.ALG_SHA256, tuple(range(64)))
    seventeen = struct.pack(">I", 17) + b"".join(struct.pack(">HB", tpm2.ALG_SHA256, 3) + b"\0\0\0" for _ in range(17))
    assert refused(tpm2.parse_attest, quote_with(seventeen)) == "17 PCR banks selected"
    nine = struct.pack(">I", 1) + struct.pack(">HB", tpm2.ALG_SHA256, 9) + bytes(9)
    assert refused(tpm2.parse_attest, quote_with(nine)) == "PCR select of 9 bytes"


def test_a_pcr_selection_lists_the_pcrs_its_bitmap_sets():
    selection = tpm2.selection_bytes("sha256", [0, 4, 8, 9, 11, 23])
    assert selection == struct.pack(">IHB", 1, tpm2.ALG_SHA256, 3) + bytes([0b00010001, 0b00001011, 0b10000000])
    assert tpm2.parse_attest(quote_with(selection)).pcr_selection == ((tpm2.ALG_SHA256, (0, 4, 8, 9, 11, 23)),)
    assert tpm2.pcr_digest("sha256", [b"a", b"b"]) == hashlib.sha256(b"ab").digest()


# -- attestation structures -----------------------------------------------------------------------
def test_an_attestation_reads_back_and_its_bounds_are_exact():
    attest = tpm2.parse_attest(quote_attest(b"n" * 64, "sha256", [0], b"d" * 32, reset=7, restart=2))
    assert (attest.magic, attest.type, attest.extra_data, attest.reset_count, attest.restart_count, attest.clock) == \
        (tpm2.TPM_GENERATED, tpm2.ST_ATTEST_QUOTE, b"n" * 64, 7, 2, 123456)
    assert attest.pcr_digest == b"d" * 32 and attest.safe is True and attest.firmware_version == 0x2000
    assert refused(tpm2.parse_attest, quote_attest(b"n" * 65, "sha256", [0], b"d" * 32)) == \
        "a 65-byte field where at most 64 fit"
    assert refused(tpm2.parse_attest, quote_attest(b"n", "sha256", [0], b"d" * 65)) == "a 65-byte field where at most 64 fit"
    assert refused(tpm2.parse_attest, quote_attest(b"n", "sha256", [0], b"d") + b"\0") == "1 unexpected trailing bytes"
    other = struct.pack(">IH", tpm2.TPM_GENERATED, 0x8019) + quote_attest(b"n", "sha256", [0], b"d")[6:]
    assert refused(tpm2.parse_attest, other) == "attestation type 0x8019 is not a quote, certify or NV certify"
    signer = struct.pack(">IH", tpm2.TPM_GENERATED, tpm2.ST_ATTEST_QUOTE) + b(b"s" * 71)
    assert refused(tpm2.parse_attest, signer) == "a 71-byte field where at most 70 fit"


# -- public areas -------------------------------------------------------------------------------
def test_keys_read_back_as_the_tpm_made_them():
    ak = tpm2.parse_public(ecc_public(EC_KEY))
    assert (ak.type, ak.name_alg, ak.curve, ak.scheme) == (tpm2.ALG_ECC, tpm2.ALG_SHA256, 3, (tpm2.ALG_ECDSA, tpm2.ALG_SHA256))
    assert ak.public_key().public_numbers() == EC_KEY.public_key().public_numbers()
    assert ak.name == b"\x00\x0b" + hashlib.sha256(ecc_public(EC_KEY)[2:]).digest()
    tk = tpm2.parse_public(rsa_public(RSA_KEY, policy=b"p" * 32))
    assert (tk.type, tk.rsa_bits, tk.rsa_exponent, tk.auth_policy, tk.scheme) == \
        (tpm2.ALG_RSA, 2048, 0, b"p" * 32, (tpm2.ALG_OAEP, tpm2.ALG_SHA256))
    assert tk.public_key().public_numbers() == RSA_KEY.public_key().public_numbers()  # exponent 0 means 65537
    assert tpm2.parse_public(rsa_public(RSA_KEY)[2:], sized=False).modulus == tk.modulus
    assert tpm2.parse_public_cached(rsa_public(RSA_KEY)) == tpm2.parse_public(rsa_public(RSA_KEY))


def rsa_area(bits: int = 2048, modulus: bytes | None = None, policy: bytes = b"") -> bytes:
    n = RSA_KEY.public_key().public_numbers().n.to_bytes(256, "big") if modulus is None else modulus
    return struct.pack(">HHI", tpm2.ALG_RSA, tpm2.ALG_SHA256, 0) + b(policy) + struct.pack(">HHHI", tpm2.ALG_NULL,
                                                                                           tpm2.ALG_NULL, bits, 0) + b(n)


def test_a_public_areas_bounds_are_exact():
    assert tpm2.parse_public(b(rsa_area(policy=b"p" * 64))).auth_policy == b"p" * 64
    assert refused(tpm2.parse_public, b(rsa_area(policy=b"p" * 65))) == "a 65-byte field where at most 64 fit"
    assert tpm2.parse_public(b(rsa_area(4096, bytes(512)))).rsa_bits == 4096
    assert refused(tpm2.parse_public, b(rsa_area(4096, bytes(513)))) == "a 513-byte field where at most 512 fit"
    assert refused(tpm2.parse_public, b(rsa_area(2048, bytes(255)))) == "RSA key of 2048 bits with a 255-byte modulus"
    assert refused(tpm2.parse_public, b(rsa_area(2047, bytes(0)))) == "RSA key of 2047 bits with a 0-byte modulus"
    for bits in (1024, 3072):
        assert tpm2.parse_public(b(rsa_area(bits, bytes(bits // 8)))).rsa_bits == bits
    big = rsa_area(policy=b"p" * 64) + bytes(2048 - len(rsa_area(policy=b"p" * 64)))
    assert refused(tpm2.parse_public, b(big)) == f"{2048 - len(rsa_area(policy=b'p' * 64))} unexpected trailing bytes"
    assert refused(tpm2.parse_public, b(big + b"\0")) == "a 2049-byte field where at most 2048 fit"
    assert refused(tpm2.parse_public, b(rsa_area()) + b"\0") == "1 unexpected trailing bytes"
    unknown = struct.pack(">HHI", 0x0099, tpm2.ALG_SHA256, 0) + b(b"")
    assert refused(tpm2.parse_public, b(unknown)) == "unknown object type 0x0099"


def ecc_area(curve: int = 3, x: bytes = b"\1" * 32, y: bytes = b"\1" * 32, kdf: int = tpm2.ALG_NULL) -> bytes:
    area = struct.pack(">HHI", tpm2.ALG_ECC, tpm2.ALG_SHA256, 0) + b(b"")
    area += struct.pack(">HHHH", tpm2.ALG_NULL, tpm2.ALG_NULL, curve, kdf) + (b"\0\x0b" if kdf != tpm2.ALG_NULL else b"")
    return area + b(x) + b(y)


def test_ecc_points_are_bounded_and_must_be_on_the_curve():
    assert tpm2.parse_public(b(ecc_area(x=bytes(66), y=bytes(66)))).x == bytes(66)
    assert refused(tpm2.parse_public, b(ecc_area(x=bytes(67)))) == "a 67-byte field where at most 66 fit"
    assert tpm2.parse_public(b(ecc_area(kdf=0x0020))).curve == 3  # a KDF scheme with its hash
    assert "not a point on the curve" in refused(lambda: tpm2.parse_public(b(ecc_area())).public_key())
    assert refused(lambda: tpm2.parse_public(b(ecc_area(curve=0x0020))).public_key()) == "unsupported curve 0x0020"
    symmetric = tpm2.parse_public(b(struct.pack(">HHI", tpm2.ALG_SYMCIPHER, tpm2.ALG_SHA256, 0) + b(b"")
                                    + struct.pack(">HHH", tpm2.ALG_AES, 128, tpm2.ALG_CFB) + b(b"u" * 32)))
    assert "no public key for object type 0x0025" in refused(symmetric.public_key)
    keyed = tpm2.parse_public(b(struct.pack(">HHI", tpm2.ALG_KEYEDHASH, tpm2.ALG_SHA256, 0) + b(b"")
                                + struct.pack(">HHH", 0x000A, tpm2.ALG_SHA256, 0x0020) + b(b"u" * 32)))
    assert keyed.type == tpm2.ALG_KEYEDHASH
    assert refused(lambda: tpm2.parse_public(b(struct.pack(">HHI", tpm2.ALG_ECC, 0x0099, 0) + b(b"") + ecc_area()[10:])).name) \
        == "unsupported name algorithm 0x0099"


# -- signatures ---------------------------------------------------------------------------------
def ecdsa(message: bytes, alg: int = tpm2.ALG_SHA256) -> bytes:
    chosen = {tpm2.ALG_SHA1: hashes.SHA1(), tpm2.ALG_SHA256: hashes.SHA256(), tpm2.ALG_SHA384: hashes.SHA384()}[alg]
    r, s = decode_dss_signature(EC_KEY.sign(message, ec.ECDSA(chosen)))
    return struct.pack(">HH", tpm2.ALG_ECDSA, alg) + b(r.to_bytes(32, "big")) + b(s.to_bytes(32, "big"))


def rsa_sig(message: bytes, alg: int, scheme: int = tpm2.ALG_RSASSA) -> bytes:
    chosen = {tpm2.ALG_SHA1: hashes.SHA1(), tpm2.ALG_SHA256: hashes.SHA256()}[alg]
    pad = padding.PKCS1v15() if scheme == tpm2.ALG_RSASSA else padding.PSS(padding.MGF1(chosen), 32)
    return struct.pack(">HH", scheme, alg) + b(RSA_KEY.sign(message, pad, chosen))


@pytest.mark.parametrize("make, key, counts", [
    (lambda m: ecdsa(m), "ecc", True),
    (lambda m: ecdsa(m, tpm2.ALG_SHA384), "ecc", True),
    (lambda m: ecdsa(m, tpm2.ALG_SHA1), "ecc", False),  # SHA-1 signatures do not count, however valid
    (lambda m: rsa_sig(m, tpm2.ALG_SHA256), "rsa", True),
    (lambda m: rsa_sig(m, tpm2.ALG_SHA256, tpm2.ALG_RSAPSS), "rsa", True),
    (lambda m: rsa_sig(m, tpm2.ALG_SHA1), "rsa", False),
    (lambda m: ecdsa(m), "rsa", False),  # an ECDSA signature checked against an RSA key
    (lambda m: rsa_sig(m, tpm2.ALG_SHA256), "ecc", False),
    (lambda m: struct.pack(">HH", tpm2.ALG_ECDSA, 0x0099) + ecdsa(m)[4:], "ecc", False),  # unknown hash
], ids=["ecdsa-sha256", "ecdsa-sha384", "ecdsa-sha1", "rsassa", "rsapss", "rsassa-sha1", "ecdsa-on-rsa", "rsa-on-ecc",
        "unknown-hash"])
def test_which_signatures_count(make, key, counts):
    public = tpm2.parse_public(ecc_public(EC_KEY) if key == "ecc" else rsa_public(RSA_KEY))
    signature = tpm2.parse_signature(make(b"message"))
    assert tpm2.verify_signature(public, b"message", signature) is counts
    assert tpm2.verify_signature(public, b"other message", signature) is False


def test_a_signatures_bounds_and_kinds_are_exact():
    assert tpm2.parse_signature(sign(EC_KEY, b"m")).alg == tpm2.ALG_ECDSA
    assert refused(tpm2.parse_signature, struct.pack(">HH", tpm2.ALG_ECDSA, tpm2.ALG_SHA256) + b(bytes(67)) + b(b"")) == \
        "a 67-byte field where at most 66 fit"
    assert tpm2.parse_signature(struct.pack(">HH", tpm2.ALG_RSASSA, tpm2.ALG_SHA256) + b(bytes(512))).rsa == bytes(512)
    assert refused(tpm2.parse_signature, struct.pack(">HH", tpm2.ALG_RSAPSS, tpm2.ALG_SHA256) + b(bytes(513))) == \
        "a 513-byte field where at most 512 fit"
    assert refused(tpm2.parse_signature, sign(EC_KEY, b"m") + b"\0") == "1 unexpected trailing bytes"
    assert refused(tpm2.parse_signature, rsa_sig(b"m", tpm2.ALG_SHA256) + b"\0") == "1 unexpected trailing bytes"
    assert refused(tpm2.parse_signature, struct.pack(">HH", 0x0014 + 0x100, 0)) == \
        "signature algorithm 0x0114 is not ECDSA, RSASSA or RSAPSS"


def test_every_field_of_a_public_area_is_read_and_kept():
    """The exponent (a TPM may use another than 65537), the symmetric definition (a storage key's,
    or NULL), each point coordinate's own bound, and keyed-hash and symmetric objects' unique field."""
    e3 = rsa.generate_private_key(3, 2048)
    n = e3.public_key().public_numbers().n.to_bytes(256, "big")
    area = struct.pack(">HHI", tpm2.ALG_RSA, tpm2.ALG_SHA256, 0) + b(b"") + struct.pack(
        ">HHHH", tpm2.ALG_AES, 128, tpm2.ALG_CFB, tpm2.ALG_NULL) + struct.pack(">HI", 2048, 3) + b(n)
    key = tpm2.parse_public(b(area))
    assert key.rsa_exponent == 3 and key.public_key().public_numbers().e == 3
    assert key.symmetric == (tpm2.ALG_AES, 128, tpm2.ALG_CFB)
    assert tpm2.parse_public(b(rsa_area())).symmetric == (tpm2.ALG_NULL, 0, 0)
    ecc = struct.pack(">HHI", tpm2.ALG_ECC, tpm2.ALG_SHA256, 0) + b(b"") + struct.pack(
        ">HHHHHH", tpm2.ALG_AES, 128, tpm2.ALG_CFB, tpm2.ALG_NULL, 3, tpm2.ALG_NULL) + b(b"\1" * 32) + b(b"\1" * 32)
    assert tpm2.parse_public(b(ecc)).symmetric == (tpm2.ALG_AES, 128, tpm2.ALG_CFB)
    assert tpm2.parse_public(b(ecc_area())).symmetric == (tpm2.ALG_NULL, 0, 0)
    assert refused(tpm2.parse_public, b(ecc_area(y=bytes(67)))) == "a 67-byte field where at most 66 fit"
    for kind, params in ((tpm2.ALG_KEYEDHASH, struct.pack(">H", tpm2.ALG_NULL)),
                         (tpm2.ALG_SYMCIPHER, struct.pack(">HHH", tpm2.ALG_AES, 128, tpm2.ALG_CFB))):
        head = struct.pack(">HHI", kind, tpm2.ALG_SHA256, 0) + b(b"") + params
        assert tpm2.parse_public(b(head + b(b"u" * 64))).type == kind
        assert refused(tpm2.parse_public, b(head + b(b"u" * 65))) == "a 65-byte field where at most 64 fit"


def test_certified_names_and_contents_are_bounded():
    def certify(name: bytes, qualified: bytes) -> bytes:
        body = struct.pack(">IH", tpm2.TPM_GENERATED, tpm2.ST_ATTEST_CERTIFY) + b(b"s" * 34) + b(b"n")
        return body + struct.pack(">QIIB", 1, 1, 0, 1) + struct.pack(">Q", 0) + b(name) + b(qualified)

    attest = tpm2.parse_attest(certify(b"a" * 70, b"q" * 70))
    assert (attest.certified_name, attest.certified_qualified_name) == (b"a" * 70, b"q" * 70)
    assert attest.qualified_signer == b"s" * 34 and attest.raw == certify(b"a" * 70, b"q" * 70)
    assert refused(tpm2.parse_attest, certify(b"a" * 71, b"")) == "a 71-byte field where at most 70 fit"
    assert refused(tpm2.parse_attest, certify(b"a", b"q" * 71)) == "a 71-byte field where at most 70 fit"

    def nv(name: bytes, contents: bytes) -> bytes:
        body = struct.pack(">IH", tpm2.TPM_GENERATED, tpm2.ST_ATTEST_NV) + b(b"s") + b(b"n")
        return body + struct.pack(">QIIB", 1, 1, 0, 1) + struct.pack(">Q", 0) + b(name) + struct.pack(">H", 3) + b(contents)

    attest = tpm2.parse_attest(nv(b"a" * 70, b"c" * 2048))
    assert (attest.nv_index_name, attest.nv_offset, len(attest.nv_contents)) == (b"a" * 70, 3, 2048)
    assert refused(tpm2.parse_attest, nv(b"a" * 71, b"")) == "a 71-byte field where at most 70 fit"
    assert refused(tpm2.parse_attest, nv(b"a", b"c" * 2049)) == "a 2049-byte field where at most 2048 fit"
    assert refused(tpm2.parse_signature, struct.pack(">HH", tpm2.ALG_ECDSA, tpm2.ALG_SHA256) + b(b"") + b(bytes(67))) == \
        "a 67-byte field where at most 66 fit"
    assert refused(tpm2.parse_attest, bytes(5)) == "truncated: 2 bytes needed at offset 4, 1 left"
