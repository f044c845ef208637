"""The provider changes the firmware's configuration: the TC names what changed, and only believes
the log's words where they are what was measured.

Root on the host owns a node's NVRAM (on the lab's real-boot nodes, a file; on a server, the
firmware's flash through its BMC): it can turn secure boot off, or enroll its own certificate in
db and sign what it likes. The firmware measures each into PCR 7 (SecureBoot, PK, KEK, db, dbx),
so the boot matches no platform: platform.unknown, and the message names the variable where the
boot departs, decoded from the event's data, so an operator knows which setting to look at.
The engine writes the log the TC reads, though: an event whose data is not what its digest
measured is said to be so, not repeated as fact. The real tampers on real firmware are in
test_realboot.py; this is the TC's decision on such logs, in milliseconds.
"""

from __future__ import annotations

import struct
import uuid

from tccdeploy.coordinator.references import Measured, judge
from tccdeploy.eventlog import EventLogWriter, parse
from tccdeploy.manifest.models import Platform, ReferenceEvent, TVMMBuild

GLOBAL = uuid.UUID("8be4df61-93ca-11d2-aa0d-00e098032b8c")  # EFI_GLOBAL_VARIABLE
SECURITY_DB = uuid.UUID("d719b2cb-3d3a-4596-a3bc-dad00e67656f")  # EFI_IMAGE_SECURITY_DATABASE
POLICY = (4, 7)


def variable(guid: uuid.UUID, name: str, value: bytes) -> bytes:
    """UEFI_VARIABLE_DATA (TCG PFP 10.4.4), what firmware measures for each secure-boot variable."""
    encoded = name.encode("utf-16-le")
    return guid.bytes_le + struct.pack("<QQ", len(name), len(value)) + encoded + value


def firmware(secure_boot: bool = True, db: bytes = b"owner-cert", lie: bool = False) -> bytes:
    """A log of PCR 7 as OVMF writes it with secure boot on, and a PCR 4 boot application.
    lie: the SecureBoot event's data says enabled while its digest is of disabled."""
    log = EventLogWriter(["sha256"])
    measured = variable(GLOBAL, "SecureBoot", b"\x01" if secure_boot else b"\x00")
    shown = variable(GLOBAL, "SecureBoot", b"\x01") if lie else measured
    log.add(7, "EV_EFI_VARIABLE_DRIVER_CONFIG", measured, shown)
    for guid, name, value in ((GLOBAL, "PK", b"pk-cert"), (GLOBAL, "KEK", b"pk-cert"),
                              (SECURITY_DB, "db", db), (SECURITY_DB, "dbx", b"")):
        log.add(7, "EV_EFI_VARIABLE_DRIVER_CONFIG", variable(guid, name, value))
    log.add(7, "EV_SEPARATOR", b"\0" * 4)
    log.add(4, "EV_EFI_BOOT_SERVICES_APPLICATION", b"kernel", b"")
    return log.to_bytes()


def events(raw: bytes) -> dict[int, list[Measured]]:
    out: dict[int, list[Measured]] = {}
    for event in parse(raw).events:
        if event.pcr in POLICY and event.type_name != "EV_NO_ACTION":
            out.setdefault(event.pcr, []).append(Measured(event.digests["sha256"], event.type_name, event))
    return out


def references() -> tuple[list[TVMMBuild], list[Platform]]:
    """The platform (PCR 7) and build (PCR 4) captured from the owner's boot."""
    golden = events(firmware())
    refs = {pcr: tuple(ReferenceEvent(m.digest.hex(), m.type) for m in golden[pcr]) for pcr in POLICY}
    return ([TVMMBuild("tvmm-1", "1.0", "approved", {}, "sha256", {4: refs[4]})],
            [Platform("model-sb", "approved", "sha256", {7: refs[7]})])


def test_the_owners_boot_matches_its_platform():
    builds, platforms = references()
    judged = judge(events(firmware()), builds, platforms, POLICY, "n1")
    assert judged.failures == [] and judged.platform is not None and judged.platform.name == "model-sb"


def test_secure_boot_turned_off_is_refused_naming_the_variable_and_its_value():
    builds, platforms = references()
    judged = judge(events(firmware(secure_boot=False)), builds, platforms, POLICY, "n1")
    ((code, message),) = judged.failures
    assert code == "platform.unknown"
    assert ("closest platform model-sb: PCR 7 event 0 (a different event: EV_EFI_VARIABLE_DRIVER_CONFIG "
            "SecureBoot (EFI_GLOBAL_VARIABLE), 1 bytes: disabled)") in message, message
    assert "not what was measured" not in message


def test_a_certificate_the_host_added_to_db_is_refused_naming_db():
    builds, platforms = references()
    judged = judge(events(firmware(db=b"owner-cert" + b"host-cert")), builds, platforms, POLICY, "n1")
    ((code, message),) = judged.failures
    assert code == "platform.unknown"
    assert "PCR 7 event 3 (a different event: EV_EFI_VARIABLE_DRIVER_CONFIG db (EFI_IMAGE_SECURITY_DATABASE)" \
        in message, message


def test_secure_boot_off_and_a_changed_db_in_one_boot_are_both_named():
    """Two settings changed in one PCR: each event that differs is named, not only the first."""
    builds, platforms = references()
    judged = judge(events(firmware(secure_boot=False, db=b"host-cert")), builds, platforms, POLICY, "n1")
    ((code, message),) = judged.failures
    assert code == "platform.unknown"
    assert "PCR 7 event 0 (a different event: EV_EFI_VARIABLE_DRIVER_CONFIG SecureBoot (EFI_GLOBAL_VARIABLE), 1 bytes: " \
           "disabled); PCR 7 event 3 (a different event: EV_EFI_VARIABLE_DRIVER_CONFIG db (EFI_IMAGE_SECURITY_DATABASE)" \
           in message, message
    assert "event 1 " not in message and "event 4 " not in message  # PK and dbx are as enrolled


def test_an_event_whose_data_is_not_what_was_measured_is_not_believed():
    """A hostile engine measured secure boot off but logs the data of "enabled": the TC refuses on
    the digest, and says the data is not what was measured rather than repeating "enabled"."""
    builds, platforms = references()
    judged = judge(events(firmware(secure_boot=False, lie=True)), builds, platforms, POLICY, "n1")
    ((code, message),) = judged.failures
    assert code == "platform.unknown"
    assert "SecureBoot (EFI_GLOBAL_VARIABLE), 1 bytes: enabled [its data is not what was measured])" in message, message


# -- the databases as the message shows them -----------------------------------------------------
X509 = uuid.UUID("a5c059a1-94e4-4aa7-87b5-ab155c2bf072")
SHA256 = uuid.UUID("c1c41626-504c-4092-aca9-41f936934328")
OWNER = uuid.UUID("6c61622d-7463-6364-6570-6c6f792d7362")


def signature_list(kind: uuid.UUID, entries: list[bytes], size: int | None = None) -> bytes:
    """EFI_SIGNATURE_LIST: type, list size, header size (0), entry size, entries (owner + data)."""
    entry = 16 + len(entries[0])
    body = b"".join(OWNER.bytes_le + e for e in entries)
    return kind.bytes_le + struct.pack("<III", size if size is not None else 28 + len(body), 0, entry) + body


def describe_db(value: bytes) -> str:
    from tccdeploy.eventdecode import describe

    log = EventLogWriter(["sha256"])
    log.add(7, "EV_EFI_VARIABLE_DRIVER_CONFIG", variable(SECURITY_DB, "db", value))
    return describe(parse(log.to_bytes()).events[-1])


def _certificate(name: str) -> bytes:
    import datetime

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(x509.oid.NameOID.COMMON_NAME, name)])
    now = datetime.datetime.now(datetime.UTC)
    cert = (x509.CertificateBuilder().subject_name(subject).issuer_name(subject).public_key(key.public_key())
            .serial_number(1).not_valid_before(now).not_valid_after(now + datetime.timedelta(days=1)).sign(key, hashes.SHA256()))
    return cert.public_bytes(serialization.Encoding.DER)


def test_a_db_is_shown_by_its_certificates_subjects_and_hashes_counted():
    value = signature_list(X509, [_certificate("owner image signing")]) + signature_list(X509, [_certificate("host key")]) \
        + signature_list(SHA256, [bytes(range(32))] * 5)
    shown = describe_db(value)
    assert shown.endswith("7 entries: X.509 CN=owner image signing; X.509 CN=host key; SHA-256 0001020304050607...; "
                          "SHA-256 0001020304050607..., and 3 more"), shown


def test_signature_lists_that_lie_about_their_sizes_are_said_not_to_decode():
    """The engine writes the log: list sizes that loop, overrun or undercut the data end in words,
    never in an exception or a loop."""
    good = signature_list(SHA256, [bytes(32)])
    for value in (good[:-1], signature_list(SHA256, [bytes(32)], size=0), signature_list(SHA256, [bytes(32)], size=2**32 - 1),
                  good[:16], b"\x00" * 27):
        assert "db (EFI_IMAGE_SECURITY_DATABASE)" in describe_db(value)
        assert ": not a signature list (" in describe_db(value), describe_db(value)
    assert describe_db(signature_list(X509, [b"not DER"])).endswith("1 entry: not an X.509 certificate (7 bytes)")
