"""enroll, attest, evict, enforce: the TC's decisions about a node, as playbook tasks.

Idempotent in the TC's terms: a node enrolled with the TPM it has now is not enrolled again; an
admitted node whose certificate is valid and whose fresh quote shows the PCR values its trusted
key is bound to is not admitted again (the attestation is still made and recorded: trust is
checked every run, it is only not *changed*). Check mode asks the node only what it can answer
without the TC recording anything (a quote needs a nonce, which is state), and predicts.
"""

from __future__ import annotations

import base64
from typing import Any

from ...coordinator import enrollment
from ...engine import attestation
from ...engine.enforce import enforce_round, handle_vms
from ...engine.runner import HostResult
from . import Context, module


def _as_result(outcome: HostResult | dict[str, Any]) -> dict[str, Any]:
    if isinstance(outcome, HostResult):
        data = dict(outcome.data)
        if outcome.status == "failed":
            data.update(failed=True, msg=outcome.msg)
            if outcome.reason:
                data["reason"] = outcome.reason
        data["changed"] = outcome.status == "changed"
        return data
    return dict(outcome)


@module("enroll")
def enroll(ctx: Context) -> dict[str, Any]:
    tc = ctx.tc
    known = tc.identity_summary(ctx.name)
    identity = ctx.session.tvmm("identity")
    site = ctx.host.vars.get("tcc_site")
    try:
        checked = tc.check_ek(base64.b64decode(identity["ek_certificate"]), base64.b64decode(identity["ek_public"]),
                              ctx.name, str(site) if site else None)
    except enrollment.EnrollmentRefused as exc:
        return {"failed": True, "changed": False, "reason": exc.reason, "msg": f"{exc.reason}: {exc}"}
    fingerprint, manufacturer = checked["ek_fingerprint"], checked["manufacturer"]
    node = tc.node(ctx.name)
    if known is not None and known.ek_fingerprint == fingerprint and node and node.state != "retired":
        return {"changed": False, "enrolled": True, "manufacturer": known.manufacturer, "ek_fingerprint": fingerprint}
    before = f"EK {known.ek_fingerprint}\n" if known else "(not enrolled)\n"
    diff = {"before": before, "after": f"EK {fingerprint} ({manufacturer})\n", "before_header": f"{ctx.name} identity",
            "after_header": f"{ctx.name} identity"}
    if known is not None and known.ek_fingerprint != fingerprint:
        return {"failed": True, "changed": False, "reason": "ek.changed", "diff": diff,
                "msg": f"ek.changed: {ctx.name} was enrolled with another TPM; a changed TPM is the TC operator's "
                       f"decision, after checking the hardware: tccdeploy tc nodes replace-tpm {ctx.name}"}
    if ctx.check:
        return {"changed": True, "diff": diff, "msg": f"would enroll (TPM from {manufacturer})"}
    return _as_result(attestation.enroll(tc)(ctx.session)) | {"diff": diff}


@module("attest")
def attest(ctx: Context) -> dict[str, Any]:
    admit = bool((ctx.args or {}).get("admit", False))
    tc = ctx.tc
    node = tc.node(ctx.name)
    if ctx.check:
        site = ctx.host.vars.get("tcc_site")
        outside = tc.perimeter_problems(str(site) if site else None, ctx.host.address)
        if outside:
            code, message = outside[0]
            return {"failed": True, "changed": False, "reason": code, "msg": f"would be untrusted: {code}: {message}"}
        if node is None:
            return {"changed": admit, "msg": "not enrolled yet; would attest" + (" and admit" if admit else "")}
        state = node.state
        if admit and state != "admitted":
            return {"changed": True, "msg": f"{state}; would attest and admit if trusted",
                    "diff": {"before": f"{state}\n", "after": "admitted\n", "before_header": f"{ctx.name} state",
                             "after_header": f"{ctx.name} state"}}
        return {"changed": False, "msg": f"{state}; check mode does not attest (a quote needs a TC nonce)"}
    outcome = _as_result(attestation.attest(tc, admit_nodes=admit)(ctx.session))  # one decision, as `attest --admit`
    if outcome.get("failed") or not outcome.get("changed"):
        return outcome
    before = node.state if node else "(not enrolled)"
    return outcome | {"diff": {"before": f"{before}\n", "after": f"admitted ({outcome.get('build')})\n",
                               "before_header": f"{ctx.name} state", "after_header": f"{ctx.name} state"}}


@module("evict")
def evict(ctx: Context) -> dict[str, Any]:
    """Take a node out: certificate revoked, no key released to it, its VMs handled by policy."""
    tc = ctx.tc
    node = tc.node(ctx.name)
    if node is None or node.state != "admitted":
        return {"changed": False, "msg": f"{ctx.name} is {node.state if node else 'not enrolled'}; nothing to evict"}
    diff = {"before": "admitted\n", "after": "quarantined\n", "before_header": f"{ctx.name} state",
            "after_header": f"{ctx.name} state"}
    if ctx.check:
        return {"changed": True, "diff": diff, "msg": "would quarantine the node and handle its VMs by the perimeter's policy"}
    reason = str((ctx.args or {}).get("reason") or "operator.evict")
    tc.quarantine(ctx.name, reason)
    with ctx.run.exclusive:
        vms = handle_vms(ctx.run.engine, tc, ctx.name, {h.name: h for h in ctx.run.engine.hosts})
    return {"changed": True, "diff": diff, "quarantined": True, "evict_reason": reason, "vms": vms}


@module("enforce")
def enforce(ctx: Context) -> dict[str, Any]:
    """One enforcement round for this node: re-attest it if admitted; on failure it is
    quarantined and its VMs handled by policy. A quarantine fails the host (the node is not
    compliant), as `enforce --once` exits 2."""
    node = ctx.tc.node(ctx.name)
    if node is None or node.state != "admitted":
        return {"changed": False, "msg": f"{ctx.name} is {node.state if node else 'not enrolled'}; not enforced"}
    if ctx.check:
        return {"changed": False, "msg": "admitted; check mode does not attest (a quote needs a TC nonce)"}
    with ctx.run.exclusive:
        report = enforce_round(ctx.run.engine, ctx.tc, only={ctx.name})
    result: dict[str, Any] = {"changed": bool(report.quarantined or report.vms), "quarantined": report.quarantined,
                              "vms": report.vms}
    if report.quarantined:
        reasons = ", ".join(q["reason"] for q in report.quarantined)
        moved = "; ".join(f"VM {v['vm']}: {v['result']}" for v in report.vms)
        result.update(failed=True, reason=report.quarantined[0]["reason"],
                      msg=f"quarantined: {reasons}" + (f"; {moved}" if moved else ""))
    return result
