"""A trusted coordinator over the lab's manifests with one registered customer, for the launch,
migration and enforcement tests."""

from __future__ import annotations

from pathlib import Path

from tccdeploy.coordinator.identity import init as tc_init
from tccdeploy.coordinator.identity import load as tc_load
from tccdeploy.coordinator.service import Coordinator
from tccdeploy.crypto import bundle as bundles
from tccdeploy.crypto import customer
from tccdeploy.crypto.request import sign_request
from tccdeploy.lab.lab import Lab
from tccdeploy.manifest.loader import load_manifests


def coordinator_with_customer(lab: Lab, root: Path) -> tuple[Coordinator, str]:
    """(coordinator, state dir); the customer's key is root/customer.pem, the TC's certificates root/tc.pem."""
    state = str(root / "tc")
    tc_init(state)
    manifests = load_manifests([lab.manifests_dir])
    tc = Coordinator.from_manifests(manifests, state)
    key, _ = customer.init(str(root / "customer.pem"))
    tc.add_customer("acme", customer.public_text(key.public_key()))
    (root / "tc.pem").write_text(tc_load(state).bundle_pem)
    return tc, state


def sealed_request(root: Path, name: str) -> dict:
    """acme's signed request for a 1-vCPU, 64 MiB VM `name` whose image is root/disk.raw sealed to
    the TC (root/tc.pem) with the customer's key (root/customer.pem): the envelope to launch."""
    image = root / f"{name}.sealed"
    bundles.seal(str(root / "disk.raw"), bundles.load_tc(str(root / "tc.pem")), customer.load(str(root / "customer.pem")),
                 str(image), name)
    path = root / f"{name}.yml"
    path.write_text(f"apiVersion: tccdeploy/v1\nkind: PlacementRequest\nmetadata: {{name: {name}}}\n"
                    f"spec: {{image: {image.name}, vcpus: 1, memoryMiB: 64}}\n")
    return sign_request(str(path), str(root / "customer.pem"))
