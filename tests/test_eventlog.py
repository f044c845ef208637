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


def test_event_missing_a_bank_digest_is_rejected():
    raw, _ = _sample_log()
    header_len = len(EventLogWriter(["sha1", "sha256"]).header())
    bad = bytearray(raw)
    struct.pack_into("<I", bad, header_len + 8, 1)  # digest count 1: sha256 now read as event size
    with pytest.raises(EventLogError):
        parse(bytes(bad))


def test_undeclared_algorithm_is_rejected():
    raw, _ = _sample_log()
    header_len = len(EventLogWriter(["sha1", "sha256"]).header())
    bad = bytearray(raw)
    struct.pack_into("<H", bad, header_len + 12, 0x000C)  # sha384, not in the Spec ID event
    with pytest.raises(EventLogError, match="not declared"):
        parse(bytes(bad))


def test_sha1_only_log_is_rejected():
    raw = struct.pack("<II", 0, 8) + bytes(20) + struct.pack("<I", 4) + b"abcd"
    with pytest.raises(EventLogError, match="crypto-agile"):
        parse(raw)


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
