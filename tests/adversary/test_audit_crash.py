"""No decision without its audit entry: the TC killed mid-stream (kill -9, as a lost machine or a
provider pulling the plug) leaves every recorded verdict and quarantine with its entry, and the
chain verifies, signatures included."""

from __future__ import annotations

import shutil
import sqlite3
import threading
import time

import pytest

from tccdeploy.coordinator import audit, identity
from tccdeploy.coordinator.client import RemoteCoordinator, TCUnavailable
from tccdeploy.coordinator.store import Registry

from ..attestkit import Node, enroll_software_node
from ..conftest import REPO, audited_registry
from ..tcservice import Service

pytestmark = pytest.mark.slow


def test_a_tc_killed_between_decisions_leaves_no_decision_unaudited(tmp_path):
    manifests = tmp_path / "manifests"
    shutil.copytree(REPO / "examples", manifests)
    service = Service(tmp_path / "tc", str(manifests))
    nodes = {f"sw{i}": Node() for i in range(4)}
    ident = identity.load(str(tmp_path / "tc"))
    registry = audited_registry(str(tmp_path / "tc" / "registry.sqlite"), ident)
    for name, node in nodes.items():
        enroll_software_node(registry, name, node)
    registry.close()
    done = []

    def engine(name: str, node: Node) -> None:
        tc = RemoteCoordinator(service.url, str(service.engine_dir), timeout=5)
        try:
            while True:
                bad = len(done) % 3 == 0  # every third verdict untrusted: quarantines are decisions too
                evidence = node.evidence(tc.nonce(name), log_extra=[(4, b"rogue")] if bad else None)
                tc.verify(name, "site1", "127.0.1.7", evidence)
                done.append(name)
        except (TCUnavailable, OSError):
            return
        finally:
            tc.close()

    threads = [threading.Thread(target=engine, args=item) for item in nodes.items()]
    for t in threads:
        t.start()
    deadline = time.monotonic() + 30
    while len(done) < 60 and time.monotonic() < deadline:
        time.sleep(0.01)
    service.kill()  # SIGKILL: no clean shutdown, requests in flight
    for t in threads:
        t.join(timeout=30)
    assert len(done) >= 60

    db = sqlite3.connect(str(tmp_path / "tc" / "registry.sqlite"))
    try:
        verdicts = {r[0] for r in db.execute("SELECT id FROM attestations")}
        quarantined = db.execute("SELECT COUNT(*) FROM nodes WHERE quarantined_at IS NOT NULL").fetchone()[0]
    finally:
        db.close()
    check = Registry(str(tmp_path / "tc" / "registry.sqlite"))
    try:
        entries = check.audit_entries()
        assert audit.verify(check, tc=ident).ok
    finally:
        check.close()
    audited = {e["data"]["id"] for e in entries if e["kind"] == "attestation"}
    assert verdicts and verdicts == audited  # every verdict has its entry, and no entry lacks its verdict
    assert quarantined == 0 or any(e["kind"] == "quarantine" for e in entries)
