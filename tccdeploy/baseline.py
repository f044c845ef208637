"""Reference values from a boot: a TVMMBuild (and a Platform) written from a known-good node's
event log, how a node's boot departs from a build, and a build predicted from its files.

These write manifests for an operator to review; they decide nothing. What they write is
`candidate` with a rollout naming the node it came from: the TC admits it there only, until the
TC's operator approves it (references.py). The node's log is taken only once the TC has checked
it (engine/capture.py): signed by the node's enrolled AK over a fresh nonce, replaying to the
quoted PCRs. A log that does not explain the PCRs never becomes a reference.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Sequence
from dataclasses import dataclass

from .bootpaths import BootPath, step_digest
from .eventdecode import describe
from .eventlog import EV_NO_ACTION, Event, EventLog
from .manifest.models import Platform, ReferenceEvent, TVMMBuild

DESCRIPTION_MAX = 120


def _events(log: EventLog, bank: str, pcrs: Sequence[int]) -> dict[int, list[Event]]:
    out: dict[int, list[Event]] = {p: [] for p in pcrs}
    for event in log.events:
        if event.type != EV_NO_ACTION and event.pcr in out:
            out[event.pcr].append(event)
    return out


def _reference(event: Event, bank: str) -> dict[str, str]:
    text = describe(event)
    if len(text) > DESCRIPTION_MAX:
        text = text[:DESCRIPTION_MAX] + "..."
    return {"digest": event.digests[bank].hex(), "type": event.type_name, "description": text}


def captured(log: EventLog, bank: str, pcrs: Sequence[int], platform_pcrs: Sequence[int], node: str,
             build: str, version: str, platform: str | None) -> tuple[dict, dict | None]:
    """The TVMMBuild (on pcrs minus platform_pcrs) and the Platform (on platform_pcrs, if any)
    manifests that node's boot matches, as candidates of a rollout on that node."""
    by_pcr = _events(log, bank, pcrs)
    build_pcrs = [p for p in pcrs if p not in platform_pcrs]
    build_doc = {
        "apiVersion": "tccdeploy/v1", "kind": "TVMMBuild",
        "metadata": {"name": build, "description": f"captured from {node}'s boot: review every event, then approve"},
        "spec": {
            "version": version, "status": "candidate", "rollout": {"nodes": [node]},
            "measurements": {"bank": bank, "pcrs": [
                {"pcr": p, "events": [_reference(e, bank) for e in by_pcr[p]]} for p in build_pcrs if by_pcr[p]]},
        },
    }
    if not build_doc["spec"]["measurements"]["pcrs"]:
        raise ValueError(f"{node}'s log has no event on the build's PCRs {build_pcrs}: nothing to capture")
    platform_doc = None
    if platform_pcrs:
        platform_doc = {
            "apiVersion": "tccdeploy/v1", "kind": "Platform",
            "metadata": {"name": platform or f"{build}-platform",
                         "description": f"firmware captured from {node}'s boot: review every event, then approve"},
            "spec": {
                "status": "candidate", "rollout": {"nodes": [node]},
                "measurements": {"bank": bank, "pcrs": [
                    {"pcr": p, "events": [_reference(e, bank) for e in by_pcr[p]]} for p in platform_pcrs]},
            },
        }
    return build_doc, platform_doc


@dataclass(frozen=True)
class Departure:
    """One place where a boot departs from a reference: PCR, position, what was expected and what came."""

    pcr: int
    index: int
    kind: str  # "changed", "extra" or "missing"
    expected: ReferenceEvent | None
    got: Event | None

    def lines(self, bank: str) -> list[str]:
        where = f"PCR {self.pcr} event {self.index}"
        if self.kind == "extra":
            assert self.got is not None
            return [f"{where}: an extra {self.got.type_name}: {describe(self.got)}",
                    f"    {bank} {self.got.digests[bank].hex()}"]
        assert self.expected is not None
        expected = f"{self.expected.type or 'event'} {self.expected.digest}"
        if self.expected.description:
            expected += f" ({self.expected.description})"
        if self.kind == "missing":
            return [f"{where}: missing: {expected}"]
        assert self.got is not None
        return [f"{where}: changed: {self.got.type_name}: {describe(self.got)}",
                f"    expected {expected}", f"    got      {self.got.type_name} {self.got.digests[bank].hex()}"]


def departures(log: EventLog, bank: str, pcrs: Sequence[int], reference: TVMMBuild | Platform) -> list[Departure]:
    """How the log departs from reference on pcrs, event by event (an empty list: it matches)."""
    out = []
    by_pcr = _events(log, bank, pcrs)
    for pcr in pcrs:
        expected, got = list(reference.pcrs.get(pcr, ())), by_pcr[pcr]
        for i in range(max(len(expected), len(got))):
            ref = expected[i] if i < len(expected) else None
            event = got[i] if i < len(got) else None
            if ref is None:
                out.append(Departure(pcr, i, "extra", None, event))
            elif event is None:
                out.append(Departure(pcr, i, "missing", ref, None))
            elif ref.digest != event.digests[bank].hex() or (ref.type is not None and ref.type != event.type_name):
                out.append(Departure(pcr, i, "changed", ref, event))
    return out


def compare(log: EventLog, bank: str, pcrs: Sequence[int], build: TVMMBuild, platforms: Sequence[Platform],
            matched_platform: str | None) -> tuple[list[str], bool]:
    """What `build capture --diff` prints: the node's firmware against its platform (the one the
    TC matched, else the closest, with where the firmware departs from it), then its boot against
    build on the other PCRs; and whether anything departs."""
    owned: set[int] = set()
    lines: list[str] = []
    differs = False
    if platforms:
        platform = next((p for p in platforms if p.name == matched_platform), None)
        if platform is not None:
            lines.append(f"firmware: platform {platform.name}")
        else:
            def departed(candidate: Platform) -> list[Departure]:
                return departures(log, bank, [p for p in pcrs if p in candidate.pcrs], candidate)

            platform = min(platforms, key=lambda candidate: len(departed(candidate)))
            lines.append(f"firmware: matches no platform; the closest is {platform.name}:")
            lines += ["  " + line for departure in departed(platform) for line in departure.lines(bank)]
            differs = True
        owned = set(platform.pcrs)
    rest = [p for p in pcrs if p not in owned]
    gone = departures(log, bank, rest, build)
    if not gone:
        lines.append(f"boot: the same as {build.name} on PCRs {rest}")
    lines += [line for departure in gone for line in departure.lines(bank)]
    return lines, differs or bool(gone)


# -- prediction from files ----------------------------------------------------------------------
def predicted(artifacts: dict[str, str], options: str, name: str, version: str, path: BootPath,
              out_dir: str | None = None) -> dict:
    """The TVMMBuild that booting these files through path measures (status candidate, no
    rollout: approve it, or make it a candidate on named nodes, after review). options: the boot
    entry's command line; the build's cmdline artifact is the line the kernel gets from it."""
    missing = [a for a in path.artifacts if a not in artifacts]
    if missing:
        raise ValueError(f"the {path.name} boot path measures {', '.join(missing)}: give each as NAME=FILE")
    cmdline = path.command_line(options)
    files: dict[str, bytes] = {}
    entries: dict[str, dict] = {}
    for artifact in path.artifacts:
        with open(artifacts[artifact], "rb") as fh:
            files[artifact] = fh.read()
        shown = os.path.relpath(artifacts[artifact], out_dir) if out_dir else artifacts[artifact]
        entries[artifact] = {"path": shown, "sha256": hashlib.sha256(files[artifact]).hexdigest()}
    entries["cmdline"] = {"value": cmdline, "sha256": hashlib.sha256(cmdline.encode()).hexdigest()}
    pcrs: dict[int, list[dict]] = {}
    for step in path.steps:
        digest = step_digest(step, files, cmdline).hex()
        if step.source and digest == entries[step.source]["sha256"]:
            event = {"artifact": step.source, "type": step.type}  # the artifact's own digest
        else:  # Authenticode, UTF-16 and fixed data: the event names its digest
            what = step.description or f"{step.source} (Authenticode)"
            event = {"digest": digest, "type": step.type, "description": what}
        pcrs.setdefault(step.pcr, []).append(event)
    return {
        "apiVersion": "tccdeploy/v1", "kind": "TVMMBuild",
        "metadata": {"name": name, "description": f"predicted from its files ({path.name} boot path): review, then approve"},
        "spec": {"version": version, "status": "candidate", "artifacts": entries,
                 "measurements": {"bank": "sha256",
                                  "pcrs": [{"pcr": p, "events": events} for p, events in sorted(pcrs.items())]}},
    }
