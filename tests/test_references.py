"""A boot judged as platform + build (coordinator/references.py): which hardware model's firmware
and which TVMM build it is, and whether their status lets this node run them. Pure logic over
reference values; the verifier and the TC use it (test_verifier.py, test_tc_decisions.py)."""

from __future__ import annotations

import dataclasses
import hashlib

import pytest

from tccdeploy.coordinator.references import Baseline, Measured, judge, match, standing, still_admitted
from tccdeploy.manifest.models import Platform, ReferenceEvent, Rollout, TVMMBuild

POLICY = (0, 4, 8)
EK = "sha256:" + "ab" * 32


def _d(text: str) -> bytes:
    return hashlib.sha256(text.encode()).digest()


def _refs(events: dict[int, list[str]], types: dict[int, list[str | None]] | None = None) -> dict[int, tuple[ReferenceEvent, ...]]:
    types = types or {}
    return {pcr: tuple(ReferenceEvent(_d(t).hex(), (types.get(pcr) or [None] * len(texts))[i]) for i, t in enumerate(texts))
            for pcr, texts in events.items()}


def build(name: str = "tvmm-1", status: str = "approved", rollout: tuple[str, ...] | None = None,
          events: dict[int, list[str]] | None = None) -> TVMMBuild:
    return TVMMBuild(name, "1.0", status, {}, "sha256", _refs(events or {4: ["shim", "kernel"], 8: ["cmdline"]}),
                     rollout=Rollout(rollout) if rollout is not None else None)


def platform(name: str = "model-a", firmware: str = "firmware a", status: str = "approved",
             rollout: tuple[str, ...] | None = None, pcrs: dict[int, list[str]] | None = None) -> Platform:
    return Platform(name, status, "sha256", _refs(pcrs if pcrs is not None else {0: [firmware, "separator"]}),
                    rollout=Rollout(rollout) if rollout is not None else None)


def boot(firmware: str = "firmware a", kernel: str = "kernel", extra: dict[int, list[str]] | None = None) -> dict[int, list[Measured]]:
    events = {0: [firmware, "separator"], 4: ["shim", kernel], 8: ["cmdline"]}
    for pcr, texts in (extra or {}).items():
        events.setdefault(pcr, []).extend(texts)
    return {pcr: [Measured(_d(t)) for t in texts] for pcr, texts in events.items()}


def codes(pairs: list[tuple[str, str]]) -> list[str]:
    return [code for code, _ in pairs]


# -- composition ------------------------------------------------------------------------------
def test_one_build_runs_on_two_models_each_named_in_the_judgement():
    models = [platform("model-a", "firmware a"), platform("model-b", "firmware b")]
    for firmware, name in (("firmware a", "model-a"), ("firmware b", "model-b")):
        judged = judge(boot(firmware), [build()], models, POLICY, "n1")
        assert judged.failures == [] and judged.platform is not None and judged.platform.name == name
        assert judged.build is not None and judged.build.name == "tvmm-1"


def test_without_platforms_the_build_covers_every_policy_pcr():
    whole = build(events={0: ["firmware a", "separator"], 4: ["shim", "kernel"], 8: ["cmdline"]})
    judged = judge(boot(), [whole], [], POLICY, "n1")
    assert judged.failures == [] and judged.build is whole and judged.platform is None
    # and a build that leaves PCR 0 out does not match a boot that extended it
    assert codes(judge(boot(), [build()], [], POLICY, "n1").failures) == ["build.unknown"]


def test_unknown_firmware_is_platform_unknown_naming_the_closest_model_while_the_build_is_still_judged():
    models = [platform("model-a", "firmware a"), platform("model-b", "firmware b")]
    judged = judge(boot("firmware c"), [build()], models, POLICY, "n1")
    assert codes(judged.failures) == ["platform.unknown"] and judged.build is not None
    assert "closest platform model-a: PCR 0 event 0 (a different event)" in judged.failures[0][1]
    both = judge(boot("firmware c", kernel="rootkit"), [build()], models, POLICY, "n1")
    assert codes(both.failures) == ["platform.unknown", "build.unknown"]
    assert "closest build tvmm-1: PCR 4 event 1 (a different event)" in both.failures[1][1]


def test_a_pcr_a_platform_lists_with_no_events_must_have_none():
    quiet = platform(pcrs={0: ["firmware a", "separator"], 2: []})
    assert judge(boot(), [build()], [quiet], (0, 2, 4, 8), "n1").failures == []
    judged = judge(boot(extra={2: ["option rom"]}), [build()], [quiet], (0, 2, 4, 8), "n1")
    assert codes(judged.failures) == ["platform.unknown"] and "PCR 2 event 0 (an extra event)" in judged.failures[0][1]


def test_a_policy_pcr_neither_part_lists_must_stay_unextended():
    judged = judge(boot(extra={9: ["initrd"]}), [build()], [platform()], (0, 4, 8, 9), "n1")
    assert codes(judged.failures) == ["build.unknown"] and "PCR 9 event 0 (an extra event)" in judged.failures[0][1]


def test_platforms_may_own_different_pcrs_and_the_build_is_judged_on_the_rest():
    wide = platform("model-w", pcrs={0: ["firmware w", "separator"], 8: ["cmdline"]})  # a model that also owns 8
    judged = judge(boot("firmware w"), [build(events={4: ["shim", "kernel"]})], [platform(), wide], POLICY, "n1")
    assert judged.failures == [] and judged.platform is wide


def test_an_event_type_a_reference_names_must_be_the_logs():
    typed = build(events={4: ["shim", "kernel"], 8: ["cmdline"]})
    typed = dataclasses.replace(typed, pcrs={**typed.pcrs, 8: (ReferenceEvent(_d("cmdline").hex(), "EV_IPL"),)})
    ipl = boot()
    ipl[8] = [Measured(_d("cmdline"), "EV_IPL")]
    assert judge(ipl, [typed], [platform()], POLICY, "n1").failures == []
    ipl[8] = [Measured(_d("cmdline"), "EV_EFI_ACTION")]  # the same digest under another type
    assert codes(judge(ipl, [typed], [platform()], POLICY, "n1").failures) == ["build.unknown"]


def test_match_picks_the_first_exact_reference_and_otherwise_diagnoses_the_closest():
    a, b = build("a", events={4: ["shim", "kernel 2"]}), build("b", events={4: ["shim", "kernel"]})
    events = {4: [Measured(_d("shim")), Measured(_d("kernel"))]}
    assert match(events, [a, b], (4,)) == (b, "")
    assert match(events, [a], (4,)) == (None, "closest build a: PCR 4 event 1 (a different event)")
    assert match(events, [], (4,)) == (None, "")


def test_an_event_of_another_type_with_the_same_digest_is_named_where_it_differs():
    typed = dataclasses.replace(build(), pcrs=_refs({4: ["shim", "kernel"], 8: ["cmdline"]}, {8: ["EV_IPL"]}))
    ipl = boot()
    ipl[8] = [Measured(_d("cmdline"), "EV_EFI_ACTION")]
    assert match(ipl, [typed], (4, 8)) == (None, "closest build tvmm-1: PCR 8 event 0 (a different event: EV_EFI_ACTION)")


def test_a_departing_event_is_shown_by_its_type_when_the_log_gave_nothing_to_decode():
    """Measured without the parsed event: its type; with an event whose digests do not hold the
    measured one (the policy's bank missing from it), the decoded text without a data check, no crash."""
    from tccdeploy.coordinator.references import shown
    from tccdeploy.eventlog import Event

    assert shown(Measured(_d("x"), "EV_IPL")) == "EV_IPL" and shown(Measured(_d("x"))) == ""
    event = Event(8, 13, {"sha1": bytes(20)}, b"grub_cmd: linux /vmlinuz", 0)
    assert shown(Measured(_d("x"), "EV_IPL", event)) == 'EV_IPL "grub_cmd: linux /vmlinuz"'


def test_a_log_without_a_pcr_the_platform_owns_is_unknown_firmware_not_a_crash():
    judged = judge({4: [Measured(_d("shim")), Measured(_d("kernel"))], 8: [Measured(_d("cmdline"))]}, [build()],
                   [platform(), platform("model-b", "firmware b")], POLICY, "n1")
    assert codes(judged.failures) == ["platform.unknown"]
    assert "closest platform model-a: PCR 0 event 0 (a missing event); PCR 0 event 1 (a missing event)" in judged.failures[0][1]


# -- status -----------------------------------------------------------------------------------
@pytest.mark.parametrize("status, failures, warnings", [
    ("approved", [], []),
    ("deprecated", [], ["platform.deprecated"]),
    ("revoked", ["platform.revoked"], []),
])
def test_a_platforms_status_decides_like_a_builds(status, failures, warnings):
    judged = judge(boot(), [build()], [platform(status=status)], POLICY, "n1")
    assert codes(judged.failures) == failures and codes(judged.warnings) == warnings


@pytest.mark.parametrize("status, failures, warnings", [
    ("approved", [], []),
    ("deprecated", [], ["build.deprecated"]),
    ("revoked", ["build.revoked"], []),
])
def test_a_builds_status_decides(status, failures, warnings):
    judged = judge(boot(), [build(status=status)], [platform()], POLICY, "n1")
    assert codes(judged.failures) == failures and codes(judged.warnings) == warnings


def test_a_candidate_runs_only_on_the_nodes_its_rollout_names_by_roster_name_or_ek():
    candidate = build(status="candidate", rollout=("n1", EK))
    on_n1 = judge(boot(), [candidate], [platform()], POLICY, "n1")
    assert on_n1.failures == [] and codes(on_n1.warnings) == ["build.candidate"]
    by_ek = judge(boot(), [candidate], [platform()], POLICY, None, ("sha256:" + "00" * 32, EK))
    assert by_ek.failures == []
    elsewhere = judge(boot(), [candidate], [platform()], POLICY, "n2", ("sha256:" + "00" * 32,))
    assert codes(elsewhere.failures) == ["build.not-in-rollout"] and "(n1, sha256:" in elsewhere.failures[0][1]
    # a node the roster does not name (None) is not a rollout node by any engine-given name
    assert codes(judge(boot(), [candidate], [platform()], POLICY, None).failures) == ["build.not-in-rollout"]


def test_a_candidate_platform_outside_its_rollout_is_refused_by_its_own_code():
    firmware_update = platform(status="candidate", rollout=("n1",))
    assert codes(judge(boot(), [build()], [firmware_update], POLICY, "n1").warnings) == ["platform.candidate"]
    assert codes(judge(boot(), [build()], [firmware_update], POLICY, "n2").failures) == ["platform.not-in-rollout"]


def test_a_candidate_without_a_rollout_or_an_unknown_status_admits_nowhere():
    assert standing(build(status="candidate"), "n1")[0] == "build.not-in-rollout"  # type: ignore[index]
    assert standing(build(status="withdrawn"), "n1")[0] == "build.revoked"  # type: ignore[index]
    assert standing(platform(status="withdrawn"), "n1")[0] == "platform.revoked"  # type: ignore[index]
    assert standing(build(), "n1") is None and standing(platform(status="deprecated"), None) is None


# -- asked again after the verdict (manifests reloaded) ------------------------------------------
def test_still_admitted_asks_the_manifests_as_they_are_now():
    builds, platforms = [build()], [platform()]
    assert still_admitted("tvmm-1", "model-a", builds, platforms, "n1") is None
    assert still_admitted("tvmm-1", None, builds, [], "n1") is None  # no platforms: the build alone
    assert still_admitted("gone", "model-a", builds, platforms, "n1")[0] == "build.revoked"  # type: ignore[index]
    assert still_admitted("tvmm-1", "gone", builds, platforms, "n1")[0] == "platform.revoked"  # type: ignore[index]
    assert still_admitted("tvmm-1", None, builds, platforms, "n1")[0] == "platform.revoked"  # type: ignore[index]
    assert still_admitted("tvmm-1", "model-a", builds, [platform(status="revoked")], "n1")[0] == "platform.revoked"  # type: ignore[index]
    ended = [build(status="candidate", rollout=("n2",))]
    assert still_admitted("tvmm-1", "model-a", ended, platforms, "n1")[0] == "build.not-in-rollout"  # type: ignore[index]


def test_a_baseline_names_the_node_as_the_tc_does_not_as_asked():
    candidate = [build(status="candidate", rollout=("n1",))]
    unnamed = Baseline(candidate, [platform()])  # the roster names no one: the default identifies nobody
    assert unnamed.admits("n1", "tvmm-1", "model-a")[0] == "build.not-in-rollout"  # type: ignore[index]
    named = Baseline(candidate, [platform()], lambda node: (node, ()))
    assert named.admits("n1", "tvmm-1", "model-a") is None and named.versions() == {"tvmm-1": "1.0"}


# -- what each refusal says (an operator acts on the message) -----------------------------------
def test_each_standing_says_which_reference_and_why():
    assert standing(build(status="revoked"), "n1") == ("build.revoked", "the node booted TVMM build tvmm-1 1.0, which is revoked")
    assert standing(platform(status="revoked"), "n1") == ("platform.revoked", "the node booted platform model-a, which is revoked")
    assert standing(build(status="candidate"), "n1") == (
        "build.not-in-rollout", "TVMM build tvmm-1 1.0 is a candidate, admitted only on the nodes its rollout names (none); "
                                "this node is not one of them")
    assert standing(platform(status="withdrawn"), "n1") == (
        "platform.revoked", "platform model-a has status 'withdrawn', which admits no node")
    warned = judge(boot(), [build(status="deprecated")], [platform(status="candidate", rollout=("n1",))], POLICY, "n1")
    assert warned.warnings == [("platform.candidate", "the node booted platform model-a, a candidate of a staged rollout"),
                               ("build.deprecated", "the node booted TVMM build tvmm-1 1.0, which is deprecated")]
    assert still_admitted(None, None, [build()], [], "n1") == (
        "build.revoked", "the node booted no build, which the TC's manifests no longer list")
    assert still_admitted("tvmm-1", None, [build()], [platform()], "n1") == (
        "platform.revoked", "the node's platform (none recorded) is not in the TC's manifests")
    assert still_admitted("gone", None, [build()], [], "n1")[1] == "the node booted gone, which the TC's manifests no longer list"  # type: ignore[index]


def test_without_platforms_a_builds_standing_still_decides():
    assert [c for c, _ in judge(boot(), [build(status="revoked", events={0: ["firmware a", "separator"],
                                                                        4: ["shim", "kernel"], 8: ["cmdline"]})],
                                 [], POLICY, "n1").failures] == ["build.revoked"]


def test_the_closest_reference_counts_events_in_place_over_every_pcr():
    two_in_place = build("a", events={0: ["f1", "f2"], 4: ["z"]})
    last_pcr_only = build("b", events={0: ["y"], 4: ["k1"]})
    events = {0: [Measured(_d("f1")), Measured(_d("f2"))], 4: [Measured(_d("k1")), Measured(_d("k2"))]}
    assert match(events, [last_pcr_only, two_in_place], (0, 4))[1].startswith("closest build a:")


def test_an_unknown_firmware_is_diagnosed_against_the_model_it_is_closest_to():
    models = [platform("model-a", "firmware a"), platform("model-b", "firmware b", pcrs={0: ["firmware b", "separator", "x"]})]
    judged = judge(boot("firmware b"), [build()], models, POLICY, "n1")  # model-b's last event is missing
    assert judged.failures[0] == ("platform.unknown", "the measured firmware matches no platform (closest platform "
                                                      "model-b: PCR 0 event 2 (a missing event))")


def test_a_rollout_may_name_a_node_by_its_ek_when_asked_again():
    by_ek = build(status="candidate", rollout=(EK,))
    firmware = platform(status="candidate", rollout=("n1", EK))
    assert still_admitted("tvmm-1", "model-a", [by_ek], [firmware], None, (EK,)) is None
    assert still_admitted("tvmm-1", "model-a", [build()], [firmware], "n1") is None
    assert still_admitted("tvmm-1", "model-a", [build()], [platform(status="candidate", rollout=(EK,))], "n1", (EK,)) is None
    assert still_admitted("tvmm-1", "model-a", [build()], [platform(status="candidate", rollout=(EK,))], "n1")[0] == \
        "platform.not-in-rollout"  # type: ignore[index]
    assert Baseline([by_ek], [platform()], lambda node: (None, (EK,))).admits("n1", "tvmm-1", "model-a") is None
