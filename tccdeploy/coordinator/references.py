"""Reference values: which platform and which TVMM build a measured boot is, and whether they
may run on this node.

A boot is judged in two parts, as a real fleet is built: the firmware of a hardware model (a
`Platform`, on the PCRs it owns, e.g. 0-7) and the TVMM software (a `TVMMBuild`, on the rest of
the policy's PCRs). One TVMM build then serves every model it runs on, and a firmware update is
a platform change, not a new build for every model. Without Platform manifests a build covers
every policy PCR, as before platforms existed.

Each part matches when its reference events equal the log's events on its PCRs, digest by digest
in order (and event type where the reference names one); a PCR it lists with no events must have
none. Then its status decides, from the TC's manifests and the TC's roster only:

    build.unknown / platform.unknown            no reference matches (the closest one is named,
                                                with each event where the log differs from it
                                                and what that event measured: which variable,
                                                which file)
    build.revoked / platform.revoked            the match is revoked
    build.not-in-rollout / platform.not-in-rollout
                                                the match is a candidate and this node is not one
                                                its rollout names (by roster name or EK)
Warnings: build.deprecated, platform.deprecated, build.candidate, platform.candidate.

The same standing is asked again at every key release and migration commit (`standing`), so a
manifest reload that revokes a reference, or ends a candidate's rollout without this node,
counts from the next decision, not only from the next attestation.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import NamedTuple

from ..eventdecode import data_check, describe
from ..eventlog import Event
from ..manifest.models import Platform, TVMMBuild

Reference = TVMMBuild | Platform


class Measured(NamedTuple):
    """One event of the log on a policy PCR: its digest in the policy's bank, its type name, and
    the parsed event (to say what it measured where the boot departs from a reference)."""

    digest: bytes
    type: str | None = None
    event: Event | None = None


def shown(measured: Measured) -> str:
    """What the event measured, decoded (which variable, which file, which command line), for an
    operator finding the rogue component. The log's data is the engine's to write: where the event's
    type says what was hashed and the digest is not that, the message says so instead of trusting it."""
    event = measured.event
    if event is None:
        return measured.type or ""
    text = f"{event.type_name} {describe(event)}"
    bank = next((b for b, d in event.digests.items() if d == measured.digest), None)
    if bank is not None and data_check(event, bank) == "not-data":
        text += " [its data is not what was measured]"
    return text


@dataclass
class Judgement:
    build: TVMMBuild | None = None
    platform: Platform | None = None
    failures: list[tuple[str, str]] = field(default_factory=list)
    warnings: list[tuple[str, str]] = field(default_factory=list)


def _departure(expected: Sequence, got: Sequence[Measured]) -> int:
    """How many events are in place before the log departs from the reference."""
    for i, (ref, event) in enumerate(zip(expected, got, strict=False)):
        if bytes.fromhex(ref.digest) != event.digest or (ref.type is not None and ref.type != event.type):
            return i
    return min(len(expected), len(got))


SHOWN_DEPARTURES = 4  # events named in a message; the rest counted


def _departed(expected: Sequence, got: Sequence[Measured]) -> list[tuple[int, str]]:
    """Each position where the log differs from the reference, with how: event by event, so two
    changed settings in one PCR (secure boot off and db changed) are both named."""
    out = []
    for i in range(max(len(expected), len(got))):
        if i >= len(expected):
            out.append((i, "an extra event"))
        elif i >= len(got):
            out.append((i, "a missing event"))
        elif bytes.fromhex(expected[i].digest) != got[i].digest or (expected[i].type is not None and expected[i].type != got[i].type):
            out.append((i, "a different event"))
    return out


def match(events_by_pcr: dict[int, list[Measured]], refs: Sequence[Reference],
          pcrs: Sequence[int]) -> tuple[Reference | None, str]:
    """The first reference whose events equal the log's on every PCR of pcrs.

    When none does, the message names the closest reference (most events in place before the
    log departs, the first on a tie) and each event where the log differs from it, decoded: what
    an operator needs to find the rogue component (the first SHOWN_DEPARTURES, the rest counted).
    """
    best: tuple[int, Reference | None] = (-1, None)
    for ref in refs:
        matched, departs = 0, False
        for pcr in pcrs:
            expected, got = ref.pcrs.get(pcr, ()), events_by_pcr.get(pcr, [])
            same = _departure(expected, got)
            matched += same
            departs = departs or same != len(expected) or same != len(got)
        if not departs:
            return ref, ""
        if matched > best[0]:
            best = (matched, ref)
    closest = best[1]
    if closest is None:
        return None, ""
    where = []
    for pcr in pcrs:
        got = events_by_pcr.get(pcr, [])
        for index, what in _departed(closest.pcrs.get(pcr, ()), got):
            detail = shown(got[index]) if index < len(got) else ""
            where.append(f"PCR {pcr} event {index} ({what}" + (f": {detail})" if detail else ")"))
    more = f"; and {len(where) - SHOWN_DEPARTURES} more" if len(where) > SHOWN_DEPARTURES else ""
    return None, f"closest {closest.kind} {closest.name}: " + "; ".join(where[:SHOWN_DEPARTURES]) + more


def coded(build_code: str, platform_code: str, ref: Reference) -> str:
    """The reason code for ref's kind (both spelled out, so the catalogue test finds them)."""
    return build_code if ref.kind == "build" else platform_code


def standing(ref: Reference, node: str | None, eks: tuple[str, ...] = ()) -> tuple[str, str] | None:
    """Why a node may not run ref now (None: it may): revoked, or a candidate outside its rollout.
    node: the node's name in the TC's registry; eks: its enrolled EK's fingerprints (sha256:...)."""
    what = "TVMM build" if ref.kind == "build" else "platform"
    label = f"{ref.name} {ref.version}".strip()
    if ref.status == "revoked":
        return coded("build.revoked", "platform.revoked", ref), f"the node booted {what} {label}, which is revoked"
    if ref.status == "candidate" and (ref.rollout is None or not ref.rollout.names(node, eks)):
        nodes = ", ".join(ref.rollout.nodes) if ref.rollout else "none"
        return (coded("build.not-in-rollout", "platform.not-in-rollout", ref), f"{what} {label} is a candidate, admitted only on the nodes its rollout "
                                              f"names ({nodes}); this node is not one of them")
    if ref.status not in ("candidate", "approved", "deprecated"):
        return coded("build.revoked", "platform.revoked", ref), f"{what} {label} has status {ref.status!r}, which admits no node"
    return None


def _warning(ref: Reference) -> tuple[str, str] | None:
    what = "TVMM build" if ref.kind == "build" else "platform"
    label = f"{ref.name} {ref.version}".strip()
    if ref.status == "deprecated":
        return coded("build.deprecated", "platform.deprecated", ref), f"the node booted {what} {label}, which is deprecated"
    if ref.status == "candidate":
        return coded("build.candidate", "platform.candidate", ref), f"the node booted {what} {label}, a candidate of a staged rollout"
    return None


def judge(events_by_pcr: dict[int, list[Measured]], builds: Sequence[TVMMBuild], platforms: Sequence[Platform],
          pcrs: Sequence[int], node: str | None, eks: tuple[str, ...] = ()) -> Judgement:
    """Which platform and build the boot is, and whether this node may run them."""
    out = Judgement()
    build_pcrs = list(pcrs)
    if platforms:
        platform, why = _match_platform(events_by_pcr, platforms, pcrs)
        if platform is None:
            out.failures.append(("platform.unknown", f"the measured firmware matches no platform ({why})"))
            owned = {p for ref in platforms for p in ref.pcrs}
        else:
            out.platform = platform
            owned = set(platform.pcrs)
        build_pcrs = [p for p in pcrs if p not in owned]
    build, why = match(events_by_pcr, builds, build_pcrs)
    if build is None:
        out.failures.append(("build.unknown", f"the measured boot matches no TVMM build ({why})"))
    else:
        out.build = build  # type: ignore[assignment]
    for ref in (out.platform, out.build):
        if ref is None:
            continue
        problem = standing(ref, node, eks)
        if problem is not None:
            out.failures.append(problem)
        elif (warning := _warning(ref)) is not None:
            out.warnings.append(warning)
    return out


def _match_platform(events_by_pcr: dict[int, list[Measured]], platforms: Sequence[Platform],
                    pcrs: Sequence[int]) -> tuple[Platform | None, str]:
    """Each platform is matched on the policy PCRs it owns (platforms may own different sets)."""
    best: tuple[int, str] = (-1, "")
    for platform in platforms:
        owned = [p for p in pcrs if p in platform.pcrs]
        found, why = match(events_by_pcr, [platform], owned)
        if found is not None:
            return platform, ""
        in_place = sum(_departure(platform.pcrs.get(p, ()), events_by_pcr.get(p, [])) for p in owned)
        if in_place > best[0]:
            best = (in_place, why)
    return None, best[1]


def still_admitted(build: str | None, platform: str | None, builds: Sequence[TVMMBuild],
                   platforms: Sequence[Platform], node: str | None, eks: tuple[str, ...] = ()) -> tuple[str, str] | None:
    """Whether the references a node's last trusted verdict named still let it run, under the
    TC's manifests as they are now (None: they do); for key releases and migration commits."""
    found = next((b for b in builds if b.name == build), None)
    if found is None:
        return "build.revoked", f"the node booted {build or 'no build'}, which the TC's manifests no longer list"
    problem = standing(found, node, eks)
    if problem is None and platforms:
        plat = next((p for p in platforms if p.name == platform), None)
        if plat is None:
            return "platform.revoked", f"the node's platform {platform or '(none recorded)'} is not in the TC's manifests"
        problem = standing(plat, node, eks)
    return problem


@dataclass(frozen=True)
class Baseline:
    """The TC's reference values as its manifests stand now, with the TC's own way of naming a
    node for rollouts (its roster); what key releases and migration commits ask again."""

    builds: Sequence[TVMMBuild]
    platforms: Sequence[Platform] = ()
    identify: Callable[[str], tuple[str | None, tuple[str, ...]]] = lambda node: (None, ())

    def versions(self) -> dict[str, str]:
        return {b.name: b.version for b in self.builds}

    def admits(self, node: str, build: str | None, platform: str | None) -> tuple[str, str] | None:
        """Why node's last trusted boot (build, platform) may not run now; None when it may."""
        name, eks = self.identify(node)
        return still_admitted(build, platform, self.builds, self.platforms, name, eks)
