"""A VM's key goes to no node the TC cast out while the decision to give it was under way.

A key release (and a migration in, and a resume) reads the node's standing (admitted, a fresh
trusted verdict, a valid certificate), unwraps the key, then writes. The engine chooses when it
asks: for a release on a node and, at the same moment, that node's quarantine (its own, or the
node's failing evidence). Had the write trusted the reads made before it, a release that
committed just after the quarantine would hand the node the TC has just cast out a ticket for
the VM's key (found in review: reads stopped waiting for writes under way, widening the window).
The write checks the node's standing again, where no other decision comes between."""

from __future__ import annotations

import pytest

from ..brokerkit import World, reason
from .test_tc_records import _at_once


@pytest.fixture(params=["sqlite", "postgresql"])
def broker_world(request, tmp_path):  # type: ignore[no-untyped-def]
    """The TC over software nodes on each of its databases: on PostgreSQL the writes serialize on
    an advisory lock, not SQLite's one writer, and the re-check must hold there too."""
    registry = request.getfixturevalue("postgres").new_database() if request.param == "postgresql" else None
    world = World(tmp_path, registry)
    world.customer("acme")
    yield world
    world.close()


def _quarantined_first(world: World, monkeypatch, write: str, node: str) -> None:  # type: ignore[no-untyped-def]
    """The registry's write, with the engine's quarantine of node decided just before it: between
    the decision's reads and its write."""
    original = getattr(world.tc.registry, write)

    def quarantine_first(*args, **kwargs):  # type: ignore[no-untyped-def]
        assert world.tc.quarantine(node, "unreachable")
        return original(*args, **kwargs)

    monkeypatch.setattr(world.tc.registry, write, quarantine_first)


@pytest.mark.parametrize("between", ["quarantine", "untrusted verdict"])
def test_a_release_decided_while_its_node_is_cast_out_is_refused(broker_world: World, monkeypatch, between):
    world = broker_world
    world.node("n1")
    record = world.accepted("acme")
    write = world.tc.registry.record_release

    def cast_out_first(*args, **kwargs):  # the engine's other call, decided between the reads and the write
        if between == "quarantine":
            assert world.tc.quarantine("n1", "unreachable")
        else:  # the node's evidence of a module the build does not have: an untrusted verdict quarantines it
            verdict, _ = world.attest("n1", log_extra=[(4, b"a rogue module")])
            assert not verdict.trusted
        return write(*args, **kwargs)

    monkeypatch.setattr(world.tc.registry, "record_release", cast_out_first)
    assert reason(world.tc.release_key, record["id"], "n1") == "release.not-admitted"
    assert world.tc.registry.request(record["id"])["state"] == "accepted"  # nothing released, the key still sealed
    assert world.tc.registry.releases(record["vm_id"]) == []


def test_a_release_decided_while_its_node_certificate_is_revoked_is_refused(broker_world: World, monkeypatch):
    world = broker_world
    world.node("n1")
    record = world.accepted("acme")
    write = world.tc.registry.record_release

    def revoke_first(*args, **kwargs):
        with world.tc.registry.transaction() as db:
            db.execute("UPDATE certificates SET revoked_at = 1 WHERE node = ?", ("n1",))
        return write(*args, **kwargs)

    monkeypatch.setattr(world.tc.registry, "record_release", revoke_first)
    assert reason(world.tc.release_key, record["id"], "n1") == "release.no-certificate"
    assert world.tc.registry.releases(record["vm_id"]) == []


def test_a_resend_of_a_release_to_a_node_cast_out_since_is_refused(broker_world: World, monkeypatch):
    """The same node's release asked again (its answer lost) is a reissue: the same check."""
    world = broker_world
    world.node("n1")
    record = world.accepted("acme")
    world.tc.release_key(record["id"], "n1")
    _quarantined_first(world, monkeypatch, "reissue_release", "n1")
    assert reason(world.tc.release_key, record["id"], "n1") == "release.not-admitted"


def test_a_migration_to_a_destination_cast_out_while_it_was_decided_is_refused(broker_world: World, monkeypatch):
    """A migration gives the destination the VM's key: the same check in its write."""
    world = broker_world
    world.node("n1")
    world.node("n2")
    record = world.launched("acme", "n1", name="web")
    _quarantined_first(world, monkeypatch, "start_migration", "n2")
    assert reason(world.tc.migration_begin, "web", "n2") == "release.not-admitted"
    assert world.tc.registry.migrations(record["vm_id"]) == []
    assert world.tc.registry.vm(record["vm_id"])["node"] == "n1"


def test_a_resume_on_a_node_cast_out_while_it_was_decided_is_refused(broker_world: World, monkeypatch):
    """A resume gives the node the VM's key and its saved state's: the same check in its write."""
    from ..test_tc_lifecycle import saved_evidence

    world = broker_world
    world.node("n1")
    world.node("n2")
    record = world.launched("acme", "n1", name="web")
    begun = world.tc.suspend_begin("web")
    world.tc.suspend_end(begun["suspension"], saved_evidence(world, "n1", record, begun))
    _quarantined_first(world, monkeypatch, "resuming", "n2")
    assert reason(world.tc.resume_begin, "web", "n2") == "release.not-admitted"
    assert [s["state"] for s in world.tc.registry.suspensions(record["vm_id"])] == ["suspended"]  # still to resume


def test_a_release_and_a_quarantine_sent_at_once_never_give_the_key_after_the_quarantine(broker_world: World):
    """The same race with real threads, each on its own connection: whichever the TC takes first,
    the audit log never shows the key released to the node after its quarantine."""
    world = broker_world
    for i in range(6):
        node = f"q{i}"
        world.node(node)
        record = world.accepted("acme")
        outcomes = _at_once({"release": lambda r=record["id"], n=node: world.tc.release_key(r, n)["request"],
                             "quarantine": lambda n=node: world.tc.quarantine(n, "unreachable")})
        assert outcomes["quarantine"] is True, outcomes
        assert outcomes["release"] in (record["id"], "release.not-admitted", "release.no-certificate"), outcomes
        kinds = [e["kind"] for e in world.tc.registry.audit_entries(node=node)]
        assert "quarantine" in kinds
        if "key-release" in kinds:
            assert kinds.index("key-release") < kinds.index("quarantine"), kinds
        else:
            assert world.tc.registry.request(record["id"])["state"] == "accepted"


def test_decisions_on_one_node_and_writes_of_the_registry_sent_at_once_all_end(broker_world: World):
    """Releases and migrations into one node, a request failed and the node quarantined, all at
    once: each ends with its result or a refusal, none with a failure (a lock cycle, a store
    error)."""
    world = broker_world
    for name in ("n1", "n2", "n3"):
        world.node(name)
    world.launched("acme", "n2", name="m1")
    world.launched("acme", "n3", name="m2")
    requests = [world.accepted("acme")["id"] for _ in range(3)]
    calls = {f"release-{r}": (lambda r=r: world.tc.release_key(r, "n1")["request"]) for r in requests}
    calls |= {f"migrate-{m}": (lambda m=m: world.tc.migration_begin(m, "n1")["migration"]) for m in ("m1", "m2")}
    calls["fail"] = lambda: world.tc.fail_request(requests[0])
    calls["quarantine"] = lambda: world.tc.quarantine("n1", "unreachable")
    outcomes = _at_once(calls)
    for name, outcome in outcomes.items():  # a result, or a refusal's code (a failure would be its repr)
        assert outcome is None or outcome is True or isinstance(outcome, int) or (
            isinstance(outcome, str) and "(" not in outcome), (name, outcome)
    assert outcomes["quarantine"] is True

