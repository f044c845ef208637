"""Real machines' event logs from public repositories (tests/vectors/eventlogs/, provenance and
licences in its README.md), each checked against two references:

- the values the source project's own tests assert for it (the TPM's PCRs as read on that
  machine, or the project's replay; each `<log>.json` says which), on every PCR the log extends;
- tpm2_eventlog (tpm2-tools 5.4, Debian 12), run here on the same file.

Where the references disagree, the TCG PC Client Platform Firmware Profile decides and the case
says why. Three disagreements, all with tpm2-tools 5.4:

- PCR 0 of logs with EV_NO_ACTION events after the Spec ID event (StartupLocality, SP800-155
  Event3): 5.4 extends their all-zero digests and ignores StartupLocality (tpm2-tools #3224,
  fixed in 5.6). PFP 10.4.1 says EV_NO_ACTION events are not extended, and the locality sets
  PCR 0's starting value; the machines' own PCR 0 (as the projects assert it) agrees with us.
- two logs 5.4 cannot read: a SHA-1 format log whose first event is a 17-byte StartupLocality
  (not a Spec ID event; go-attestation reads it, as we do) and a log with an EV_NO_ACTION at
  PCR index 0xFFFFFFFF (Windows' AIK event), on which 5.4 crashes.
- a Spec ID event whose size leaves out its own vendorInfo bytes (a tpm2-tools fixture): the
  event size covers the whole TCG_EfiSpecIdEvent (PFP 10.4.5.1), so the log is malformed;
  tpm2_eventlog reads past the event.
"""

from __future__ import annotations

import hashlib
import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from tccdeploy.eventlog import EV_NO_ACTION, EventLog, EventLogError, parse

CORPUS = Path(__file__).parent / "vectors" / "eventlogs"
LOGS = sorted(str(p.relative_to(CORPUS))[:-5] for p in CORPUS.glob("*/*.json"))

# The logs tccdeploy refuses, each with why (the references agree, or the spec decides).
REFUSED = {
    "keylime/binary_bios_measurements-bogus": "PCR index 1969712994 out of range",  # ASCII text, not a log
    "keylime/binary_bios_measurements-empty": "truncated: first event PCR index needs 4 bytes",
    "tpm2-tools/specid-vendordata.bin": "truncated: vendorInfo needs 4 bytes, 0 left",  # see the module docstring
}
# PCRs a project asserts that no replay of the log can give, and why.
UNREPLAYABLE = {
    # The firmware left out the two ExitBootServices EV_EFI_ACTION events of PCR 5; go-attestation
    # injects them before it compares (attest/eventlog_workarounds.go). tccdeploy does not: a node
    # whose log does not explain its PCRs fails eventlog.replay, which is the point of the log.
    ("go-attestation/ebs_event_missing_eventlog", "sha1", 5),
}
# tpm2_eventlog 5.4 cannot read these (the module docstring says why); tccdeploy reads both.
TPM2_TOOLS_UNREADABLE = {"go-attestation/short_no_action_eventlog", "go-attestation/option_rom_eventlog"}


def _meta(name: str) -> dict:
    return json.loads((CORPUS / f"{name}.json").read_text())


def _parsed(name: str) -> EventLog:
    return parse((CORPUS / name).read_bytes())


def _extended(log: EventLog, bank: str) -> set[int]:
    return {e.pcr for e in log.events if e.type != EV_NO_ACTION and bank in e.digests}


def test_the_corpus_is_there_with_provenance_for_every_log():
    assert len(LOGS) >= 30, "tests/vectors/eventlogs/ is missing logs"
    readme = (CORPUS / "README.md").read_text()
    for name in LOGS:
        meta = _meta(name)
        assert hashlib.sha256((CORPUS / name).read_bytes()).hexdigest() == meta["sha256"], name
        assert meta["sources"] and all(s["commit"] and s["repository"] and s["path"] for s in meta["sources"]), name
        assert name.split("/")[1] in readme, f"{name} is not in the corpus README"
    for project in {name.split("/")[0] for name in LOGS}:
        assert (CORPUS / project / "LICENSE").is_file(), f"{project}'s licence is not beside its logs"


@pytest.mark.parametrize("name", LOGS)
def test_each_log_parses_or_is_refused_with_the_expected_reason(name: str):
    if name in REFUSED:
        with pytest.raises(EventLogError, match=re.escape(REFUSED[name])):
            _parsed(name)
        return
    log = _parsed(name)
    assert log.events and log.banks
    for bank in log.banks:
        log.replay(bank)


@pytest.mark.parametrize("name", [n for n in LOGS if n not in REFUSED])
def test_every_pcr_a_source_project_asserts_is_what_the_log_replays_to(name: str):
    log = _parsed(name)
    checked = 0
    for reference in _meta(name)["references"]:
        for bank, values in (reference.get("pcrs") or {}).items():
            if bank not in log.banks:
                continue  # e.g. sha256 values stated for a SHA-1 format log: nothing to replay
            replayed = log.replay(bank)
            for pcr in sorted(_extended(log, bank) & {int(p) for p in values}):
                if (name, bank, pcr) in UNREPLAYABLE:
                    assert replayed[pcr].hex() != values[str(pcr)]
                    continue
                assert replayed[pcr].hex() == values[str(pcr)], f"{reference['project']}: {bank} PCR {pcr}"
                checked += 1
    stated = any(r.get("pcrs") for r in _meta(name)["references"])
    assert checked or not stated or any(k[0] == name for k in UNREPLAYABLE)


def _tpm2_eventlog(path: Path) -> dict[str, dict[int, str]] | None:
    done = subprocess.run(["tpm2_eventlog", str(path)], capture_output=True, text=True, timeout=60)
    if done.returncode != 0:
        return None
    pcrs: dict[str, dict[int, str]] = {}
    bank = None
    for line in done.stdout[done.stdout.rfind("\npcrs:"):].splitlines()[1:]:
        if m := re.match(r"^  (\w+):$", line):
            bank = m.group(1)
        elif (m := re.match(r"^    (\d+)\s*:\s*0x([0-9A-Fa-f]+)$", line)) and bank:
            pcrs.setdefault(bank, {})[int(m.group(1))] = m.group(2).lower()
    return pcrs


def _as_tpm2_tools_54(log: EventLog, bank: str) -> dict[int, bytes]:
    """tpm2-tools 5.4's replay: every event after the Spec ID extends (EV_NO_ACTION's zero digest
    too), every PCR from zero (no StartupLocality)."""
    values: dict[int, bytes] = {}
    for event in log.events:
        if bank in event.digests:
            current = values.get(event.pcr, bytes(len(event.digests[bank])))
            values[event.pcr] = hashlib.new(bank, current + event.digests[bank]).digest()
    return values


@pytest.mark.skipif(shutil.which("tpm2_eventlog") is None, reason="tpm2_eventlog (tpm2-tools) is not installed")
@pytest.mark.parametrize("name", [n for n in LOGS if n not in REFUSED])
def test_every_pcr_tpm2_eventlog_computes_agrees_or_differs_only_where_the_spec_says_it_errs(name: str):
    log = _parsed(name)
    theirs = _tpm2_eventlog(CORPUS / name)
    if theirs is None:
        assert name in TPM2_TOOLS_UNREADABLE, f"tpm2_eventlog cannot read {name}"
        return
    assert theirs, "tpm2_eventlog computed no PCR"
    for bank, values in theirs.items():
        ours, as_54 = log.replay(bank), _as_tpm2_tools_54(log, bank)
        for pcr, value in values.items():
            if ours[pcr].hex() != value:
                # 5.4 extended an EV_NO_ACTION or ignored StartupLocality: its value is exactly that
                assert as_54[pcr].hex() == value and pcr == 0, f"{bank} PCR {pcr}"
                assert any(e.type == EV_NO_ACTION and e.pcr == 0 for e in log.events)


def test_the_disagreements_with_tpm2_tools_are_the_logs_with_no_action_events_in_pcr_0():
    """The README's count: which logs tpm2-tools 5.4 replays otherwise, each for the spec's reason."""
    differing = sorted(name for name in LOGS if name not in REFUSED and name not in TPM2_TOOLS_UNREADABLE
                       and any(_as_tpm2_tools_54(_parsed(name), b).get(0) != _parsed(name).replay(b).get(0)
                               for b in _parsed(name).banks))
    assert differing == [
        "go-tpm-tools/confidential-gke-debug-251000_eventlog.bin",  # SP800-155 Event3
        "go-tpm-tools/eventlogwithsp800155.bin",  # SP800-155 Event3
        "go-tpm-tools/gdc-host.bin",  # StartupLocality 3 (Boot Guard)
        "go-tpm-tools/glinux-alex.bin",  # StartupLocality 3
        "keylime/binary_bios_measurements",  # StartupLocality 3
    ]


def corpus_counts() -> dict[str, int]:
    """The figures the README reports for the corpus."""
    counts = dict.fromkeys(("logs", "parsed", "refused", "asserted", "replayed", "t2e_total", "t2e_agree",
                            "t2e_unreadable"), 0)
    counts["logs"], counts["refused"] = len(LOGS), len(REFUSED)
    for name in (n for n in LOGS if n not in REFUSED):
        counts["parsed"] += 1
        log = _parsed(name)
        for reference in _meta(name)["references"]:
            for bank, values in (reference.get("pcrs") or {}).items():
                if bank in log.banks:
                    replayed = log.replay(bank)
                    for pcr in _extended(log, bank) & {int(p) for p in values}:
                        counts["asserted"] += 1
                        counts["replayed"] += replayed[pcr].hex() == values[str(pcr)]
        theirs = _tpm2_eventlog(CORPUS / name) if shutil.which("tpm2_eventlog") else None
        if theirs is None:
            counts["t2e_unreadable"] += 1
            continue
        for bank, values in theirs.items():
            replayed = log.replay(bank)
            counts["t2e_total"] += len(values)
            counts["t2e_agree"] += sum(replayed[pcr].hex() == value for pcr, value in values.items())
    return counts


@pytest.mark.skipif(shutil.which("tpm2_eventlog") is None, reason="tpm2_eventlog (tpm2-tools) is not installed")
def test_the_readme_reports_the_corpus_as_it_is():
    counts = corpus_counts()
    readme = (CORPUS.parent.parent.parent / "README.md").read_text()
    said = (f"{counts['logs']} logs", f"{counts['parsed']} parse and {counts['refused']} are refused",
            f"({counts['asserted']} in all", f"tccdeploy replays {counts['replayed']} exactly",
            f"agrees on {counts['t2e_agree']} of the {counts['t2e_total']} PCRs",
            f"cannot read {counts['t2e_unreadable']} logs")
    for words in said:
        assert words in " ".join(readme.split()), f"README: say {words!r} (tests/test_eventlog_corpus.py counts)"


def test_a_real_uefi_boot_is_what_its_files_predict():
    """tccdeploy/ovmf-systemd-boot-linux61.bin: OVMF booted systemd-boot, which booted Linux 6.1's
    EFI stub, on a vTPM; its log replays to the PCRs the booted kernel read (the tests above), and
    the boot chain's events are what baseline.uefi_linux_events computes from the files: the
    Authenticode digests firmware measured, the load options and initrd the stub measured, the
    command line systemd-boot measured."""
    from tccdeploy.bootpaths import SYSTEMD_BOOT, step_digest
    from tccdeploy.pe import authenticode

    name = "tccdeploy/ovmf-systemd-boot-linux61.bin"
    meta, log = _meta(name), _parsed(name)
    files = meta["files"]
    by_pcr: dict[int, list] = {}
    for event in log.events:
        if event.type != EV_NO_ACTION:
            by_pcr.setdefault(event.pcr, []).append(event)
    applications = [e.digests["sha256"] for e in by_pcr[4] if e.type_name == "EV_EFI_BOOT_SERVICES_APPLICATION"]
    assert applications[1].hex() == files["vmlinuz"]["authenticode_sha256"]
    installed = Path(files["systemd-bootx64.efi"]["path"])
    if installed.is_file() and hashlib.sha256(installed.read_bytes()).hexdigest() == files["systemd-bootx64.efi"]["sha256"]:
        assert applications[0] == authenticode(installed.read_bytes())  # pe.py against real firmware's measurement
    cmdline = SYSTEMD_BOOT.command_line(files["loader entry options"])
    assert cmdline == files["kernel command line"]
    initrd = bytes.fromhex(files["initrd.img"]["sha256"])
    expected: dict[int, list[bytes]] = {}
    known = {"initrd": initrd, "kernel": bytes.fromhex(files["vmlinuz"]["authenticode_sha256"])}
    for step in SYSTEMD_BOOT.steps:  # the files' digests from the .json: the files are not kept
        if step.source != "bootloader":
            expected.setdefault(step.pcr, []).append(known.get(step.source) or step_digest(step, {}, cmdline))
    assert [e.digests["sha256"] for e in by_pcr[9]] == expected[9]
    assert [e.digests["sha256"] for e in by_pcr[12]] == expected[12]
    # PCR 4: this boot tried another boot option first ("Returning from EFI Application" and a second
    # "Calling"), as OVMF does when its boot order is not pinned; the lab pins it (lab/realboot.py).
    fixed = [e.digests["sha256"] for e in by_pcr[4] if e.type_name in ("EV_EFI_ACTION", "EV_SEPARATOR")]
    assert fixed[:2] == expected[4][:2]
