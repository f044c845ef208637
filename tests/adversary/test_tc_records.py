"""A hostile engine against the TC's records of where a VM is: steps taken in an order no honest
engine takes, each answered from the TC's records inside the write that changes them, so no
order makes the records say a running VM is gone, or put two copies of one VM in play (found in
a review of the lease and ticket code, issue 20). Every test here failed before its fix."""

from __future__ import annotations

import hashlib
from collections.abc import Callable

import pytest

from ..brokerkit import reason
from ..test_tc_lifecycle import arrival, ended_evidence, resumed_evidence, saved_evidence, saved_on_n1


@pytest.fixture
def world(broker_world):
    return broker_world


@pytest.fixture(params=["sqlite", "postgresql"])
def any_world(request, tmp_path):  # type: ignore[no-untyped-def]
    """The TC on each of its databases: SQLite serializes writes itself, PostgreSQL on the
    registry's advisory lock, each thread on its own connection (a replica's decision threads)."""
    from ..brokerkit import World

    registry = request.getfixturevalue("postgres").new_database() if request.param == "postgresql" else None
    world = World(tmp_path, registry)
    world.customer("acme")
    yield world
    world.close()


def _at_once(calls: dict[str, Callable[[], object]]) -> dict[str, object]:
    """Each call on its own thread, released together and interleaving finely: what each returned,
    or the reason it was refused with."""
    import sys
    import threading

    start, outcomes = threading.Barrier(len(calls)), {}

    def run(name: str) -> None:
        start.wait()
        try:
            outcomes[name] = calls[name]()
        except Exception as exc:  # noqa: BLE001 - the refusals are the point
            outcomes[name] = getattr(exc, "reason", repr(exc))

    threads = [threading.Thread(target=run, args=(n,)) for n in calls]
    interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-5)  # a check apart from its write would be passed twice
    try:
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    finally:
        sys.setswitchinterval(interval)
    return outcomes


def test_a_destroy_ticket_taken_before_a_resume_cannot_record_the_resumed_vm_destroyed(world):
    """The end ticket is issued while the VM is suspended on n1 (nothing resumes yet); the engine
    then resumes it on n2 from n1's saved state, destroys n1's copy with the earlier ticket and
    reports it: the TC used to record the VM destroyed while it ran on n2, and took a new launch
    request for it (a second copy, with its key)."""
    record, _ = saved_on_n1(world)
    end = world.tc.vm_end_ticket(record["vm_id"], "n1", "destroy")
    resume = world.tc.resume_begin("web", "n2")
    destroyed = ended_evidence(world, "n1", record, end)
    assert reason(world.tc.vm_ended, end, destroyed) == "vm.end-resuming"
    vm = world.tc.registry.vm(record["vm_id"])
    assert (vm["state"], vm["node"]) == ("suspended", "n1")
    suspension = world.tc.registry.suspensions(record["vm_id"])[-1]
    assert world.tc.resume_end(suspension["id"], resumed_evidence(world, "n2", record, resume))["node"] == "n2"
    assert world.tc.vm_ended(end, destroyed)["recorded"] is False  # n1's stay is over: n1's end changes nothing
    vm = world.tc.registry.vm(record["vm_id"])
    assert (vm["state"], vm["node"]) == ("running", "n2")


def test_a_resume_is_not_recorded_running_for_a_vm_the_records_no_longer_hold_suspended(world):
    """`resumed` moved the suspension on and updated no VM row without saying so: the TC answered
    "running" for a VM its records said was gone."""
    record, _ = saved_on_n1(world)
    resume = world.tc.resume_begin("web", "n2")
    with world.tc.registry.transaction(serialize=True) as db:  # as any path that ends the VM would leave it
        db.execute("UPDATE vms SET state = 'destroyed' WHERE vm_id = ?", (record["vm_id"],))
    suspension = world.tc.registry.suspensions(record["vm_id"])[-1]
    assert reason(world.tc.resume_end, suspension["id"], resumed_evidence(world, "n2", record, resume)) \
        == "suspend.not-suspended"
    assert world.tc.registry.suspension(suspension["id"])["state"] == "resuming"  # nothing half-written


GROUP = {"antiAffinityGroup": "web"}


def test_two_migrations_into_one_node_cannot_together_break_anti_affinity(world):
    """Each migration passed its destination's anti-affinity check, which counted only the VMs
    already there: two VMs the customer keeps apart were moved together, one after the other,
    before either committed (found in review)."""
    for node in ("n1", "n2", "n3"):
        world.node(node)
    world.launched("acme", "n1", name="a", constraints=GROUP)
    world.launched("acme", "n2", name="b", constraints=GROUP)
    world.tc.migration_begin("a", "n3")
    assert reason(world.tc.migration_begin, "b", "n3") == "placement.constraint"
    assert [m.vm_id for m in world.tc.migrations()] == [world.tc.registry.vm("a")["vm_id"]]


def test_a_key_released_to_a_node_counts_there_before_its_launch_is_recorded(world):
    """A release for one VM of the group, then a migration of another into the same node."""
    for node in ("n1", "n2"):
        world.node(node)
    world.launched("acme", "n1", name="a", constraints=GROUP)
    record = world.accepted("acme", name="b", constraints=GROUP)
    world.tc.release_key(record["id"], "n2")
    assert reason(world.tc.migration_begin, "a", "n2") == "placement.constraint"
    again = world.tc.release_key(record["id"], "n2")  # its own release again (a retry): not against itself
    assert again["ticket"]["ticket"]["node"] == "n2"


def test_a_resume_on_its_way_to_a_node_counts_there(world):
    for node in ("n1", "n2"):
        world.node(node)
    record = world.launched("acme", "n1", name="a", constraints=GROUP)
    begun = world.tc.suspend_begin("a")
    world.tc.suspend_end(begun["suspension"], saved_evidence(world, "n1", record, begun))
    assert world.tc.resume_begin("a", "n2")["node"] == "n2"
    other = world.accepted("acme", name="b", constraints=GROUP)
    assert reason(world.tc.release_key, other["id"], "n2") == "placement.constraint"
    assert world.tc.release_key(other["id"], "n1")["ticket"]["ticket"]["node"] == "n1"  # it leaves n1


def test_a_resume_to_the_node_it_was_suspended_on_keeps_that_nodes_vm_limit(world):
    """A resume naming no node goes back where the VM was saved; its capacity was asked only for
    a node named, so the default one took a VM past the roster's limit (found in review)."""
    world.node("n1")
    with world.tc.registry.transaction(serialize=True) as db:
        db.execute("UPDATE roster SET capacity = 1 WHERE name = 'n1'")
    record = world.launched("acme", "n1", name="a")
    begun = world.tc.suspend_begin("a")
    world.tc.suspend_end(begun["suspension"], saved_evidence(world, "n1", record, begun))
    world.launched("acme", "n1", name="c")  # its place taken while it is saved
    assert reason(world.tc.resume_begin, "a") == "placement.constraint"
    assert reason(world.tc.resume_begin, "a", "n1") == "placement.constraint"


# A node rebooted into other software after its last trusted quote (within the quote's age: the
# TC has not seen the new boot) still holds its AK, and that software can extend and quote any
# event. The TC believed such evidence of an arrival, a save and a resume (only an end and a
# launch checked the boot; found in review): now each must come from the boot last found trusted.
# A TPM Restart (resume from hibernation) clears the PCRs under the same resetCount: a boot is the
# pair (resetCount, restartCount), and each test runs with either moved (the second found in review).
BOOT_COUNTERS = pytest.mark.parametrize("counter", ["reset", "restart"])


def other_boot(world, node: str, counter: str) -> None:  # type: ignore[no-untyped-def]
    tpm = world.nodes[node].tpm
    setattr(tpm, counter, getattr(tpm, counter) + 1)


@BOOT_COUNTERS
def test_arrival_evidence_from_a_boot_the_tc_has_not_trusted_commits_nothing(world, counter):
    world.node("n1")
    world.node("n2")
    record = world.launched("acme", "n1", name="web")
    begun = world.tc.migration_begin("web", "n2")
    other_boot(world, "n2", counter)  # rebooted (or restarted) since its trusted attestation
    assert reason(world.tc.migration_end, begun["migration"], record["vm_id"], True, "",
                  arrival(world, begun, record)) == "migrate.evidence-boot"
    assert world.tc.registry.vm(record["vm_id"])["node"] == "n1"
    assert world.tc.registry.migration(begun["migration"])["state"] == "started"


@BOOT_COUNTERS
def test_save_evidence_from_a_boot_the_tc_has_not_trusted_suspends_nothing(world, counter):
    world.node("n1")
    world.node("n2")
    record = world.launched("acme", "n1", name="web")
    begun = world.tc.suspend_begin("web")
    other_boot(world, "n1", counter)
    assert reason(world.tc.suspend_end, begun["suspension"], saved_evidence(world, "n1", record, begun)) \
        == "suspend.evidence-boot"
    assert world.tc.registry.vm(record["vm_id"])["state"] == "running"


@BOOT_COUNTERS
def test_resume_evidence_from_a_boot_the_tc_has_not_trusted_resumes_nothing(world, counter):
    record, begun = saved_on_n1(world)
    resume = world.tc.resume_begin("web", "n2")
    other_boot(world, "n2", counter)
    assert reason(world.tc.resume_end, begun["suspension"], resumed_evidence(world, "n2", record, resume)) \
        == "suspend.evidence-boot"
    assert world.tc.registry.vm(record["vm_id"])["state"] == "suspended"


def test_a_vm_being_suspended_is_not_migrated_at_the_same_time(world):
    """A suspension was refused while a migration was under way, but not the other way round: the
    engine could hold a suspend ticket and a migrate-out ticket for one VM at once (found in review)."""
    world.node("n1")
    world.node("n2")
    world.launched("acme", "n1", name="web")
    begun = world.tc.suspend_begin("web")
    assert reason(world.tc.migration_begin, "web", "n2") == "migrate.suspending"
    assert world.tc.migrations() == []
    world.tc.suspend_end(begun["suspension"], None, saved=False)  # dropped: the VM runs where it was
    assert world.tc.migration_begin("web", "n2")["migration"]


@pytest.mark.parametrize("decision", ["migration", "release", "resume"])
def test_each_decision_that_sends_a_vm_to_a_node_counts_the_vms_on_their_way_there(world, decision):
    for node in ("n1", "n2"):
        world.node(node)
    world.launched("acme", "n1", name="a", constraints=GROUP)
    record = world.accepted("acme", name="b", constraints=GROUP)
    world.tc.release_key(record["id"], "n2")  # b is on its way to n2
    registry = world.tc.registry
    if decision == "migration":
        assert reason(world.tc.migration_begin, "a", "n2") == "placement.constraint"
        assert world.tc.migrations() == []
    elif decision == "release":
        other = world.accepted("acme", name="c", constraints=GROUP)
        assert reason(world.tc.release_key, other["id"], "n2") == "placement.constraint"
        assert registry.request(other["id"])["state"] == "accepted"
    else:  # a, of the same group, saved on n1 and resumed towards n2
        vm = registry.vm("a")
        begun = world.tc.suspend_begin("a")
        world.tc.suspend_end(begun["suspension"], saved_evidence(world, "n1", {"vm_id": vm["vm_id"],
                             "image_sha256": vm["image_sha256"]}, begun))
        assert reason(world.tc.resume_begin, "a", "n2") == "placement.constraint"
        assert registry.suspensions(vm["vm_id"])[-1]["state"] == "suspended"


def test_migrations_sent_at_once_into_one_node_pass_its_anti_affinity_one_at_most(any_world):
    """A hostile engine sends its decisions together (the served TC takes four at once): judged
    before their writes, each passed alone. The check is in the write's serialized transaction."""
    world = any_world
    names = [f"vm{i}" for i in range(5)]
    for i, name in enumerate(names):
        world.node(f"n{i + 1}")
        world.launched("acme", f"n{i + 1}", name=name, constraints=GROUP)
    world.node("n9")
    outcomes = _at_once({name: (lambda name=name: world.tc.migration_begin(name, "n9")["migration"]) for name in names})
    assert sorted(v for v in outcomes.values() if isinstance(v, str)) == ["placement.constraint"] * (len(names) - 1), outcomes
    assert len(world.tc.migrations()) == 1


def test_releases_sent_at_once_to_one_node_pass_its_anti_affinity_and_capacity_one_at_most(any_world):
    world = any_world
    world.node("n1")
    grouped = [world.accepted("acme", name=f"g{i}", constraints=GROUP)["id"] for i in range(4)]
    outcomes = _at_once({r: (lambda r=r: world.tc.release_key(r, "n1")["request"]) for r in grouped})
    assert sorted(v for v in outcomes.values() if v not in grouped) == ["placement.constraint"] * 3, outcomes
    ek = "sha256:" + hashlib.sha256(b"n1").hexdigest()  # (the roster entry brokerkit's nodes are enrolled under)
    world.tc.roster_remove(ek)
    world.tc.roster_add(ek, "site1", "n1", capacity=3)  # one on its way already: two more fit
    plain = [world.accepted("acme", name=f"p{i}")["id"] for i in range(4)]
    outcomes = _at_once({r: (lambda r=r: world.tc.release_key(r, "n1")["request"]) for r in plain})
    assert sorted(v for v in outcomes.values() if v not in plain) == ["placement.constraint"] * 2, outcomes


def test_a_node_that_cannot_qualify_is_refused_before_the_key_is_unwrapped(world, monkeypatch):
    """With the VM-dependent constraints judged in the write, a release to a node of another site
    must still be refused before the TC's RSA unwrap: an engine asking again and again would
    otherwise spend the TC's private-key work for nothing (found in review)."""
    from tccdeploy.coordinator import keybroker

    world.node("n1")
    record = world.accepted("acme", constraints={"sites": ["elsewhere"]})
    unwraps: list[object] = []
    original = keybroker.wrap.unwrap
    monkeypatch.setattr(keybroker.wrap, "unwrap", lambda *a, **k: unwraps.append(a) or original(*a, **k))
    assert reason(world.tc.release_key, record["id"], "n1") == "placement.constraint"
    assert unwraps == []


HOSTILE_TEXT = ["n1'); DELETE FROM audit; --", "n1\\'; DROP TABLE requests; --", "%s%(x)s%%", "$$; COMMIT; $$",
                "E'\\x27'", "n1\"; --"]


@pytest.mark.parametrize("text", HOSTILE_TEXT)
def test_text_the_engine_chooses_is_stored_as_text_in_a_deferred_write(any_world, text):
    """The audit entry of a refusal is written deferred, its values quoted by the client on
    PostgreSQL (one simple query with the COMMIT): a node name the engine makes up to end the
    quoting stays a name in the log, the chain verifies and no other row moves."""
    from tccdeploy.coordinator import audit

    world = any_world
    world.node("n1")
    record = world.accepted("acme")
    before = len(world.tc.registry.audit_entries())
    assert reason(world.tc.release_key, record["id"], text) == "release.not-admitted"
    entries = world.tc.registry.audit_entries()
    assert len(entries) == before + 1 and entries[-1]["node"] == text and entries[-1]["kind"] == "key-release.refused"
    assert audit.verify(world.tc.registry, tc=world.tc.identity()).ok
    assert world.tc.registry.request(record["id"])["state"] == "accepted"
    assert world.tc.release_key(record["id"], "n1")["node"] == "n1"


def test_a_request_failed_after_its_release_still_counts_on_its_node_until_it_rebooted(world, clock):
    """An engine that fails a request whose key it was given holds the ticket, and may have started
    the VM with it: the request's VM weighs on that node's anti-affinity and capacity until the
    node proves a reboot after the ticket's life (it was dropped from the count at once; then,
    in this change's first form, after the ticket's life, though the VM may run on: both found
    in review). The same for a release that expired unlaunched."""
    from tccdeploy.coordinator import keybroker

    world.node("n1")
    first = world.accepted("acme", name="a", constraints=GROUP)
    world.tc.release_key(first["id"], "n1")
    world.tc.fail_request(first["id"])
    lapsed = world.accepted("acme", name="l", constraints={"antiAffinityGroup": "db"})
    world.tc.release_key(lapsed["id"], "n1")
    second = world.accepted("acme", name="b", constraints=GROUP)
    other = world.accepted("acme", name="o", constraints={"antiAffinityGroup": "db"})
    assert reason(world.tc.release_key, second["id"], "n1") == "placement.constraint"
    ek = "sha256:" + hashlib.sha256(b"n1").hexdigest()
    world.tc.roster_remove(ek)
    world.tc.roster_add(ek, "site1", "n1", capacity=2)
    plain = world.accepted("acme", name="c")
    assert reason(world.tc.release_key, plain["id"], "n1") == "placement.constraint"
    clock(keybroker.RELEASE_EXPIRY + 1)  # every ticket spent; the lapsed release expires unlaunched
    assert world.tc.expire_releases() == [lapsed["id"]]
    world.attest("n1")  # (fresh after the clock moved: the boot those VMs may run in)
    assert reason(world.tc.release_key, second["id"], "n1") == "placement.constraint"
    assert reason(world.tc.release_key, other["id"], "n1") == "placement.constraint"
    world.nodes["n1"].tpm.reset += 1  # the node reboots: what ran there is gone
    world.attest("n1")
    world.tc.roster_remove(ek)
    world.tc.roster_add(ek, "site1", "n1", capacity=None)
    assert world.tc.release_key(second["id"], "n1")["node"] == "n1"
    assert world.tc.release_key(other["id"], "n1")["node"] == "n1"


@pytest.mark.parametrize("text", HOSTILE_TEXT)
def test_text_the_engine_chooses_is_a_value_in_a_writes_first_statement(any_world, text):
    """A write's first statement goes with BEGIN and the registry's lock in one simple query on
    PostgreSQL, its values quoted by the client: a quarantine of a node named to end the quoting
    quarantines nothing (no such node), and every row and the chain stay as they were."""
    from tccdeploy.coordinator import audit

    world = any_world
    world.node("n1")
    before = len(world.tc.registry.audit_entries())
    assert world.tc.quarantine(text, text) is False
    assert world.tc.registry.node("n1")["state"] == "admitted" and world.tc.registry.node(text) is None
    assert len(world.tc.registry.audit_entries()) == before and audit.verify(world.tc.registry, tc=world.tc.identity()).ok
