"""A customer's placement request, signed: single use (a fresh id), naming the sealed image by its
VM id and disk digest, signed with the customer's key under the placement-request domain."""

from __future__ import annotations

import base64
import datetime
import os


class RequestError(ValueError):
    """The request file is not one PlacementRequest."""


def sign_request(request_path: str, key_path: str) -> dict:
    """A signed, single-use placement request naming the sealed image it launches."""
    from ..manifest.loader import load_manifests
    from . import bundle, customer
    from .canonical import PLACEMENT_REQUEST, signed_bytes

    result = load_manifests([request_path])
    if len(result.requests) != 1:
        raise RequestError(f"{request_path} must hold exactly one PlacementRequest; it holds {result.holds()} "
                           "(a request is the PlacementRequest manifest you sign: see examples/requests/)")
    manifest = result.requests[0].source.data  # type: ignore[union-attr]
    bundle_dir = result.requests[0].image
    envelope_bundle = bundle.load(bundle_dir)
    if envelope_bundle["descriptor"].get("version") != bundle.DESCRIPTOR_VERSION:
        raise RequestError(f"{bundle_dir} was sealed by an older tccdeploy (descriptor version "
                           f"{envelope_bundle['descriptor'].get('version')}), which the TC no longer takes: seal the "
                           "image again (tccdeploy image seal)")
    key = customer.load(key_path)
    request_id, salt = customer.new_id("request", key.public_key())
    request = {
        "manifest": manifest,
        "id": request_id,
        "salt": salt,
        "created": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "customer": customer.public_text(key.public_key()),
        "image": {"vm_id": envelope_bundle["descriptor"]["vm_id"], "sha256": envelope_bundle["descriptor"]["disk"]["sha256"]},
    }
    return {"request": request, "signature": base64.b64encode(key.sign(signed_bytes(PLACEMENT_REQUEST, request))).decode(),
            "bundle": os.path.abspath(bundle_dir)}
