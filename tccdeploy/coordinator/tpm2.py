"""TPM 2.0 structures as the trusted coordinator reads them, with `cryptography` only.

The TC must not trust the node's TSS, so it parses what the TPM produced itself: TPMT_PUBLIC
(keys and their names), TPMS_ATTEST (quotes, certifications) and TPMT_SIGNATURE, and it does
MakeCredential in software. Every parser bounds-checks and raises TPMFormatError on anything
malformed; inputs come from an untrusted engine.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import struct
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import lru_cache

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from cryptography.hazmat.primitives.asymmetric.utils import encode_dss_signature
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms

try:  # CFB lives in "decrepit" from cryptography 47 on; TPM 2.0 still uses it for credentials
    from cryptography.hazmat.decrepit.ciphers.modes import CFB
except ImportError:  # pragma: no cover - older cryptography
    from cryptography.hazmat.primitives.ciphers.modes import CFB

TPM_GENERATED = 0xFF544347
ST_ATTEST_QUOTE = 0x8018
ST_ATTEST_CERTIFY = 0x8017
ST_ATTEST_NV = 0x8014

ALG_RSA, ALG_SHA1, ALG_AES, ALG_SHA256, ALG_SHA384, ALG_SHA512, ALG_NULL = 0x0001, 0x0004, 0x0006, 0x000B, 0x000C, 0x000D, 0x0010
ALG_RSASSA, ALG_RSAPSS, ALG_OAEP, ALG_ECDSA, ALG_ECC, ALG_CFB, ALG_KEYEDHASH, ALG_SYMCIPHER = 0x0014, 0x0016, 0x0017, 0x0018, 0x0023, 0x0043, 0x0008, 0x0025
HASHES: dict[int, Callable[[], hashes.HashAlgorithm]] = {
    ALG_SHA1: hashes.SHA1, ALG_SHA256: hashes.SHA256, ALG_SHA384: hashes.SHA384, ALG_SHA512: hashes.SHA512}
HASH_NAMES = {ALG_SHA1: "sha1", ALG_SHA256: "sha256", ALG_SHA384: "sha384", ALG_SHA512: "sha512"}
HASH_IDS = {name: alg for alg, name in HASH_NAMES.items()}
CURVES: dict[int, Callable[[], ec.EllipticCurve]] = {0x0003: ec.SECP256R1, 0x0004: ec.SECP384R1, 0x0005: ec.SECP521R1}

# TPMA_OBJECT bits
FIXED_TPM, ST_CLEAR, FIXED_PARENT, SENSITIVE_DATA_ORIGIN, USER_WITH_AUTH = 0x2, 0x4, 0x10, 0x20, 0x40
ADMIN_WITH_POLICY, NO_DA, ENCRYPTED_DUPLICATION, RESTRICTED, DECRYPT, SIGN = 0x80, 0x400, 0x800, 0x10000, 0x20000, 0x40000


# TPMA_NV bits the asset-tag check reads
NV_PPWRITE, NV_OWNERWRITE, NV_AUTHWRITE, NV_POLICYWRITE = 0x1, 0x2, 0x4, 0x8
NV_WRITELOCKED, NV_WRITEDEFINE, NV_WRITTEN, NV_PLATFORMCREATE = 0x800, 0x2000, 0x20000000, 0x40000000


class TPMFormatError(ValueError):
    """Bytes that are not the TPM structure they claim to be."""


class _Reader:
    __slots__ = ("data", "pos")

    def __init__(self, data: bytes):
        self.data, self.pos = data, 0

    def take(self, n: int) -> bytes:
        if n < 0 or self.pos + n > len(self.data):
            raise TPMFormatError(f"truncated: {n} bytes needed at offset {self.pos}, {len(self.data) - self.pos} left")
        out = self.data[self.pos:self.pos + n]
        self.pos += n
        return out

    def u8(self) -> int:
        return self.take(1)[0]

    def u16(self) -> int:
        return struct.unpack(">H", self.take(2))[0]

    def u32(self) -> int:
        return struct.unpack(">I", self.take(4))[0]

    def u64(self) -> int:
        return struct.unpack(">Q", self.take(8))[0]

    def tpm2b(self, limit: int = 4096) -> bytes:
        size = self.u16()
        if size > limit:
            raise TPMFormatError(f"a {size}-byte field where at most {limit} fit")
        return self.take(size)

    def done(self) -> None:
        if self.pos != len(self.data):
            raise TPMFormatError(f"{len(self.data) - self.pos} unexpected trailing bytes")


def tpm2b(data: bytes) -> bytes:
    return struct.pack(">H", len(data)) + data


@dataclass(frozen=True)
class Public:
    """A TPMT_PUBLIC: what a key is and may do; `name` is how the TPM refers to it."""

    type: int
    name_alg: int
    attributes: int
    auth_policy: bytes
    raw: bytes  # the marshalled TPMT_PUBLIC (the name is computed over it)
    rsa_bits: int = 0
    rsa_exponent: int = 0
    modulus: bytes = b""
    curve: int = 0
    x: bytes = b""
    y: bytes = b""
    symmetric: tuple[int, int, int] = (ALG_NULL, 0, 0)  # alg, key bits, mode
    scheme: tuple[int, int] = (ALG_NULL, ALG_NULL)

    @property
    def name(self) -> bytes:
        if self.name_alg not in HASH_NAMES:
            raise TPMFormatError(f"unsupported name algorithm 0x{self.name_alg:04x}")
        return struct.pack(">H", self.name_alg) + hashlib.new(HASH_NAMES[self.name_alg], self.raw).digest()

    def has(self, bits: int) -> bool:
        return self.attributes & bits == bits

    def public_key(self) -> rsa.RSAPublicKey | ec.EllipticCurvePublicKey:
        cached = self.__dict__.get("_key")
        if cached is not None:
            return cached
        key = self._make_key()
        object.__setattr__(self, "_key", key)
        return key

    def _make_key(self) -> rsa.RSAPublicKey | ec.EllipticCurvePublicKey:
        if self.type == ALG_RSA:
            exponent = self.rsa_exponent or 65537
            return rsa.RSAPublicNumbers(exponent, int.from_bytes(self.modulus, "big")).public_key()
        if self.type == ALG_ECC:
            curve = CURVES.get(self.curve)
            if curve is None:
                raise TPMFormatError(f"unsupported curve 0x{self.curve:04x}")
            try:
                return ec.EllipticCurvePublicNumbers(int.from_bytes(self.x, "big"), int.from_bytes(self.y, "big"), curve()).public_key()
            except ValueError as exc:
                raise TPMFormatError(f"not a point on the curve: {exc}") from None
        raise TPMFormatError(f"no public key for object type 0x{self.type:04x}")


def parse_public(data: bytes, sized: bool = True) -> Public:
    """Parse a TPM2B_PUBLIC (sized=True) or a bare TPMT_PUBLIC."""
    if sized:
        outer = _Reader(data)
        data = outer.tpm2b(limit=2048)
        outer.done()
    r = _Reader(data)
    kind, name_alg, attributes = r.u16(), r.u16(), r.u32()
    policy = r.tpm2b(limit=64)
    fields: dict = {}
    if kind == ALG_RSA:
        sym = r.u16()
        symmetric = (sym, r.u16(), r.u16()) if sym != ALG_NULL else (ALG_NULL, 0, 0)
        scheme = r.u16()
        scheme_hash = r.u16() if scheme != ALG_NULL else ALG_NULL
        bits, exponent = r.u16(), r.u32()
        modulus = r.tpm2b(limit=512)
        if bits not in (1024, 2048, 3072, 4096) or (modulus and len(modulus) * 8 != bits):
            raise TPMFormatError(f"RSA key of {bits} bits with a {len(modulus)}-byte modulus")
        fields.update(rsa_bits=bits, rsa_exponent=exponent, modulus=modulus, symmetric=symmetric, scheme=(scheme, scheme_hash))
    elif kind == ALG_ECC:
        sym = r.u16()
        symmetric = (sym, r.u16(), r.u16()) if sym != ALG_NULL else (ALG_NULL, 0, 0)
        scheme = r.u16()
        scheme_hash = r.u16() if scheme != ALG_NULL else ALG_NULL
        curve = r.u16()
        kdf = r.u16()
        if kdf != ALG_NULL:
            r.u16()
        x, y = r.tpm2b(limit=66), r.tpm2b(limit=66)
        fields.update(curve=curve, x=x, y=y, symmetric=symmetric, scheme=(scheme, scheme_hash))
    elif kind == ALG_KEYEDHASH:
        scheme = r.u16()
        if scheme != ALG_NULL:
            r.u16()
            if scheme == 0x000A:  # XOR has a KDF too
                r.u16()
        r.tpm2b(limit=64)
    elif kind == ALG_SYMCIPHER:
        r.u16(), r.u16(), r.u16()
        r.tpm2b(limit=64)
    else:
        raise TPMFormatError(f"unknown object type 0x{kind:04x}")
    r.done()
    return Public(kind, name_alg, attributes, policy, data, **fields)


@lru_cache(maxsize=4096)
def parse_public_cached(data: bytes) -> Public:
    """parse_public for keys the TC verifies with again and again (enrolled AKs)."""
    return parse_public(data)


@dataclass(frozen=True)
class Attest:
    """A TPMS_ATTEST: what the TPM signed."""

    magic: int
    type: int
    qualified_signer: bytes
    extra_data: bytes
    clock: int
    reset_count: int
    restart_count: int
    safe: bool
    firmware_version: int
    pcr_selection: tuple[tuple[int, tuple[int, ...]], ...] = ()
    pcr_digest: bytes = b""
    certified_name: bytes = b""
    certified_qualified_name: bytes = b""
    nv_index_name: bytes = b""
    nv_offset: int = 0
    nv_contents: bytes = b""
    raw: bytes = field(default=b"", repr=False)


@dataclass(frozen=True)
class NVPublic:
    """TPMS_NV_PUBLIC: an NV index's definition; its Name is what TPM2_NV_Certify certifies."""

    index: int
    name_alg: int
    attributes: int
    auth_policy: bytes
    data_size: int
    raw: bytes

    @property
    def name(self) -> bytes:
        if self.name_alg not in HASH_NAMES:
            raise TPMFormatError(f"NV name algorithm 0x{self.name_alg:04x} is not supported")
        return struct.pack(">H", self.name_alg) + hashlib.new(HASH_NAMES[self.name_alg], self.raw).digest()

    def has(self, bits: int) -> bool:
        return self.attributes & bits == bits


def parse_nv_public(data: bytes) -> NVPublic:
    """A TPM2B_NV_PUBLIC, as TPM2_NV_ReadPublic returns it."""
    r = _Reader(data)
    raw = r.tpm2b(limit=512)
    inner = _Reader(raw)
    index, name_alg, attributes = inner.u32(), inner.u16(), inner.u32()
    policy = inner.tpm2b(limit=64)
    size = inner.u16()
    inner.done()
    r.done()
    return NVPublic(index, name_alg, attributes, policy, size, raw)


def _pcr_selection(r: _Reader) -> tuple[tuple[int, tuple[int, ...]], ...]:
    count = r.u32()
    if count > 16:
        raise TPMFormatError(f"{count} PCR banks selected")
    out = []
    for _ in range(count):
        alg, size = r.u16(), r.u8()
        if size > 8:
            raise TPMFormatError(f"PCR select of {size} bytes")
        bitmap = r.take(size)
        out.append((alg, tuple(i * 8 + b for i, byte in enumerate(bitmap) for b in range(8) if byte >> b & 1)))
    return tuple(out)


def parse_attest(data: bytes) -> Attest:
    r = _Reader(data)
    magic, kind = r.u32(), r.u16()
    signer, extra = r.tpm2b(limit=70), r.tpm2b(limit=64)
    clock, resets, restarts, safe = r.u64(), r.u32(), r.u32(), r.u8()
    firmware = r.u64()
    fields: dict = {}
    if kind == ST_ATTEST_QUOTE:
        fields["pcr_selection"] = _pcr_selection(r)
        fields["pcr_digest"] = r.tpm2b(limit=64)
    elif kind == ST_ATTEST_CERTIFY:
        fields["certified_name"] = r.tpm2b(limit=70)
        fields["certified_qualified_name"] = r.tpm2b(limit=70)
    elif kind == ST_ATTEST_NV:
        fields["nv_index_name"] = r.tpm2b(limit=70)
        fields["nv_offset"] = r.u16()
        fields["nv_contents"] = r.tpm2b(limit=2048)
    else:
        raise TPMFormatError(f"attestation type 0x{kind:04x} is not a quote, certify or NV certify")
    r.done()
    return Attest(magic, kind, signer, extra, clock, resets, restarts, bool(safe), firmware, raw=data, **fields)


@dataclass(frozen=True)
class Signature:
    alg: int
    hash_alg: int
    der: bytes = b""  # ECDSA as DER (r, s)
    rsa: bytes = b""


def parse_signature(data: bytes) -> Signature:
    r = _Reader(data)
    alg = r.u16()
    if alg == ALG_ECDSA:
        hash_alg = r.u16()
        sig_r, sig_s = r.tpm2b(limit=66), r.tpm2b(limit=66)
        r.done()
        return Signature(alg, hash_alg, der=encode_dss_signature(int.from_bytes(sig_r, "big"), int.from_bytes(sig_s, "big")))
    if alg in (ALG_RSASSA, ALG_RSAPSS):
        hash_alg = r.u16()
        sig = r.tpm2b(limit=512)
        r.done()
        return Signature(alg, hash_alg, rsa=sig)
    raise TPMFormatError(f"signature algorithm 0x{alg:04x} is not ECDSA, RSASSA or RSAPSS")


def verify_signature(key: Public, message: bytes, signature: Signature) -> bool:
    """True only when signature is the key's, over message, with a hash of at least SHA-256."""
    hash_cls = HASHES.get(signature.hash_alg)
    if hash_cls is None or signature.hash_alg == ALG_SHA1:
        return False
    try:
        public = key.public_key()
        if signature.alg == ALG_ECDSA and isinstance(public, ec.EllipticCurvePublicKey):
            public.verify(signature.der, message, ec.ECDSA(hash_cls()))
        elif signature.alg == ALG_RSASSA and isinstance(public, rsa.RSAPublicKey):
            public.verify(signature.rsa, message, padding.PKCS1v15(), hash_cls())
        elif signature.alg == ALG_RSAPSS and isinstance(public, rsa.RSAPublicKey):
            public.verify(signature.rsa, message, padding.PSS(padding.MGF1(hash_cls()), padding.PSS.AUTO), hash_cls())
        else:
            return False
    except Exception:  # noqa: BLE001 - any failure to verify is "not verified"
        return False
    return True


def kdfa(hash_alg: int, key: bytes, label: bytes, context_u: bytes, context_v: bytes, bits: int) -> bytes:
    """TPM 2.0 Part 1, 11.4.10.2: KDFa in counter mode with HMAC."""
    name = HASH_NAMES[hash_alg]
    out = b""
    counter = 0
    while len(out) * 8 < bits:
        counter += 1
        data = struct.pack(">I", counter) + label + b"\x00" + context_u + context_v + struct.pack(">I", bits)
        out += hmac.new(key, data, name).digest()
    return out[: (bits + 7) // 8]


def make_credential(ek: Public, secret: bytes, ak_name: bytes) -> tuple[bytes, bytes]:
    """TPM2_MakeCredential in software: (credentialBlob, encrypted seed), both unsized.

    Only a TPM holding ek's private part and an object named ak_name can recover `secret`.
    """
    if ek.type != ALG_RSA:
        raise TPMFormatError("only RSA endorsement keys are supported for credential activation")
    if ek.symmetric[0] != ALG_AES or ek.symmetric[2] != ALG_CFB:
        raise TPMFormatError("the EK's symmetric algorithm is not AES-CFB")
    name_hash = HASHES[ek.name_alg]
    size = name_hash().digest_size
    seed = os.urandom(size)
    public = ek.public_key()
    assert isinstance(public, rsa.RSAPublicKey)
    encrypted_seed = public.encrypt(seed, padding.OAEP(padding.MGF1(name_hash()), name_hash(), b"IDENTITY\x00"))
    sym_key = kdfa(ek.name_alg, seed, b"STORAGE", ak_name, b"", ek.symmetric[1])
    encryptor = Cipher(algorithms.AES(sym_key), CFB(bytes(16))).encryptor()
    enc_identity = encryptor.update(tpm2b(secret)) + encryptor.finalize()
    hmac_key = kdfa(ek.name_alg, seed, b"INTEGRITY", b"", b"", size * 8)
    outer = hmac.new(hmac_key, enc_identity + ak_name, HASH_NAMES[ek.name_alg]).digest()
    return tpm2b(outer) + enc_identity, encrypted_seed


def pcr_digest(bank: str, values: list[bytes]) -> bytes:
    """The quote's pcrDigest: the bank's hash over the selected PCR values in index order."""
    return hashlib.new(bank, b"".join(values)).digest()


def selection_bytes(bank: str, pcrs: list[int]) -> bytes:
    """TPML_PCR_SELECTION for one bank (PolicyPCR and the quote's selection use this form)."""
    bitmap = bytearray(3)
    for pcr in pcrs:
        bitmap[pcr // 8] |= 1 << (pcr % 8)
    return struct.pack(">IHB", 1, HASH_IDS[bank], 3) + bytes(bitmap)
