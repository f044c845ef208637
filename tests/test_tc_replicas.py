"""Two `tc serve` replicas on one PostgreSQL: one TC. A nonce is consumed once across replicas,
the audit chain stays linear under concurrent writers, and losing a replica mid-run loses
nothing: the engine's client goes on with the other."""

from __future__ import annotations

import threading
import time

import pytest

from tccdeploy.coordinator import audit, identity
from tccdeploy.coordinator.client import RemoteCoordinator
from tccdeploy.coordinator.store import Registry

from .attestkit import Node, enroll_software_node
from .conftest import REPO
from .labvms import kill_everywhere
from .pgserver import PostgresServer, skip_reason
from .tcservice import Service

pytestmark = pytest.mark.slow
SITE, ADDRESS = "site1", "127.0.1.7"  # inside the example perimeter's site1


@pytest.fixture(scope="module")
def replicas(tmp_path_factory):
    reason = skip_reason()
    if reason:
        pytest.skip(reason)
    server = PostgresServer()
    url = server.new_database()
    state = tmp_path_factory.mktemp("replicated-tc")
    first = second = None
    try:
        first = Service(state, str(REPO / "examples"), registry=url)
        second = Service(state, str(REPO / "examples"), registry=url, setup=False)

        class Replicas:
            pass

        r = Replicas()
        r.a, r.b, r.url, r.state = first, second, url, state
        yield r
    finally:
        for service in (first, second):
            if service is not None:
                service.stop()
        server.stop()


def enrolled(replicas, name: str) -> Node:  # type: ignore[no-untyped-def]
    """A software node, enrolled straight into the shared registry (enrollment's own tests are elsewhere)."""
    node = Node()
    registry = Registry(replicas.url)
    try:
        enroll_software_node(registry, name, node, SITE, ADDRESS)
    finally:
        registry.close()
    return node


def client(replicas, *urls: str) -> RemoteCoordinator:  # type: ignore[no-untyped-def]
    return RemoteCoordinator(",".join(urls), str(replicas.a.engine_dir))


def test_a_nonce_from_one_replica_is_verified_by_the_other_and_only_once(replicas):
    node = enrolled(replicas, "sw-once")
    on_a, on_b = client(replicas, replicas.a.url), client(replicas, replicas.b.url)
    try:
        nonce = on_a.nonce("sw-once")
        evidence = node.evidence(nonce)
        results: list[tuple] = []
        start = threading.Barrier(16)

        def submit(i: int) -> None:
            start.wait()
            results.append((on_a if i % 2 else on_b).verify("sw-once", SITE, ADDRESS, evidence))

        threads = [threading.Thread(target=submit, args=(i,)) for i in range(16)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    finally:
        on_a.close()
        on_b.close()
    # One decision: every submission of the same evidence gets the one verdict recorded for it.
    assert len({attestation for _, attestation in results}) == 1 and all(v.trusted for v, _ in results)
    registry = Registry(replicas.url)
    try:
        assert len(registry.attestations("sw-once", limit=100)) == 1
    finally:
        registry.close()


def test_the_audit_chain_stays_linear_with_both_replicas_writing(replicas):
    nodes = {f"sw-{i}": enrolled(replicas, f"sw-{i}") for i in range(8)}
    errors: list[str] = []

    def work(name: str, url: str) -> None:
        tc = client(replicas, url)
        try:
            for _ in range(5):
                verdict, _ = tc.verify(name, SITE, ADDRESS, nodes[name].evidence(tc.nonce(name)))
                if not verdict.trusted:
                    errors.append(f"{name}: {verdict.reasons}")
        finally:
            tc.close()

    threads = [threading.Thread(target=work, args=(name, replicas.a.url if i % 2 else replicas.b.url))
               for i, name in enumerate(nodes)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    registry = Registry(replicas.url)
    try:
        result = audit.verify(registry, tc=identity.load(str(replicas.state)))
        ids = [e["id"] for e in registry.audit_entries()]
    finally:
        registry.close()
    assert result.ok and ids == list(range(1, len(ids) + 1)) and len(ids) >= 40


def test_losing_a_replica_mid_run_loses_nothing_and_repeats_nothing(replicas):
    node = enrolled(replicas, "sw-failover")
    tc = client(replicas, replicas.a.url, replicas.b.url)
    outcomes: list[str] = []
    halfway = threading.Event()
    killer = threading.Thread(target=lambda: (halfway.wait(30), replicas.a.kill()))  # while requests are in flight
    killer.start()
    try:
        deadline = time.monotonic() + 60
        while len(outcomes) < 100 and time.monotonic() < deadline:
            verdict, _ = tc.verify("sw-failover", SITE, ADDRESS, node.evidence(tc.nonce("sw-failover")))
            outcomes.append("trusted" if verdict.trusted else ",".join(r["code"] for r in verdict.reasons))
            if len(outcomes) == 30:
                halfway.set()
    finally:
        halfway.set()
        killer.join()
        tc.close()
    assert replicas.a.proc.poll() is not None and tc.url == replicas.b.url  # the run moved to the other replica
    # A submission in flight when the replica died may have been recorded there: resent, it gets
    # the verdict recorded for it, never a second one.
    assert len(outcomes) == 100
    assert outcomes.count("trusted") == 100
    registry = Registry(replicas.url)
    try:
        recorded = registry.attestations("sw-failover", limit=1000)
        assert sum(a["verdict"] == "trusted" for a in recorded) == outcomes.count("trusted")
        assert len({a["nonce"] for a in recorded}) == len(recorded)  # no nonce counted twice
        assert audit.verify(registry, tc=identity.load(str(replicas.state))).ok
    finally:
        registry.close()


def test_a_launch_goes_on_with_the_other_replica_and_the_key_is_released_once(lab, tmp_path, postgres):
    import json
    import os
    import subprocess

    from .tcservice import BIN

    url, state = postgres.new_database(), tmp_path / "tc"
    a = Service(state, lab.manifests_dir, registry=url)
    b = Service(state, lab.manifests_dir, registry=url, setup=False)
    admin = dict(os.environ, TCCDEPLOY_STATE=str(state), TCCDEPLOY_REGISTRY=url, NO_COLOR="1")
    engine = dict(os.environ, TCCDEPLOY_STATE=str(tmp_path / "engine"), TCCDEPLOY_TC=f"{a.url},{b.url}",
                  TCCDEPLOY_ENGINE_DIR=str(a.engine_dir), NO_COLOR="1")
    key = str(tmp_path / "customer.pem")
    vm_id = None

    def tcc(env, *args):  # type: ignore[no-untyped-def]
        return subprocess.run([str(BIN / "tccdeploy"), *args], env=env, capture_output=True, text=True, timeout=300)

    try:
        assert tcc(admin, "tc", "show", "-o", str(tmp_path / "tc.pem")).returncode == 0
        public = tcc(admin, "customer", "init", "--key", key).stdout.strip().splitlines()[-1]
        assert tcc(admin, "tc", "customers", "add", "acme", public).returncode == 0
        assert tcc(engine, "enroll", "node1,node2", "-i", lab.inventory_dir).returncode == 0
        assert tcc(engine, "attest", "--admit", "node1,node2", "-i", lab.inventory_dir).returncode == 0
        (tmp_path / "disk.raw").write_bytes(bytes(1024 * 1024))
        assert tcc(admin, "image", "seal", str(tmp_path / "disk.raw"), "--tc", str(tmp_path / "tc.pem"), "--key", key,
                   "-o", str(tmp_path / "web.sealed"), "--name", "web").returncode == 0
        (tmp_path / "web.yml").write_text("apiVersion: tccdeploy/v1\nkind: PlacementRequest\nmetadata: {name: web}\n"
                                          "spec: {image: web.sealed, vcpus: 1, memoryMiB: 64}\n")
        assert tcc(admin, "request", "sign", str(tmp_path / "web.yml"), "--key", key, "-o", str(tmp_path / "w.json")).returncode == 0
        submitted = tcc(admin, "request", "submit", str(tmp_path / "w.json"), "--tc", a.url, "--tc-cert",
                        str(tmp_path / "tc.pem"), "--json")
        request_id = json.loads(submitted.stdout)["id"]

        a.kill()  # the replica the customer and the engine used so far is lost
        launched = tcc(engine, "request", "launch", request_id, "-i", lab.inventory_dir, "--bundle", str(tmp_path / "web.sealed"))
        assert launched.returncode == 0, launched.stderr
        again = tcc(engine, "request", "launch", request_id, "-i", lab.inventory_dir, "--bundle", str(tmp_path / "web.sealed"))
        assert again.returncode == 2 and "launched" in again.stderr  # not launched twice
        registry = Registry(url)
        try:
            vm = registry.vm("web")
            vm_id = vm["vm_id"]
            assert vm["state"] == "running" and len(registry.releases(vm_id)) == 1
            assert audit.verify(registry, tc=identity.load(str(state))).ok
        finally:
            registry.close()
        fetched = tcc(admin, "receipt", "fetch", request_id, "--tc", b.url, "--tc-cert", str(tmp_path / "tc.pem"),
                      "--key", key, "-o", str(tmp_path / "receipt.json"))
        assert "VALID" in fetched.stdout, fetched.stderr
    finally:
        b.stop()
        a.stop()
        if vm_id is not None:
            kill_everywhere(lab, vm_id)  # (the TCs are gone)
