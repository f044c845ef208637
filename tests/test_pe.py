"""The PE/COFF Authenticode digest (tccdeploy/pe.py) that firmware measures for EFI applications:
equal to the digest the vendor signed into each of Debian's signed EFI binaries (shim, GRUB), and
a clear PEError, never an IndexError, for what is not a well-formed image."""

from __future__ import annotations

import glob
import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tccdeploy.pe import PEError, authenticode, certificate_table, is_pe

SIGNED = sorted(glob.glob("/usr/lib/shim/*.efi.signed") + glob.glob("/usr/lib/grub/x86_64-efi-signed/*.efi.signed"))
# DigestInfo { sha256, NULL } then the OCTET STRING of the digest, as SpcIndirectDataContent holds it
DIGEST_INFO = bytes.fromhex("300d060960864801650304020105000420")


def _signed_digest(image: bytes) -> bytes:
    offset, size = certificate_table(image)
    signature = image[offset:offset + size]
    at = signature.index(DIGEST_INFO) + len(DIGEST_INFO)
    return signature[at:at + 32]


@pytest.mark.skipif(not SIGNED, reason="Debian's shim-signed and grub-efi-amd64-signed are not installed (scripts/install)")
@pytest.mark.parametrize("path", SIGNED, ids=lambda p: p.rsplit("/", 1)[-1])
def test_the_digest_is_the_one_the_vendor_signed(path: str):
    image = open(path, "rb").read()
    assert is_pe(image) and certificate_table(image)[1] > 0
    assert authenticode(image) == _signed_digest(image)


def _minimal(sections: list[bytes], trailing: bytes = b"", cert: bytes = b"", pe32plus: bool = True) -> bytearray:
    """A small PE/COFF image built from the spec's layout, for the edges the real ones do not have."""
    optional_size = 240 if pe32plus else 224
    e_lfanew = 0x40
    table = e_lfanew + 24 + optional_size
    headers = (table + 40 * len(sections) + 0x1FF) // 0x200 * 0x200
    image = bytearray(headers)
    image[:2] = b"MZ"
    struct.pack_into("<I", image, 0x3C, e_lfanew)
    image[e_lfanew:e_lfanew + 4] = b"PE\x00\x00"
    struct.pack_into("<HH", image, e_lfanew + 4, 0x8664, len(sections))
    struct.pack_into("<H", image, e_lfanew + 20, optional_size)
    optional = e_lfanew + 24
    struct.pack_into("<H", image, optional, 0x20B if pe32plus else 0x10B)
    struct.pack_into("<I", image, optional + 60, headers)
    struct.pack_into("<I", image, optional + 64, 0xDEADBEEF)  # CheckSum: not hashed
    struct.pack_into("<I", image, optional + (108 if pe32plus else 92), 16)
    pointer = headers
    for i, body in enumerate(sections):
        struct.pack_into("<II", image, table + 40 * i + 16, len(body), pointer)
        pointer += len(body)
    image += b"".join(sections) + trailing
    if cert:
        struct.pack_into("<II", image, optional + (144 if pe32plus else 128), len(image), len(cert))
        image += cert
    return image


def test_the_checksum_the_certificate_entry_and_the_certificates_are_left_out():
    import hashlib

    image = _minimal([b"text" * 16, b"data" * 8], trailing=b"tail", cert=b"C" * 24)
    digest = authenticode(bytes(image))
    changed = bytearray(image)
    changed[0x40 + 24 + 64] ^= 0xFF  # the CheckSum
    changed[-1] ^= 0xFF  # inside the certificate table
    assert authenticode(bytes(changed)) == digest
    changed[-30] ^= 0xFF  # the trailing data before it is hashed
    assert authenticode(bytes(changed)) != digest
    headers = struct.unpack_from("<I", image, 0x40 + 24 + 60)[0]
    optional = 0x40 + 24
    expected = hashlib.sha256(image[:optional + 64] + image[optional + 68:optional + 144] + image[optional + 152:headers]
                              + b"text" * 16 + b"data" * 8 + b"tail").digest()
    assert digest == expected
    assert authenticode(bytes(_minimal([b"x" * 8], pe32plus=False))) != authenticode(bytes(_minimal([b"x" * 8])))


def test_sections_are_hashed_in_file_order_whatever_the_table_order():
    import hashlib

    swapped = _minimal([b"A" * 32, b"B" * 32])
    table, optional = 0x40 + 24 + 240, 0x40 + 24
    first, second = bytes(swapped[table:table + 40]), bytes(swapped[table + 40:table + 80])
    swapped[table:table + 40], swapped[table + 40:table + 80] = second, first  # B's entry first, A still first in the file
    headers = struct.unpack_from("<I", swapped, optional + 60)[0]
    expected = hashlib.sha256(swapped[:optional + 64] + swapped[optional + 68:optional + 144]
                              + swapped[optional + 152:headers] + b"A" * 32 + b"B" * 32).digest()
    assert authenticode(bytes(swapped)) == expected


@pytest.mark.parametrize("mutate, message", [
    (lambda b: b.__setitem__(slice(0, 2), b"ZM"), "not a PE/COFF image"),
    (lambda b: struct.pack_into("<H", b, 0x40 + 24, 0x999), "neither PE32 nor PE32+"),
    (lambda b: struct.pack_into("<I", b, 0x40 + 24 + 108, 4), "no certificate-table directory entry"),
    (lambda b: struct.pack_into("<I", b, 0x40 + 24 + 60, 10**9), "SizeOfHeaders"),
    (lambda b: struct.pack_into("<I", b, 0x40 + 24 + 240 + 16, 10**9), "section 0"),
    (lambda b: struct.pack_into("<II", b, 0x40 + 24 + 144, 100, 10**9), "certificate table"),
])
def test_a_malformed_image_is_refused_by_the_field_at_fault(mutate, message):
    image = _minimal([b"x" * 64])
    mutate(image)
    with pytest.raises(PEError, match=message):
        authenticode(bytes(image))


@settings(max_examples=200, deadline=None)
@given(cut=st.integers(min_value=0, max_value=700), noise=st.binary(max_size=64), at=st.integers(min_value=0, max_value=700))
def test_truncated_or_corrupted_images_fail_cleanly(cut: int, noise: bytes, at: int):
    image = _minimal([b"x" * 64, b"y" * 64], trailing=b"t" * 8)
    image[at:at + len(noise)] = noise
    try:
        authenticode(bytes(image[:cut]))
    except PEError:
        pass
