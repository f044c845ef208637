"""Shared test set-up: where the repository and the shared test vectors are."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
SHARED = Path(os.environ.get("TCCDEPLOY_SHARED", REPO.parent / "shared"))


@pytest.fixture
def repo() -> Path:
    return REPO


@pytest.fixture
def shared_vectors() -> Path:
    path = SHARED / "vectors"
    if not path.is_dir():
        pytest.skip(f"shared test vectors not found at {path} (set TCCDEPLOY_SHARED to the shared/ folder)")
    return path


def _lab_skip_reason() -> str | None:
    import shutil

    if os.geteuid() != 0:
        return "the lab needs root (sshd, lab user)"
    for tool in ("swtpm", "swtpm_setup", "ssh-keygen"):
        if shutil.which(tool) is None:
            return f"{tool} is not installed (run scripts/install)"
    return None


# Addresses 127.K.S.N: K=0 is a developer's own lab; the tests use their own K values: the session
# lab 110-129 (pytest-xdist's first worker, or no worker), 130-149 (the second), and so on;
# tests/test_lab.py 101-103 and 250, tests/adversary/test_realboot.py 61.
TEST_LAB_INDEX = 110
LAB_INDEXES_PER_WORKER = 20


def _session_lab_indexes() -> range:
    worker = os.environ.get("PYTEST_XDIST_WORKER", "gw0")  # gw0, gw1, ...
    first = TEST_LAB_INDEX + LAB_INDEXES_PER_WORKER * int(worker.removeprefix("gw") or 0)
    if first + LAB_INDEXES_PER_WORKER > 250:
        raise RuntimeError(f"too many test workers for the lab's addresses ({worker}): run at most 6")
    return range(first, first + LAB_INDEXES_PER_WORKER)


def lab_directory() -> str:
    """An empty folder the lab user can reach (pytest's tmp_path sits under a 0700 folder)."""
    import tempfile

    return tempfile.mkdtemp(prefix="tccdeploy-test-lab-")


@pytest.fixture(scope="session")
def lab(tmp_path_factory):
    """A lab of 4 nodes in 2 sites, 1 rogue-TPM node and 1 outside node, shared by the session.

    Always torn down, even when tests fail. Tests that break a node use `lab_node`, which puts
    the node back afterwards.
    """
    reason = _lab_skip_reason()
    if reason:
        pytest.skip(reason)
    import shutil

    from tccdeploy.lab.lab import Lab
    from tccdeploy.lab.tpm import LabError

    instance = Lab(lab_directory())
    try:
        # Another test run (a developer's, or CI's in a clone) may hold this worker's first lab
        # index: take the next free one.
        indexes = _session_lab_indexes()
        for index in indexes:
            try:
                instance.up(nodes=4, sites=2, outside=1, rogue=1, lab_index=index)
                break
            except LabError as exc:
                if "in use" not in str(exc) or index == indexes[-1]:
                    raise
        yield instance
    finally:
        if instance.exists():
            instance.down()
        else:
            shutil.rmtree(instance.dir, ignore_errors=True)


@pytest.fixture
def lab_node(lab):
    """A node of the session lab that the test may break; it is reset after the test."""
    used: list[str] = []

    def take(name: str = "node2"):
        used.append(name)
        return lab.node(name)

    yield take
    for name in used:
        lab.reset(name)
    lab.load()


@pytest.fixture
def fsyncs(monkeypatch) -> list[str]:  # type: ignore[no-untyped-def]
    """The paths os.fsync is called on during the test, in order (fsync itself still runs): what
    a power cut right after cannot undo."""
    synced: list[str] = []
    real = os.fsync

    def fsync(fd: int) -> None:
        synced.append(os.readlink(f"/proc/self/fd/{fd}"))
        real(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    return synced


@pytest.fixture(scope="session")
def postgres():
    """A real PostgreSQL server (Debian's package) for the session; each test takes a new database."""
    from .pgserver import PostgresServer, skip_reason

    reason = skip_reason()
    if reason:
        pytest.skip(reason)
    server = PostgresServer()
    yield server
    server.stop()


def live_examples(folder: Path) -> Path:
    """The example manifests with the builds as the lab measures them from this tree (the service
    artifact's digest is the code's own, which mutation testing changes): for tests whose
    software nodes boot the lab's builds."""
    import shutil

    import yaml

    from tccdeploy.lab.builds import LAB_BUILDS, build_manifest

    target = folder / "examples"
    if not target.exists():
        shutil.copytree(REPO / "examples", target)
        for build in LAB_BUILDS:
            (target / "builds" / f"{build.name}.yml").write_text(yaml.safe_dump(build_manifest(build), sort_keys=False))
    return target


@pytest.fixture(scope="session")
def tc_identity(tmp_path_factory):
    """A TC identity (CA, wrapping and purpose keys) for tests that need the TC's signatures."""
    from tccdeploy.coordinator import identity

    return identity.init(str(tmp_path_factory.mktemp("tc-identity")))[0]


def audited_registry(location: str, tc):  # type: ignore[no-untyped-def]
    """A Registry writing its decisions with signed audit entries, as the Coordinator's does."""
    from tccdeploy.coordinator import audit
    from tccdeploy.coordinator.store import Registry

    registry = Registry(location)
    registry.auditor = audit.Auditor(tc)
    return registry


@pytest.fixture
def broker_world(tmp_path):
    """A TC over software nodes (tests/brokerkit.py) with one registered customer, acme."""
    from .brokerkit import World

    world = World(tmp_path)
    world.customer("acme")
    yield world
    world.close()


# The modules that take longest, in worker-seconds measured on this 2-core machine (a full
# `scripts/test --durations=0 --junitxml=...` summed per file, session 14). Workers take whole
# files in the collection's order (scripts/test passes --no-loadscope-reorder, or xdist would
# sort files by their number of tests), so starting with the longest keeps the two workers'
# finishing times close: longest processing time first. A module missing here runs after these,
# in the collection's order; a stale figure costs only balance, never a result.
MODULE_SECONDS = {
    "tests/adversary/test_realboot.py": 420,
    "tests/test_playbooks_lab.py": 160,
    "tests/test_migrate.py": 99,
    "tests/test_api_fuzz.py": 85,
    "tests/test_launch.py": 75,
    "tests/adversary/test_tickets_lab.py": 75,
    "tests/test_tc_flow_served.py": 72,
    "tests/test_ansible_parity.py": 70,
    "tests/test_collection_lab.py": 48,
    "tests/adversary/test_webhooks.py": 18,
    "tests/adversary/test_customers.py": 55,
    "tests/adversary/test_suspend_lab.py": 52,
    "tests/test_tc_replicas.py": 38,
    "tests/test_enforce.py": 32,
    "tests/test_tc_faults.py": 31,
    "tests/test_apply_cli.py": 30,
    "tests/test_tc_service.py": 25,
    "tests/adversary/test_perimeter.py": 25,
    "tests/adversary/test_identity.py": 25,
}


def pytest_collection_modifyitems(config, items):  # type: ignore[no-untyped-def]
    """Longest modules first (MODULE_SECONDS), the rest in the collection's order (a stable sort)."""
    items.sort(key=lambda item: -MODULE_SECONDS.get(item.nodeid.split("::", 1)[0], 0))


# -- an audited registry: the webhook tests' (tests/test_webhooks.py, test_webhook_forms.py) --
@pytest.fixture
def registry(tmp_path, tc_identity):  # type: ignore[no-untyped-def]
    """A real SQLite registry whose entries are signed, as the Coordinator sets it up."""
    from tccdeploy.coordinator import audit
    from tccdeploy.coordinator.store import Registry

    reg = Registry(str(tmp_path / "registry.sqlite"))
    reg.auditor = audit.Auditor(tc_identity)
    yield reg
    reg.close()
