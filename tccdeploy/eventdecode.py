"""What each event of a TCG event log measured, decoded for people: the firmware variable, the
EFI application and the device path it was loaded from, the GPT, the command line.

For display only (`tccdeploy eventlog`, `build capture`, `build capture --diff`): nothing here
decides trust. A verdict rests on digests, which an event's data does not prove (firmware logs
what it likes beside the digest it extends); the decoded text tells an operator what changed
where the digests say something did. The data comes from an untrusted node, so every decoder
works on bounded slices and `describe` never raises: what does not decode is said so.

Layouts: TCG PC Client Platform Firmware Profile (PFP) 1.05 section 10.4 and the UEFI
specification (device paths, chapter 10; EFI_LOAD_OPTION, 3.1.3), little-endian throughout.
"""

from __future__ import annotations

import struct
import uuid
from collections.abc import Callable

from .eventlog import EVENT_CODES, Event

MAX_TEXT = 160  # a decoded field longer than this is cut (a hostile log may put megabytes in one)

GUIDS = {
    "8be4df61-93ca-11d2-aa0d-00e098032b8c": "EFI_GLOBAL_VARIABLE",
    "d719b2cb-3d3a-4596-a3bc-dad00e67656f": "EFI_IMAGE_SECURITY_DATABASE",
    "605dab50-e046-4300-abb6-3dd810dd8b23": "SHIM_LOCK",
    "eb9d2d31-2d88-11d3-9a16-0090273fc14d": "SMBIOS_TABLE",
    "f2fd1544-9794-4a2c-992e-e5bbcf20e394": "SMBIOS3_TABLE",
    "8868e871-e4f1-11d3-bc22-0080c73c8881": "ACPI_20_TABLE",
}
EVENT_TAGS = {0x8F3B22EC: "Linux initrd", 0x8F3B22ED: "LOADED_IMAGE::LoadOptions"}


class _Undecodable(ValueError):
    pass


def _take(data: bytes, offset: int, size: int) -> bytes:
    if size < 0 or offset + size > len(data):
        raise _Undecodable(f"needs {offset + size} bytes, has {len(data)}")
    return data[offset:offset + size]


def _u(data: bytes, offset: int, fmt: str) -> int:
    return int(struct.unpack_from("<" + fmt, _take(data, offset, struct.calcsize("<" + fmt)))[0])


def _clip(text: str) -> str:
    text = "".join(ch if ch.isprintable() else f"\\x{ord(ch):02x}" if ord(ch) < 256 else "?" for ch in text)
    return text if len(text) <= MAX_TEXT else text[:MAX_TEXT] + "..."


def _guid(raw: bytes) -> str:
    value = str(uuid.UUID(bytes_le=_take(raw, 0, 16)))
    return GUIDS.get(value, value)


def _quoted(text: str) -> str:
    return f'"{text}"'


def _ascii(data: bytes) -> str:
    return _clip(data.rstrip(b"\x00").decode("ascii", "replace"))


def _utf16(data: bytes) -> str:
    return _clip(data[: len(data) - len(data) % 2].decode("utf-16-le", "replace").rstrip("\x00"))


def _text(data: bytes) -> str:
    """A string event: UTF-16 when it looks like it (systemd-boot, S-CRTM versions), else ASCII."""
    if len(data) >= 4 and data[1] == 0 and data[3] == 0:
        return _utf16(data)
    return _ascii(data)


# -- device paths (UEFI 10.3) -----------------------------------------------------------------
def device_path(raw: bytes) -> str:
    """A UEFI device path as text, node by node (the common nodes by name, others by type)."""
    parts: list[str] = []
    offset = 0
    while offset + 4 <= len(raw) and len(parts) < 32:
        kind, sub, length = raw[offset], raw[offset + 1], _u(raw, offset + 2, "H")
        if length < 4 or offset + length > len(raw):
            parts.append(f"<bad node length {length}>")
            break
        body = raw[offset + 4:offset + length]
        if kind == 0x7F:
            break
        parts.append(_path_node(kind, sub, body))
        offset += length
    return _clip("/".join(parts)) or "(empty)"


def _path_node(kind: int, sub: int, body: bytes) -> str:
    try:
        if kind == 0x01 and sub == 0x01:
            return f"Pci({body[1]:#x},{body[0]:#x})"
        if kind == 0x02 and sub == 0x01:
            hid, uid = _u(body, 0, "I"), _u(body, 4, "I")
            return f"PciRoot({uid:#x})" if hid == 0x0A0341D0 else f"Acpi({hid:#x},{uid:#x})"
        if kind == 0x03 and sub == 0x02:
            return f"Scsi({_u(body, 0, 'H')},{_u(body, 2, 'H')})"
        if kind == 0x03 and sub == 0x12:
            return f"Sata({_u(body, 0, 'H')},{_u(body, 2, 'H')},{_u(body, 4, 'H')})"
        if kind == 0x03 and sub == 0x17:
            return f"NVMe({_u(body, 0, 'I')})"
        if kind == 0x03 and sub == 0x0B:
            return "MAC(" + _take(body, 0, 6).hex() + ")"
        if kind == 0x04 and sub == 0x01:
            number, start, size = _u(body, 0, "I"), _u(body, 4, "Q"), _u(body, 12, "Q")
            signature = str(uuid.UUID(bytes_le=_take(body, 20, 16))) if _take(body, 37, 1)[0] == 2 else _take(body, 20, 4).hex()
            return f"HD({number},{signature},{start:#x},{size:#x})"
        if kind == 0x04 and sub == 0x04:
            return _utf16(body)
        if kind == 0x04 and sub == 0x06:
            return f"FvFile({_guid(body)})"
        if kind == 0x04 and sub == 0x07:
            return f"Fv({_guid(body)})"
    except _Undecodable:
        pass
    return f"Path({kind},{sub},{body[:16].hex()})"


# -- per event type ---------------------------------------------------------------------------
def _variable(data: bytes, authority: bool = False) -> str:
    """UEFI_VARIABLE_DATA: GUID, name length (chars), data length, name (UTF-16), data.
    authority: an EV_EFI_VARIABLE_AUTHORITY event, whose data is the one db entry that admitted
    an image (EFI_SIGNATURE_DATA), not the whole variable."""
    guid, chars, size = _guid(data), _u(data, 16, "Q"), _u(data, 24, "Q")
    if chars > 1024 or size > len(data):
        raise _Undecodable(f"variable name of {chars} chars, data of {size} bytes")
    name = _utf16(_take(data, 32, 2 * chars))
    value = _take(data, 32 + 2 * chars, size)
    shown = f"{name} ({guid}), {size} bytes"
    if name in ("SecureBoot", "AuditMode", "DeployedMode", "MokSBState") and size == 1:
        shown += f": {'enabled' if value[0] else 'disabled'}"
    elif name == "BootOrder" and size % 2 == 0:
        shown += ": " + ",".join(f"Boot{v:04X}" for (v,) in struct.iter_unpack("<H", value[:64]))
    elif name.startswith("Boot") and len(name) == 8 and size >= 6:
        shown += f": {_load_option(value)}"
    elif name in SIGNATURE_DATABASES and authority and size > 16:
        shown += f": {_x509(value[16:])}"
    elif name in SIGNATURE_DATABASES and size:
        try:
            shown += f": {_signature_lists(value)}"
        except (_Undecodable, struct.error, ValueError) as exc:
            shown += f": not a signature list ({exc})"
    return shown


X509_GUID = "a5c059a1-94e4-4aa7-87b5-ab155c2bf072"  # EFI_CERT_X509_GUID
SHA256_GUID = "c1c41626-504c-4092-aca9-41f936934328"  # EFI_CERT_SHA256_GUID
SIGNATURE_DATABASES = ("PK", "KEK", "db", "dbx", "dbt", "dbr", "MokList", "MokListX")
SHOWN_SIGNATURES = 4


def _signature_lists(value: bytes) -> str:
    """EFI_SIGNATURE_LISTs (UEFI 32.4.1): type GUID, list size, header size, entry size, header, then
    entries of owner GUID + data. Says how many entries and what the first few are (certificates
    by subject), so a certificate the host added to db is named."""
    shown: list[str] = []
    count = offset = 0
    while offset < len(value):
        kind = str(uuid.UUID(bytes_le=_take(value, offset, 16)))
        list_size, header_size, size = _u(value, offset + 16, "I"), _u(value, offset + 20, "I"), _u(value, offset + 24, "I")
        if list_size < 28 + header_size or size <= 16:
            raise _Undecodable(f"a signature list of {list_size} bytes with entries of {size}")
        body = _take(value, offset + 28 + header_size, list_size - 28 - header_size)
        for start in range(0, len(body) - size + 1, size):
            count += 1
            if len(shown) < SHOWN_SIGNATURES:
                entry = body[start + 16:start + size]
                shown.append(_x509(entry) if kind == X509_GUID else
                             f"SHA-256 {entry[:8].hex()}..." if kind == SHA256_GUID else f"a {GUIDS.get(kind, kind)} entry")
        offset += list_size
    more = f", and {count - len(shown)} more" if count > len(shown) else ""
    return f"{count} entr{'y' if count == 1 else 'ies'}: " + "; ".join(shown) + more


def _x509(der: bytes) -> str:
    import warnings

    from cryptography import x509

    try:
        with warnings.catch_warnings():  # vendors' certificates bend X.509's rules (a 3-letter country)
            warnings.simplefilter("ignore")
            return "X.509 " + _clip(x509.load_der_x509_certificate(der).subject.rfc4514_string())
    except ValueError:
        return f"not an X.509 certificate ({len(der)} bytes)"


def _load_option(value: bytes) -> str:
    """EFI_LOAD_OPTION: attributes, path length, description (UTF-16, NUL-ended), device path."""
    path_length = _u(value, 4, "H")
    end = next((i for i in range(6, len(value) - 1, 2) if value[i:i + 2] == b"\x00\x00"), len(value))
    description = _utf16(value[6:end])
    return f"{_quoted(description)} at {device_path(value[end + 2:end + 2 + path_length])}"


def _image(data: bytes) -> str:
    """UEFI_IMAGE_LOAD_EVENT: location, length, link-time address, device path length, path."""
    length, path_length = _u(data, 8, "Q"), _u(data, 24, "Q")
    return f"image of {length} bytes from {device_path(_take(data, 32, min(path_length, len(data) - 32)))}"


def _gpt(data: bytes) -> str:
    """UEFI_GPT_DATA: the 92-byte header, a partition count, the non-empty entries."""
    disk = str(uuid.UUID(bytes_le=_take(data, 56, 16)))
    entry_size, count = _u(data, 84, "I"), _u(data, 92, "Q")
    names = []
    for i in range(min(count, 16)):
        entry = _take(data, 100 + i * entry_size, entry_size) if entry_size >= 128 else b""
        names.append(_utf16(entry[56:128]) or "(unnamed)")
    return f"GPT of disk {disk}: {count} partition(s) " + ", ".join(_quoted(n) for n in names)


def _blob(data: bytes) -> str:
    """UEFI_PLATFORM_FIRMWARE_BLOB: base and length of a firmware volume in memory."""
    return f"firmware blob at {_u(data, 0, 'Q'):#x}, {_u(data, 8, 'Q')} bytes"


def _blob2(data: bytes) -> str:
    """UEFI_PLATFORM_FIRMWARE_BLOB2: a described blob."""
    size = _take(data, 0, 1)[0]
    return f"firmware blob {_quoted(_ascii(_take(data, 1, size)))}, {_u(data, 1 + size + 8, 'Q')} bytes"


def _tables(data: bytes) -> str:
    """UEFI_HANDOFF_TABLE_POINTERS: a count, then (GUID, address) per table."""
    count = _u(data, 0, "Q")
    return f"{count} handoff table(s): " + ", ".join(_guid(_take(data, 8 + 24 * i, 16)) for i in range(min(count, 8)))


def _tables2(data: bytes) -> str:
    size = _take(data, 0, 1)[0]
    return f"handoff tables {_quoted(_ascii(_take(data, 1, size)))}"


def _separator(data: bytes) -> str:
    if len(data) == 4:
        value = _u(data, 0, "I")
        return "separator" if value == 0 else f"separator, error value {value:#x}"
    return f"separator with {len(data)} bytes of data"


def _post_code(data: bytes) -> str:
    if len(data) == 16 and not data.isascii():
        return _blob(data)
    return _text(data)


def _crtm_version(data: bytes) -> str:
    if len(data) == 16 and b"\x00\x00" not in data[:-2]:
        return f"S-CRTM version {_guid(data)}"
    return f"S-CRTM version {_quoted(_text(data))}"


def _event_tag(data: bytes) -> str:
    tag, size = _u(data, 0, "I"), _u(data, 4, "I")
    what = EVENT_TAGS.get(tag, f"tag {tag:#x}")
    body = _take(data, 8, min(size, len(data) - 8))
    return f"{what}: {_quoted(_text(body))}" if body else what


def _no_action(data: bytes) -> str:
    """EV_NO_ACTION: what its signature says (PFP 10.4.5); none is ever extended."""
    if data.startswith(b"Spec ID Event"):
        return _ascii(data[:16])
    if data.startswith(b"StartupLocality\x00") and len(data) >= 17:
        return f"StartupLocality {data[16]} (PCR 0 started at {data[16]})"
    if data.startswith(b"SP800-155 Event"):
        return f"{_ascii(data[:16])}: reference integrity manifest information, {len(data)} bytes"
    if data.startswith(b"NvIndexInstance") or data.startswith(b"NvIndexDynamic"):
        return f"{_ascii(data[:16])}: NV index contents, {len(data)} bytes"
    if data.startswith(b"H-CRTM CompMeas"):
        return "H-CRTM component measurement"
    return f"no action, {len(data)} bytes"


DECODERS: dict[int, Callable[[bytes], str]] = {
    EVENT_CODES["EV_EFI_VARIABLE_DRIVER_CONFIG"]: _variable,
    EVENT_CODES["EV_EFI_VARIABLE_BOOT"]: _variable,
    EVENT_CODES["EV_EFI_VARIABLE_BOOT2"]: _variable,
    EVENT_CODES["EV_EFI_VARIABLE_AUTHORITY"]: lambda data: _variable(data, authority=True),
    EVENT_CODES["EV_EFI_BOOT_SERVICES_APPLICATION"]: _image,
    EVENT_CODES["EV_EFI_BOOT_SERVICES_DRIVER"]: _image,
    EVENT_CODES["EV_EFI_RUNTIME_SERVICES_DRIVER"]: _image,
    EVENT_CODES["EV_EFI_GPT_EVENT"]: _gpt,
    EVENT_CODES["EV_EFI_GPT_EVENT2"]: _gpt,
    EVENT_CODES["EV_EFI_PLATFORM_FIRMWARE_BLOB"]: _blob,
    EVENT_CODES["EV_EFI_PLATFORM_FIRMWARE_BLOB2"]: _blob2,
    EVENT_CODES["EV_EFI_HANDOFF_TABLES"]: _tables,
    EVENT_CODES["EV_EFI_HANDOFF_TABLES2"]: _tables2,
    EVENT_CODES["EV_SEPARATOR"]: _separator,
    EVENT_CODES["EV_POST_CODE"]: _post_code,
    EVENT_CODES["EV_S_CRTM_VERSION"]: _crtm_version,
    EVENT_CODES["EV_EVENT_TAG"]: _event_tag,
    EVENT_CODES["EV_NO_ACTION"]: _no_action,
    EVENT_CODES["EV_IPL"]: lambda data: _quoted(_text(data)),
    EVENT_CODES["EV_EFI_ACTION"]: lambda data: _quoted(_ascii(data)),
    EVENT_CODES["EV_ACTION"]: lambda data: _quoted(_ascii(data)),
    EVENT_CODES["EV_COMPACT_HASH"]: lambda data: _quoted(_text(data)),
    EVENT_CODES["EV_EFI_HCRTM_EVENT"]: lambda data: f"H-CRTM {_quoted(_ascii(data))}",
}


def _other(data: bytes) -> str:
    """An event type without a layout of its own: its text if it starts as text (vendors' S-CRTM
    contents, microcode and platform-flag events usually do), else its first bytes."""
    head = data.split(b"\x00", 1)[0]
    if len(head) >= 4 and all(32 <= b < 127 for b in head):
        return _quoted(_ascii(head)) + (f" and {len(data) - len(head)} more bytes" if len(data) > len(head) + 1 else "")
    return f"{len(data)} bytes of data" + (f": {data[:16].hex()}" if data else "")


def describe(event: Event) -> str:
    """One line saying what the event measured; never raises, whatever its data."""
    decoder = DECODERS.get(event.type)
    if decoder is None:
        return _other(event.data)
    try:
        return decoder(event.data)
    except (_Undecodable, struct.error, ValueError, IndexError) as exc:
        return f"undecodable {event.type_name} data ({len(event.data)} bytes: {exc})"


# -- does the event's data show what was hashed? ------------------------------------------------
GRUB_PREFIXES = (b"grub_cmd: ", b"kernel_cmdline: ")


def _h(bank: str, data: bytes) -> bytes:
    from .eventlog import _hash

    return _hash(bank, data).digest()


VARIABLE_EVENTS = ("EV_EFI_VARIABLE_DRIVER_CONFIG", "EV_EFI_VARIABLE_BOOT", "EV_EFI_VARIABLE_BOOT2",
                   "EV_EFI_VARIABLE_AUTHORITY")


def data_digests(event: Event, bank: str) -> list[bytes]:
    """The digests event's own data can imply in bank, where its type says what firmware or the
    boot loader hashed (none: the digest is of something not in the log, a file or memory):
    - EV_SEPARATOR, EV_EFI_ACTION, EV_EFI_GPT_EVENT, EV_S_CRTM_VERSION, EV_COMPACT_HASH: the data;
    - EV_EFI_VARIABLE_*: the whole UEFI_VARIABLE_DATA (PFP 10.4.4), or the variable's value alone
      (edk2 for Boot####, and older firmware for every variable);
    - EV_IPL from GRUB 2.06 in PCR 8 ("grub_cmd: X", "kernel_cmdline: X"): X, without prefix or
      NUL; from systemd-boot/-stub in PCR 12: the UTF-16 command line with its NUL, as logged.
    Each formula is checked on every such event of the corpus (tests/test_eventdecode.py)."""
    name, data = event.type_name, event.data
    if name in ("EV_SEPARATOR", "EV_EFI_ACTION", "EV_EFI_GPT_EVENT", "EV_S_CRTM_VERSION", "EV_COMPACT_HASH"):
        return [_h(bank, data)]
    if name in VARIABLE_EVENTS:
        out = [_h(bank, data)]
        try:
            chars, size = _u(data, 16, "Q"), _u(data, 24, "Q")
            out.append(_h(bank, _take(data, 32 + 2 * chars, size)))
        except (_Undecodable, struct.error):
            pass
        return out
    if name == "EV_IPL" and event.pcr == 8:
        for prefix in GRUB_PREFIXES:
            if data.startswith(prefix):
                return [_h(bank, data[len(prefix):].rstrip(b"\x00"))]
    if name == "EV_IPL" and event.pcr == 12:
        return [_h(bank, data)]
    return []


def data_check(event: Event, bank: str) -> str:
    """'data' when the event's digest is what its data implies; 'not-data' when the data implies
    a digest and this is not it (firmware hashed something other than what it logged: a vendor's
    variant, or a log that says one thing and measured another); '' when the data cannot tell."""
    implied = data_digests(event, bank) if bank in event.digests else []
    if not implied:
        return ""
    return "data" if event.digests[bank] in implied else "not-data"
