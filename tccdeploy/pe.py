"""The Authenticode digest of a PE/COFF image: what UEFI firmware (and shim, for what it loads)
extends into PCR 4 for an EFI application, so a build's PCR 4 can be predicted from its files.

The algorithm is Microsoft's "Windows Authenticode Portable Executable Signature Format" as
edk2 implements it for measured boot (SecurityPkg DxeTpm2MeasureBootLib, MeasureBootPeCoff.c):
hash the headers without the CheckSum field and the certificate-table directory entry, then the
sections' raw data in file order, then whatever lies after the last section except the
attribute certificate table. edk2 pads nothing; for a signed image shim and systemd agree with
it (they pad unsigned trailing data to 8 bytes, which a signed image never has).

The file comes from an operator; still, every offset is checked against the file's size and a
malformed image is a PEError naming the field, never an IndexError.
"""

from __future__ import annotations

import hashlib
import struct


class PEError(ValueError):
    """Not a PE/COFF image tccdeploy can digest; the message names the field."""


def _u16(data: bytes, offset: int, what: str) -> int:
    if offset < 0 or offset + 2 > len(data):
        raise PEError(f"{what} at byte {offset} lies past the end of the file ({len(data)} bytes)")
    return int(struct.unpack_from("<H", data, offset)[0])


def _u32(data: bytes, offset: int, what: str) -> int:
    if offset < 0 or offset + 4 > len(data):
        raise PEError(f"{what} at byte {offset} lies past the end of the file ({len(data)} bytes)")
    return int(struct.unpack_from("<I", data, offset)[0])


def is_pe(data: bytes) -> bool:
    """Starts as a PE/COFF image (MZ header pointing at a PE signature)."""
    if len(data) < 0x40 or data[:2] != b"MZ":
        return False
    e_lfanew = _u32(data, 0x3C, "e_lfanew")
    return data[e_lfanew:e_lfanew + 4] == b"PE\x00\x00"


def certificate_table(data: bytes) -> tuple[int, int]:
    """(file offset, size) of the attribute certificate table; (0, 0) for an unsigned image."""
    return _layout(data)[3]


def _layout(data: bytes) -> tuple[int, int, int, tuple[int, int], list[tuple[int, int]]]:
    """(optional header offset, certificate directory entry offset, SizeOfHeaders,
    certificate table (offset, size), sections' (PointerToRawData, SizeOfRawData))."""
    if not is_pe(data):
        raise PEError("not a PE/COFF image (no MZ header with a PE signature)")
    e_lfanew = _u32(data, 0x3C, "e_lfanew")
    sections = _u16(data, e_lfanew + 6, "NumberOfSections")
    optional_size = _u16(data, e_lfanew + 20, "SizeOfOptionalHeader")
    optional = e_lfanew + 24
    magic = _u16(data, optional, "optional header magic")
    if magic == 0x10B:
        directories, count_at = optional + 96, optional + 92
    elif magic == 0x20B:
        directories, count_at = optional + 112, optional + 108
    else:
        raise PEError(f"optional header magic 0x{magic:x} is neither PE32 nor PE32+")
    if _u32(data, count_at, "NumberOfRvaAndSizes") < 5:
        raise PEError("the image has no certificate-table directory entry (fewer than 5 data directories)")
    cert_entry = directories + 4 * 8
    cert = (_u32(data, cert_entry, "certificate table offset"), _u32(data, cert_entry + 4, "certificate table size"))
    if cert[1] and (cert[0] < 0 or cert[0] + cert[1] > len(data)):
        raise PEError(f"the certificate table ({cert[1]} bytes at {cert[0]}) lies past the end of the file")
    headers = _u32(data, optional + 60, "SizeOfHeaders")
    if headers > len(data) or headers < cert_entry + 8:
        raise PEError(f"SizeOfHeaders {headers} is not within the file and past the data directories")
    table = optional + optional_size
    raw = []
    for i in range(sections):
        entry = table + 40 * i
        size, pointer = _u32(data, entry + 16, "SizeOfRawData"), _u32(data, entry + 20, "PointerToRawData")
        if size:
            if pointer + size > len(data):
                raise PEError(f"section {i} ({size} bytes at {pointer}) lies past the end of the file")
            raw.append((pointer, size))
    return optional, cert_entry, headers, cert, sorted(raw)


def authenticode(data: bytes, algorithm: str = "sha256") -> bytes:
    """The image's Authenticode digest in algorithm (a hashlib name)."""
    optional, cert_entry, headers, (cert_offset, cert_size), sections = _layout(data)
    h = hashlib.new(algorithm)
    checksum = optional + 64
    h.update(data[:checksum])
    h.update(data[checksum + 4:cert_entry])
    h.update(data[cert_entry + 8:headers])
    hashed = headers
    for pointer, size in sections:
        h.update(data[pointer:pointer + size])
        hashed += size
    end = len(data) - cert_size
    if end > hashed:
        h.update(data[hashed:end])
    return h.digest()
