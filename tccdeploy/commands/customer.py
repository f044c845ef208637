"""The customer's side: `customer init`, `image seal|inspect`, `request sign`, `receipt verify`.

None of these needs the provider: a customer runs them on its own machine with its own key,
pinning the TC by its certificate.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import sys

KEY_ENV = "TCCDEPLOY_CUSTOMER_KEY"


def default_key() -> str:
    return os.environ.get(KEY_ENV) or os.path.join(os.path.expanduser("~"), ".config", "tccdeploy", "customer-key.pem")


def cmd_customer_init(args: argparse.Namespace) -> int:
    from ..crypto import customer

    key, created = customer.init(args.key)
    print(("created" if created else "exists") + f": {args.key} (0600)")
    print("register this public key with the provider's TC (tccdeploy tc customers add NAME KEY):")
    print(customer.public_text(key.public_key()))
    return 0


def cmd_seal(args: argparse.Namespace) -> int:
    from ..crypto import bundle, customer

    tc = bundle.load_tc(args.tc, args.pin)
    descriptor = bundle.seal(args.disk, tc, customer.load(args.key), args.output, args.name)
    print(f"sealed {args.disk} -> {args.output}")
    print(f"  vm id:        {descriptor['vm_id']}")
    print(f"  disk sha256:  {descriptor['disk']['sha256']} ({descriptor['disk']['size']} bytes, LUKS qcow2)")
    print(f"  key wrapped to the TC whose CA fingerprint is {tc.ca_fingerprint}")
    return 0


def cmd_inspect(args: argparse.Namespace) -> int:
    from ..crypto import bundle

    envelope = bundle.load(args.bundle, check_disk=not args.no_disk)
    d = envelope["descriptor"]
    if args.json:
        print(json.dumps(d, indent=2))
        return 0
    print(f"{args.bundle}: sealed image {d['name']} (signature verified{', disk digest verified' if not args.no_disk else ''})")
    for label, value in (("vm id", d["vm_id"]), ("disk", f"{d['disk']['file']} sha256 {d['disk']['sha256']}"),
                         ("size", f"{d['disk']['size']} bytes ({d['disk'].get('virtual_size', '?')} virtual)"),
                         ("created", d.get("created", "-")), ("customer key id", d["customer"]["id"]),
                         ("TC CA sha256", d.get("tc", {}).get("ca_sha256", "-")),
                         ("Kvm", "wrapped to the TC (RSA-OAEP-SHA256, label: VM id and customer key id)")):
        print(f"  {label + ':':<17} {value}")
    return 0


def cmd_request_sign(args: argparse.Namespace) -> int:
    from ..crypto.request import RequestError, sign_request

    try:
        envelope = sign_request(args.request, args.key)
    except RequestError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    with open(args.output, "w") as fh:
        json.dump(envelope, fh, indent=2)
    print(f"signed request {envelope['request']['id']} -> {args.output} (accepted once by the TC)")
    return 0


def _tc_ca(path: str, pin: str | None = None):  # type: ignore[no-untyped-def]
    """The TC's CA certificate from the customer's pinned tc.pem (and, given pin, of that SHA-256
    fingerprint: the one the customer checked when sealing), or None (the reason printed)."""
    import hashlib

    from cryptography import x509
    from cryptography.hazmat.primitives import serialization

    try:
        with open(path, "rb") as fh:
            certs = x509.load_pem_x509_certificates(fh.read())
    except (OSError, ValueError):
        print(f"error: {path} holds no PEM certificates: --tc takes the TC's certificates as `tccdeploy tc "
              "show -o tc.pem` wrote them (the TC's operator publishes them)", file=sys.stderr)
        return None
    ca = next((c for c in certs if c.issuer == c.subject), None)
    if ca is None:
        print(f"error: no CA certificate in {path}", file=sys.stderr)
        return None
    fingerprint = hashlib.sha256(ca.public_bytes(serialization.Encoding.DER)).hexdigest()
    if pin and fingerprint != pin.strip().lower():
        print(f"INVALID: tc.pin: the TC's CA in {path} has fingerprint {fingerprint}, not the pinned {pin}: this is not "
              "the TC you sealed for", file=sys.stderr)
        return None
    return ca


def _signed_request(path: str) -> dict | None:  # type: ignore[type-arg]
    """The request body of a signed request file (`request sign`'s output), or None (said why)."""
    try:
        with open(path) as fh:
            envelope = json.load(fh)
        request = envelope["request"]
        if not isinstance(request, dict):
            raise TypeError("request is not an object")
        return request  # type: ignore[no-any-return]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        print(f"error: {path} is not a signed request as `tccdeploy request sign` wrote it ({exc})", file=sys.stderr)
        return None


def verified_receipt(text: str | bytes, tc: str, request: dict | None = None, request_id: str | None = None,  # type: ignore[type-arg]
                     key_id: str | None = None, pin: str | None = None) -> dict | None:  # type: ignore[type-arg]
    """The receipt's body if the TC of the pinned certificates signed it and it answers what was
    given (the customer's signed request, its id, its key); None with INVALID and the reason printed."""
    from ..coordinator import receipts

    ca = _tc_ca(tc, pin)
    if ca is None:
        return None
    try:
        body = receipts.verify(receipts.parse(text), ca)
        receipts.check_answers(body, request, request_id, key_id)
    except receipts.ReceiptError as exc:
        print(f"INVALID: {exc.reason}: {exc}", file=sys.stderr)
        return None
    return body


def show_receipt(body: dict, checked_against: str | None) -> None:  # type: ignore[type-arg]
    """What a verified receipt proves, in words."""
    from ..coordinator.runtime import last_event_of
    from ..crypto.runtime import REDACTED

    when = datetime.datetime.fromtimestamp(body["time"], datetime.UTC).isoformat(timespec="seconds")
    attested = datetime.datetime.fromtimestamp(body["attestation"]["time"], datetime.UTC).isoformat(timespec="seconds")
    print("VALID: signed by the TC whose certificate you gave. It proves that:")
    key = f" (key {body['customer_key_id']})" if "customer_key_id" in body else ""
    print(f"  VM {body['vm']} ({body['vm_id']}) of customer {body['customer']}{key} started on node {body['node']} at {when},")
    print(f"  from the image with sha256 {body['image_sha256']} (request {body['request']});")
    print(f"  the node held node certificate {body['node_certificate_serial']} and had booted TVMM build {body['tvmm_build']},")
    print(f"  proven by attestation #{body['attestation']['id']} at {attested} (PCR digest {body['attestation']['pcr_digest']}).")
    evidence = body.get("launch_evidence")
    if evidence:
        events = evidence["events"]
        last = last_event_of(events, body["vm_id"])
        others = sum(1 for e in events if REDACTED in e)
        print(f"  The node's TPM said so itself: a quote by its attestation key over runtime PCR {evidence['runtime_pcr']},")
        print(f"  made for launch ticket {evidence['ticket']}, whose {len(events)} event(s) since the TPM's reset replay")
        print(f"  to it ({others} of other VMs, shown by digest only); this VM's last: {last.get('event')} "
              f"({last.get('vcpus')} vCPU, {last.get('memory_mib')} MiB)")
        print(f"  from image {last.get('image_sha256')}. (Checked again here; that this key is the node's TPM's is the TC's word.)")
    else:
        print("  (an older receipt: it carries no evidence from the node's own TPM)")
    if checked_against:
        print(f"  It answers {checked_against}.")
    else:
        print("  Not checked against a request of yours: give --request REQUEST.json (what `request sign` wrote) to check "
              "that it answers that request.")


def cmd_receipt_verify(args: argparse.Namespace) -> int:
    request = None
    if args.request:
        request = _signed_request(args.request)
        if request is None:
            return 1
    try:
        with open(args.receipt, "rb") as fh:
            text = fh.read()
    except OSError as exc:
        print(f"INVALID: cannot read {args.receipt}: {exc.strerror}", file=sys.stderr)
        return 1
    body = verified_receipt(text, args.tc, request, pin=args.pin)
    if body is None:
        return 1
    if args.json:
        print(json.dumps(body, indent=2))
        return 0
    show_receipt(body, f"your request {request['id']} (its VM id, image and key)" if request else None)
    return 0


def customer_query(args: argparse.Namespace, op: str) -> dict | None:  # type: ignore[type-arg]
    """Ask a served TC about one of the customer's requests (a signed, single-use query); None
    (and the reason printed) when the TC refuses."""
    from ..coordinator.client import CustomerClient
    from ..coordinator.keybroker import Refused
    from ..crypto import customer

    client = CustomerClient(args.tc, args.tc_cert)
    try:
        return client.status(args.id, customer.load(args.key)) if op == "status" else \
            client.receipt(args.id, customer.load(args.key))
    except Refused as exc:
        print(f"refused: {exc.reason}: {exc}", file=sys.stderr)
        return None
    finally:
        client.close()


def cmd_receipt_fetch(args: argparse.Namespace) -> int:
    """Fetch the receipt from a served TC, check it with the pinned certificate and against the
    request asked about and the customer's key, and only then keep it."""
    from ..crypto import customer

    receipt = customer_query(args, "receipt")
    if receipt is None:
        return 2
    key_id = customer.key_id(customer.load(args.key).public_key())
    body = verified_receipt(json.dumps(receipt), args.tc_cert, request_id=args.id, key_id=key_id)
    if body is None:
        return 1
    with open(args.output, "w") as fh:
        json.dump(receipt, fh, indent=2)
    print(f"wrote {args.output}")
    show_receipt(body, f"request {args.id}, made with your key")
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("customer", help="the customer's signing identity")
    cs = p.add_subparsers(dest="customer_command", metavar="ACTION", required=True)
    q = cs.add_parser("init", help="create an Ed25519 signing key (0600) and print its public key to register")
    q.add_argument("--key", default=default_key(), help=f"key file (default ${KEY_ENV} or ~/.config/tccdeploy/customer-key.pem)")
    q.set_defaults(func=cmd_customer_init)

    p = sub.add_parser("image", help="seal a VM image for the TC, or inspect a sealed bundle")
    im = p.add_subparsers(dest="image_command", metavar="ACTION", required=True)
    q = im.add_parser("seal", help="encrypt a raw/qcow2 image (LUKS qcow2) under a fresh key wrapped to the TC",
                      formatter_class=argparse.RawDescriptionHelpFormatter,
                      description="Convert DISK into a LUKS-encrypted qcow2 under a fresh random key Kvm (passed to\n"
                                  "qemu-img through a pipe, never on disk or in argv) and write BUNDLE/descriptor.json:\n"
                                  "VM id, disk sha256 and size, Kvm wrapped to the TC, signed with your key.",
                      epilog="example:\n  tccdeploy image seal web.raw --tc tc.pem --key customer-key.pem -o web.sealed")
    q.add_argument("disk", metavar="DISK")
    q.add_argument("--tc", required=True, metavar="TC_CERT", help="the TC's certificates (tccdeploy tc show -o FILE)")
    q.add_argument("--pin", metavar="SHA256", help="the TC CA fingerprint you expect (refuse any other)")
    q.add_argument("--key", default=default_key(), help="your customer key")
    q.add_argument("-o", "--output", required=True, metavar="BUNDLE", help="bundle directory to create")
    q.add_argument("--name", help="the image's name (default: DISK's)")
    q.set_defaults(func=cmd_seal)
    q = im.add_parser("inspect", help="show and check a sealed bundle (signature, disk digest)")
    q.add_argument("bundle", metavar="BUNDLE")
    q.add_argument("--no-disk", action="store_true", help="check the descriptor only")
    q.add_argument("--json", action="store_true")
    q.set_defaults(func=cmd_inspect)

    p = sub.add_parser("receipt", help="verify a launch receipt offline; fetch one from a served TC")
    rc = p.add_subparsers(dest="receipt_command", metavar="ACTION", required=True)
    q = rc.add_parser("verify", help="check a receipt with only the TC certificate, and say what it proves")
    q.add_argument("receipt", metavar="RECEIPT")
    q.add_argument("--tc", required=True, metavar="TC_CERT")
    q.add_argument("--request", metavar="REQUEST.json",
                   help="your signed request (as `request sign` wrote it): check the receipt answers it (its id, VM, "
                        "image and your key), not only that the TC signed it")
    q.add_argument("--pin", metavar="SHA256", help="the TC CA's SHA-256 fingerprint you checked when sealing (image seal "
                                                 "--pin): refuse a tc.pem of another CA")
    q.add_argument("--json", action="store_true")
    q.set_defaults(func=cmd_receipt_verify)
    q = rc.add_parser("fetch", help="fetch a receipt from a served TC (a signed query), verify it, save it")
    q.add_argument("id", metavar="REQUEST_ID")
    q.add_argument("--tc", required=True, metavar="URL", help="the served TC")
    q.add_argument("--tc-cert", required=True, metavar="TC_CERT", help="the TC certificates you pinned (tc show -o)")
    q.add_argument("--key", default=default_key(), help="your customer key (signs the query)")
    q.add_argument("-o", "--output", required=True, metavar="RECEIPT")
    q.set_defaults(func=cmd_receipt_fetch)
