"""The whole lab flow with the engine and the customer talking to `tc serve` over HTTPS, on
SQLite and on PostgreSQL: enroll, attest and admit; the customer submits a signed request to
the TC and the provider launches it; the customer checks its state and fetches the receipt;
encrypted migration; a tampered node quarantined by enforcement and its VM powered off (a node
whose boot changed cannot open a migration key, so its VM's state never reaches a trusted node)."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

from tccdeploy.lab.lab import Lab

from .labvms import kill_everywhere
from .tcservice import BIN, Service

pytestmark = pytest.mark.slow
NODES = "node1,node2,node3,node4"


def run(env: dict[str, str], *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([str(BIN / "tccdeploy"), *args], env=env, capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize("database", ["sqlite", "postgresql"])
def test_the_whole_flow_through_a_served_tc(lab: Lab, tmp_path: Path, database, request):
    registry = request.getfixturevalue("postgres").new_database() if database == "postgresql" else None
    state = tmp_path / "tc"
    service = Service(state, lab.manifests_dir, registry=registry)
    admin = dict(os.environ, TCCDEPLOY_STATE=str(state), NO_COLOR="1")  # the TC's operator, on the TC's machine
    if registry:
        admin["TCCDEPLOY_REGISTRY"] = registry
    engine = dict(os.environ, TCCDEPLOY_STATE=str(tmp_path / "engine"), TCCDEPLOY_TC=service.url, NO_COLOR="1",
                  TCCDEPLOY_ENGINE_DIR=str(service.engine_dir))  # the provider: no TC state at all
    customer = dict(os.environ, TCCDEPLOY_CUSTOMER_KEY=str(tmp_path / "customer.pem"), NO_COLOR="1")
    inv = ["-i", lab.inventory_dir]
    vm_id = node = None
    try:
        assert run(admin, "tc", "show", "-o", str(tmp_path / "tc.pem")).returncode == 0
        public = run(customer, "customer", "init", "--key", str(tmp_path / "customer.pem")).stdout.strip().splitlines()[-1]
        assert run(admin, "tc", "customers", "add", "acme", public).returncode == 0

        assert run(engine, "enroll", NODES, *inv).returncode == 0
        attested = run(engine, "attest", "--admit", NODES, *inv, "--json")
        assert attested.returncode == 0 and all(r["result"]["admitted"] for r in json.loads(attested.stdout))

        (tmp_path / "disk.raw").write_bytes(bytes(1024 * 1024))
        assert run(customer, "image", "seal", str(tmp_path / "disk.raw"), "--tc", str(tmp_path / "tc.pem"),
                   "-o", str(tmp_path / "web.sealed"), "--name", "web").returncode == 0
        (tmp_path / "web.yml").write_text("apiVersion: tccdeploy/v1\nkind: PlacementRequest\nmetadata: {name: web}\n"
                                          "spec: {image: web.sealed, vcpus: 1, memoryMiB: 64}\n")
        assert run(customer, "request", "sign", str(tmp_path / "web.yml"), "-o", str(tmp_path / "web.json")).returncode == 0
        pinned = ["--tc", service.url, "--tc-cert", str(tmp_path / "tc.pem")]
        submitted = run(customer, "request", "submit", str(tmp_path / "web.json"), *pinned, "--json")
        assert submitted.returncode == 0, submitted.stderr
        request_id = json.loads(submitted.stdout)["id"]
        again = run(customer, "request", "submit", str(tmp_path / "web.json"), *pinned)
        assert again.returncode == 2 and "request.replayed" in again.stderr
        status = json.loads(run(customer, "request", "status", request_id, *pinned, "--json").stdout)
        assert status["state"] == "accepted" and not status["receipt"]

        launched = run(engine, "request", "launch", request_id, *inv, "--bundle", str(tmp_path / "web.sealed"))
        assert launched.returncode == 0, launched.stderr
        status = json.loads(run(customer, "request", "status", request_id, *pinned, "--json").stdout)
        assert status["state"] == "launched" and status["vm_state"] == "running" and status["receipt"]
        fetched = run(customer, "receipt", "fetch", request_id, *pinned, "-o", str(tmp_path / "receipt.json"))
        assert fetched.returncode == 0 and "VALID" in fetched.stdout, fetched.stdout + fetched.stderr

        vms = json.loads(run(engine, "vms", "--json").stdout)
        vm_id, first = vms[0]["vm_id"], vms[0]["node"]
        moved = run(engine, "migrate", "web", "--to", "auto", *inv, "--json")
        assert moved.returncode == 0, moved.stderr
        node = json.loads(moved.stdout)["to"]
        assert node != first

        lab.tamper(node)
        enforced = run(engine, "enforce", "--once", *inv, "-l", NODES)
        assert enforced.returncode == 2 and f"quarantined {node}: build.unknown" in enforced.stdout, enforced.stdout
        vms = json.loads(run(engine, "vms", "--json").stdout)
        # powered off; live in the TC's records until the node proves it gone (its word is worth nothing now)
        assert vms[0]["state"] == "running" and vms[0]["node"] == node, vms
        assert "vm.end-boot-untrusted" in enforced.stdout, enforced.stdout
        assert "tvmm.tk-refused" in enforced.stdout, enforced.stdout  # why it could not be evacuated
        nodes = {n["name"]: n for n in json.loads(run(engine, "nodes", "--json").stdout)}
        assert nodes[node]["state"] == "quarantined" and nodes[node]["reasons"] == ["build.unknown"]
        history = json.loads(run(engine, "nodes", node, "--json").stdout)
        assert history["attestations"][0]["verdict"] == "untrusted"
        for who in (admin, engine):  # the TC's operator on its registry; the engine from the entries served
            audit = run(who, "audit", "verify")
            assert audit.returncode == 0 and "chain intact" in audit.stdout, audit.stderr
        refused = run(engine, "vm", "destroy", "web", *inv)  # the tampered node's evidence proves nothing
        assert refused.returncode != 0 and "vm.end-boot-untrusted" in refused.stdout + refused.stderr, refused.stdout
        lab.reset(node)  # rebooted into the approved build: a trusted quote with a higher resetCount
        assert run(engine, "attest", node, *inv).returncode == 0
        assert json.loads(run(engine, "vms", "--json").stdout)[0]["state"] == "off"
        destroyed = run(engine, "vm", "destroy", "web", *inv)  # its (encrypted) disk is still there
        assert destroyed.returncode == 0, destroyed.stdout + destroyed.stderr
        assert json.loads(run(engine, "vms", "--json").stdout) == []
        vm_id = None
    finally:
        service.stop()
        if vm_id is not None:
            kill_everywhere(lab, vm_id)  # (the TC is gone)
        if node is not None:
            lab.reset(node)
