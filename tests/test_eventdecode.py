"""Events decoded for people (tccdeploy/eventdecode.py), on real machines' logs from the corpus
(tests/vectors/eventlogs) and on hostile data: what each event measured, never an exception."""

from __future__ import annotations

import hashlib
import struct
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tccdeploy.eventdecode import DECODERS, MAX_TEXT, data_check, describe, device_path
from tccdeploy.eventlog import EVENT_CODES, Event, EventLogError, parse

CORPUS = Path(__file__).parent / "vectors" / "eventlogs"


def _log(name: str):  # type: ignore[no-untyped-def]
    return parse((CORPUS / name).read_bytes())


def _described(name: str) -> list[str]:
    return [f"{e.pcr} {e.type_name} {describe(e)}" for e in _log(name).events]


def test_every_event_of_every_real_log_decodes():
    count = 0
    for path in sorted(CORPUS.glob("*/*")):
        if path.suffix in (".json", ".md") or path.name == "LICENSE":
            continue
        try:
            log = parse(path.read_bytes())
        except EventLogError:
            continue
        for event in log.events:
            text = describe(event)
            assert text and not text.startswith("undecodable"), (path.name, event.type_name, text)
            count += 1
    assert count > 1800


def test_firmware_variables_boot_order_and_applications_with_their_device_paths():
    lines = _described("go-tpm-tools/ubuntu-2104-no-dbx.bin")
    assert "7 EV_EFI_VARIABLE_DRIVER_CONFIG SecureBoot (EFI_GLOBAL_VARIABLE), 1 bytes: disabled" in lines
    assert "1 EV_EFI_VARIABLE_BOOT BootOrder (EFI_GLOBAL_VARIABLE), 8 bytes: Boot0003,Boot0000,Boot0001,Boot0002" in lines
    assert "4 EV_EFI_ACTION \"Calling EFI Application from Boot Option\"" in lines
    assert '1 EV_EFI_VARIABLE_BOOT Boot0003 (EFI_GLOBAL_VARIABLE), 118 bytes: "ubuntu" at ' \
           'HD(15,6ea6f740-25ef-4269-838d-1a6f21ebf27f,0x2800,0x35000)/\\EFI\\ubuntu\\shimx64.efi' in lines
    shim = next(line for line in lines if "shimx64" in line and "APPLICATION" in line)
    assert shim.startswith("4 EV_EFI_BOOT_SERVICES_APPLICATION image of 955072 bytes from PciRoot(0x0)/Pci(0x3,0x0)/Scsi(1,0)/"
                           "HD(15,6ea6f740-25ef-4269-838d-1a6f21ebf27f,0x2800,0x35000)/\\EFI\\ubuntu\\shimx64.efi")
    assert "7 EV_EFI_VARIABLE_AUTHORITY SbatLevel (SHIM_LOCK), 18 bytes" in lines
    assert any(line.startswith('8 EV_IPL "kernel_cmdline: /boot/vmlinuz-5.11.0-1008-gcp root=PARTUUID=') for line in lines)
    assert '9 EV_IPL "/boot/vmlinuz-5.11.0-1008-gcp"' in lines


def test_gpt_sp800_155_and_secure_boot_databases():
    lines = _described("go-tpm-tools/eventlogwithsp800155.bin")
    assert lines[0] == "0 EV_NO_ACTION SP800-155 Event3: reference integrity manifest information, 160 bytes"
    gpt = next(line for line in lines if "GPT" in line)
    assert gpt.startswith('5 EV_EFI_GPT_EVENT GPT of disk 71540592-28b2-fa48-9c40-c65c99cc639a: 12 partition(s) "STATE", '
                          '"KERN-A", "ROOT-A"')
    assert "7 EV_EFI_VARIABLE_DRIVER_CONFIG SecureBoot (EFI_GLOBAL_VARIABLE), 1 bytes: enabled" in lines
    # the databases' certificates by subject, and the db entry that admitted an image (its authority)
    google_db = "X.509 CN=UEFI DB Key v20250203,OU=Container Optimized OS,O=Google LLC.,L=Mountain View,ST=California,C=US"
    assert f"7 EV_EFI_VARIABLE_DRIVER_CONFIG db (EFI_IMAGE_SECURITY_DATABASE), 1097 bytes: 1 entry: {google_db}" in lines
    assert f"7 EV_EFI_VARIABLE_AUTHORITY db (EFI_IMAGE_SECURITY_DATABASE), 1069 bytes: {google_db}" in lines
    dbx = next(line for line in lines if " dbx " in line)
    assert dbx.startswith("7 EV_EFI_VARIABLE_DRIVER_CONFIG dbx (EFI_IMAGE_SECURITY_DATABASE), 4461 bytes: 4 entries: X.509 CN=")
    assert "7 EV_EFI_VARIABLE_AUTHORITY SbatLevel (SHIM_LOCK), 18 bytes" in lines  # not a certificate: not decoded as one


def test_boot_guard_firmware_blobs_and_systemd_boots_utf16_command_line():
    lines = _described("go-tpm-tools/gdc-host.bin")
    assert lines[:3] == ["0 EV_NO_ACTION StartupLocality 3 (PCR 0 started at 3)",
                         '0 EV_S_CRTM_CONTENTS "Boot Guard Measured S-CRTM"', '0 EV_S_CRTM_VERSION S-CRTM version "2.3.5"']
    assert "0 EV_EFI_PLATFORM_FIRMWARE_BLOB firmware blob at 0xffdc0000, 2293760 bytes" in lines
    fedora = _described("tpm2-tools/event-sd-boot-fedora37.bin")
    assert '12 EV_IPL " console=ttyS0 console=tty0 efi=debug "' in fedora
    assert '9 EV_EVENT_TAG Linux initrd: "Linux initrd"' in fedora


def test_device_paths_name_their_nodes_and_stop_at_a_bad_length():
    file_path = "\\EFI\\BOOT\\BOOTX64.EFI".encode("utf-16-le") + b"\x00\x00"
    raw = (bytes([2, 1]) + struct.pack("<HII", 12, 0x0A0341D0, 0) + bytes([1, 1]) + struct.pack("<H", 6) + bytes([0, 2])
           + bytes([4, 4]) + struct.pack("<H", 4 + len(file_path)) + file_path + bytes([0x7F, 0xFF, 4, 0]))
    assert device_path(raw) == "PciRoot(0x0)/Pci(0x2,0x0)/\\EFI\\BOOT\\BOOTX64.EFI"
    assert device_path(bytes([4, 4, 200, 0]) + b"abc") == "<bad node length 200>"
    assert device_path(b"") == "(empty)"
    assert device_path(bytes([9, 9, 6, 0, 0xAB, 0xCD])) == "Path(9,9,abcd)"


def test_what_does_not_decode_is_said_so():
    truncated = Event(7, EVENT_CODES["EV_EFI_VARIABLE_DRIVER_CONFIG"], {}, bytes(20))
    assert describe(truncated).startswith("undecodable EV_EFI_VARIABLE_DRIVER_CONFIG data (20 bytes:")
    huge_name = Event(7, EVENT_CODES["EV_EFI_VARIABLE_BOOT"], {}, bytes(16) + struct.pack("<QQ", 10**9, 0))
    assert describe(huge_name).startswith("undecodable EV_EFI_VARIABLE_BOOT data")
    assert describe(Event(0, 0x12345678, {}, b"\x01\x02")) == "2 bytes of data: 0102"
    assert describe(Event(0, 0x12345678, {}, b"")) == "0 bytes of data"
    assert describe(Event(0, EVENT_CODES["EV_IPL"], {}, b"a" * 10_000)) == '"' + "a" * MAX_TEXT + '..."'


@settings(max_examples=400, deadline=None)
@given(kind=st.sampled_from(sorted(DECODERS) + [0x7FFFFFFF]), data=st.binary(max_size=600))
def test_hostile_event_data_never_raises_and_stays_short(kind: int, data: bytes):
    text = describe(Event(0, kind, {}, data))
    assert isinstance(text, str) and len(text) < 4 * MAX_TEXT


@pytest.mark.parametrize("name", ["EV_EFI_VARIABLE_BOOT", "EV_EFI_BOOT_SERVICES_APPLICATION", "EV_EFI_GPT_EVENT",
                                  "EV_EFI_HANDOFF_TABLES", "EV_EFI_PLATFORM_FIRMWARE_BLOB2", "EV_EVENT_TAG"])
def test_each_structured_decoder_survives_every_truncation_of_a_real_event(name: str):
    code = EVENT_CODES[name]
    sample = next((e for path in sorted(CORPUS.glob("*/*.bin")) for e in _safe_events(path) if e.type == code), None)
    if sample is None:
        sample = Event(0, code, {}, bytes(64))
    for cut in range(len(sample.data) + 1):
        assert describe(Event(0, code, {}, sample.data[:cut]))


def _safe_events(path: Path) -> list[Event]:
    try:
        return parse(path.read_bytes()).events
    except EventLogError:
        return []


# Events whose digest is not the digest of their data by any formula their type allows: known
# firmware and shim quirks, not decoding errors (shim's "Shim" vendor-certificate authority in
# older shims, COS's db authority, a Boot Guard S-CRTM version), one per (log, event index).
NOT_DATA = {
    ("go-attestation/sb_cert_eventlog", 11), ("go-attestation/sb_cert_eventlog", 13),
    ("go-tpm-tools/cos-85-amd-sev.bin", 23), ("go-tpm-tools/cos-85-amd-sev.bin", 41),
    ("go-tpm-tools/cos-93-amd-sev.bin", 23), ("go-tpm-tools/cos-93-amd-sev.bin", 41),
    ("go-tpm-tools/debian-10.bin", 23), ("go-tpm-tools/gdc-host.bin", 2),
    ("tpm2-tools/event-postcode.bin", 39), ("tpm2-tools/event-postcode.bin", 53),
}


def test_the_digest_of_a_self_describing_event_is_the_digest_of_its_data_bar_known_quirks():
    """GRUB's commands (the string after "grub_cmd: ", without its NUL), systemd-boot's UTF-16
    command line, separators, actions, GPT and variables: the formulas baseline predictions use."""
    counted = {"data": 0, "not-data": 0, "": 0}
    grub = 0
    found = set()
    for path in sorted(CORPUS.glob("*/*")):
        if path.suffix in (".json", ".md") or path.name == "LICENSE":
            continue
        name = f"{path.parent.name}/{path.name}"
        for i, event in enumerate(_safe_events(path)):
            for bank in event.digests:
                verdict = data_check(event, bank)
                counted[verdict] += 1
                if verdict == "not-data":
                    found.add((name, i))
                grub += verdict == "data" and event.data.startswith((b"grub_cmd: ", b"kernel_cmdline: "))
    assert found == NOT_DATA
    assert counted["data"] > 3000 and grub > 1500


def test_a_logged_string_that_is_not_what_was_measured_is_marked():
    command = Event(8, EVENT_CODES["EV_IPL"], {"sha256": hashlib.sha256(b"linux /vmlinuz ro").digest()},
                    b"kernel_cmdline: linux /vmlinuz ro\x00")
    assert data_check(command, "sha256") == "data"
    lying = Event(8, command.type, command.digests, b"kernel_cmdline: linux /vmlinuz ro quiet\x00")
    assert data_check(lying, "sha256") == "not-data"
    assert data_check(Event(9, command.type, command.digests, b"/boot/vmlinuz\x00"), "sha256") == ""  # a file's digest
    assert data_check(command, "sha384") == ""
