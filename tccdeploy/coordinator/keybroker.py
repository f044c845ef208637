"""The key broker: a VM's key goes only to a node that is trusted now, once per request.

    request.signature        the placement request is not signed by a registered customer key
    request.replayed         its id was used before
    request.stale            it was signed too long ago
    request.image            the bundle's descriptor is not the customer's, or not for this request
    request.duplicate-vm     a VM of that name is already running for the customer
    release.not-admitted     the node is not admitted (enrolled only, quarantined, unknown)
    release.not-fresh        its latest attestation is not trusted or older than the policy allows
    release.no-certificate   no valid (unexpired, unrevoked) node certificate
    release.already          the request's key was already released
    release.unwrap           the TC cannot unwrap the key (sealed for another TC, or altered)

The clear Kvm exists only inside `release`, between unwrapping with the TC's key and wrapping
to the node's TK (OAEP, label bound to the VM id).
"""

from __future__ import annotations

import base64
import datetime
import hashlib
import time
from typing import Any

from cryptography import x509

from ..crypto import customer, wrap
from ..crypto.canonical import canonical
from ..manifest.models import Perimeter
from .identity import Identity
from .store import Registry

REQUEST_MAX_AGE = 24 * 3600


class Refused(Exception):
    def __init__(self, reason: str, message: str):
        super().__init__(message)
        self.reason = reason


def accept(registry: Registry, envelope: dict[str, Any], bundle: dict[str, Any]) -> dict[str, Any]:
    """Check a signed placement request and the bundle it names; record it (once)."""
    try:
        request, signature = envelope["request"], base64.b64decode(envelope["signature"], validate=True)
        key_text = request["customer"]
        public = customer.parse_public(key_text)
    except (KeyError, TypeError, ValueError, customer.CustomerKeyError) as exc:
        raise Refused("request.signature", f"malformed request envelope: {exc}") from None
    owner = registry.customer_by_key(key_text)
    if owner is None:
        raise Refused("request.signature", "the request is signed by a key no customer registered (tc customers add)")
    try:
        public.verify(signature, canonical(request))
    except Exception:  # noqa: BLE001
        raise Refused("request.signature", "the request's signature does not verify") from None
    try:
        created = datetime.datetime.fromisoformat(request["created"]).timestamp()
    except (KeyError, ValueError):
        raise Refused("request.stale", "the request has no valid creation time") from None
    if not -300 <= time.time() - created <= REQUEST_MAX_AGE:
        raise Refused("request.stale", "the request was signed more than a day ago (or in the future)")
    descriptor = bundle["descriptor"]
    if descriptor["customer"]["key"] != key_text or request["image"]["vm_id"] != descriptor["vm_id"] \
            or request["image"]["sha256"] != descriptor["disk"]["sha256"]:
        raise Refused("request.image", "the sealed image is not this customer's, or not the one the request names")
    if registry.request(str(request.get("id"))) is not None:
        raise Refused("request.replayed", f"request {request['id']} was submitted before; a request is accepted once")
    name = request["manifest"]["metadata"]["name"]
    for vm in registry.vms():
        if vm["customer"] == owner["name"] and vm["name"] == name:
            raise Refused("request.duplicate-vm", f"{owner['name']} already has a VM named {name!r}")
    spec = request["manifest"]["spec"]
    record = {"id": request["id"], "customer": owner["name"], "vm": name, "vm_id": descriptor["vm_id"],
              "image_sha256": descriptor["disk"]["sha256"], "wrapped_key": descriptor["wrapped_key"], "spec": spec}
    if not registry.accept_request(record):
        raise Refused("request.replayed", f"request {request['id']} was submitted before; a request is accepted once")
    return record


QUERY_MAX_SKEW = 300.0


def check_customer_query(registry: Registry, request_id: str, op: str, when: str, signature: str) -> dict[str, Any]:
    """A customer asking about its own request: signed by the key that signed the request, within
    five minutes of now, and each signature used once. Returns the request."""
    request = registry.request(request_id)
    if request is None:
        raise Refused("query.unknown-request", f"no request {request_id}")
    owner = next((c for c in registry.customers() if c["name"] == request["customer"]), None)
    try:
        created = datetime.datetime.fromisoformat(when).timestamp()
        signed = base64.b64decode(signature, validate=True)
    except (ValueError, TypeError):
        raise Refused("query.signature", "the query's time or signature is malformed") from None
    if abs(time.time() - created) > QUERY_MAX_SKEW:
        raise Refused("query.expired", "the query was signed more than five minutes from now; sign it again")
    try:
        customer.parse_public(owner["key"] if owner else "").verify(
            signed, canonical({"op": op, "request": request_id, "time": when}))
    except Exception:  # noqa: BLE001
        raise Refused("query.signature", "the query is not signed by the customer who made the request") from None
    if not registry.use_once(hashlib.sha256(signed).hexdigest(), f"query:{request_id}", QUERY_MAX_SKEW * 2):
        raise Refused("query.replayed", "this signed query was used before; sign a new one")
    return request


def sign_customer_query(key: Any, request_id: str, op: str) -> dict[str, str]:
    """The customer's side of check_customer_query."""
    when = datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")
    signature = key.sign(canonical({"op": op, "request": request_id, "time": when}))
    return {"time": when, "signature": base64.b64encode(signature).decode()}


def release(registry: Registry, tc: Identity, perimeter: Perimeter, request_id: str, node: str) -> dict[str, Any]:
    """Re-wrap the request's Kvm to node's TK, if node is trusted now; record the release."""
    request = registry.request(request_id)
    if request is None:
        raise Refused("release.unknown-request", f"no request {request_id}")
    if request["state"] != "accepted":
        raise Refused("release.already", f"request {request_id} is {request['state']}; its key is released once")
    latest, certificate_row, rewrapped = rewrap_for(registry, tc, perimeter, request["wrapped_key"], request["vm_id"], node)
    if not registry.record_release(request_id, request["vm_id"], node, latest["id"], certificate_row["serial"]):
        raise Refused("release.already", f"request {request_id}'s key was released concurrently")
    return {"wrapped_key": base64.b64encode(rewrapped).decode(), "attestation": latest,
            "certificate_serial": certificate_row["serial"], "request": request,
            "certificate_pem": certificate_row["pem"]}


def rewrap_for(registry: Registry, tc: Identity, perimeter: Perimeter, wrapped_key: str, vm_id: str,
               node: str) -> tuple[dict[str, Any], dict[str, Any], bytes]:
    """Kvm (sealed to the TC) re-wrapped to node's TK, if node is trusted now: the one place a
    VM key is ever in clear, for launch and migration alike."""
    row = registry.node(node)
    if row is None or row["state"] != "admitted":
        raise Refused("release.not-admitted", f"{node} is {row['state'] if row else 'unknown'}, not admitted")
    latest = registry.attestations(node, limit=1)
    if not latest or latest[0]["verdict"] != "trusted" or time.time() - latest[0]["time"] > perimeter.attestation.max_quote_age:
        raise Refused("release.not-fresh", f"{node}'s latest attestation is not trusted and fresh; attest it again")
    certificate_row = registry.certificate(node)
    if certificate_row is None or certificate_row["not_after"] < time.time():
        raise Refused("release.no-certificate", f"{node} has no valid node certificate; admit it again")
    certificate = x509.load_pem_x509_certificate(certificate_row["pem"].encode())
    label = wrap.vm_label(vm_id)
    try:
        kvm = wrap.unwrap(tc.wrap_key, base64.b64decode(wrapped_key), label)
    except Exception:  # noqa: BLE001
        raise Refused("release.unwrap", "the TC cannot unwrap this image's key: sealed for another TC, or altered") from None
    rewrapped = wrap.wrap(certificate.public_key(), kvm, label)  # type: ignore[arg-type]
    del kvm
    return latest[0], certificate_row, rewrapped
