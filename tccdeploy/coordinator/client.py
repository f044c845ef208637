"""The TC over HTTPS, for engines: the same methods the embedded Coordinator offers the engine,
so enrollment and attestation run unchanged against either.

The connection pins the TC's CA certificate (no system CAs: a certificate any public CA issued
for the address is not the TC) and presents the engine's client certificate. A refusal comes
back as the same exception, with the same reason code, as from the embedded TC.
"""

from __future__ import annotations

import os
import ssl
import sys
import time
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlencode, urlsplit

from .admission import AdmissionRefused
from .enrollment import Challenge, EnrollmentRefused
from .keybroker import Refused
from .records import IdentitySummary, MigrationRecord, NodeRecord, RequestRecord, VMRecord
from .transport import Answer, Transport, TransportError
from .verifier import Evidence, Verdict
from .wire import b64, evidence_to_wire, unb64, verdict_from_wire

ENGINE_FILES = ("engine-cert.pem", "engine-key.pem", "tc-ca.pem")


class TCUnavailable(RuntimeError):
    """The TC could not be reached or answered with something other than a decision."""


class TCNotFound(TCUnavailable):
    """The TC has no such thing (404)."""


MAX_BACKOFF = 10.0  # seconds between two asks of a TC that cannot decide now


def _error_of(response: Answer) -> dict[str, Any]:
    try:
        error = response.json()
    except ValueError:
        error = None
    if not isinstance(error, dict):
        error = {"error": f"http.{response.status_code}", "message": response.text[:300]}
    return error


def https_url(url: str) -> str:
    """url, if it names a TC over HTTPS: plain HTTP would hand the signed requests and queries to
    whoever sits on the network, and let it forge the answers (a customer's client took it)."""
    try:
        parsed = urlsplit(url)
        parsed.port  # noqa: B018 - raises on a port that is not one
    except ValueError as exc:
        raise TCUnavailable(f"{url!r} is not a TC's URL ({exc}): give --tc https://HOST:PORT "
                            "(or set $TCCDEPLOY_TC)") from None
    if parsed.hostname and not parsed.hostname.isascii():
        raise TCUnavailable(f"{url!r} names its host with letters outside ASCII: give the host's ASCII (IDNA, "
                            "xn--) form or its address")
    if parsed.scheme != "https" or not parsed.hostname:
        raise TCUnavailable(f"{url!r} is not a TC's URL: a TC is served over HTTPS only; give --tc "
                            "https://HOST:PORT (or set $TCCDEPLOY_TC)")
    return url


class RemoteCoordinator:
    """url: one TC, or several replicas separated by commas: a request that cannot reach one
    (connection refused, reset, timed out before an answer) goes to the next. Retrying is safe
    because the TC makes every state change single-use: an evidence submission a lost replica
    already recorded comes back refused as a replayed nonce, never as a second verdict."""

    def __init__(self, url: str, engine_dir: str, timeout: float = 30.0, retries: int = 3):
        missing = [f for f in ENGINE_FILES if not os.path.exists(os.path.join(engine_dir, f))]
        if missing:
            raise TCUnavailable(f"no engine credentials in {engine_dir} ({', '.join(missing)} missing): the TC's operator "
                                f"makes them with `tccdeploy tc engines add NAME -o DIR`")
        context = pinned_context(os.path.join(engine_dir, "tc-ca.pem"),
                                 "the engine's folder is as `tccdeploy tc engines add NAME -o DIR` made it")
        context.load_cert_chain(os.path.join(engine_dir, "engine-cert.pem"), os.path.join(engine_dir, "engine-key.pem"))
        self.engine_dir = engine_dir
        self.retries = retries
        self.urls = [u.strip().rstrip("/") for u in url.split(",") if u.strip()]
        for each in self.urls or [url]:
            https_url(each)
        self.url = self.urls[0]
        self.http = Transport(context, timeout)
        self._policy: dict[str, Any] | None = None

    def close(self) -> None:
        self.http.close()

    def connect(self) -> None:
        """Open a connection to the TC now (TLS handshake included), kept for the calls that
        follow: what a long-running engine has open anyway, out of the first call's time."""
        answer = self._send("GET", "/healthz", None)
        if answer.status_code != 200:
            raise TCUnavailable(f"the TC at {self.url} answered {answer.status_code} to GET /healthz")

    def _send(self, method: str, path: str, body: dict[str, Any] | None) -> Answer:
        errors = []
        # Each replica once; a lone TC twice, since it closes connections idle past its header
        # deadline and one may close just as a request goes out on it.
        for _ in range(max(2, len(self.urls))):
            try:
                return self.http.request(method, self.url + path, body)
            except TransportError as exc:
                errors.append(f"{self.url}: {exc}")
                self.url = self.urls[(self.urls.index(self.url) + 1) % len(self.urls)]  # the next replica
        raise TCUnavailable(f"no TC answered {method} {path}: {'; '.join(errors)}")

    def _call(self, method: str, path: str, body: dict[str, Any] | None = None,
              refusal: type[Exception] = Refused) -> Any:
        response = self._send(method, path, body)
        for attempt in range(self.retries):
            # 503: the TC could not decide (its store is down or full, its clock went back) and
            # decided nothing, or its decision process stopped mid-call (service.decision-lost:
            # maybe decided); asking again is safe either way, as the TC answers from its records:
            # another replica at once, else after the wait it asks for, bounded, saying why.
            if response.status_code != 503:
                break
            reason = _error_of(response).get("error")
            if len(self.urls) > 1:
                self.url = self.urls[(self.urls.index(self.url) + 1) % len(self.urls)]
            else:
                try:
                    wait = min(float(response.headers.get("retry-after", "1")), MAX_BACKOFF)
                except ValueError:
                    wait = 1.0
                print(f"tccdeploy: the TC cannot decide now ({reason}); asking again in {wait:g} s "
                      f"({attempt + 1}/{self.retries})", file=sys.stderr, flush=True)
                time.sleep(wait)
            response = self._send(method, path, body)
        if response.status_code == 200:
            return response.json()
        error = _error_of(response)
        if response.status_code == 403 and not str(error.get("error", "")).startswith("auth."):
            raise refusal(error["error"], error.get("message") or f"the TC refused: {error['error']}")  # type: ignore[call-arg]
        kind = TCNotFound if response.status_code == 404 else TCUnavailable
        raise kind(f"the TC at {self.url} answered {response.status_code} to {method} {path}: "
                   f"{error.get('error')}: {error.get('message')}")

    # -- what the engine asks the node for -------------------------------------------------
    def _policy_now(self) -> dict[str, Any]:
        if self._policy is None:
            self._policy = self._call("GET", "/v1/policy")
        return self._policy

    def quote_policy(self) -> tuple[str, list[int]]:
        policy = self._policy_now()
        return str(policy["bank"]), [int(p) for p in policy["pcrs"]]

    def asset_tag_index(self, site: str | None) -> int | None:
        value = self._policy_now()["asset_tags"].get(site) if site else None
        return int(value) if value is not None else None

    def ca_certificate_pem(self) -> str:
        """The TC CA this engine pins (its credentials' tc-ca.pem): what a node's service pins too."""
        with open(os.path.join(self.engine_dir, "tc-ca.pem")) as fh:
            return fh.read()

    # -- enrollment, attestation, admission ---------------------------------------------------
    def enrollment_challenge(self, node: str, ek_certificate: bytes, ek_public: bytes, ak_public: bytes,
                             ssh_host_key: str, site: str | None = None, address: str = "") -> Challenge | None:
        answer = self._call("POST", "/v1/enrollments", {
            "node": node, "ek_certificate": b64(ek_certificate), "ek_public": b64(ek_public),
            "ak_public": b64(ak_public), "ssh_host_key": ssh_host_key, "site": site, "address": address},
            EnrollmentRefused)
        if answer.get("enrolled"):
            return None
        return Challenge(unb64(answer["credential"]), unb64(answer["secret"]))

    def enrollment_finish(self, node: str, answer: bytes) -> dict[str, Any]:
        return self._call("POST", "/v1/enrollments/finish", {"node": node, "answer": b64(answer)},  # type: ignore[no-any-return]
                          EnrollmentRefused)

    def nonce(self, node: str, purpose: str = "quote") -> bytes:
        return unb64(self._call("POST", "/v1/nonces", {"node": node, "purpose": purpose})["nonce"])

    def verify(self, node: str, site: str | None, address: str, evidence: Evidence) -> tuple[Verdict, int]:
        answer = self._call("POST", "/v1/attestations", {"node": node, "site": site, "address": address,
                                                          "evidence": evidence_to_wire(evidence)})
        return verdict_from_wire(answer), int(answer["attestation"])

    def admission_challenge(self, node: str, attestation_id: int, tk_public: bytes, certify_attest: bytes,
                            certify_signature: bytes, nonce: bytes) -> bytes:
        answer = self._call("POST", "/v1/admissions", {
            "node": node, "attestation": attestation_id, "tk_public": b64(tk_public), "certify_attest": b64(certify_attest),
            "certify_signature": b64(certify_signature), "nonce": b64(nonce)}, AdmissionRefused)
        return unb64(answer["challenge"])

    def admission_finish(self, node: str, answer_hex: str) -> dict[str, Any]:
        return self._call("POST", "/v1/admissions/finish", {"node": node, "answer": answer_hex}, AdmissionRefused)  # type: ignore[no-any-return]

    def quarantine(self, node: str, reason: str) -> bool:
        return bool(self._call("POST", f"/v1/nodes/{node}/quarantine", {"reason": reason})["quarantined"])

    def lease_nodes(self, nodes: list[str], seconds: float) -> dict[str, Any]:
        return self._call("POST", "/v1/leases", {"nodes": nodes, "seconds": seconds})  # type: ignore[no-any-return]

    def release_leases(self, nodes: list[str]) -> int:
        return int(self._call("POST", "/v1/leases/end", {"nodes": nodes})["ended"])

    def nodes(self) -> list[NodeRecord]:
        return [NodeRecord.from_row(row) for row in self._call("GET", "/v1/nodes")]

    def identity_summary(self, node: str) -> IdentitySummary | None:
        try:
            return IdentitySummary.from_row(self._call("GET", f"/v1/nodes/{node}/identity"))
        except TCNotFound:
            return None

    def check_ek(self, ek_certificate: bytes, ek_public: bytes, node: str | None = None,
                 site: str | None = None) -> dict[str, Any]:
        body: dict[str, Any] = {"ek_certificate": b64(ek_certificate), "ek_public": b64(ek_public), "site": site}
        if node is not None:
            body["node"] = node
        return self._call("POST", "/v1/enrollments/check", body, EnrollmentRefused)  # type: ignore[no-any-return]

    def perimeter_problems(self, site: str | None, address: str) -> list[tuple[str, str]]:
        answer = self._call("POST", "/v1/perimeter/check", {"site": site, "address": address})
        return [(p["code"], p["message"]) for p in answer["problems"]]

    def admission_needed(self, node: str, attestation_id: int) -> str | None:
        return self._call("GET", f"/v1/nodes/{node}/admission?attestation={int(attestation_id)}")["needed"]  # type: ignore[no-any-return]

    def customer_name(self, key_text: str) -> str | None:
        return None  # placement previews only; the TC checks the customer when the request arrives

    def node_history(self, name: str, limit: int = 20) -> tuple[dict[str, Any] | None, list[dict[str, Any]]]:
        try:
            answer = self._call("GET", f"/v1/nodes/{name}?limit={int(limit)}")
        except TCNotFound:
            return None, []
        return answer["node"], answer["attestations"]

    def ear(self, node: str, attestation: int | None = None) -> dict[str, Any]:
        """The node's verdict as the TC's signed EAR (Refused when there is none to issue)."""
        query = "" if attestation is None else f"?attestation={int(attestation)}"
        try:
            return self._call("GET", f"/v1/nodes/{node}/ear{query}")  # type: ignore[no-any-return]
        except TCNotFound as exc:
            raise Refused(getattr(exc, "reason", "") or "ear.no-verdict", str(exc)) from None

    def audit_entries(self, node: str | None = None, vm: str | None = None, since: float | None = None) -> list[dict[str, Any]]:
        """The audit log as the TC returns it; `audit.verify` recomputes its chain here, so a
        client checks it without trusting the service's own verdict."""
        query = urlencode({k: v for k, v in (("node", node), ("vm", vm), ("since", since)) if v is not None})
        return self._call("GET", "/v1/audit" + (f"?{query}" if query else ""))  # type: ignore[no-any-return]

    def audit_certificate(self) -> str:
        """The TC's audit-signing certificates as served (the current one and the retired ones);
        the caller checks each chains to its pinned CA."""
        from cryptography import x509
        from cryptography.hazmat.primitives import serialization

        from .identity import PURPOSES

        response = self._send("GET", "/v1/certificate", None)
        found = ""
        for cert in x509.load_pem_x509_certificates(response.content):
            try:
                usages = list(cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value)
            except x509.ExtensionNotFound:
                continue
            if usages == [PURPOSES["audit"]]:
                found += cert.public_bytes(serialization.Encoding.PEM).decode()
        if not found:
            raise TCUnavailable(f"the TC at {self.url} serves no audit-signing certificate")
        return found

    # -- what launch, migration and enforcement read and record -----------------------------
    @property
    def builds(self) -> list[BuildInfo]:
        return [BuildInfo(b["name"], b["version"], b["status"]) for b in self._call("GET", "/v1/builds")]

    def runtime_pcr(self) -> int:
        return int(self._policy_now()["runtime_pcr"])

    def grace_period(self) -> float:
        return float(self._policy_now()["grace_period"])

    def enforce_interval(self) -> float:
        return float(self._policy_now()["interval"])

    def on_failure(self) -> str:
        return str(self._policy_now()["on_failure"])

    def node(self, name: str) -> NodeRecord | None:
        try:
            return NodeRecord.from_row(self._call("GET", f"/v1/nodes/{name}")["node"])
        except TCNotFound:
            return None

    def last_trusted_time(self, node: str) -> float | None:
        value = self._call("GET", f"/v1/nodes/{node}")["last_trusted"]
        return float(value) if value is not None else None

    def vms(self, include_destroyed: bool = False) -> list[VMRecord]:
        return [VMRecord.from_row(row) for row in self._call("GET", "/v1/vms" + ("?all=1" if include_destroyed else ""))]

    def vm(self, name_or_id: str) -> VMRecord | None:
        try:
            return VMRecord.from_row(self._call("GET", f"/v1/vms/{name_or_id}"))
        except TCNotFound:
            return None

    def set_vm_state(self, vm_id: str, state: str) -> None:
        self._call("POST", f"/v1/vms/{vm_id}/state", {"state": state})

    def record_enforcement(self, node: str, vm_id: str, policy: str, result: str) -> None:
        self._call("POST", f"/v1/vms/{vm_id}/enforcement", {"node": node, "policy": policy, "result": result})

    def request_record(self, request_id: str) -> RequestRecord | None:
        try:
            return RequestRecord.from_row(self._call("GET", f"/v1/requests/{request_id}"))
        except TCNotFound:
            return None

    def accept_request(self, envelope: dict[str, Any], bundle: dict[str, Any]) -> dict[str, Any]:
        accepted = self._call("POST", "/v1/requests", {"request": {k: v for k, v in envelope.items() if k != "bundle"},
                                                        "bundle": bundle})
        record = self.request_record(accepted["id"])
        return record.as_dict() if record else accepted  # type: ignore[no-any-return]

    def release_key(self, request_id: str, node: str) -> dict[str, Any]:
        return self._call("POST", f"/v1/requests/{request_id}/release", {"node": node})  # type: ignore[no-any-return]

    def record_launch(self, release: dict[str, Any], node: str, status: dict[str, Any]) -> dict[str, Any]:
        return self._call("POST", f"/v1/requests/{release['request']}/launched", {  # type: ignore[no-any-return]
            "node": node, "status": {k: v for k, v in status.items()
                                     if isinstance(v, (str, int, float, bool)) or v is None or k == "evidence"}})

    def fail_request(self, request_id: str) -> None:
        self._call("POST", f"/v1/requests/{request_id}/failed", {})

    def migrations(self, state: str | None = None) -> list[MigrationRecord]:
        return [MigrationRecord.from_row(row) for row in self._call("GET", "/v1/migrations" + (f"?state={state}" if state else ""))]

    def migration_begin(self, vm_name: str, destination: str) -> dict[str, Any]:
        return self._call("POST", "/v1/migrations", {"vm": vm_name, "destination": destination})  # type: ignore[no-any-return]

    def migration_end(self, migration: int, vm_id: str, commit: bool, reason: str = "",
                      evidence: dict[str, Any] | None = None) -> dict[str, Any]:
        body: dict[str, Any] = {"vm_id": vm_id, "commit": commit, "reason": reason[:2000]}
        if evidence is not None:
            body["evidence"] = evidence
        return self._call("POST", f"/v1/migrations/{migration}/end", body)  # type: ignore[no-any-return]

    def migration_settlement(self, migration: int) -> dict[str, Any]:
        return self._call("GET", f"/v1/migrations/{int(migration)}/settlement")  # type: ignore[no-any-return]

    def vm_end_ticket(self, vm_id: str, node: str, action: str) -> dict[str, Any]:
        return self._call("POST", f"/v1/vms/{vm_id}/end-ticket", {"node": node, "action": action})  # type: ignore[no-any-return]

    def suspend_begin(self, vm_name: str) -> dict[str, Any]:
        return self._call("POST", "/v1/suspensions", {"vm": vm_name})  # type: ignore[no-any-return]

    def suspend_end(self, suspension_id: int, evidence: dict[str, Any] | None, saved: bool = True) -> dict[str, Any]:
        body: dict[str, Any] = {"saved": saved}
        if evidence is not None:
            body["evidence"] = evidence
        return self._call("POST", f"/v1/suspensions/{int(suspension_id)}/end", body)  # type: ignore[no-any-return]

    def resume_begin(self, vm_name: str, node: str | None = None) -> dict[str, Any]:
        body = {"vm": vm_name} | ({"node": node} if node else {})
        return self._call("POST", "/v1/resumes", body)  # type: ignore[no-any-return]

    def resume_end(self, suspension_id: int, evidence: dict[str, Any]) -> dict[str, Any]:
        return self._call("POST", f"/v1/suspensions/{int(suspension_id)}/resumed",  # type: ignore[no-any-return]
                          {"evidence": evidence})

    def vm_ended(self, ticket: dict[str, Any], evidence: dict[str, Any]) -> dict[str, Any]:
        return self._call("POST", f"/v1/vms/{ticket['ticket']['vm_id']}/ended",  # type: ignore[no-any-return]
                          {"ticket": ticket, "evidence": evidence})


@dataclass(frozen=True)
class BuildInfo:
    """What placement needs of a TVMM build the TC knows."""

    name: str
    version: str
    status: str


class TCCertificates(ValueError):
    """The file given as the TC's certificates holds none (a user's mistake, named as such)."""


def pinned_context(cafile: str, what: str) -> ssl.SSLContext:
    """A TLS context that trusts only the TC's CA in cafile, and names in the certificate's
    subjectAltName only (never its common name)."""
    try:
        context = ssl.create_default_context(cafile=cafile)
        context.hostname_checks_common_name = False
        return context
    except (ssl.SSLError, OSError) as exc:
        raise TCCertificates(f"{cafile} holds no certificate TLS can use ({getattr(exc, 'reason', None) or exc}): "
                             f"{what}") from None


class CustomerClient:
    """The customer's side of a served TC: submit a signed request, ask its state, fetch the
    receipt. The connection pins the TC's CA from the customer's tc.pem (as receipts do)."""

    def __init__(self, url: str, tc_pem: str, timeout: float = 30.0):
        self.url = https_url(url.strip()).rstrip("/")
        context = pinned_context(tc_pem, "--tc-cert takes the TC's certificates as `tccdeploy tc show -o tc.pem` wrote them")
        self.http = Transport(context, timeout)

    def close(self) -> None:
        self.http.close()

    def _post(self, path: str, body: dict[str, Any]) -> dict[str, Any]:
        try:
            response = self.http.request("POST", self.url + path, body)
        except TransportError as exc:
            raise TCUnavailable(f"the TC at {self.url} did not answer: {exc}") from None
        data = response.json() if response.headers.get("content-type", "").startswith("application/json") else {}
        if response.status_code != 200:
            raise Refused(str(data.get("error") or f"http.{response.status_code}"),
                          str(data.get("message") or response.text[:300] or f"the TC answered {response.status_code}"))
        return data  # type: ignore[no-any-return]

    def submit(self, envelope: dict[str, Any], bundle: dict[str, Any]) -> dict[str, Any]:
        return self._post("/v1/requests", {"request": {k: v for k, v in envelope.items() if k != "bundle"}, "bundle": bundle})

    def status(self, request_id: str, key: Any) -> dict[str, Any]:
        from .keybroker import sign_customer_query

        return self._post(f"/v1/requests/{request_id}/status", sign_customer_query(key, request_id, "status"))

    def receipt(self, request_id: str, key: Any) -> dict[str, Any]:
        from .keybroker import sign_customer_query

        return self._post(f"/v1/requests/{request_id}/receipt", sign_customer_query(key, request_id, "receipt"))
