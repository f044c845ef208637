"""Customers' rules are the TC's: the image's owner, one running copy, the request's constraints,
and VM state that moves only forward, whatever the engine reports."""

from __future__ import annotations

import base64
import json
import secrets
import time
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from tccdeploy.crypto import customer
from tccdeploy.crypto.canonical import PLACEMENT_REQUEST, SEALED_IMAGE, signed_bytes

from .conftest import World, read_json, refused

pytestmark = pytest.mark.slow


def _copied(world: World, victim_bundle: Path, thief: str, name: str) -> dict:
    """thief's own descriptor and request around the victim's vm_id, disk digest and wrapped key."""
    key = customer.load(world.customers[thief]["KEY"])
    victim = read_json(victim_bundle / "descriptor.json")["descriptor"]
    descriptor = dict(victim, customer={"key": customer.public_text(key.public_key()),
                                        "id": customer.key_id(key.public_key())}, name=name)
    request = {"manifest": {"apiVersion": "tccdeploy/v1", "kind": "PlacementRequest", "metadata": {"name": name},
                            "spec": {"image": "x", "vcpus": 1, "memoryMiB": 64}},
               "id": secrets.token_hex(16),
               "created": time.strftime("%Y-%m-%dT%H:%M:%S+00:00", time.gmtime()),
               "customer": customer.public_text(key.public_key()),
               "image": {"vm_id": victim["vm_id"], "sha256": victim["disk"]["sha256"]}}
    sign = key.sign
    return {"request": {"request": request, "signature": base64.b64encode(sign(signed_bytes(PLACEMENT_REQUEST, request))).decode()},
            "bundle": {"descriptor": descriptor, "signature": base64.b64encode(sign(signed_bytes(SEALED_IMAGE, descriptor))).decode()}}


def _launched(world: World, owner: str, name: str, constraints: str = "{}") -> tuple[str, Path, str]:
    """owner's VM `name`, submitted and launched honestly: (request id, bundle, vm_id)."""
    bundle = world.seal(owner, name)
    submitted = world.submit(owner, world.sign(owner, name, bundle, constraints))
    assert submitted.returncode == 0, submitted.stderr
    request_id = json.loads(submitted.stdout)["id"]
    launched = world.launch(request_id, bundle)
    assert launched.returncode == 0, launched.stdout + launched.stderr
    return request_id, bundle, read_json(bundle / "descriptor.json")["descriptor"]["vm_id"]


def test_a_sealed_key_copied_into_another_customers_request_is_refused(world: World):
    """mallory (the provider, registered as a customer) copies acme's image into a descriptor and
    request she signs herself: before acme submits it (to squat it) and after."""
    bundle = world.seal("acme", "ledger")
    vm_id = read_json(bundle / "descriptor.json")["descriptor"]["vm_id"]
    before, audited = world.decisions(), world.audit_count()
    refused(world.public_post("/v1/requests", _copied(world, bundle, "mallory", "ledger-copy")), "request.image-owner")
    assert world.decisions() == before and world.audit_kinds_since(audited) == ["request.refused"]
    submitted = world.submit("acme", world.sign("acme", "ledger", bundle))
    assert submitted.returncode == 0, submitted.stderr  # acme's own request is not blocked by the attempt
    refused(world.public_post("/v1/requests", _copied(world, bundle, "mallory", "ledger-copy2")), "request.image-owner")
    # A stranger's key (no registered customer) is refused before anything else.
    stranger = Ed25519PrivateKey.generate()
    forged = _copied(world, bundle, "mallory", "ledger-copy3")
    forged["request"]["request"]["customer"] = customer.public_text(stranger.public_key())
    refused(world.public_post("/v1/requests", forged), "request.signature")
    assert world.qemus(vm_id) == []


def test_a_second_copy_of_a_running_image_is_refused(world: World):
    request_id, bundle, vm_id = _launched(world, "acme", "web")
    try:
        before = world.decisions()
        again = world.submit("acme", world.sign("acme", "web-two", bundle))  # freshly signed, a new VM name
        assert again.returncode != 0 and "request.vm-exists" in again.stderr, again.stdout + again.stderr
        assert world.decisions() == before and len(world.qemus(vm_id)) == 1
        # The launch report cannot be replayed: not to move the VM, not to re-sign a fresher receipt.
        with world.api() as client:
            receipt = client.get(f"/v1/requests/{request_id}").json()
            assert receipt["state"] == "launched"
        with world.api() as client:
            node = client.get(f"/v1/vms/{vm_id}").json()["node"]
        elsewhere = next(n for n in ("node1", "node2", "node3", "node4") if n != node)
        refused(world.post(f"/v1/requests/{request_id}/launched", {"node": elsewhere, "status": {"running": True}}),
                "launch.no-release")
        refused(world.post(f"/v1/requests/{request_id}/launched", {"node": node, "status": {"running": True}}),
                "launch.replayed")
        refused(world.post(f"/v1/requests/{request_id}/release", {"node": node}), "release.already")
        assert world.decisions() == before
    finally:
        world.destroy("web")
    assert world.qemus(vm_id) == []
    # Destroyed is final: the engine cannot report it back to life.
    refused(world.post(f"/v1/vms/{vm_id}/state", {"state": "running"}), "vm.state-transition")


def test_a_key_release_outside_the_constraints_is_refused(world: World):
    bundle = world.seal("acme", "db")
    submitted = world.submit("acme", world.sign("acme", "db", bundle, "{sites: [site1], antiAffinityGroup: ha}"))
    request_id = json.loads(submitted.stdout)["id"]
    vm_id = read_json(bundle / "descriptor.json")["descriptor"]["vm_id"]
    world.admit("node3", "node4")  # admitted, freshly attested, in site2
    before = world.decisions()
    for node in ("node3", "node4"):
        response = world.post(f"/v1/requests/{request_id}/release", {"node": node})
        refused(response, "placement.constraint")
        assert "site site2 not in ['site1']" in response.json()["message"]
    assert world.decisions() == before and world.qemus(vm_id) == []
    launched = world.launch(request_id, bundle)  # the honest placement in site1 goes ahead
    assert launched.returncode == 0, launched.stdout + launched.stderr
    try:
        with world.api() as client:
            source = client.get("/v1/vms/db").json()["node"]
        other_site1 = "node2" if source == "node1" else "node1"
        world.admit("node3", other_site1)
        before = world.decisions()
        refused(world.post("/v1/migrations", {"vm": "db", "destination": "node3"}), "placement.constraint")
        assert world.decisions() == before
        # Anti-affinity is the TC's too: a second VM of group ha may not join the first one's node.
        bundle2 = world.seal("acme", "db2")
        second = world.submit("acme", world.sign("acme", "db2", bundle2, "{sites: [site1], antiAffinityGroup: ha}"))
        second_id = json.loads(second.stdout)["id"]
        world.admit(source)
        response = world.post(f"/v1/requests/{second_id}/release", {"node": source})
        refused(response, "placement.constraint")
        assert "anti-affinity group ha" in response.json()["message"]
        world.engine_cmd("request", "launch", second_id, "-i", world.lab.inventory_dir, "--bundle", str(bundle2))
    finally:
        world.destroy("db")
        world.destroy("db2")


def test_a_migration_commit_needs_a_trusted_destination(world: World):
    _, _, vm_id = _launched(world, "acme", "cache")
    destination = None
    try:
        with world.api() as client:
            source = client.get("/v1/vms/cache").json()["node"]
        destination = next(n for n in ("node1", "node2", "node3", "node4") if n != source)
        world.admit(destination)
        begun = world.post("/v1/migrations", {"vm": "cache", "destination": destination})
        assert begun.status_code == 200, begun.text
        migration = begun.json()["migration"]
        # The engine now quarantines the destination (it may: that is enforcement) and commits anyway.
        assert world.post(f"/v1/nodes/{destination}/quarantine", {"reason": "test.hostile"}).status_code == 200
        before = world.decisions()
        refused(world.post(f"/v1/migrations/{migration}/end", {"vm_id": vm_id, "commit": True}),
                "migrate.destination-untrusted")
        assert world.decisions() == before
        with world.api() as client:
            assert client.get("/v1/vms/cache").json()["node"] == source
        assert world.post(f"/v1/migrations/{migration}/end", {"vm_id": vm_id, "commit": False}).status_code == 200
        refused(world.post(f"/v1/migrations/{migration}/end", {"vm_id": vm_id, "commit": True}),
                "migration.not-under-way")
    finally:
        world.destroy("cache")
        if destination is not None:
            world.restore(destination)
