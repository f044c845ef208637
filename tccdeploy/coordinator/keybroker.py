"""The key broker: a VM's key goes only to a node that is trusted now, once, within the
customer's constraints, for the customer who owns the image.

    request.signature        the placement request is not signed by a registered customer key
    request.replayed         its id was used before
    request.stale            it was signed too long ago
    request.image            the bundle's descriptor is not the customer's, or not for this request
    request.image-owner      the image (its vm_id) belongs to another customer
    request.vm-exists        a copy of that VM may still run (one image runs once)
    request.duplicate-vm     a VM of that name is already running for the customer
    release.unknown-request  no such request
    release.not-admitted     the node is not admitted (enrolled only, quarantined, unknown)
    release.not-fresh        its latest attestation is not trusted or older than the policy allows
    release.build-revoked    the build or platform that attestation matched may not run there any more
                             (manifests reloaded: revoked, or a candidate's rollout without the node)
    release.no-certificate   no valid (unexpired, unrevoked) node certificate
    release.already          the request's key was already released (to another node, or the request is
                             launched or failed); the same node may ask again and gets a fresh ticket
    release.reissue-limit    the same release was asked for too many times
    release.unproven-copy    the key went to another node for this request before (its release expired
                             unused) and that node has not rebooted since: it may still launch it
    release.unwrap           the TC cannot unwrap the key (sealed for another TC or customer, or altered)
    placement.constraint     the node does not meet the request's constraints (sites, builds,
                             minimum version, anti-affinity, the roster's capacity)

The clear Kvm exists only inside `rewrap_for`, between unwrapping with the TC's key (OAEP label:
VM id and customer key id) and wrapping to the node's TK (OAEP, label bound to the VM id).
"""

from __future__ import annotations

import base64
import datetime
import functools
import hashlib
import time
from collections.abc import Callable
from typing import Any

from cryptography import x509

from ..crypto import customer, wrap
from ..crypto import ticket as tickets
from ..crypto.canonical import CUSTOMER_QUERY, PLACEMENT_REQUEST, signed_bytes
from ..manifest.models import Perimeter
from . import constraints
from .identity import Identity
from .records import NodeRecord, VMRecord
from .references import Baseline
from .refusals import Refused
from .store import RELEASE_EXPIRY, Audit, Conflict, Registry

__all__ = ["Refused", "accept", "check_customer_query", "release", "rewrap_for", "sign_customer_query"]

REQUEST_MAX_AGE = 24 * 3600


def accept(registry: Registry, tc: Identity, envelope: dict[str, Any], bundle: dict[str, Any],
           audit: Callable[[dict[str, Any]], Audit] = lambda record: None) -> dict[str, Any]:
    """Check a signed placement request and the bundle it names; record it (once).

    The image must be this customer's: its VM id is one the customer's key makes, and its key
    opens under the OAEP label of this VM id and this customer's key id, so a wrapped key copied
    into another customer's descriptor, or another customer's VM id or request id claimed before
    its owner submits it, is refused here, before anything is recorded."""
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
        public.verify(signature, signed_bytes(PLACEMENT_REQUEST, request))
    except Exception:  # noqa: BLE001
        raise Refused("request.signature", "the request's signature does not verify") from None
    try:
        created = datetime.datetime.fromisoformat(request["created"]).timestamp()
    except (KeyError, TypeError, ValueError):
        raise Refused("request.stale", "the request has no valid creation time") from None
    if not -300 <= time.time() - created <= REQUEST_MAX_AGE:
        raise Refused("request.stale", "the request was signed more than a day ago (or in the future)")
    try:
        descriptor = bundle["descriptor"]
        same = (descriptor["customer"]["key"] == key_text and request["image"]["vm_id"] == descriptor["vm_id"]
                and request["image"]["sha256"] == descriptor["disk"]["sha256"])
        version = descriptor.get("version")
        name = request["manifest"]["metadata"]["name"]
        spec = request["manifest"]["spec"]
        request_id = str(request["id"])
    except (KeyError, TypeError, AttributeError):
        raise Refused("request.image", "the request or the image descriptor lacks a field it needs") from None
    if not same:
        raise Refused("request.image", "the sealed image is not this customer's, or not the one the request names")
    if version != 3:
        raise Refused("request.image", f"the image was sealed by an older tccdeploy (descriptor version {version}): "
                                       "seal it again")
    if not customer.is_bound("vm", owner["key_id"], descriptor["vm_id"], descriptor.get("vm_salt")):
        raise Refused("request.image-owner", "the image's VM id is not one this customer's key makes (from its vm_salt): "
                                             "a sealed image is launched only by the customer who sealed it")
    if not customer.is_bound("request", owner["key_id"], request_id, request.get("salt")):
        raise Refused("request.id", "the request's id is not one this customer's key makes (from its salt): sign the "
                                    "request again with this tccdeploy (request sign)")
    try:
        kvm = wrap.unwrap(tc.wrap_key, base64.b64decode(descriptor["wrapped_key"], validate=True),
                          wrap.sealed_label(str(descriptor["vm_id"]), owner["key_id"]))
    except Exception:  # noqa: BLE001 - another TC's, another customer's, or altered: all "not yours"
        raise Refused("request.image-owner", "the image's key is not sealed to this TC for this customer: a sealed image "
                                             "is launched only by the customer who sealed it") from None
    del kvm
    if registry.request(request_id) is not None:
        raise Refused("request.replayed", f"request {request_id} was submitted before; a request is accepted once")
    for vm in registry.vms():
        if vm["customer"] == owner["name"] and vm["name"] == name:
            raise Refused("request.duplicate-vm", f"{owner['name']} already has a VM named {name!r}")
    record = {"id": request_id, "customer": owner["name"], "vm": name, "vm_id": descriptor["vm_id"],
              "image_sha256": descriptor["disk"]["sha256"], "wrapped_key": descriptor["wrapped_key"], "spec": spec}
    try:
        registry.accept_request(record, owner["key_id"], audit(record))
    except Conflict as exc:
        raise Refused(exc.reason, str(exc)) from None
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
            signed, signed_bytes(CUSTOMER_QUERY, {"op": op, "request": request_id, "time": when}))
    except Exception:  # noqa: BLE001
        raise Refused("query.signature", "the query is not signed by the customer who made the request") from None
    # (its record lives as long as the query itself could be accepted: its signed time + the skew)
    refused = registry.use_once(hashlib.sha256(signed).hexdigest(), f"query:{request_id}", created + QUERY_MAX_SKEW)
    if refused == "replayed":
        raise Refused("query.replayed", "this signed query was used before; sign a new one")
    if refused:
        raise Refused("query.replay-horizon", "the query is older than the TC's record of used queries reaches (the "
                                              "TC's clock went back, or the query is old): sign a new one once the "
                                              "clocks agree")
    return request


def sign_customer_query(key: Any, request_id: str, op: str) -> dict[str, str]:
    """The customer's side of check_customer_query."""
    when = datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")
    signature = key.sign(signed_bytes(CUSTOMER_QUERY, {"op": op, "request": request_id, "time": when}))
    return {"time": when, "signature": base64.b64encode(signature).decode()}




def release(registry: Registry, tc: Identity, perimeter: Perimeter, baseline: Baseline, request_id: str, node: str,
            capacity: int | None,
            audit: Callable[[dict[str, Any], dict[str, Any], str], Audit] = lambda a, c, t: None,
            expire: Callable[[str], list[str]] = lambda request: [],
            request: dict[str, Any] | None = None, owner: dict[str, Any] | None = None) -> dict[str, Any]:
    """Re-wrap the request's Kvm to node's TK, if node is trusted now and meets the request's
    constraints; record the release (once) with its audit entry.

    Safe to retry: a release whose answer was lost in flight is asked for again, and the same
    node gets a fresh ticket that supersedes the last (both name that node's TK and this one VM,
    whose node runs it once). Another node gets the key only once the release expired unused
    (`expire_releases`) and the node it went to has rebooted since: until then it may still
    launch the VM, and a second node must not. request, owner: its row and its image's, when the
    caller has read them (every check below is on the TC's records as read now; the conditional
    write settles races)."""
    request = registry.request(request_id) if request is None or request["id"] != request_id else request
    if request is None:
        raise Refused("release.unknown-request", f"no request {request_id}")
    made = [r for r in registry.releases(request["vm_id"]) if r["request"] == request_id]
    current = made[-1] if made and made[-1]["expired"] is None else None
    if (request["state"] == "released" and current is not None and current["time"] < time.time() - RELEASE_EXPIRY
            and expire(request_id)):  # (audited; the TC's sweep had not come by yet)
        request = registry.request(request_id) or request
        made, current = [r for r in registry.releases(request["vm_id"]) if r["request"] == request_id], None
    if request["state"] == "released":
        if current is None or current["node"] != node:
            where = current["node"] if current else "another node"
            raise Refused("release.already", f"request {request_id}'s key went to {where}: ask again for {where}, or "
                                             f"wait until that release expires ({RELEASE_EXPIRY} s without a launch)")
    elif request["state"] != "accepted":
        raise Refused("release.already", f"request {request_id} is {request['state']}; its key is released once")
    else:
        for earlier in made:
            if earlier["node"] != node and not registry.rebooted_since(earlier["node"], int(earlier["attestation"])):
                raise Refused("release.unproven-copy", f"request {request_id}'s key went to {earlier['node']} before, and "
                                                       f"{earlier['node']} has not rebooted since: it may still launch "
                                                       f"the VM; release it there, or reboot {earlier['node']} first")
    ticket_id = tickets.new_id()
    if owner is None or owner["vm_id"] != request["vm_id"]:
        owner = registry.image_owner(request["vm_id"])
    customer_id = owner["key_id"] if owner else ""
    latest, certificate_row, rewrapped, guard = rewrap_for(
        registry, tc, perimeter, baseline, request, node, capacity,
        tickets.label("launch", "kvm", request["vm_id"], customer_id, ticket_id), owner)
    now = int(time.time())
    spec = request["spec"]
    ticket = tickets.issue(tc.purpose("ticket").key, tc.purpose("ticket").certificate, {
        "v": 1, "kind": "launch", "id": ticket_id, "node": node, "node_serial": certificate_row["serial"],
        "tk_name": certificate_row["tk_name"], "vm_id": request["vm_id"], "name": request["vm"],
        "customer": customer_id, "request": request_id, "image_sha256": request["image_sha256"],
        "vcpus": int(spec["vcpus"]), "memory_mib": int(spec["memoryMiB"]), "issued": now, "expires": now + tickets.TTL,
        "kvm": base64.b64encode(rewrapped).decode(), "runtime_pcr": perimeter.attestation.runtime_pcr,
    })
    entry = audit(latest, certificate_row, ticket_id)
    if request["state"] == "released":
        assert current is not None
        if entry is not None:
            entry["data"]["supersedes"] = current["ticket"]
        try:
            done = registry.reissue_release(int(current["id"]), current["ticket"], latest["id"], certificate_row["serial"],
                                            ticket_id, entry, guard=guard)
        except Conflict as exc:
            raise Refused(exc.reason, str(exc)) from None
    else:
        try:
            done = registry.record_release(request_id, request["vm_id"], node, latest["id"], certificate_row["serial"],
                                           entry, ticket_id, guard=guard)
        except Conflict as exc:
            raise Refused(exc.reason, str(exc)) from None
    if not done:
        raise Refused("release.already", f"request {request_id}'s key was released concurrently")
    return {"ticket": ticket, "attestation": latest, "certificate_serial": certificate_row["serial"], "request": request}


def check_node(registry: Registry, perimeter: Perimeter, baseline: Baseline, request: dict[str, Any], node: str,
               capacity: int | None) -> tuple[dict[str, Any], dict[str, Any], Callable[[list[dict[str, Any]]], None]]:
    """(latest attestation, certificate row, placement guard for the write) if node may receive
    this request's key now."""
    row, latest, certificate_row = registry.standing(node)  # (one read, one snapshot)
    if row is None or row["state"] != "admitted":
        raise Refused("release.not-admitted", f"{node} is {row['state'] if row else 'unknown'}, not admitted")
    if latest is None or latest["verdict"] != "trusted" or time.time() - latest["time"] > perimeter.attestation.max_quote_age:
        raise Refused("release.not-fresh", f"{node}'s latest attestation is not trusted and fresh; attest it again")
    problem = baseline.admits(node, latest["build"], latest.get("platform"))
    if problem is not None:  # the manifests changed since the verdict: revoked, or a rollout without this node
        raise Refused("release.build-revoked", f"{node} may not run its boot any more: {problem[1]} ({problem[0]})")
    if certificate_row is None or certificate_row["not_after"] < time.time():
        raise Refused("release.no-certificate", f"{node} has no valid node certificate; admit it again")
    judged = NodeRecord(node, row["state"], row["site"], row["address"], latest["build"])  # the TC's own records
    # The constraints that depend on the VMs are judged inside the decision's write (the guard), on
    # the VMs there and on their way as that transaction reads them: judged before it, two
    # decisions at once each passed. The node's own (site, build, version) are judged here too,
    # so a node that cannot qualify costs the TC no key unwrap.
    guard = placement_guard(request, judged, baseline.versions(), capacity)
    try:
        guard([])
    except Conflict as exc:
        raise Refused(exc.reason, str(exc)) from None
    return latest, certificate_row, guard


def placement_guard(request: dict[str, Any], node: NodeRecord, versions: dict[str, str],
                    capacity: int | None) -> Callable[[list[dict[str, Any]]], None]:
    """The request's constraints on node, as a check of the VMs there and on their way (the VM
    itself left out: its own earlier release or move does not count against it). Run before the
    decision and again inside its write (Registry's guard), where no concurrent decision comes
    between; Conflict placement.constraint when node does not meet them."""

    def guard(rows: list[dict[str, Any]]) -> None:
        why = constraints.problems(request["spec"], node, (VMRecord.from_row(v) for v in rows if v["vm_id"] != request["vm_id"]),
                                   versions, request["customer"], capacity)
        if why:
            raise Conflict("placement.constraint", f"{node.name} does not meet request {request['id']}'s constraints: "
                                                   f"{'; '.join(why)}")
    return guard


@functools.lru_cache(maxsize=1024)
def node_certificate(pem: str) -> x509.Certificate:
    """A node certificate from its PEM row, parsed once (the TC issued it; it is read on every release)."""
    return x509.load_pem_x509_certificate(pem.encode())


def rewrap_for(registry: Registry, tc: Identity, perimeter: Perimeter, baseline: Baseline, request: dict[str, Any],
               node: str, capacity: int | None, label: bytes, owner: dict[str, Any] | None = None,
               ) -> tuple[dict[str, Any], dict[str, Any], bytes, Callable[[list[dict[str, Any]]], None]]:
    """Kvm (sealed to the TC) re-wrapped to node's TK under label (the ticket's that carries it),
    if node may have it now: the one place a VM key is ever in clear, for launch and migration alike.
    owner: the image's row, when the caller has read it. The last item: the placement guard the
    decision's write runs again."""
    latest, certificate_row, guard = check_node(registry, perimeter, baseline, request, node, capacity)
    certificate = node_certificate(certificate_row["pem"])
    if owner is None or owner["vm_id"] != request["vm_id"]:
        owner = registry.image_owner(request["vm_id"])
    if owner is None or owner["customer"] != request["customer"]:
        raise Refused("request.image-owner", f"image {request['vm_id']} is not {request['customer']}'s")
    try:
        kvm = wrap.unwrap(tc.wrap_key, base64.b64decode(request["wrapped_key"]),
                          wrap.sealed_label(request["vm_id"], owner["key_id"]))
    except Exception:  # noqa: BLE001
        raise Refused("release.unwrap", "the TC cannot unwrap this image's key: sealed for another TC or customer, "
                                        "or altered") from None
    rewrapped = wrap.wrap(certificate.public_key(), kvm, label)  # type: ignore[arg-type]
    del kvm
    return latest, certificate_row, rewrapped, guard
