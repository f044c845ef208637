"""A hostile provider's world: the lab's nodes, a served TC run by a third party, and an engine
with a valid engine certificate that does whatever it likes over the API and on its own
machines (root here stands for root on the nodes: it reaches their TPM sockets and sshd).

The honest parts are set up once per package: nodes 1-4 enrolled and admitted through the TC,
two registered customers: acme (the victim) and mallory (the provider registered as a
customer). Each test attacks, then checks the TC refused with the named reason, that the
registry holds nothing new but audited refusals, and that no VM started; tests that disturb a
node give it back with `restore`.
"""

from __future__ import annotations

import base64
import json
import os
import sqlite3
import subprocess
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest

from tccdeploy.engine.runner import Engine, Session
from tccdeploy.lab.lab import Lab
from tccdeploy.manifest.loader import load_inventory

from ..tcservice import BIN, Service

NODES = ("node1", "node2", "node3", "node4")
# What a refused attack may leave behind: single-use values it burnt, and its audited refusal.
TRANSIENT = ("audit", "nonces", "challenges", "horizons")


def run(env: dict[str, str], *args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([str(BIN / "tccdeploy"), *args], env=env, capture_output=True, text=True, timeout=timeout)


@dataclass
class World:
    lab: Lab
    service: Service
    root: Path
    admin: dict[str, str]
    engine_env: dict[str, str]
    customers: dict[str, dict[str, str]] = field(default_factory=dict)
    _engine: Engine | None = None

    # -- the TC's API, as a hostile engine sends it ------------------------------------------
    def api(self) -> httpx.Client:
        return self.service.client()

    def post(self, path: str, body: dict[str, Any]) -> httpx.Response:
        with self.api() as client:
            return client.post(path, json=body)

    def get_vm(self, name: str) -> dict[str, Any] | None:
        """The TC's record of a VM (None once it is destroyed)."""
        with self.api() as client:
            response = client.get(f"/v1/vms/{name}")
        if response.status_code == 404:
            return None
        response.raise_for_status()
        return response.json()  # type: ignore[no-any-return]

    def public_post(self, path: str, body: dict[str, Any]) -> httpx.Response:
        with self.service.client(cert=False) as client:
            return client.post(path, json=body)

    # -- the nodes, as root on them ------------------------------------------------------------
    @property
    def engine(self) -> Engine:
        if self._engine is None:
            self._engine = Engine(load_inventory(self.lab.inventory_dir).select("all"), state=str(self.root / "hostile"))
        return self._engine

    def session(self, name: str) -> Session:
        stale = self.engine.sessions.pop(name, None)  # a lab reset drops connections
        if stale is not None:
            stale.close()
        return self.engine.session(next(h for h in self.engine.hosts if h.name == name))

    def tcti(self, name: str) -> str:
        return self.lab.tcti(self.lab.node(name))

    def quote(self, name: str, nonce: bytes) -> dict[str, Any]:
        """Honest-looking evidence from node's TPM for a nonce the TC issued (wire form)."""
        session = self.session(name)
        quote = session.tvmm("quote", {"nonce": b64(nonce), "bank": "sha256", "pcrs": list(self.policy["pcrs"])})
        from tccdeploy.engine.attestation import host_key

        return {"attest": quote["attest"], "signature": quote["signature"], "pcrs": quote["pcrs"],
                "eventlog": quote["eventlog"], "nonce": b64(nonce), "ssh_host_key": host_key(session)}

    @property
    def policy(self) -> dict[str, Any]:
        with self.api() as client:
            return client.get("/v1/policy").json()  # type: ignore[no-any-return]

    def nonce(self, name: str, purpose: str = "quote") -> bytes:
        response = self.post("/v1/nonces", {"node": name, "purpose": purpose})
        assert response.status_code == 200, response.text
        return base64.b64decode(response.json()["nonce"])

    # -- the registry, as the TC's operator sees it ----------------------------------------------
    def decisions(self) -> dict[str, list[tuple]]:
        """Every table but the transient ones: what a refused attack must leave as it was."""
        db = sqlite3.connect(str(self.service.state / "registry.sqlite"))
        try:
            tables = [r[0] for r in db.execute("SELECT name FROM sqlite_master WHERE type = 'table'")]
            return {t: db.execute(f"SELECT * FROM {t} ORDER BY 1").fetchall()  # noqa: S608 - table names from sqlite_master
                    for t in tables if t not in TRANSIENT and not t.startswith("sqlite_")}
        finally:
            db.close()

    def audit_kinds_since(self, count: int) -> list[str]:
        db = sqlite3.connect(str(self.service.state / "registry.sqlite"))
        try:
            return [r[0] for r in db.execute("SELECT kind FROM audit WHERE id > ? ORDER BY id", (count,))]
        finally:
            db.close()

    def audit_count(self) -> int:
        db = sqlite3.connect(str(self.service.state / "registry.sqlite"))
        try:
            return int(db.execute("SELECT COUNT(*) FROM audit").fetchone()[0])
        finally:
            db.close()

    def node_state(self, name: str) -> str | None:
        db = sqlite3.connect(str(self.service.state / "registry.sqlite"))
        try:
            row = db.execute("SELECT state FROM nodes WHERE name = ?", (name,)).fetchone()
            return row[0] if row else None
        finally:
            db.close()

    # -- honest operations ----------------------------------------------------------------------
    def operator(self, *args: str) -> subprocess.CompletedProcess:
        """The TC operator's command on the TC's machine."""
        return run(self.admin, "tc", *args, "-m", self.lab.manifests_dir)

    def engine_cmd(self, *args: str) -> subprocess.CompletedProcess:
        return run(self.engine_env, *args)

    def admit(self, *names: str) -> None:
        result = self.engine_cmd("attest", "--admit", ",".join(names), "-i", self.lab.inventory_dir, "--json")
        assert result.returncode == 0, result.stdout + result.stderr

    def ready(self, name: str) -> None:
        """A fresh trusted verdict on name, as a key release needs (restored first if an earlier
        test left it out)."""
        if self.node_state(name) == "admitted":
            self.admit(name)
        else:
            self.restore(name)

    def restore(self, name: str) -> None:
        """Give node back as it was: a clean reboot, the operator's release if it was quarantined,
        and a fresh admission."""
        self.lab.reset(name)
        if self.node_state(name) == "quarantined":
            assert self.operator("nodes", "release", name, "--note", "test over").returncode == 0
        self.admit(name)

    def seal(self, owner: str, name: str) -> Path:
        """A sealed 1 MiB image of owner's, to the TC."""
        env = self.customers[owner]
        raw = self.root / f"{name}.raw"
        raw.write_bytes(os.urandom(4096) + bytes(1024 * 1024))
        bundle = self.root / f"{name}.sealed"
        result = run(env, "image", "seal", str(raw), "--tc", str(self.root / "tc.pem"), "-o", str(bundle), "--name", name)
        assert result.returncode == 0, result.stderr
        return bundle

    def sign(self, owner: str, name: str, bundle: Path, constraints: str = "{}") -> Path:
        """owner's signed placement request for bundle, as VM `name`."""
        env = self.customers[owner]
        manifest = self.root / f"{name}-{owner}.yml"
        manifest.write_text("apiVersion: tccdeploy/v1\nkind: PlacementRequest\n"
                            f"metadata: {{name: {name}}}\nspec: {{image: {bundle}, vcpus: 1, memoryMiB: 64, "
                            f"constraints: {constraints}}}\n")
        signed = self.root / f"{name}-{owner}.json"
        result = run(env, "request", "sign", str(manifest), "-o", str(signed))
        assert result.returncode == 0, result.stderr
        return signed

    def submit(self, owner: str, signed: Path) -> subprocess.CompletedProcess:
        return run(self.customers[owner], "request", "submit", str(signed), "--tc", self.service.url,
                   "--tc-cert", str(self.root / "tc.pem"), "--json")

    def launch(self, request_id: str, bundle: Path) -> subprocess.CompletedProcess:
        return self.engine_cmd("request", "launch", request_id, "-i", self.lab.inventory_dir, "--bundle", str(bundle))

    def destroy(self, vm: str) -> None:
        self.engine_cmd("vm", "destroy", vm, "-i", self.lab.inventory_dir)

    def qemus(self, vm_id: str) -> list[int]:
        """QEMU processes running vm_id on any node (what "no VM may start" is checked against)."""
        found = []
        for pid in os.listdir("/proc"):
            if pid.isdigit():
                try:
                    with open(f"/proc/{pid}/cmdline", "rb") as fh:
                        argv = fh.read().split(b"\0")
                except OSError:
                    continue
                if argv and b"qemu-system" in argv[0] and any(vm_id.encode() in a for a in argv):
                    found.append(int(pid))
        return found


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


@pytest.fixture(scope="package")
def world(lab: Lab, tmp_path_factory) -> World:
    root = tmp_path_factory.mktemp("adversary")
    state = root / "tc"
    service = Service(state, lab.manifests_dir)
    admin = dict(os.environ, TCCDEPLOY_STATE=str(state), NO_COLOR="1")
    engine_env = dict(os.environ, TCCDEPLOY_STATE=str(root / "engine"), TCCDEPLOY_TC=service.url, NO_COLOR="1",
                      TCCDEPLOY_ENGINE_DIR=str(service.engine_dir))
    w = World(lab, service, root, admin, engine_env)
    try:
        assert run(admin, "tc", "show", "-o", str(root / "tc.pem")).returncode == 0
        for name in ("acme", "mallory"):
            key = str(root / f"{name}.pem")
            env = dict(os.environ, TCCDEPLOY_CUSTOMER_KEY=key, NO_COLOR="1")
            public = run(env, "customer", "init", "--key", key).stdout.strip().splitlines()[-1]
            assert run(admin, "tc", "customers", "add", name, public).returncode == 0
            w.customers[name] = env | {"KEY": key}
        enrolled = w.engine_cmd("enroll", ",".join(NODES), "-i", lab.inventory_dir)
        assert enrolled.returncode == 0, enrolled.stdout + enrolled.stderr
        w.admit(*NODES)
        yield w
    finally:
        if w._engine is not None:
            w._engine.close()
        service.stop()


def refused(response: httpx.Response, reason: str) -> None:
    """The TC refused with exactly this reason (403 for a decision, 400 for a malformed body)."""
    assert response.status_code in (400, 403, 409), response.text
    assert response.json()["error"] == reason, response.text


def read_json(path: Path) -> Any:
    return json.loads(path.read_text())


@pytest.fixture
def clock(monkeypatch):
    """Move the TC's wall clock (every module reads time.time)."""
    import time

    real = time.time
    shift = [0.0]
    monkeypatch.setattr(time, "time", lambda: real() + shift[0])

    def move(seconds: float) -> None:
        shift[0] += seconds

    return move
