"""Another customer (the provider is one: `mallory`) against a customer's ids at the TC. Request ids
and VM ids were the customer's free choice and the TC's first come, first served: whoever saw a
signed request or a bundle on its way (the engine submits them) could claim its ids under its own
key first, and the owner's own request was then refused, while the TC signed a receipt naming the
owner's ids for the claimer's VM (found in a review of the receipt code). Now both ids are made
from the customer's key id and a salt it signs, and the TC checks that."""

from __future__ import annotations

import base64

import pytest

from tccdeploy.crypto import customer, wrap
from tccdeploy.crypto.canonical import PLACEMENT_REQUEST, SEALED_IMAGE, signed_bytes

from ..brokerkit import reason


@pytest.fixture
def world(broker_world):
    broker_world.customer("mallory")
    return broker_world


def _claimed(world, bundle: dict, vm_id: str, vm_salt: str) -> dict:  # type: ignore[type-arg]
    """mallory's own bundle made over to vm_id: her key wrapped under her label for it, signed by her."""
    key = world.keys["mallory"]
    descriptor = dict(bundle["descriptor"], vm_id=vm_id, vm_salt=vm_salt, wrapped_key=base64.b64encode(wrap.wrap(
        world.tc.identity().wrap_certificate.public_key(), b"k" * 32,
        wrap.sealed_label(vm_id, customer.key_id(key.public_key())))).decode())
    return {"descriptor": descriptor, "signature": base64.b64encode(key.sign(signed_bytes(SEALED_IMAGE, descriptor))).decode()}


def _resigned(world, owner: str, envelope: dict, **fields: str) -> dict:  # type: ignore[type-arg]
    request = dict(envelope["request"], **fields)
    return {"request": request,
            "signature": base64.b64encode(world.keys[owner].sign(signed_bytes(PLACEMENT_REQUEST, request))).decode()}


def test_another_customer_cannot_claim_a_vm_id_before_its_owner(world):
    victim = world.image("acme")
    taken = victim["descriptor"]
    claim = _claimed(world, world.image("mallory"), taken["vm_id"], taken["vm_salt"])  # the owner's salt, too
    assert reason(world.tc.accept_request, world.request("mallory", claim), claim) == "request.image-owner"
    assert world.tc.registry._all("SELECT id FROM requests") == []
    assert world.tc.accept_request(world.request("acme", victim), victim)["customer"] == "acme"


def test_another_customer_cannot_claim_a_request_id_before_its_owner(world):
    bundle = world.image("acme")
    envelope = world.request("acme", bundle)
    theirs = world.image("mallory")
    claim = _resigned(world, "mallory", world.request("mallory", theirs), id=envelope["request"]["id"],
                      salt=envelope["request"]["salt"])
    assert reason(world.tc.accept_request, claim, theirs) == "request.id"
    assert world.tc.registry._all("SELECT id FROM requests") == []
    assert world.tc.accept_request(envelope, bundle)["id"] == envelope["request"]["id"]


# Each way an id can fail to be its key's: its salt gone, another salt, another id.
CHANGES = {"no-salt": (None, None), "other-salt": (None, "00" * 16), "free-id": ("ab" * 16, None)}


def _changed(fields: dict, salt_field: str, id_field: str, change: str) -> dict:  # type: ignore[type-arg]
    new_id, new_salt = CHANGES[change]
    out = dict(fields)
    if change == "no-salt":
        del out[salt_field]
    elif new_salt is not None:
        out[salt_field] = new_salt
    if new_id is not None:
        out[id_field] = new_id
    return out


@pytest.mark.parametrize("change", list(CHANGES))
def test_a_request_whose_id_its_key_does_not_make_is_refused(world, change):
    bundle = world.image("acme")
    request = _changed(world.request("acme", bundle)["request"], "salt", "id", change)
    assert reason(world.tc.accept_request, _resigned(world, "acme", {"request": request}), bundle) == "request.id"


@pytest.mark.parametrize("change", ["no-salt", "other-salt"])
def test_an_image_whose_vm_id_its_key_does_not_make_is_refused(world, change):
    bundle = world.image("acme")
    descriptor = _changed(bundle["descriptor"], "vm_salt", "vm_id", change)
    resigned = {"descriptor": descriptor, "signature": base64.b64encode(
        world.keys["acme"].sign(signed_bytes(SEALED_IMAGE, descriptor))).decode()}
    assert reason(world.tc.accept_request, world.request("acme", resigned), resigned) == "request.image-owner"
