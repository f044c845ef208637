"""The TC judges a boot as platform + build (examples/platforms and examples/builds: two lab
hardware models, one candidate build whose rollout names node1), records both, and asks again
at each key release once the manifests change. Software nodes, real SQLite (tests/brokerkit.py)."""

from __future__ import annotations

import dataclasses

import pytest

from tccdeploy.manifest.loader import load_manifests

from .brokerkit import World, reason


@pytest.fixture
def world(tmp_path):  # type: ignore[no-untyped-def]
    made = World(tmp_path)
    yield made
    made.close()


def booted(world: World, name: str, build: str = "tvmm-2026.1", model: str = "lab-model-a", admit: bool = True):  # type: ignore[no-untyped-def]
    node = world.node(name, admit=False)
    node.tpm.build, node.tpm.model = build, model
    if admit:
        world.admit(name)
    return node


def codes(verdict) -> list[str]:  # type: ignore[no-untyped-def]
    return [r["code"] for r in verdict.reasons]


def test_one_build_on_both_lab_models_is_trusted_and_the_verdict_names_each_part(world):
    for name, model in (("node1", "lab-model-a"), ("node2", "lab-model-b")):
        booted(world, name, model=model, admit=False)
        verdict, _ = world.attest(name)
        assert verdict.trusted and verdict.build == "tvmm-2026.1" and verdict.platform == model
        assert world.tc.registry.node(name)["platform"] == model
        assert world.tc.registry.attestations(name, limit=1)[0]["platform"] == model


def test_firmware_of_an_unknown_model_is_untrusted_by_name(world):
    booted(world, "node1", model="lab-model-c", admit=False)  # firmware no Platform lists
    verdict, _ = world.attest("node1")
    assert codes(verdict) == ["platform.unknown"] and verdict.build == "tvmm-2026.1" and verdict.platform is None


def test_the_candidate_build_is_admitted_on_the_rollouts_node_only(world):
    booted(world, "node1", build="tvmm-2026.3", admit=False)
    verdict, _ = world.attest("node1")
    assert verdict.trusted and [w["code"] for w in verdict.warnings] == ["build.candidate"]
    booted(world, "node2", build="tvmm-2026.3", admit=False)
    verdict, _ = world.attest("node2")
    assert codes(verdict) == ["build.not-in-rollout"] and verdict.build == "tvmm-2026.3"


def _reloaded(world: World, builds=None, platforms=None):  # type: ignore[no-untyped-def]
    loaded = load_manifests([world.manifests])
    if builds is not None:
        loaded.builds = builds(loaded.builds)
    if platforms is not None:
        loaded.platforms = platforms(loaded.platforms)
    world.tc.reload(loaded)


def test_a_key_release_after_the_candidates_rollout_ends_without_the_node_is_refused(world):
    booted(world, "node1", build="tvmm-2026.3")
    world.customer("alice")
    record = world.accepted("alice")
    _reloaded(world, builds=lambda builds: [dataclasses.replace(b, rollout=dataclasses.replace(b.rollout, nodes=("node9",)))
                                             if b.name == "tvmm-2026.3" else b for b in builds])
    assert reason(world.tc.release_key, record["id"], "node1") == "release.build-revoked"


def test_a_key_release_after_the_nodes_platform_is_revoked_is_refused_and_the_next_round_quarantines(world):
    booted(world, "node2", model="lab-model-b")
    world.customer("alice")
    record = world.accepted("alice")
    _reloaded(world, platforms=lambda platforms: [dataclasses.replace(p, status="revoked") if p.name == "lab-model-b" else p
                                                  for p in platforms])
    assert reason(world.tc.release_key, record["id"], "node2") == "release.build-revoked"
    verdict, _ = world.attest("node2")
    assert codes(verdict) == ["platform.revoked"] and world.tc.registry.node("node2")["state"] == "quarantined"


def test_a_rollout_naming_a_node_by_its_ek_admits_the_candidate_there(world):
    import hashlib

    ek = "sha256:" + hashlib.sha256(b"node2").hexdigest()  # brokerkit's roster names node2's EK so
    _reloaded(world, builds=lambda builds: [dataclasses.replace(b, rollout=dataclasses.replace(b.rollout, nodes=(ek,)))
                                             if b.name == "tvmm-2026.3" else b for b in builds])
    booted(world, "node2", build="tvmm-2026.3", admit=False)
    verdict, _ = world.attest("node2")
    assert verdict.trusted and [w["code"] for w in verdict.warnings] == ["build.candidate"]
