"""`build capture`: a node's boot, as its TPM proves it, for writing reference values.

The engine fetches fresh evidence (a quote over the TC's nonce, the event log) and has the TC
verify it, as any attestation round does. The log is kept only when the TC found nothing wrong
with the evidence itself: signed by the node's enrolled AK, over the TC's fresh nonce, the
quoted PCRs the ones reported, the log replaying to them, inside the perimeter. Failing only
because the boot matches no (approved, or in-rollout) build or platform is what capturing a new
build is for. Like any attestation, the verdict is recorded: a node booted into a build the
manifests do not admit is untrusted (and an admitted one quarantined) until its build is approved.
"""

from __future__ import annotations

import base64
from typing import Any

from .attestation import TC, evidence_for
from .runner import HostResult, Session

# The only failures a capture accepts: the boot is not (yet) an admissible reference.
REFERENCE_FAILURES = frozenset({"build.unknown", "platform.unknown", "build.revoked", "platform.revoked",
                                "build.not-in-rollout", "platform.not-in-rollout"})


def capture(coordinator: TC):  # type: ignore[no-untyped-def]
    def work(session: Session) -> HostResult | dict[str, Any]:
        name = session.host.name
        if coordinator.identity_summary(name) is None:
            return HostResult(name, "failed", "node.not-enrolled: the TC has no enrolled TPM for this node, so nothing "
                                              "proves its log; run tccdeploy enroll first", {}, reason="node.not-enrolled")
        evidence = evidence_for(session, coordinator)
        site = session.host.vars.get("tcc_site")
        verdict, record = coordinator.verify(name, str(site) if site else None, session.host.address, evidence)
        codes = [r["code"] for r in verdict.reasons]
        other = [r for r in verdict.reasons if r["code"] not in REFERENCE_FAILURES]
        if other:
            detail = "; ".join(f"{r['code']}: {r['message']}" for r in other)
            return HostResult(name, "failed", f"the node's evidence does not prove its log, nothing captured: {detail}",
                              {"reasons": codes}, reason=other[0]["code"])
        return {"changed": False, "eventlog": base64.b64encode(evidence.eventlog).decode(), "reasons": codes,
                "build": verdict.build, "platform": verdict.platform, "attestation": record}

    return work
