"""Enrollment and attestation as engine work: carry the node's answers to the coordinator.

The engine decides nothing here. It asks the node's TVMM service for the TPM's evidence and hands it to the
coordinator, which checks it; a refusal comes back as a failed host with the TC's reason code.
"""

from __future__ import annotations

import base64
from typing import Any

from ..coordinator.admission import AdmissionRefused
from ..coordinator.enrollment import EnrollmentRefused
from ..coordinator.interface import TC
from ..coordinator.verifier import Evidence
from .connection import fingerprint
from .helper import RemoteError
from .runner import HostResult, Session


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def _unb64(text: str) -> bytes:
    return base64.b64decode(text)


def host_key(session: Session) -> str:
    transport = session.connect().transport
    assert transport is not None
    return fingerprint(transport.get_remote_server_key())


def enroll(coordinator: TC):  # type: ignore[no-untyped-def]
    """Carry the node's TPM identity to the TC. A node enrolled with the TPM it has is left as it
    is (changed=False); a changed TPM is the TC operator's call (`tc nodes replace-tpm`)."""

    def work(session: Session) -> HostResult | dict[str, Any]:
        name = session.host.name
        identity = session.tvmm("identity")
        ak = session.tvmm("ak_create")
        site = session.host.vars.get("tcc_site")
        try:
            challenge = coordinator.enrollment_challenge(
                name, _unb64(identity["ek_certificate"]), _unb64(identity["ek_public"]), _unb64(ak["ak_public"]),
                host_key(session), str(site) if site else None, session.host.address)
            if challenge is None:
                known = coordinator.identity_summary(name)
                return {"changed": False, "enrolled": True, "manufacturer": known.manufacturer if known else None,
                        "ek_fingerprint": known.ek_fingerprint if known else None}
            try:
                answer = session.tvmm("ak_activate", {"credential": _b64(challenge.credential),
                                                      "secret": _b64(challenge.secret)})
            except RemoteError as exc:
                raise EnrollmentRefused("ak.not-bound", f"the TPM could not activate the credential: {exc}") from None
            result = coordinator.enrollment_finish(name, _unb64(answer["secret"]))
        except EnrollmentRefused as exc:
            return HostResult(name, "failed", str(exc), {"refused": exc.reason}, reason=exc.reason)
        return {"changed": True, "enrolled": True, "manufacturer": result["manufacturer"],
                "ek_fingerprint": result["ek_fingerprint"]}

    return work


def admit(session: Session, coordinator: TC, attestation_id: int) -> dict[str, Any]:
    """Create TK on the node, have the TC check it and its policy, prove it works, get the certificate."""
    name = session.host.name
    bank, pcrs = coordinator.quote_policy()
    nonce = coordinator.nonce(name, "certify")
    tk = session.tvmm("tk_create", {"bank": bank, "pcrs": pcrs, "nonce": _b64(nonce),
                                    "tc_ca": coordinator.ca_certificate_pem()}, timeout=120)
    challenge = coordinator.admission_challenge(name, attestation_id, _unb64(tk["tk_public"]), _unb64(tk["attest"]),
                                                _unb64(tk["signature"]), nonce)
    answer = session.tvmm("tk_check", {"ciphertext": _b64(challenge)})
    return coordinator.admission_finish(name, answer["digest"])


def evidence_for(session: Session, coordinator: TC) -> Evidence:
    """The node's TPM evidence for a fresh TC nonce: a quote over the policy's PCRs, the event
    log, and the site's asset tag certified over the same nonce where the site has one."""
    name = session.host.name
    bank, pcrs = coordinator.quote_policy()
    nonce = coordinator.nonce(name)
    quote = session.tvmm("quote", {"nonce": _b64(nonce), "bank": bank, "pcrs": pcrs})
    evidence = Evidence(_unb64(quote["attest"]), _unb64(quote["signature"]),
                        {int(k): bytes.fromhex(v) for k, v in quote["pcrs"].items()},
                        _unb64(quote["eventlog"]), nonce, ssh_host_key=host_key(session))
    site = session.host.vars.get("tcc_site")
    tag_index = coordinator.asset_tag_index(str(site) if site else None)
    if tag_index is not None:
        try:
            certified = session.tvmm("nv_certify", {"index": tag_index, "nonce": _b64(nonce)})
            evidence.asset_attest = _unb64(certified["attest"])
            evidence.asset_signature = _unb64(certified["signature"])
            evidence.asset_nv_public = _unb64(certified["nv_public"])
        except Exception:  # noqa: BLE001 - no tag: the verifier names the failure
            pass
    return evidence


def attest(coordinator: TC, admit_nodes: bool = False):  # type: ignore[no-untyped-def]

    def work(session: Session) -> HostResult | dict[str, Any]:
        name = session.host.name
        if coordinator.identity_summary(name) is None:  # no AK the TC knows: a quote would prove nothing
            return HostResult(name, "failed", "untrusted: node.not-enrolled: the TC has no enrolled TPM for this node; "
                                              "run tccdeploy enroll first", {"verdict": "untrusted",
                                                                             "reasons": ["node.not-enrolled"]},
                              reason="node.not-enrolled")
        evidence = evidence_for(session, coordinator)
        site = session.host.vars.get("tcc_site")
        verdict, record = coordinator.verify(name, str(site) if site else None, session.host.address, evidence)
        data = {"verdict": "trusted" if verdict.trusted else "untrusted", "build": verdict.build,
                "platform": verdict.platform,
                "reasons": [r["code"] for r in verdict.reasons], "warnings": [w["code"] for w in verdict.warnings],
                "attestation": record}
        if not verdict.trusted:
            detail = "; ".join(f"{r['code']}: {r['message']}" for r in verdict.reasons)
            return HostResult(name, "failed", f"untrusted: {detail}", data, reason=verdict.reasons[0]["code"])
        if not admit_nodes:
            return {"changed": False, **data}
        why = coordinator.admission_needed(name, record)  # the playbook's attest module asks the same
        if why is None:
            return {"changed": False, **data, "admitted": True}
        try:
            certificate = admit(session, coordinator, record)
        except AdmissionRefused as exc:
            return HostResult(name, "failed", f"not admitted: {exc.reason}: {exc}", data | {"refused": exc.reason},
                              reason=exc.reason)
        return {"changed": True, **data, "admitted": True, "certificate_serial": certificate["serial"]}

    return work
