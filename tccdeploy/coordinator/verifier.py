"""The verifier: is this quote, from this node, proof of an approved boot inside the perimeter?

Every check below has its own reason code, and all of them run (a forged quote that also comes
from outside the perimeter shows both). A verdict is `trusted` only when no check failed;
nothing is ever admitted on a partial check. The codes:

    evidence.malformed       the attestation, signature or PCR values do not parse
    node.not-enrolled        no enrolled AK for this node
    node.ssh-host-key        the node's SSH host key is missing, or not the one pinned at enrollment
    quote.signature          not signed by the node's enrolled AK
    quote.magic              not TPM-generated (magic is not TPM_GENERATED_VALUE)
    quote.type               not a quote (TPMS_ATTEST type)
    quote.nonce              the quote does not carry the nonce the TC issued
    nonce.unknown / nonce.replayed / nonce.expired / nonce.other-node   (the TC's nonce record)
    quote.pcr-selection      the quote does not cover the policy's bank and PCRs
    quote.pcr-digest         the reported PCR values are not what the TPM quoted
    quote.counters-backwards resetCount/restartCount below the last trusted attestation's
    eventlog.malformed       the event log does not parse
    eventlog.bank-missing    the log declares the policy's bank but an event that extends a PCR
                             carries no digest for it: the boot cannot be judged in that bank
    eventlog.replay          replaying the log does not give the quoted PCR values
    build.unknown / platform.unknown        the measured events match no TVMM build / platform
    build.revoked / platform.revoked        they match a revoked one
    build.not-in-rollout / platform.not-in-rollout
                             they match a candidate whose rollout does not name this node
                             (references.py: how a boot is split into platform and build)
    perimeter.no-site        the node has no site (not on the roster; or, for a prediction, claims none)
    perimeter.unknown-site   its site is not in the perimeter
    perimeter.address        its claimed address is not in its site's networks (a consistency check only)
    perimeter.not-in-roster / perimeter.roster-site / perimeter.roster-name / perimeter.roster-conflict
                             the roster does not place this EK as claimed (roster.py)
    perimeter.asset-tag      the site's asset tag is missing, wrong, or not certified by the AK
    perimeter.asset-tag-index  the certified NV index is not the site's, not platform-created and
                             write-locked, or certified from an offset or for a part of it
    perimeter.asset-tag-nonce  the certification does not carry the TC's quote nonce
Warnings (not failures): build.deprecated, platform.deprecated, build.candidate, platform.candidate,
node.rebooted.
"""

from __future__ import annotations

import hmac
import ipaddress
from dataclasses import dataclass, field
from typing import Any

from ..eventlog import EV_NO_ACTION, EventLogError, MissingBank
from ..eventlog import parse as parse_eventlog
from ..manifest.models import Perimeter, Platform, TVMMBuild
from . import references, roster, tpm2


@dataclass
class Evidence:
    attest: bytes
    signature: bytes
    pcrs: dict[int, bytes]
    eventlog: bytes
    nonce: bytes
    nonce_check: Any = None  # store.NonceCheck, from consuming the nonce
    asset_attest: bytes = b""
    asset_signature: bytes = b""
    asset_nv_public: bytes = b""
    ssh_host_key: str = ""


@dataclass
class Verdict:
    trusted: bool
    reasons: list[dict[str, str]] = field(default_factory=list)
    warnings: list[dict[str, str]] = field(default_factory=list)
    build: str | None = None
    pcr_digest: str | None = None
    reset_count: int | None = None
    restart_count: int | None = None
    platform: str | None = None

    def as_dict(self) -> dict[str, Any]:
        return {"verdict": "trusted" if self.trusted else "untrusted", "reasons": self.reasons,
                "warnings": self.warnings, "build": self.build, "platform": self.platform,
                "pcr_digest": self.pcr_digest, "reset_count": self.reset_count, "restart_count": self.restart_count}


class _Collector:
    def __init__(self) -> None:
        self.reasons: list[dict[str, str]] = []
        self.warnings: list[dict[str, str]] = []

    @staticmethod
    def _entry(code: str, message: str) -> dict[str, str]:
        # As with Refused: a reason nobody can act on is a bug of its own.
        if not isinstance(code, str) or "." not in code or not isinstance(message, str) or not message.strip():
            raise TypeError(f"a verdict's reason needs a code and a message (got {code!r}, {message!r})")
        return {"code": code, "message": message}

    def fail(self, code: str, message: str) -> None:
        self.reasons.append(self._entry(code, message))

    def warn(self, code: str, message: str) -> None:
        self.warnings.append(self._entry(code, message))


def perimeter_problems(perimeter: Perimeter, site: str | None, address: str) -> list[tuple[str, str]]:
    """Why a node at address claiming site is outside the perimeter (nothing when it is inside)."""
    site_def = perimeter.site(site) if site else None
    if not site:
        return [("perimeter.no-site", "the node claims no site: it is outside the perimeter")]
    if site_def is None:
        return [("perimeter.unknown-site", f"site {site!r} is not in perimeter {perimeter.name!r}")]
    try:
        inside = site_def.contains(ipaddress.ip_address(address))
    except ValueError:
        inside = False
    return [] if inside else [("perimeter.address", f"address {address} is not in site {site}'s networks")]


def verify(
    evidence: Evidence,
    perimeter: Perimeter,
    builds: list[TVMMBuild],
    identity: dict[str, Any] | None,
    site: str | None,
    address: str,
    last_trusted: dict[str, Any] | None = None,
    roster_failures: list[tuple[str, str]] | None = None,
    platforms: list[Platform] | tuple[Platform, ...] = (),
    node: str | None = None,
) -> Verdict:
    """site: the node's site as the TC's roster records it (not the engine's claim); address:
    the engine's claim, checked for consistency; roster_failures: what the roster check found;
    node: the node's name in the TC's registry, for candidates' rollouts (with the enrolled EK's
    fingerprints from identity)."""
    c = _Collector()
    policy = perimeter.attestation
    verdict = Verdict(False)

    # Who: an enrolled AK, reached at the pinned host key.
    ak = None
    if identity is None:
        c.fail("node.not-enrolled", "the node is not enrolled: run tccdeploy enroll first")
    else:
        ak = tpm2.parse_public_cached(bytes(identity["ak_public"]))
        if not evidence.ssh_host_key:
            c.fail("node.ssh-host-key", "the evidence names no SSH host key: the node must be reached at the key "
                                        "pinned at enrollment")
        elif not hmac.compare_digest(evidence.ssh_host_key.encode(), str(identity["ssh_host_key"]).encode()):
            c.fail("node.ssh-host-key", "the node's SSH host key is not the one pinned at enrollment")

    # What the TPM signed.
    attest = signature = None
    try:
        attest = tpm2.parse_attest(evidence.attest)
        signature = tpm2.parse_signature(evidence.signature)
    except tpm2.TPMFormatError as exc:
        c.fail("evidence.malformed", f"the quote does not parse: {exc}")
    if attest is not None and signature is not None:
        if ak is not None and not tpm2.verify_signature(ak, evidence.attest, signature):
            c.fail("quote.signature", "the quote is not signed by the node's enrolled attestation key")
        if attest.magic != tpm2.TPM_GENERATED:
            c.fail("quote.magic", f"magic 0x{attest.magic:08x} is not TPM_GENERATED_VALUE")
        if attest.type != tpm2.ST_ATTEST_QUOTE:
            c.fail("quote.type", f"attestation type 0x{attest.type:04x} is not a quote")
        if not hmac.compare_digest(attest.extra_data, evidence.nonce):
            c.fail("quote.nonce", "the quote does not carry the nonce the TC issued")
        verdict.reset_count, verdict.restart_count = attest.reset_count, attest.restart_count
        if last_trusted and last_trusted.get("reset_count") is not None:
            before = (last_trusted["reset_count"], last_trusted["restart_count"])
            now = (attest.reset_count, attest.restart_count)
            if now < before:
                c.fail("quote.counters-backwards", f"TPM reset/restart counters went back from {before} to {now}")
            elif now != before:
                c.warn("node.rebooted", f"the TPM was reset or restarted since the last attestation ({before} -> {now})")
    check = evidence.nonce_check
    if check is not None and not check.ok:
        c.fail(check.reason, {"nonce.unknown": "the TC never issued this nonce",
                              "nonce.replayed": "this nonce was used before (a replayed quote)",
                              "nonce.expired": "the nonce expired before the quote arrived",
                              "nonce.other-node": "the nonce was issued for another node"}.get(check.reason, check.reason))

    # Which PCRs and values.
    wanted = (tpm2.HASH_IDS[policy.bank], tuple(policy.pcrs))
    values = [evidence.pcrs.get(p, b"") for p in policy.pcrs]
    if attest is not None and attest.type == tpm2.ST_ATTEST_QUOTE:
        if attest.pcr_selection != (wanted,):
            c.fail("quote.pcr-selection", f"the quote covers {attest.pcr_selection}, the policy needs {policy.bank} PCRs {list(policy.pcrs)}")
        elif any(len(v) != len(attest.pcr_digest) for v in values) or \
                not hmac.compare_digest(tpm2.pcr_digest(policy.bank, values), attest.pcr_digest):
            c.fail("quote.pcr-digest", "the reported PCR values are not the ones the TPM quoted")
        verdict.pcr_digest = attest.pcr_digest.hex()

    # What was measured: the log must explain the PCRs, and match an approved build.
    try:
        log = parse_eventlog(evidence.eventlog)
        replayed = log.replay(policy.bank, list(policy.pcrs))
    except MissingBank as exc:
        c.fail("eventlog.bank-missing", f"the event log cannot be replayed in the policy's bank: {exc}")
    except EventLogError as exc:
        c.fail("eventlog.malformed", f"the event log does not parse: {exc}")
    else:
        bad = [p for p in policy.pcrs if replayed[p] != evidence.pcrs.get(p)]
        if bad:
            c.fail("eventlog.replay", f"replaying the event log does not give PCR(s) {bad}")
        events: dict[int, list[references.Measured]] = {}
        for event in log.events:
            if event.type != EV_NO_ACTION and event.pcr in policy.pcrs:
                events.setdefault(event.pcr, []).append(references.Measured(event.digests[policy.bank], event.type_name,
                                                                                 event))
        judged = references.judge(events, builds, platforms, policy.pcrs, node, roster.enrolled_identities(identity))
        verdict.build = judged.build.name if judged.build else None
        verdict.platform = judged.platform.name if judged.platform else None
        for code, message in judged.failures:
            c.fail(code, message)
        for code, message in judged.warnings:
            c.warn(code, message)

    # Where: inside the perimeter, as the TC's roster says; the claimed address must agree.
    for code, message in roster_failures or []:
        c.fail(code, message)
    for code, message in perimeter_problems(perimeter, site, address):
        c.fail(code, message)
    site_def = perimeter.site(site) if site else None
    if site_def is not None and site_def.asset_tag is not None:
        _check_asset_tag(c, evidence, ak, site_def.asset_tag.nv_index, site_def.asset_tag.value)

    verdict.reasons, verdict.warnings = c.reasons, c.warnings
    verdict.trusted = not c.reasons
    return verdict


REQUIRED_NV = tpm2.NV_PLATFORMCREATE | tpm2.NV_WRITELOCKED | tpm2.NV_WRITTEN


def _check_asset_tag(c: _Collector, evidence: Evidence, ak: tpm2.Public | None, index: int, value: str) -> None:
    """The tag counts only from the site's NV index, made by the platform (firmware or the TC's
    provisioning, never the OS owner, i.e. the provider) and write-locked, certified whole from
    offset 0 over the quote's nonce, which the TC issued and consumed."""
    if not evidence.asset_attest:
        c.fail("perimeter.asset-tag", "the site requires an asset tag and the node certified none")
        return
    try:
        attest = tpm2.parse_attest(evidence.asset_attest)
        signature = tpm2.parse_signature(evidence.asset_signature)
        nv = tpm2.parse_nv_public(evidence.asset_nv_public)
        nv_name = nv.name
    except tpm2.TPMFormatError as exc:
        c.fail("perimeter.asset-tag", f"the asset-tag certification does not parse: {exc}")
        return
    if ak is None or not tpm2.verify_signature(ak, evidence.asset_attest, signature) or \
            attest.type != tpm2.ST_ATTEST_NV or attest.magic != tpm2.TPM_GENERATED:
        c.fail("perimeter.asset-tag", "the asset tag is not certified by the node's attestation key")
        return
    if not hmac.compare_digest(attest.extra_data, evidence.nonce):
        c.fail("perimeter.asset-tag-nonce", "the asset-tag certification does not carry the TC's nonce for this quote")
        return
    if not hmac.compare_digest(attest.nv_index_name, nv_name) or nv.index != index:
        c.fail("perimeter.asset-tag-index", f"the certified NV index is not the site's index 0x{index:08x}")
        return
    if not nv.has(REQUIRED_NV):
        c.fail("perimeter.asset-tag-index", f"NV index 0x{index:08x} (attributes 0x{nv.attributes:08x}) is not "
                                            "platform-created, written and write-locked: the OS owner could have written it")
        return
    if attest.nv_offset != 0 or nv.data_size != len(value.encode()) or len(attest.nv_contents) != nv.data_size:
        c.fail("perimeter.asset-tag-index", "the certification covers only part of the asset-tag index")
        return
    if not hmac.compare_digest(attest.nv_contents, value.encode()):
        c.fail("perimeter.asset-tag", f"the TPM's asset tag is {attest.nv_contents[:64]!r}, the site needs {value!r}")
