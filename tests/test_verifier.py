"""The verifier against a corpus of forged and broken evidence: each rejected, with its reason.

Evidence here is built in software (tests/attestkit.py) so that every forgery a real TPM would
refuse to produce can be tried; tests/test_attestation.py does the same checks on real swtpm
quotes from the lab.
"""

from __future__ import annotations

import dataclasses
import hashlib
import struct
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tccdeploy.coordinator import tpm2
from tccdeploy.coordinator.store import NonceCheck
from tccdeploy.coordinator.verifier import verify
from tccdeploy.eventlog import EventLogWriter, parse
from tccdeploy.manifest.loader import load_manifests

from .attestkit import Node, quote_attest, sign

REPO = Path(__file__).resolve().parent.parent
NONCE = b"n" * 32


@pytest.fixture(scope="module")
def manifests(tmp_path_factory):
    from .conftest import live_examples

    return load_manifests([str(live_examples(tmp_path_factory.mktemp("manifests")))])


def run(manifests, node: Node, evidence, site="site1", address="127.0.1.7", last=None, identity=None, nonce_ok=True):
    evidence.nonce_check = NonceCheck(True) if nonce_ok is True else nonce_ok
    return verify(evidence, manifests.perimeter, manifests.builds, identity or node.identity(), site, address, last,
                  platforms=manifests.platforms)


def codes(verdict) -> list[str]:
    return [r["code"] for r in verdict.reasons]


def test_good_evidence_is_trusted(manifests):
    node = Node()
    verdict = run(manifests, node, node.evidence(NONCE))
    assert verdict.trusted and codes(verdict) == [] and verdict.build == "tvmm-2026.1"


def test_wrong_signature(manifests):
    node = Node()
    evidence = node.evidence(NONCE)
    evidence.signature = sign(Node().key, evidence.attest)
    assert codes(run(manifests, node, evidence)) == ["quote.signature"]


def test_another_nodes_ak(manifests):
    node, other = Node(), Node()
    assert codes(run(manifests, node, other.evidence(NONCE))) == ["quote.signature"]


def test_quote_without_the_nonce(manifests):
    node = Node()
    evidence = node.evidence(b"x" * 32)
    evidence.nonce = NONCE
    assert codes(run(manifests, node, evidence)) == ["quote.nonce"]


@pytest.mark.parametrize("reason, says", [("nonce.replayed", "used before"), ("nonce.expired", "expired"),
                                           ("nonce.unknown", "never issued"), ("nonce.other-node", "another node"),
                                           ("nonce.something-new", "nonce.something-new")])
def test_nonce_state_from_the_registry(manifests, reason: str, says: str):
    node = Node()
    verdict = run(manifests, node, node.evidence(NONCE), nonce_ok=NonceCheck(False, reason))
    assert codes(verdict) == [reason] and says in verdict.reasons[0]["message"]


def test_a_trusted_verdict_records_the_quoted_digest_and_counters(manifests):
    node = Node(reset=5, restart=2)
    evidence = node.evidence(NONCE)
    verdict = run(manifests, node, evidence)
    assert verdict.trusted and verdict.pcr_digest == tpm2.parse_attest(evidence.attest).pcr_digest.hex()
    assert (verdict.reset_count, verdict.restart_count) == (5, 2)


def test_a_certification_passed_off_as_a_quote_is_untrusted(manifests):
    from .attestkit import certify_attest

    node = Node()
    evidence = node.evidence(NONCE)
    evidence.attest = certify_attest(NONCE, b"\x00\x0b" + bytes(32))  # the AK's, over the nonce, but no quote
    evidence.signature = sign(node.key, evidence.attest)
    verdict = run(manifests, node, evidence)
    assert codes(verdict) == ["quote.type"] and "0x8017 is not a quote" in verdict.reasons[0]["message"]
    assert verdict.pcr_digest is None


def test_reported_pcr_values_missing_one_the_policy_covers_are_untrusted_not_a_crash(manifests):
    node = Node()
    evidence = node.evidence(NONCE)
    del evidence.pcrs[11]
    assert codes(run(manifests, node, evidence)) == ["quote.pcr-digest", "eventlog.replay"]


def test_a_policy_pcr_no_event_touched_replays_to_its_reset_value(manifests):
    """A log without events for PCR 9: the PCR keeps its reset value, which the quote must show
    (no crash, no replay failure); the boot then matches no platform and no build."""
    from tccdeploy.eventlog import EventLogWriter

    node = Node()
    writer = EventLogWriter(["sha1", "sha256"])
    values = {p: bytes(32) for p in (0, 4, 8, 9, 11)}
    for pcr in (0, 4, 8, 11):
        values[pcr] = hashlib.sha256(values[pcr] + writer.add(pcr, "EV_POST_CODE", b"x%d" % pcr)["sha256"]).digest()
    attest = quote_attest(NONCE, "sha256", [0, 4, 8, 9, 11], hashlib.sha256(b"".join(values[p] for p in (0, 4, 8, 9, 11))).digest())
    from tccdeploy.coordinator.verifier import Evidence

    evidence = Evidence(attest, sign(node.key, attest), values, writer.to_bytes(), NONCE, ssh_host_key=node.host_key)
    assert codes(run(manifests, node, evidence)) == ["platform.unknown", "build.unknown"]


def test_pcr_digest_mismatch(manifests):
    node = Node()
    evidence = node.evidence(NONCE)
    evidence.pcrs[8] = bytes(32)  # report a value the TPM did not quote
    assert "quote.pcr-digest" in codes(run(manifests, node, evidence))


def test_quote_over_fewer_pcrs_than_policy(manifests):
    node = Node()
    assert codes(run(manifests, node, node.evidence(NONCE, pcrs=[0, 4, 8]))) == ["quote.pcr-selection"]


def test_not_tpm_generated_and_not_a_quote(manifests):
    node = Node()
    evidence = node.evidence(NONCE)
    for magic, kind, code in ((0xDEADBEEF, tpm2.ST_ATTEST_QUOTE, "quote.magic"),):
        attest = quote_attest(NONCE, "sha256", [0, 4, 8, 9, 11], tpm2.parse_attest(evidence.attest).pcr_digest,
                              magic=magic, kind=kind)
        forged = dataclasses.replace(evidence, attest=attest, signature=sign(node.key, attest))
        assert codes(run(manifests, node, forged)) == [code]


def _log_events(raw: bytes) -> tuple[bytes, list[bytes]]:
    header_len = len(EventLogWriter(["sha1", "sha256"]).header())
    log = parse(raw)
    offsets = [e.offset for e in log.events] + [len(raw)]
    return raw[:header_len], [raw[a:b] for a, b in zip(offsets, offsets[1:], strict=False)]


@pytest.mark.parametrize("change", ["altered", "truncated", "reordered", "extra"])
def test_event_log_tampering(manifests, change: str):
    node = Node()
    evidence = node.evidence(NONCE)
    header, events = _log_events(evidence.eventlog)
    if change == "altered":
        events[2] = events[2][:-1] + bytes([events[2][-1] ^ 1])  # event data: digests still match the PCRs
        patched = bytearray(events[3])
        patched[40] ^= 0xFF  # a byte of event 3's sha256 digest (after count, sha1 id+digest, sha256 id)
        events[3] = bytes(patched)
    elif change == "truncated":
        events = events[:-1]
    elif change == "reordered":
        events[2], events[3] = events[3], events[2]
    else:
        writer = EventLogWriter(["sha1", "sha256"])
        writer.add(4, "EV_EFI_BOOT_SERVICES_APPLICATION", b"extra")
        events.append(writer.to_bytes()[len(writer.header()):])
    evidence.eventlog = header + b"".join(events)
    assert "eventlog.replay" in codes(run(manifests, node, evidence))
    assert not run(manifests, node, evidence).trusted


def test_logged_extra_component_matches_no_build(manifests):
    node = Node()
    evidence = node.evidence(NONCE, log_extra=[(4, b"rogue kernel module")])
    verdict = run(manifests, node, evidence)
    assert codes(verdict) == ["build.unknown"]
    # where the boot departs, and what the event there measured (decoded from the log)
    assert "PCR 4 event 3 (an extra event: EV_EFI_BOOT_SERVICES_APPLICATION image of 19 bytes" \
        in verdict.reasons[0]["message"], verdict.reasons[0]["message"]


def test_revoked_build(manifests):
    node = Node(build="tvmm-2025.4")
    verdict = run(manifests, node, node.evidence(NONCE))
    assert codes(verdict) == ["build.revoked"] and verdict.build == "tvmm-2025.4"


def test_deprecated_build_warns(manifests):
    node = Node(build="tvmm-2026.2")
    builds = [dataclasses.replace(b, status="deprecated") if b.name == "tvmm-2026.2" else b for b in manifests.builds]
    evidence = node.evidence(NONCE)
    evidence.nonce_check = NonceCheck(True)
    verdict = verify(evidence, manifests.perimeter, builds, node.identity(), "site1", "127.0.1.7", platforms=manifests.platforms)
    assert verdict.trusted and [w["code"] for w in verdict.warnings] == ["build.deprecated"]


def test_counters_going_backwards(manifests):
    node = Node(reset=3, restart=0)
    last = {"reset_count": 5, "restart_count": 0}
    assert codes(run(manifests, node, node.evidence(NONCE), last=last)) == ["quote.counters-backwards"]


@pytest.mark.parametrize("before, now, reasons, warnings", [
    ((5, 2), (5, 1), ["quote.counters-backwards"], []),  # the same boot, restartCount back: not resetCount alone
    ((5, 2), (4, 9), ["quote.counters-backwards"], []),
    ((5, 2), (5, 2), [], []),
    ((5, 2), (5, 3), [], ["node.rebooted"]),  # a TPM restart (resume from hibernation)
    ((5, 2), (6, 0), [], ["node.rebooted"]),  # a reset: restartCount starts again
    ((None, None), (1, 0), [], []),  # nothing recorded to compare with
])
def test_tpm_counters_compare_as_reset_then_restart(manifests, before, now, reasons, warnings):
    node = Node(reset=now[0], restart=now[1])
    verdict = run(manifests, node, node.evidence(NONCE), last={"reset_count": before[0], "restart_count": before[1]})
    assert codes(verdict) == reasons and [w["code"] for w in verdict.warnings] == warnings
    if reasons:
        assert verdict.reasons[0]["message"] == f"TPM reset/restart counters went back from {before} to {now}"


def test_reboot_is_a_warning(manifests):
    node = Node(reset=6)
    verdict = run(manifests, node, node.evidence(NONCE), last={"reset_count": 5, "restart_count": 0})
    assert verdict.trusted and [w["code"] for w in verdict.warnings] == ["node.rebooted"]


@pytest.mark.parametrize("site, address, code", [
    (None, "127.0.9.1", "perimeter.no-site"),
    ("site7", "127.0.1.7", "perimeter.unknown-site"),
    ("site1", "127.0.2.7", "perimeter.address"),
    ("site2", "127.0.2.7", "perimeter.asset-tag"),  # site2 has an asset tag; none certified
])
def test_perimeter(manifests, site, address, code):
    node = Node()
    assert codes(run(manifests, node, node.evidence(NONCE), site=site, address=address)) == [code]


def test_not_enrolled_and_changed_host_key(manifests):
    node = Node()
    evidence = node.evidence(NONCE)
    evidence.nonce_check = NonceCheck(True)
    assert "node.not-enrolled" in codes(verify(evidence, manifests.perimeter, manifests.builds, None, "site1", "127.0.1.7",
                                              platforms=manifests.platforms))
    identity = node.identity() | {"ssh_host_key": "SHA256:other"}
    assert codes(run(manifests, node, node.evidence(NONCE), identity=identity)) == ["node.ssh-host-key"]


def test_every_failure_is_reported_not_just_the_first(manifests):
    node = Node(build="tvmm-2025.4")
    evidence = node.evidence(b"x" * 32)
    evidence.nonce = NONCE
    verdict = run(manifests, node, evidence, site=None, nonce_ok=NonceCheck(False, "nonce.replayed"))
    assert {"quote.nonce", "nonce.replayed", "build.revoked", "perimeter.no-site"} <= set(codes(verdict))


def test_malformed_evidence_is_a_reason_not_a_crash(manifests):
    node = Node()
    evidence = node.evidence(NONCE)
    evidence.attest = evidence.attest[:-3]
    evidence.eventlog = b"\x00" * 10
    verdict = run(manifests, node, evidence)
    assert {"evidence.malformed", "eventlog.malformed"} <= set(codes(verdict)) and not verdict.trusted


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=300))
def test_tpm_parsers_reject_garbage_cleanly(data: bytes):
    for parser in (tpm2.parse_attest, tpm2.parse_signature, tpm2.parse_public):
        try:
            parser(data)
        except tpm2.TPMFormatError:
            pass


@settings(max_examples=300, deadline=None)
@given(st.data())
def test_mutated_quotes_never_verify_and_never_crash(manifests, data):
    node = Node()
    evidence = node.evidence(NONCE)
    field_name = data.draw(st.sampled_from(["attest", "signature"]))
    raw = bytearray(getattr(evidence, field_name))
    position = data.draw(st.integers(0, len(raw) - 1))
    raw[position] ^= data.draw(st.integers(1, 255))
    setattr(evidence, field_name, bytes(raw))
    assert not run(manifests, node, evidence).trusted


def test_make_credential_shape():
    from cryptography.hazmat.primitives.asymmetric import rsa

    key = rsa.generate_private_key(65537, 2048)
    n = key.public_key().public_numbers().n.to_bytes(256, "big")
    area = struct.pack(">HHI", tpm2.ALG_RSA, tpm2.ALG_SHA256, 0x000300B2) + struct.pack(">H", 32) + bytes(32)
    area += struct.pack(">HHHHHI", tpm2.ALG_AES, 128, tpm2.ALG_CFB, tpm2.ALG_NULL, 2048, 0) + struct.pack(">H", 256) + n
    ek = tpm2.parse_public(struct.pack(">H", len(area)) + area)
    blob, seed = tpm2.make_credential(ek, b"s" * 32, b"\x00\x0b" + hashlib.sha256(b"ak").digest())
    assert len(seed) == 256 and len(blob) == 2 + 32 + 2 + 32


def test_a_verdict_reason_without_a_code_or_words_is_a_bug_not_a_verdict():
    from tccdeploy.coordinator.verifier import _Collector

    collector = _Collector()
    collector.fail("quote.nonce", "the quote is for another nonce")
    collector.warn("build.candidate", "a candidate build")
    assert collector.reasons == [{"code": "quote.nonce", "message": "the quote is for another nonce"}]
    assert collector.warnings == [{"code": "build.candidate", "message": "a candidate build"}]
    for code, message in ((None, "words"), ("", "words"), ("nodot", "words"), ("quote.nonce", ""), ("quote.nonce", " "),
                          ("quote.nonce", None)):
        for record in (collector.fail, collector.warn):
            with pytest.raises(TypeError):
                record(code, message)  # type: ignore[arg-type]


# -- build matching: which build, and where a log departs from the closest one -----------------
def _build(name: str, events: dict[int, list[bytes]]):  # type: ignore[no-untyped-def]
    from tccdeploy.manifest.models import ReferenceEvent, TVMMBuild

    return TVMMBuild(name, "1", "approved", {}, "sha256",
                     {pcr: tuple(ReferenceEvent(d.hex()) for d in digests) for pcr, digests in events.items()})


def _d(text: str) -> bytes:
    return hashlib.sha256(text.encode()).digest()


BOOT = {0: [_d("firmware")], 4: [_d("shim"), _d("grub"), _d("kernel")]}


@pytest.mark.parametrize("log, where", [
    ({0: [_d("firmware")], 4: [_d("shim"), _d("grub"), _d("kernel"), _d("rootkit")]}, "PCR 4 event 3 (an extra event)"),
    ({0: [_d("firmware")], 4: [_d("shim"), _d("grub")]}, "PCR 4 event 2 (a missing event)"),
    ({0: [_d("firmware")], 4: [_d("shim"), _d("evil grub"), _d("kernel")]}, "PCR 4 event 1 (a different event)"),
    ({0: [], 4: [_d("shim"), _d("grub"), _d("kernel")]}, "PCR 0 event 0 (a missing event)"),
    ({4: [_d("shim"), _d("grub"), _d("kernel")]}, "PCR 0 event 0 (a missing event)"),
])
def test_a_log_that_departs_from_every_build_is_told_where(log, where):
    matched, why = verifier_match([_build("b1", BOOT)], log)
    assert matched is None and why == f"closest build b1: {where}"


def verifier_match(builds, log):  # type: ignore[no-untyped-def]
    from tccdeploy.coordinator.references import Measured, match

    return match({pcr: [Measured(d) for d in digests] for pcr, digests in log.items()}, builds, (0, 4))


def test_the_build_a_log_matches_exactly_is_chosen_whichever_its_place():
    other = _build("b0", {0: [_d("firmware")], 4: [_d("shim"), _d("grub"), _d("other kernel")]})
    mine = _build("b1", BOOT)
    assert verifier_match([other, mine], BOOT) == (mine, "")
    assert verifier_match([mine, other], BOOT) == (mine, "")


def test_the_closest_build_is_the_one_with_most_events_in_place_the_first_on_a_tie():
    log = {0: [_d("firmware")], 4: [_d("shim"), _d("grub"), _d("new kernel")]}
    far = _build("far", {0: [_d("firmware")], 4: [_d("other shim")]})
    near = _build("near", {0: [_d("firmware")], 4: [_d("shim"), _d("grub"), _d("kernel")]})
    twin = _build("twin", {0: [_d("firmware")], 4: [_d("shim"), _d("grub"), _d("kernel 2")]})
    assert verifier_match([far, near, twin], log)[1] == "closest build near: PCR 4 event 2 (a different event)"
    assert verifier_match([twin, near], log)[1] == "closest build twin: PCR 4 event 2 (a different event)"
    # events in place count over all PCRs, not the last one only
    firmware_twin = _build("firmware-twin", {0: [_d("firmware")], 4: [_d("other shim")]})
    kernel_twin = _build("kernel-twin", {0: [_d("another firmware")], 4: [_d("shim")]})
    assert verifier_match([firmware_twin, kernel_twin], {0: [_d("firmware")], 4: [_d("x")]})[1].startswith(
        "closest build firmware-twin")
    nothing = _build("nothing", {0: [_d("another firmware")], 4: [_d("x")]})
    # every event where the log differs is named, not only the first
    assert verifier_match([nothing], log)[1] == ("closest build nothing: PCR 0 event 0 (a different event); PCR 4 event 0 "
                                                 "(a different event); PCR 4 event 1 (an extra event); PCR 4 event 2 "
                                                 "(an extra event)")
    longer = {0: [_d("firmware")], 4: [_d("shim"), _d("grub"), _d("new kernel"), *(_d(f"rootkit {i}") for i in range(5))]}
    assert verifier_match([near], longer)[1] == ("closest build near: PCR 4 event 2 (a different event); PCR 4 event 3 "
                                                 "(an extra event); PCR 4 event 4 (an extra event); PCR 4 event 5 "
                                                 "(an extra event); and 2 more")
    assert verifier_match([], log) == (None, "")


def test_a_verdict_reads_back_with_every_field():
    from tccdeploy.coordinator.verifier import Verdict

    reasons, warnings = [{"code": "quote.nonce", "message": "m"}], [{"code": "build.candidate", "message": "w"}]
    assert Verdict(False, reasons, warnings, "b1", "ab", 3, 4, "p1").as_dict() == {
        "verdict": "untrusted", "reasons": reasons, "warnings": warnings, "build": "b1", "platform": "p1",
        "pcr_digest": "ab", "reset_count": 3, "restart_count": 4}
    assert Verdict(True).as_dict()["verdict"] == "trusted"


def test_an_address_that_is_not_an_ip_address_is_outside_every_site(manifests):
    from tccdeploy.coordinator.verifier import perimeter_problems

    perimeter = manifests.perimeter
    assert perimeter_problems(perimeter, "site1", "127.0.1.9") == []
    for address in ("node1.example", "", "127.0.1.999"):
        assert perimeter_problems(perimeter, "site1", address) == [
            ("perimeter.address", f"address {address} is not in site site1's networks")]
    assert perimeter_problems(perimeter, None, "127.0.1.9")[0][0] == "perimeter.no-site"
    assert perimeter_problems(perimeter, "site9", "127.0.1.9")[0][0] == "perimeter.unknown-site"


def test_a_log_without_the_policys_bank_is_untrusted_by_name_not_a_crash(manifests):
    """A node whose log declares sha256 but measures into sha1 only: the boot cannot be matched
    against a sha256 build, whatever the quote says; the verdict says so."""
    from tccdeploy.coordinator.verifier import Evidence
    from tccdeploy.eventlog import EventLogWriter

    node = Node()
    good = node.evidence(NONCE)
    full = EventLogWriter(["sha1", "sha256"])
    stripped = full.header()
    for event in parse(good.eventlog).events:
        body = struct.pack("<III", event.pcr, event.type, 1) + struct.pack("<H", 0x0004) + event.digests["sha1"]
        stripped += body + struct.pack("<I", len(event.data)) + event.data
    evidence = Evidence(good.attest, good.signature, good.pcrs, stripped, NONCE, ssh_host_key=node.host_key)
    verdict = run(manifests, node, evidence)
    assert codes(verdict) == ["eventlog.bank-missing"] and "policy's bank" in verdict.reasons[0]["message"]


def test_a_sha1_format_log_under_a_sha256_policy_is_untrusted_by_name(manifests):
    from tccdeploy.coordinator.verifier import Evidence

    node = Node()
    good = node.evidence(NONCE)
    sha1_log = b"".join(struct.pack("<II", e.pcr, e.type) + e.digests["sha1"] + struct.pack("<I", len(e.data)) + e.data
                        for e in parse(good.eventlog).events)
    evidence = Evidence(good.attest, good.signature, good.pcrs, sha1_log, NONCE, ssh_host_key=node.host_key)
    verdict = run(manifests, node, evidence)
    assert codes(verdict) == ["eventlog.bank-missing"] and "no sha256 digests (banks: sha1)" in verdict.reasons[0]["message"]
