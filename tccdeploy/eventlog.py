"""The TCG2 crypto-agile binary event log: parser, replay and writer, in one place.

The log is how a verifier learns *what* was measured into each PCR; the quote only says what
the PCRs hold. The format (TCG PC Client Platform Firmware Profile, section 10) is what Linux
exposes at /sys/kernel/security/tpm0/binary_bios_measurements:

- a first event in the old SHA-1 format (TCG_PCR_EVENT) of type EV_NO_ACTION whose data is the
  "Spec ID Event03" structure, listing the hash algorithms (banks) and their digest sizes;
- then TCG_PCR_EVENT2 records: PCR index, event type, a digest per bank, event data.

The log is evidence from an untrusted node, so the parser bounds-checks every length and raises
EventLogError (with the byte offset) on anything malformed; it never trusts a size field.
Replay extends PCR = H(PCR || digest) per bank, skipping EV_NO_ACTION (PFP 10.4.1: those are
never extended), and starts PCR 0 where the TPM started it: at the locality of a StartupLocality
EV_NO_ACTION logged in PCR 0 before PCR 0's first extend (0 or 3; TPM2_Startup from locality 3
leaves 00..03), or at 00..04 when that first extend is an H-CRTM event (EV_EFI_HCRTM_EVENT: the
TPM resets PCR 0 to 00..04 before _TPM_Hash_End extends the H-CRTM's digest). tpm2-tools 5.4
does neither (tests/test_eventlog_corpus.py shows where real machines prove it wrong).
"""

from __future__ import annotations

import hashlib
import struct
from dataclasses import dataclass, field

# TPM_ALG_ID -> (name, digest size)
ALGORITHMS: dict[int, tuple[str, int]] = {
    0x0004: ("sha1", 20),
    0x000B: ("sha256", 32),
    0x000C: ("sha384", 48),
    0x000D: ("sha512", 64),
    0x0012: ("sm3_256", 32),
}
ALG_BY_NAME: dict[str, int] = {name: alg for alg, (name, _) in ALGORITHMS.items()}
HASHLIB_NAMES = {"sm3_256": "sm3"}  # the TCG's bank names where hashlib (OpenSSL) spells them otherwise


def _hash(bank: str, data: bytes = b"") -> hashlib._Hash:
    return hashlib.new(HASHLIB_NAMES.get(bank, bank), data)

EV_NO_ACTION = 0x00000003
EV_EFI_HCRTM_EVENT = 0x80000010
EVENT_TYPES: dict[int, str] = {
    0x00000000: "EV_PREBOOT_CERT",
    0x00000001: "EV_POST_CODE",
    0x00000002: "EV_UNUSED",
    0x00000003: "EV_NO_ACTION",
    0x00000004: "EV_SEPARATOR",
    0x00000005: "EV_ACTION",
    0x00000006: "EV_EVENT_TAG",
    0x00000007: "EV_S_CRTM_CONTENTS",
    0x00000008: "EV_S_CRTM_VERSION",
    0x00000009: "EV_CPU_MICROCODE",
    0x0000000A: "EV_PLATFORM_CONFIG_FLAGS",
    0x0000000B: "EV_TABLE_OF_DEVICES",
    0x0000000C: "EV_COMPACT_HASH",
    0x0000000D: "EV_IPL",
    0x0000000E: "EV_IPL_PARTITION_DATA",
    0x0000000F: "EV_NONHOST_CODE",
    0x00000010: "EV_NONHOST_CONFIG",
    0x00000011: "EV_NONHOST_INFO",
    0x00000012: "EV_OMIT_BOOT_DEVICE_EVENTS",
    0x00000013: "EV_POST_CODE2",
    0x80000000: "EV_EFI_EVENT_BASE",
    0x80000001: "EV_EFI_VARIABLE_DRIVER_CONFIG",
    0x80000002: "EV_EFI_VARIABLE_BOOT",
    0x80000003: "EV_EFI_BOOT_SERVICES_APPLICATION",
    0x80000004: "EV_EFI_BOOT_SERVICES_DRIVER",
    0x80000005: "EV_EFI_RUNTIME_SERVICES_DRIVER",
    0x80000006: "EV_EFI_GPT_EVENT",
    0x80000007: "EV_EFI_ACTION",
    0x80000008: "EV_EFI_PLATFORM_FIRMWARE_BLOB",
    0x80000009: "EV_EFI_HANDOFF_TABLES",
    0x8000000A: "EV_EFI_PLATFORM_FIRMWARE_BLOB2",
    0x8000000B: "EV_EFI_HANDOFF_TABLES2",
    0x8000000C: "EV_EFI_VARIABLE_BOOT2",
    0x8000000D: "EV_EFI_GPT_EVENT2",
    0x80000010: "EV_EFI_HCRTM_EVENT",
    0x800000E0: "EV_EFI_VARIABLE_AUTHORITY",
    0x800000E1: "EV_EFI_SPDM_FIRMWARE_BLOB",
    0x800000E2: "EV_EFI_SPDM_FIRMWARE_CONFIG",
}
EVENT_CODES: dict[str, int] = {name: code for code, name in EVENT_TYPES.items()}

SPEC_ID_SIGNATURE = b"Spec ID Event03\x00"
STARTUP_LOCALITY_SIGNATURE = b"StartupLocality\x00"
MAX_LOG_BYTES = 16 * 1024 * 1024
MAX_EVENT_DATA = 1024 * 1024
NUM_PCRS = 24


class EventLogError(ValueError):
    """A malformed event log; `offset` is where in the bytes it went wrong."""

    def __init__(self, message: str, offset: int = 0):
        super().__init__(f"{message} (at byte {offset})")
        self.offset = offset


class MissingBank(EventLogError):
    """A well-formed log that cannot be replayed in this bank: an event that extends a PCR carries
    no digest for it (firmware that declares more banks than it measures into, as tpm2_eventlog
    reads them). The other banks replay; a policy on this one cannot be judged from the log."""


@dataclass(frozen=True)
class Event:
    pcr: int
    type: int
    digests: dict[str, bytes]
    data: bytes
    offset: int = 0

    @property
    def type_name(self) -> str:
        return EVENT_TYPES.get(self.type, f"0x{self.type:08x}")


@dataclass
class EventLog:
    algorithms: dict[str, int]  # bank name -> digest size, from the Spec ID event
    events: list[Event] = field(default_factory=list)  # after the Spec ID event
    startup_locality: int = 0
    spec_version: tuple[int, int, int] = (2, 0, 0)
    uintn_size: int = 2
    platform_class: int = 0
    # declared banks some extending event lacks, each with the first such event's offset
    incomplete: dict[str, int] = field(default_factory=dict)
    pcr0_extended: bool = False  # PCR 0's first extend is logged: its starting value is settled

    @property
    def banks(self) -> list[str]:
        """The banks the log can be replayed in: declared, of a hash tccdeploy knows, and carried by
        every event that extends."""
        return [bank for bank in self.algorithms if bank in ALG_BY_NAME and bank not in self.incomplete]


    def replay(self, bank: str, pcrs: list[int] | None = None) -> dict[int, bytes]:
        """The PCR values this log implies, for every PCR an event touched (or those asked)."""
        if bank not in self.algorithms:
            raise MissingBank(f"the log has no {bank} digests (banks: {', '.join(self.algorithms)})")
        if bank not in ALG_BY_NAME:
            raise MissingBank(f"the log's {bank} bank cannot be replayed: its hash algorithm is not one tccdeploy knows")
        lacking = self.incomplete.get(bank)
        if lacking is not None:
            raise MissingBank(f"the log declares {bank} but an event extends a PCR without a {bank} digest", lacking)
        size = self.algorithms[bank]
        values: dict[int, bytes] = {}
        for event in self.events:
            if event.type == EV_NO_ACTION:
                continue
            current = values.get(event.pcr)
            if current is None:
                current = _initial(event.pcr, size, self.startup_locality)
            values[event.pcr] = _hash(bank, current + event.digests[bank]).digest()
        if pcrs is not None:
            return {p: values.get(p, _initial(p, size, self.startup_locality)) for p in pcrs}
        return values


def _initial(pcr: int, size: int, locality: int) -> bytes:
    if pcr == 0:
        return bytes(size - 1) + bytes([locality])
    if 17 <= pcr <= 22:
        return b"\xff" * size  # dynamic-launch PCRs start at all ones
    return bytes(size)


class _Reader:
    __slots__ = ("raw", "pos")

    def __init__(self, raw: bytes):
        self.raw = raw
        self.pos = 0

    def take(self, n: int, what: str) -> bytes:
        if n < 0 or self.pos + n > len(self.raw):
            raise EventLogError(f"truncated: {what} needs {n} bytes, {len(self.raw) - self.pos} left", self.pos)
        out = self.raw[self.pos:self.pos + n]
        self.pos += n
        return out

    def u8(self, what: str) -> int:
        return self.take(1, what)[0]

    def u16(self, what: str) -> int:
        return struct.unpack("<H", self.take(2, what))[0]

    def u32(self, what: str) -> int:
        return struct.unpack("<I", self.take(4, what))[0]

    @property
    def left(self) -> int:
        return len(self.raw) - self.pos


def parse(raw: bytes) -> EventLog:
    """Parse a TCG event log: crypto-agile (a Spec ID Event03 first) or, failing that, the SHA-1
    format of TPM 1.2 firmware; raise EventLogError on anything malformed."""
    if len(raw) > MAX_LOG_BYTES:
        raise EventLogError(f"log is {len(raw)} bytes; at most {MAX_LOG_BYTES} are accepted")
    r = _Reader(raw)
    # TCG_PCR_EVENT (SHA-1 format): the Spec ID event of a crypto-agile log, or a SHA-1 log's first event.
    pcr = r.u32("first event PCR index")
    event_type = r.u32("first event type")
    r.take(20, "first event SHA-1 digest")
    size = r.u32("first event size")
    start = r.pos
    if not (pcr == 0 and event_type == EV_NO_ACTION and r.left >= 16 and raw[start:start + 16] == SPEC_ID_SIGNATURE):
        return _parse_sha1(raw)
    if size < 29 or size > r.left:
        raise EventLogError(f"Spec ID event size {size} is impossible", start - 4)
    spec = _Reader(r.take(size, "Spec ID event"))
    if spec.take(16, "signature") != SPEC_ID_SIGNATURE:
        raise EventLogError("Spec ID event signature is not 'Spec ID Event03' (a SHA-1-only log?)", start)
    platform_class = spec.u32("platformClass")
    minor, major, errata = spec.u8("specVersionMinor"), spec.u8("specVersionMajor"), spec.u8("specErrata")
    uintn = spec.u8("uintnSize")
    count = spec.u32("numberOfAlgorithms")
    if count == 0 or count > 16:
        raise EventLogError(f"Spec ID event lists {count} algorithms", start + 24)
    algorithms: dict[str, int] = {}
    sizes_by_id: dict[int, tuple[str, int]] = {}
    for _ in range(count):
        alg, digest_size = spec.u16("algorithmId"), spec.u16("digestSize")
        known = ALGORITHMS.get(alg)
        name = known[0] if known else f"alg_0x{alg:04x}"
        if known and known[1] != digest_size:
            raise EventLogError(f"{name} digest size {digest_size} in the Spec ID event, expected {known[1]}", start)
        if digest_size == 0 or digest_size > 64:
            raise EventLogError(f"digest size {digest_size} for algorithm 0x{alg:04x}", start)
        algorithms[name] = digest_size
        sizes_by_id[alg] = (name, digest_size)
    vendor_size = spec.u8("vendorInfoSize")
    spec.take(vendor_size, "vendorInfo")
    log = EventLog(algorithms, [], 0, (major, minor, errata), uintn, platform_class)

    # The event loop is the hot path of verification (a real log has 100+ events): offsets
    # and struct.unpack_from directly, each length checked before it is used.
    data, pos, end = raw, r.pos, len(raw)
    unpack = struct.unpack_from
    while pos < end:
        offset = pos
        if pos + 12 > end:
            raise EventLogError(f"truncated: event header needs 12 bytes, {end - pos} left", pos)
        pcr, event_type, digest_count = unpack("<III", data, pos)
        pos += 12
        if pcr >= NUM_PCRS and event_type != EV_NO_ACTION:
            raise EventLogError(f"PCR index {pcr} out of range", offset)
        if digest_count > len(sizes_by_id):
            raise EventLogError(f"event has {digest_count} digests; the log declares {len(sizes_by_id)} banks", offset + 8)
        digests: dict[str, bytes] = {}
        for _ in range(digest_count):
            if pos + 2 > end:
                raise EventLogError("truncated: digest algorithm needs 2 bytes", pos)
            (alg,) = unpack("<H", data, pos)
            pos += 2
            known = sizes_by_id.get(alg)
            if known is None:
                raise EventLogError(f"digest algorithm 0x{alg:04x} is not declared in the Spec ID event", pos - 2)
            name, digest_size = known
            if name in digests:
                raise EventLogError(f"two {name} digests in one event", pos - 2)
            if pos + digest_size > end:
                raise EventLogError(f"truncated: {name} digest needs {digest_size} bytes, {end - pos} left", pos)
            digests[name] = data[pos:pos + digest_size]
            pos += digest_size
        if pos + 4 > end:
            raise EventLogError("truncated: event size needs 4 bytes", pos)
        (data_size,) = unpack("<I", data, pos)
        pos += 4
        event_data = _event_data(data, pos, end, data_size)
        pos += data_size
        if event_type != EV_NO_ACTION and len(digests) != len(algorithms):
            for bank in algorithms:
                if bank not in digests:
                    log.incomplete.setdefault(bank, offset)
        _add(log, Event(pcr, event_type, digests, event_data, offset))
    return log


def _event_data(data: bytes, pos: int, end: int, size: int) -> bytes:
    """An event's data of size bytes at pos (just after its size field), bounds checked."""
    if size > MAX_EVENT_DATA:
        raise EventLogError(f"event data of {size} bytes", pos - 4)
    if pos + size > end:
        raise EventLogError(f"truncated: event data needs {size} bytes, {end - pos} left", pos)
    return data[pos:pos + size]


def _add(log: EventLog, event: Event) -> None:
    """Append event, settling PCR 0's starting value from the events before its first extend."""
    if event.pcr == 0 and not log.pcr0_extended:
        if event.type == EV_NO_ACTION:
            if event.data.startswith(STARTUP_LOCALITY_SIGNATURE) and len(event.data) >= 17:
                log.startup_locality = event.data[16]
        else:
            log.pcr0_extended = True
            if event.type == EV_EFI_HCRTM_EVENT:
                log.startup_locality = 4
    log.events.append(event)


def _parse_sha1(raw: bytes) -> EventLog:
    """The SHA-1 log format (TCG PC Client for TPM 1.2 / TCG_PCR_EVENT throughout): each event a
    PCR index, a type, one SHA-1 digest and its data. Still written by much firmware, and by
    Windows on some clouds; it replays in the sha1 bank only."""
    log = EventLog({"sha1": 20}, [], 0, (1, 2, 0), 2, 0)
    data, pos, end = raw, 0, len(raw)
    unpack = struct.unpack_from
    while pos < end:
        offset = pos
        if pos + 32 > end:
            raise EventLogError(f"truncated: SHA-1 event header needs 32 bytes, {end - pos} left", pos)
        pcr, event_type = unpack("<II", data, pos)
        digest = data[pos + 8:pos + 28]
        (data_size,) = unpack("<I", data, pos + 28)
        pos += 32
        if pcr >= NUM_PCRS and event_type != EV_NO_ACTION:
            raise EventLogError(f"PCR index {pcr} out of range", offset)
        event_data = _event_data(data, pos, end, data_size)
        pos += data_size
        _add(log, Event(pcr, event_type, {"sha1": digest}, event_data, offset))
    return log


def parse_file(path: str) -> EventLog:
    with open(path, "rb") as fh:
        raw = fh.read(MAX_LOG_BYTES + 1)
    return parse(raw)


class EventLogWriter:
    """Builds a crypto-agile log; the lab uses it to write what its boot measured."""

    def __init__(self, banks: list[str]):
        for bank in banks:
            if bank not in ALG_BY_NAME:
                raise ValueError(f"unknown bank {bank}")
        self.banks = list(banks)
        self._events: list[bytes] = []

    def digests_of(self, measured: bytes) -> dict[str, bytes]:
        return {bank: _hash(bank, measured).digest() for bank in self.banks}

    def add(self, pcr: int, event_type: str | int, measured: bytes, data: bytes | None = None) -> dict[str, bytes]:
        """Record a measurement of `measured` (its digests go in the log); returns the digests."""
        digests = self.digests_of(measured)
        self.add_digests(pcr, event_type, digests, measured if data is None else data)
        return digests

    def add_digests(self, pcr: int, event_type: str | int, digests: dict[str, bytes], data: bytes) -> None:
        code = EVENT_CODES[event_type] if isinstance(event_type, str) else event_type
        body = struct.pack("<III", pcr, code, len(self.banks))
        for bank in self.banks:
            body += struct.pack("<H", ALG_BY_NAME[bank]) + digests[bank]
        body += struct.pack("<I", len(data)) + data
        self._events.append(body)

    def header(self) -> bytes:
        spec = SPEC_ID_SIGNATURE + struct.pack("<IBBBBI", 0, 0, 2, 0, 2, len(self.banks))
        for bank in self.banks:
            alg = ALG_BY_NAME[bank]
            spec += struct.pack("<HH", alg, ALGORITHMS[alg][1])
        spec += b"\x00"  # vendorInfoSize
        return struct.pack("<II", 0, EV_NO_ACTION) + bytes(20) + struct.pack("<I", len(spec)) + spec

    def to_bytes(self) -> bytes:
        return self.header() + b"".join(self._events)


def image_load_event(length: int) -> bytes:
    """A UEFI_IMAGE_LOAD_EVENT with an empty device path, as firmware logs for boot applications."""
    end_of_path = b"\x7f\xff\x04\x00"
    return struct.pack("<QQQQ", 0, length, 0, len(end_of_path)) + end_of_path
