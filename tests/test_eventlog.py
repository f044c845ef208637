"""The TCG2 event log parser and writer: real machines' logs, round trips, and hostile input."""

from __future__ import annotations

import hashlib
import struct

import pytest
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st

from tccdeploy.eventlog import EventLogError, EventLogWriter, image_load_event, parse, parse_file

VECTORS = ("event-arch-linux", "event-gce-ubuntu-2104-log", "event-sd-boot-fedora37")


def _expected_pcrs(yaml_path) -> dict[str, dict[int, str]]:
    document = yaml.safe_load(yaml_path.read_text())
    return {bank: dict(values.items()) for bank, values in document["pcrs"].items()}


@pytest.mark.parametrize("name", VECTORS)
def test_real_machine_logs_replay_to_tpm2_eventlog_pcrs_in_every_bank(shared_vectors, name: str):
    folder = shared_vectors / "eventlogs"
    log = parse_file(str(folder / f"{name}.bin"))
    expected = _expected_pcrs(folder / f"{name}.tpm2_eventlog.yaml")
    assert set(expected) == set(log.banks)
    for bank, pcrs in expected.items():
        replayed = log.replay(bank)
        size = log.algorithms[bank]
        assert set(replayed) == set(pcrs), bank
        for index, value in pcrs.items():
            assert replayed[index].hex() == f"{value:0{size * 2}x}", f"{name} {bank} PCR {index}"


@pytest.mark.parametrize("name", VECTORS)
def test_real_machine_logs_have_the_events_tpm2_eventlog_lists(shared_vectors, name: str):
    folder = shared_vectors / "eventlogs"
    log = parse_file(str(folder / f"{name}.bin"))
    listed = yaml.safe_load((folder / f"{name}.tpm2_eventlog.yaml").read_text())["events"]
    assert len(listed) == len(log.events) + 1  # tpm2_eventlog also lists the Spec ID event
    for event, entry in zip(log.events, listed[1:], strict=True):
        assert event.pcr == entry["PCRIndex"] and event.type_name == entry["EventType"]
        for digest in entry.get("Digests", []):
            assert event.digests[digest["AlgorithmId"]].hex() == digest["Digest"]


def _sample_log() -> tuple[bytes, dict[int, bytes]]:
    writer = EventLogWriter(["sha1", "sha256"])
    expected: dict[int, bytes] = {}
    for pcr, event_type, measured, data in [
        (0, "EV_POST_CODE", b"firmware", b"firmware"),
        (0, "EV_SEPARATOR", b"\0\0\0\0", b"\0\0\0\0"),
        (4, "EV_EFI_BOOT_SERVICES_APPLICATION", b"kernel", image_load_event(6)),
        (8, "EV_IPL", b"console=ttyS0", b"console=ttyS0\0"),
    ]:
        digest = writer.add(pcr, event_type, measured, data)["sha256"]
        expected[pcr] = hashlib.sha256(expected.get(pcr, bytes(32)) + digest).digest()
    return writer.to_bytes(), expected


def test_writer_and_parser_round_trip():
    raw, expected = _sample_log()
    log = parse(raw)
    assert log.banks == ["sha1", "sha256"]
    assert [e.type_name for e in log.events] == ["EV_POST_CODE", "EV_SEPARATOR", "EV_EFI_BOOT_SERVICES_APPLICATION", "EV_IPL"]
    assert log.replay("sha256") == expected
    assert log.replay("sha256", [0, 7])[7] == bytes(32)


def test_startup_locality_sets_pcr0_start_value():
    writer = EventLogWriter(["sha256"])
    writer.add_digests(0, "EV_NO_ACTION", {"sha256": bytes(32)}, b"StartupLocality\x00\x03")
    digest = writer.add(0, "EV_POST_CODE", b"x")["sha256"]
    log = parse(writer.to_bytes())
    assert log.startup_locality == 3
    assert log.replay("sha256")[0] == hashlib.sha256(bytes(31) + b"\x03" + digest).digest()


@pytest.mark.parametrize("cut", [1, 7, 30, 60, 100])
def test_truncated_log_is_rejected_with_offset(cut: int):
    raw, _ = _sample_log()
    with pytest.raises(EventLogError) as info:
        parse(raw[:-cut])
    assert "truncated" in str(info.value) or "byte" in str(info.value)


def test_an_event_missing_a_declared_bank_leaves_that_bank_unreplayable_and_the_others_whole():
    """As firmware writes it (and tpm2_eventlog reads it): a Spec ID event declaring sha1 and
    sha256 whose events carry sha1 only. The sha1 bank replays; sha256 is a named failure."""
    from tccdeploy.eventlog import MissingBank

    raw = spec_id() + event(pcr=0, digests=[(0x0004, hashlib.sha1(b"fw").digest())]) + event(pcr=4)
    log = parse(raw)
    assert log.banks == ["sha1"] and log.incomplete == {"sha256": len(spec_id())}
    assert log.replay("sha1")[0] == hashlib.sha1(bytes(20) + hashlib.sha1(b"fw").digest()).digest()
    with pytest.raises(MissingBank) as info:
        log.replay("sha256")
    assert info.value.offset == len(spec_id())
    assert "declares sha256 but an event extends a PCR without a sha256 digest" in str(info.value)


def test_undeclared_algorithm_is_rejected():
    raw, _ = _sample_log()
    header_len = len(EventLogWriter(["sha1", "sha256"]).header())
    bad = bytearray(raw)
    struct.pack_into("<H", bad, header_len + 12, 0x000C)  # sha384, not in the Spec ID event
    with pytest.raises(EventLogError, match="not declared"):
        parse(bytes(bad))


def test_a_log_without_a_spec_id_event_is_read_as_a_sha1_log():
    """The SHA-1 format of TPM 1.2 firmware (TCG_PCR_EVENT throughout): one SHA-1 digest per event."""
    fw, kernel = hashlib.sha1(b"fw").digest(), hashlib.sha1(b"kernel").digest()
    raw = struct.pack("<II", 0, 3) + bytes(20) + struct.pack("<I", 17) + b"StartupLocality\x00\x03"
    raw += struct.pack("<II", 0, 8) + fw + struct.pack("<I", 4) + b"abcd"
    raw += struct.pack("<II", 4, 0x80000003) + kernel + struct.pack("<I", 0)
    log = parse(raw)
    assert log.banks == ["sha1"] and [e.pcr for e in log.events] == [0, 0, 4] and log.startup_locality == 3
    assert log.events[1].data == b"abcd" and log.events[2].type_name == "EV_EFI_BOOT_SERVICES_APPLICATION"
    assert log.replay("sha1") == {0: hashlib.sha1(bytes(19) + b"\x03" + fw).digest(),
                                  4: hashlib.sha1(bytes(20) + kernel).digest()}
    from tccdeploy.eventlog import MissingBank

    with pytest.raises(MissingBank, match=r"the log has no sha256 digests \(banks: sha1\)"):
        log.replay("sha256")


@pytest.mark.parametrize("raw, message", [
    (struct.pack("<II", 0, 8) + bytes(20) + struct.pack("<I", 4) + b"abc", "truncated: event data needs 4 bytes, 3 left (at byte 32)"),
    (struct.pack("<II", 0, 8) + bytes(20) + struct.pack("<I", 0) + b"\0" * 31, "truncated: SHA-1 event header needs 32 bytes, 31 left (at byte 32)"),
    (struct.pack("<II", 24, 8) + bytes(20) + struct.pack("<I", 0), "PCR index 24 out of range (at byte 0)"),
    (struct.pack("<II", 0, 8) + bytes(20) + struct.pack("<I", (1 << 20) + 1), "event data of 1048577 bytes (at byte 28)"),
])
def test_a_sha1_log_is_bounded_like_any_other(raw, message):
    with pytest.raises(EventLogError) as info:
        parse(raw)
    assert str(info.value) == message


def test_huge_size_fields_are_rejected_not_allocated():
    raw, _ = _sample_log()
    header_len = len(EventLogWriter(["sha1", "sha256"]).header())
    bad = bytearray(raw)
    size_at = header_len + 12 + 2 + 20 + 2 + 32
    struct.pack_into("<I", bad, size_at, 0xFFFFFFF0)
    with pytest.raises(EventLogError):
        parse(bytes(bad))


@settings(max_examples=400, deadline=None)
@given(st.binary(max_size=400))
def test_random_bytes_are_rejected_cleanly(data: bytes):
    try:
        parse(data)
    except EventLogError:
        pass


@settings(max_examples=400, deadline=None)
@given(st.data())
def test_mutated_logs_parse_or_are_rejected_cleanly(data):
    raw, _ = _sample_log()
    mutated = bytearray(raw)
    for _ in range(data.draw(st.integers(1, 4))):
        position = data.draw(st.integers(0, len(mutated) - 1))
        mutated[position] = data.draw(st.integers(0, 255))
    cut = data.draw(st.integers(0, len(mutated)))
    try:
        log = parse(bytes(mutated[:cut]))
    except EventLogError:
        return
    for bank in log.banks:
        if bank in ("sha1", "sha256", "sha384", "sha512"):
            log.replay(bank)


# -- every bound and refusal of the parser, exactly ----------------------------------------------
from tccdeploy import eventlog  # noqa: E402


def spec_id(algorithms: list[tuple[int, int]] | None = None, signature: bytes = eventlog.SPEC_ID_SIGNATURE,
            vendor: bytes = b"", platform: int = 1, version: tuple[int, int, int] = (2, 0, 0), uintn: int = 2) -> bytes:
    algorithms = [(0x0004, 20), (0x000B, 32)] if algorithms is None else algorithms
    major, minor, errata = version
    body = signature + struct.pack("<IBBBBI", platform, minor, major, errata, uintn, len(algorithms))
    body += b"".join(struct.pack("<HH", alg, size) for alg, size in algorithms) + bytes([len(vendor)]) + vendor
    return struct.pack("<II", 0, eventlog.EV_NO_ACTION) + bytes(20) + struct.pack("<I", len(body)) + body


def event(pcr: int = 0, kind: int = 1, digests: list[tuple[int, bytes]] | None = None, data: bytes = b"x",
          size: int | None = None) -> bytes:
    digests = [(0x0004, bytes(20)), (0x000B, bytes(32))] if digests is None else digests
    body = struct.pack("<III", pcr, kind, len(digests)) + b"".join(struct.pack("<H", a) + d for a, d in digests)
    return body + struct.pack("<I", len(data) if size is None else size) + data


def why(raw: bytes) -> str:
    with pytest.raises(EventLogError) as info:
        parse(raw)
    return str(info.value)


def test_the_spec_id_event_reads_back():
    log = parse(spec_id(vendor=b"abc", platform=7, version=(2, 1, 3), uintn=1) + event())
    assert (log.platform_class, log.spec_version, log.uintn_size) == (7, (2, 1, 3), 1)
    assert log.algorithms == {"sha1": 20, "sha256": 32} and len(log.events) == 1


def test_pcrs_0_to_23_are_taken_and_24_is_not_except_for_no_action_events():
    assert parse(spec_id() + event(pcr=23)).events[0].pcr == 23
    assert why(spec_id() + event(pcr=24)) == f"PCR index 24 out of range (at byte {len(spec_id())})"
    assert parse(spec_id() + event(pcr=0xFFFFFFFF, kind=eventlog.EV_NO_ACTION)).events[0].pcr == 0xFFFFFFFF


def test_event_data_is_taken_up_to_one_mib_and_not_a_byte_more():
    assert len(parse(spec_id() + event(data=bytes(eventlog.MAX_EVENT_DATA))).events[0].data) == eventlog.MAX_EVENT_DATA
    offset = len(spec_id()) + 12 + 2 + 20 + 2 + 32
    assert why(spec_id() + event(data=b"", size=eventlog.MAX_EVENT_DATA + 1)) == f"event data of 1048577 bytes (at byte {offset})"
    assert why(spec_id() + event(data=b"ab", size=3)) == f"truncated: event data needs 3 bytes, 2 left (at byte {offset + 4})"


def test_a_log_is_taken_up_to_16_mib_and_not_a_byte_more(tmp_path):
    too_big = b"\0" * (eventlog.MAX_LOG_BYTES + 1)
    assert why(too_big) == f"log is {eventlog.MAX_LOG_BYTES + 1} bytes; at most {eventlog.MAX_LOG_BYTES} are accepted (at byte 0)"
    just = spec_id()
    while eventlog.MAX_LOG_BYTES - len(just) > 16:  # events of up to 1 MiB of data each, to 16 MiB exactly
        just += event(kind=eventlog.EV_NO_ACTION, digests=[],
                      data=bytes(min(eventlog.MAX_EVENT_DATA, eventlog.MAX_LOG_BYTES - len(just) - 16)))
    assert len(just) == eventlog.MAX_LOG_BYTES
    assert len(parse(just).events) == 16
    (tmp_path / "big.bin").write_bytes(too_big + b"more")
    with pytest.raises(EventLogError, match="at most"):
        parse_file(str(tmp_path / "big.bin"))


@pytest.mark.parametrize("raw, message", [
    (struct.pack("<II", 0, eventlog.EV_NO_ACTION) + bytes(20) + struct.pack("<I", 28) + eventlog.SPEC_ID_SIGNATURE + bytes(12),
     "Spec ID event size 28 is impossible (at byte 28)"),
    (struct.pack("<II", 0, eventlog.EV_NO_ACTION) + bytes(20) + struct.pack("<I", 40) + eventlog.SPEC_ID_SIGNATURE + bytes(23),
     "Spec ID event size 40 is impossible (at byte 28)"),
    (spec_id([]), "Spec ID event lists 0 algorithms (at byte 56)"),
    (spec_id([(0x0100 + i, 32) for i in range(17)]), "Spec ID event lists 17 algorithms (at byte 56)"),
    (spec_id([(0x000B, 20)]), "sha256 digest size 20 in the Spec ID event, expected 32 (at byte 32)"),
    (spec_id([(0x0099, 0)]), "digest size 0 for algorithm 0x0099 (at byte 32)"),
    (spec_id([(0x0099, 65)]), "digest size 65 for algorithm 0x0099 (at byte 32)"),
])
def test_a_spec_id_event_that_cannot_be_right_is_refused(raw, message):
    """A first event that carries the Spec ID Event03 signature is a crypto-agile log's, checked as one."""
    assert why(raw) == message


def test_sixteen_algorithms_of_up_to_64_bytes_are_taken():
    algorithms = [(0x0100 + i, 64 if i == 0 else 1) for i in range(16)]
    log = parse(spec_id(algorithms) + event(digests=[(a, bytes(s)) for a, s in algorithms]))
    assert log.algorithms["alg_0x0100"] == 64 and len(log.algorithms) == 16


def test_each_events_digests_are_checked_against_the_spec_id_event():
    at = len(spec_id())
    assert why(spec_id() + event(digests=[(0x0004, bytes(20)), (0x000B, bytes(32)), (0x000B, bytes(32))])) == \
        f"event has 3 digests; the log declares 2 banks (at byte {at + 8})"
    assert why(spec_id() + event(digests=[(0x0004, bytes(20)), (0x0004, bytes(20))])) == \
        f"two sha1 digests in one event (at byte {at + 12 + 22})"
    assert parse(spec_id() + event(digests=[(0x0004, bytes(20))])).incomplete == {"sha256": at}
    assert parse(spec_id() + event(digests=[])).banks == []
    assert parse(spec_id() + event(kind=eventlog.EV_NO_ACTION, digests=[(0x0004, bytes(20))])).events[0].digests == \
        {"sha1": bytes(20)}  # an EV_NO_ACTION event extends nothing: it may carry fewer digests
    assert why(spec_id() + event()[:12] + b"\x04") == f"truncated: digest algorithm needs 2 bytes (at byte {at + 12})"
    assert why(spec_id() + event()[:20]) == f"truncated: sha1 digest needs 20 bytes, 6 left (at byte {at + 14})"
    assert why(spec_id() + event()[:70]) == f"truncated: event size needs 4 bytes (at byte {at + 12 + 22 + 34})"
    assert why(spec_id() + event()[:11]) == f"truncated: event header needs 12 bytes, 11 left (at byte {at})"


def test_startup_locality_needs_its_whole_event_and_pcr0_alone_starts_from_it():
    short = event(kind=eventlog.EV_NO_ACTION, digests=[], data=eventlog.STARTUP_LOCALITY_SIGNATURE)
    assert parse(spec_id() + short).startup_locality == 0
    four = event(kind=eventlog.EV_NO_ACTION, digests=[], data=eventlog.STARTUP_LOCALITY_SIGNATURE + b"\x04")
    log = parse(spec_id() + four + event(pcr=0) + event(pcr=16) + event(pcr=17) + event(pcr=22) + event(pcr=23))
    assert log.startup_locality == 4
    values = log.replay("sha256")
    assert values[0] == hashlib.sha256(bytes(31) + b"\x04" + bytes(32)).digest()
    assert values[16] == values[23] == hashlib.sha256(bytes(64)).digest()
    assert values[17] == values[22] == hashlib.sha256(b"\xff" * 32 + bytes(32)).digest()
    assert log.replay("sha1", [0, 5, 18]) == {0: hashlib.sha1(bytes(19) + b"\x04" + bytes(20)).digest(), 5: bytes(20),
                                              18: b"\xff" * 20}
    with pytest.raises(EventLogError, match=r"the log has no sha384 digests \(banks: sha1, sha256\)"):
        log.replay("sha384")


def test_only_a_startup_locality_in_pcr_0_before_its_first_extend_counts():
    """PFP 10.4.5.3: the locality PCR 0 was started from; logged after PCR 0's first extend, or in
    another PCR, it describes nothing the TPM did, and a log cannot move PCR 0's start with it."""
    def locality(n: int, pcr: int = 0) -> bytes:
        return event(pcr=pcr, kind=eventlog.EV_NO_ACTION, digests=[], data=eventlog.STARTUP_LOCALITY_SIGNATURE + bytes([n]))

    assert parse(spec_id() + locality(3) + event(pcr=0)).startup_locality == 3
    assert parse(spec_id() + event(pcr=4) + locality(3) + event(pcr=0)).startup_locality == 3  # PCR 4 first: still before
    late = parse(spec_id() + event(pcr=0) + locality(3))
    assert late.startup_locality == 0 and late.replay("sha256")[0] == hashlib.sha256(bytes(64)).digest()
    assert parse(spec_id() + locality(3, pcr=1) + event(pcr=0)).startup_locality == 0
    assert parse(spec_id() + locality(3) + locality(0) + event(pcr=0)).startup_locality == 0  # the last one before


def test_an_h_crtm_event_as_pcr_0s_first_extend_starts_pcr_0_at_4():
    """The TPM resets PCR 0 to 00..04 for an H-CRTM (_TPM_Hash_Start) and extends its digest; the
    log's EV_EFI_HCRTM_EVENT is that extend. Anywhere else it starts nothing."""
    hcrtm = event(pcr=0, kind=eventlog.EV_EFI_HCRTM_EVENT, data=b"HCRTM")
    log = parse(spec_id() + hcrtm + event(pcr=0))
    assert log.startup_locality == 4 and log.pcr0_extended
    first = hashlib.sha256(bytes(31) + b"\x04" + log.events[0].digests["sha256"]).digest()
    assert log.replay("sha256")[0] == hashlib.sha256(first + log.events[1].digests["sha256"]).digest()
    assert parse(spec_id() + event(pcr=0) + hcrtm).startup_locality == 0
    assert parse(spec_id() + event(pcr=1, kind=eventlog.EV_EFI_HCRTM_EVENT)).startup_locality == 0


def test_the_writer_takes_only_banks_it_knows():
    with pytest.raises(ValueError, match="unknown bank md5"):
        EventLogWriter(["sha256", "md5"])
    assert parse(EventLogWriter(["sha384"]).to_bytes()).algorithms == {"sha384": 48}


def test_an_sm3_bank_replays_with_openssls_sm3():
    """The TCG names it sm3_256, OpenSSL sm3: a log from a TPM with an SM3 bank replays all the same."""
    writer = EventLogWriter(["sha256", "sm3_256"])
    digest = writer.add(0, "EV_POST_CODE", b"firmware")["sm3_256"]
    assert digest == hashlib.new("sm3", b"firmware").digest()
    assert parse(writer.to_bytes()).replay("sm3_256")[0] == hashlib.new("sm3", bytes(32) + digest).digest()


def test_the_header_is_read_with_unsigned_fields_and_errors_say_where():
    with pytest.raises(EventLogError) as info:
        parse(b"\0\0")
    assert str(info.value) == "truncated: first event PCR index needs 4 bytes, 2 left (at byte 0)" and info.value.offset == 0
    huge = struct.pack("<II", 0, eventlog.EV_NO_ACTION) + bytes(20) + struct.pack("<I", 0xFFFFFFFF)
    assert why(huge + eventlog.SPEC_ID_SIGNATURE) == "Spec ID event size 4294967295 is impossible (at byte 28)"
    assert why(huge) == "event data of 4294967295 bytes (at byte 28)"  # no Spec ID: a SHA-1 log's event
    with pytest.raises(EventLogError) as info:
        parse(spec_id()[:40])  # too short to carry the Spec ID signature: a SHA-1 log's event, cut short
    assert info.value.offset == 32 and "event data needs 37 bytes, 8 left" in str(info.value)
    unknown = parse(spec_id([(0x8001, 32)]) + event(digests=[(0x8001, bytes(32))]))
    assert unknown.algorithms == {"alg_0x8001": 32} and unknown.banks == []
    from tccdeploy.eventlog import MissingBank

    with pytest.raises(MissingBank, match="alg_0x8001 bank cannot be replayed"):  # named, not hashlib's ValueError
        unknown.replay("alg_0x8001")
    header = spec_id()  # numberOfAlgorithms read unsigned: 0x80000000 algorithms is too many, not negative
    many = header[:56] + struct.pack("<I", 0x80000000) + header[60:]
    assert "lists 2147483648 algorithms" in why(many)


def test_a_log_file_is_read_as_bytes(tmp_path):
    raw, expected = _sample_log()
    (tmp_path / "binary_bios_measurements").write_bytes(raw)
    assert parse_file(str(tmp_path / "binary_bios_measurements")).replay("sha256") == expected


def test_the_writer_records_the_event_data_given_apart_from_what_was_measured():
    writer = EventLogWriter(["sha256"])
    writer.add(4, "EV_EFI_BOOT_SERVICES_APPLICATION", b"the kernel's bytes", image_load_event(18))
    (event,) = parse(writer.to_bytes()).events
    assert event.data == image_load_event(18) and event.digests["sha256"] == hashlib.sha256(b"the kernel's bytes").digest()


@settings(max_examples=300, deadline=None)
@given(st.data())
def test_mutated_sha1_logs_parse_or_are_rejected_cleanly(data):
    raw = b"".join(struct.pack("<II", pcr, kind) + hashlib.sha1(bytes([pcr])).digest() + struct.pack("<I", len(body)) + body
                   for pcr, kind, body in ((0, 8, b"abcd"), (0, 3, b"StartupLocality\x00\x03"), (4, 0x80000003, b""),
                                           (7, 0x80000001, b"x" * 40)))
    mutated = bytearray(raw)
    for _ in range(data.draw(st.integers(1, 4))):
        mutated[data.draw(st.integers(0, len(mutated) - 1))] = data.draw(st.integers(0, 255))
    try:
        log = parse(bytes(mutated[:data.draw(st.integers(0, len(mutated)))]))
    except EventLogError:
        return
    for bank in log.banks:
        log.replay(bank)


@pytest.mark.parametrize("size, field, left", [
    (29, "algorithmId", 1), (30, "digestSize", 0), (31, "digestSize", 1), (32, "vendorInfoSize", 0),
])
def test_a_spec_id_event_whose_size_ends_inside_a_field_names_that_field_and_where(size: int, field: str, left: int):
    """The event's own size ends inside a field: the error names it and the offset within the Spec
    ID event. (Before byte 28 no field can be cut: 29 bytes is the least size taken.)"""
    body = spec_id([(0x000B, 32)])[32:]
    raw = struct.pack("<II", 0, eventlog.EV_NO_ACTION) + bytes(20) + struct.pack("<I", size) + body[:size] + bytes(8)
    at = {"algorithmId": 28, "digestSize": 30, "vendorInfoSize": 32}[field]
    wanted = {"algorithmId": 2, "digestSize": 2, "vendorInfoSize": 1}[field]
    assert why(raw) == f"truncated: {field} needs {wanted} bytes, {left} left (at byte {at})"
    vendor = spec_id([(0x000B, 32)], vendor=b"abcd")[32:]
    cut = struct.pack("<II", 0, eventlog.EV_NO_ACTION) + bytes(20) + struct.pack("<I", 35) + vendor[:35]
    assert why(cut) == "truncated: vendorInfo needs 4 bytes, 2 left (at byte 33)"


def test_an_event_cut_at_each_boundary_is_refused_by_what_it_lacks():
    at = len(spec_id())
    whole = event()
    assert why(spec_id() + whole[:12]) == f"truncated: digest algorithm needs 2 bytes (at byte {at + 12})"
    assert why(spec_id() + whole[:14]) == f"truncated: sha1 digest needs 20 bytes, 0 left (at byte {at + 14})"
    assert why(spec_id() + whole[:34]) == f"truncated: digest algorithm needs 2 bytes (at byte {at + 34})"
    assert why(spec_id() + whole[:36 + 32]) == f"truncated: event size needs 4 bytes (at byte {at + 68})"
    assert parse(spec_id() + event(digests=[], data=b"")).events[0].data == b""  # a 16-byte event is whole
    assert why(spec_id() + event(digests=[(0x000C, bytes(48))])) == \
        f"digest algorithm 0x000c is not declared in the Spec ID event (at byte {at + 12})"


def test_an_event_size_past_two_gib_is_not_read_as_negative():
    at = len(spec_id()) + 12 + 22 + 34
    assert why(spec_id() + event(data=b"", size=0x80000000)) == f"event data of 2147483648 bytes (at byte {at})"
    assert why(spec_id() + event(data=b"", size=0xFFFFFFFF)) == f"event data of 4294967295 bytes (at byte {at})"


def test_a_sha1_format_log_says_what_it_is_and_where_each_event_starts():
    first = struct.pack("<II", 0, 8) + bytes(20) + struct.pack("<I", 2) + b"ab"
    second = struct.pack("<II", 4, 1) + bytes(20) + struct.pack("<I", 0)
    log = parse(first + second)
    assert (log.spec_version, log.uintn_size, log.platform_class, log.algorithms) == ((1, 2, 0), 2, 0, {"sha1": 20})
    assert [e.offset for e in log.events] == [0, len(first)]
    assert why(first + struct.pack("<II", 24, 1) + bytes(20) + struct.pack("<I", 0)) == \
        f"PCR index 24 out of range (at byte {len(first)})"


def test_the_writer_writes_what_the_parser_reads_field_for_field():
    writer = EventLogWriter(["sha1", "sha256"])
    writer.add_digests(4, eventlog.EVENT_CODES["EV_IPL"], writer.digests_of(b"x"), b"by code")  # a type given as a number
    writer.add(5, "EV_EFI_ACTION", b"by name")
    log = parse(writer.to_bytes())
    assert (log.platform_class, log.spec_version, log.uintn_size) == (0, (2, 0, 0), 2)
    assert [(e.pcr, e.type_name, e.data) for e in log.events] == [(4, "EV_IPL", b"by code"), (5, "EV_EFI_ACTION", b"by name")]
    assert eventlog.image_load_event(5) == struct.pack("<QQQQ", 0, 5, 0, 4) + b"\x7f\xff\x04\x00"
