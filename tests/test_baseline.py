"""Reference values from boots (tccdeploy/baseline.py): a build and platform captured from a lab
node's log are what the lab's manifests say, the TC accepts the node on them (a candidate on that
node only) and refuses a tampered boot; a departure is named event by event; a build predicted
from the lab build's files is the lab's build exactly."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest
import yaml

from tccdeploy.baseline import captured, compare, departures, predicted
from tccdeploy.bootpaths import boot_path
from tccdeploy.coordinator.references import Measured, judge
from tccdeploy.eventlog import EV_NO_ACTION, parse
from tccdeploy.lab.builds import (
    ARTIFACTS,
    LAB_BUILDS,
    LAB_PLATFORMS,
    POLICY_PCRS,
    artifact_bytes,
    build_manifest,
    platform_manifest,
)
from tccdeploy.manifest.loader import load_paths

from .attestkit import boot_log
from .conftest import live_examples

REPO = Path(__file__).resolve().parent.parent


def _log(build: str = "tvmm-2026.1", model: str = "lab-model-b", extra=None):  # type: ignore[no-untyped-def]
    return parse(boot_log(build, extra, model)[0])


def _digests(doc: dict) -> dict[int, list[str]]:
    return {e["pcr"]: [x.get("digest") or doc["spec"]["artifacts"][x["artifact"]]["sha256"] for x in e["events"]]
            for e in doc["spec"]["measurements"]["pcrs"]}


def _load(folder: Path, *docs: dict):  # type: ignore[no-untyped-def]
    """The example manifests (builds as this tree measures them) plus docs, loaded and
    cross-checked as the TC would load them."""
    target = live_examples(folder)
    for doc in docs:
        (target / f"{doc['metadata']['name']}.yml").write_text(yaml.safe_dump(doc, sort_keys=False))
    return load_paths([str(target)])


def _judge(log, loaded, node: str):  # type: ignore[no-untyped-def]
    events: dict[int, list[Measured]] = {}
    for e in log.events:
        if e.type != EV_NO_ACTION and e.pcr in POLICY_PCRS:
            events.setdefault(e.pcr, []).append(Measured(e.digests["sha256"], e.type_name))
    return judge(events, loaded.builds, loaded.platforms, POLICY_PCRS, node)


def test_a_captured_build_and_platform_are_the_lab_manifests_measurements():
    build, platform = captured(_log(), "sha256", POLICY_PCRS, (0,), "node2", "golden", "2027.1.0", "model-b-golden")
    lab_build = build_manifest(LAB_BUILDS[0])
    assert _digests(build) == _digests(lab_build)
    assert platform is not None and _digests(platform) == _digests(platform_manifest(LAB_PLATFORMS[1]))
    for doc in (build, platform):
        assert doc["spec"]["status"] == "candidate" and doc["spec"]["rollout"] == {"nodes": ["node2"]}
    first = build["spec"]["measurements"]["pcrs"][0]["events"][0]
    assert first["type"] == "EV_EFI_BOOT_SERVICES_APPLICATION" and first["description"].startswith("image of 4")
    cmdline = next(e for e in build["spec"]["measurements"]["pcrs"] if e["pcr"] == 8)["events"][0]
    assert cmdline == {"digest": lab_build["spec"]["artifacts"]["cmdline"]["sha256"], "type": "EV_IPL",
                       "description": '"console=ttyS0 ro tccdeploy.build=tvmm-2026.1"'}


def test_captured_manifests_validate_and_admit_their_node_only_and_not_a_tampered_boot(tmp_path):
    build, platform = captured(_log("tvmm-2026.2", "lab-model-a"), "sha256", POLICY_PCRS, (0,), "node1", "golden",
                               "2027.1.0", "golden-firmware")
    assert platform is not None
    loaded = _load(tmp_path, build, platform)
    assert loaded.errors == [], [f"{p.code}: {p.message}" for p in loaded.errors]
    loaded.builds = [b for b in loaded.builds if b.name == "golden"]
    loaded.platforms = [p for p in loaded.platforms if p.name == "golden-firmware"]
    on_node1 = _judge(_log("tvmm-2026.2", "lab-model-a"), loaded, "node1")
    assert on_node1.failures == [] and [c for c, _ in on_node1.warnings] == ["platform.candidate", "build.candidate"]
    assert [c for c, _ in _judge(_log("tvmm-2026.2", "lab-model-a"), loaded, "node2").failures] == [
        "platform.not-in-rollout", "build.not-in-rollout"]
    tampered = _log("tvmm-2026.2", "lab-model-a", extra=[(4, b"rootkit")])
    assert [c for c, _ in _judge(tampered, loaded, "node1").failures] == ["build.unknown"]


def test_without_platform_pcrs_the_build_covers_every_policy_pcr():
    build, platform = captured(_log(), "sha256", POLICY_PCRS, (), "node2", "whole", "1.0", None)
    assert platform is None and sorted(_digests(build)) == [0, 4, 8, 9, 11]


def test_a_log_with_nothing_on_the_builds_pcrs_is_not_captured():
    with pytest.raises(ValueError, match=r"no event on the build's PCRs \[5, 6\]"):
        captured(_log(), "sha256", (0, 5, 6), (0,), "node2", "empty", "1.0", None)


def test_a_departure_is_named_where_and_what_decoded():
    from tccdeploy.manifest.models import TVMMBuild

    reference = TVMMBuild.from_document(None, build_manifest(LAB_BUILDS[0]), "/")  # type: ignore[arg-type]
    assert departures(_log(), "sha256", (4, 8, 9, 11), reference) == []
    other = departures(_log("tvmm-2026.2"), "sha256", (4, 8), reference)
    assert [(d.pcr, d.index, d.kind) for d in other] == [(4, 0, "changed"), (4, 1, "changed"), (8, 0, "changed")]
    lines = other[2].lines("sha256")
    assert lines[0] == 'PCR 8 event 0: changed: EV_IPL: "console=ttyS0 ro tccdeploy.build=tvmm-2026.2"'
    assert lines[1].startswith("    expected EV_IPL " + reference.pcrs[8][0].digest)
    implant = departures(_log(extra=[(4, b"rootkit")]), "sha256", (4,), reference)
    assert [(d.index, d.kind) for d in implant] == [(3, "extra")]
    assert implant[0].lines("sha256")[0] == "PCR 4 event 3: an extra EV_EFI_BOOT_SERVICES_APPLICATION: image of 7 bytes " \
                                            "from (empty)"
    short = _log()
    short.events = [e for e in short.events if not (e.pcr == 11 and e is short.events[-1])]
    gone = departures(short, "sha256", (11,), reference)
    assert [(d.index, d.kind) for d in gone] == [(1, "missing")] and gone[0].lines("sha256")[0].startswith(
        "PCR 11 event 1: missing: EV_IPL " + reference.pcrs[11][1].digest)


def test_a_build_predicted_from_the_lab_builds_files_is_the_lab_build(tmp_path):
    for lab in LAB_BUILDS:
        files = {}
        for name in ARTIFACTS:
            if name != "cmdline":
                path = tmp_path / lab.name / name
                path.parent.mkdir(exist_ok=True)
                path.write_bytes(artifact_bytes(lab.name, name))
                files[name] = str(path)
        cmdline = artifact_bytes(lab.name, "cmdline").decode()
        doc = predicted(files, cmdline, lab.name, lab.version, boot_path("lab"))
        expected = build_manifest(lab)
        assert doc["spec"]["measurements"] == expected["spec"]["measurements"]
        assert {k: v["sha256"] for k, v in doc["spec"]["artifacts"].items()} == \
               {k: v["sha256"] for k, v in expected["spec"]["artifacts"].items()}


def test_a_pe_boot_loader_is_predicted_by_its_authenticode_digest(tmp_path):
    shim = Path("/usr/lib/shim/shimx64.efi.signed")
    if not shim.exists():
        pytest.skip("Debian's shim-signed is not installed (scripts/install)")
    from tccdeploy.pe import authenticode

    files = {name: str(tmp_path / name) for name in ARTIFACTS if name != "cmdline"}
    for name, path in files.items():
        Path(path).write_bytes(artifact_bytes("tvmm-2026.1", name))
    files["bootloader"] = str(shim)
    doc = predicted(files, "ro", "pe", "1.0", boot_path("lab"), str(tmp_path))
    first = doc["spec"]["measurements"]["pcrs"][0]["events"][0]
    assert first == {"digest": authenticode(shim.read_bytes()).hex(), "type": "EV_EFI_BOOT_SERVICES_APPLICATION",
                     "description": "bootloader (Authenticode)"}
    assert doc["spec"]["artifacts"]["bootloader"]["sha256"] == hashlib.sha256(shim.read_bytes()).hexdigest()
    with pytest.raises(ValueError, match="the lab boot path measures initrd"):
        predicted({k: v for k, v in files.items() if k != "initrd"}, "ro", "pe", "1.0", boot_path("lab"))


def test_the_diff_names_the_firmware_against_the_closest_model_and_the_boot_against_the_build(tmp_path):
    loaded = _load(tmp_path)
    build = next(b for b in loaded.builds if b.name == "tvmm-2026.1")
    lines, differs = compare(_log(model="lab-model-a"), "sha256", POLICY_PCRS, build, loaded.platforms, "lab-model-a")
    assert not differs and lines == ["firmware: platform lab-model-a", "boot: the same as tvmm-2026.1 on PCRs [4, 8, 9, 11]"]
    lines, differs = compare(_log(model="lab-model-x"), "sha256", POLICY_PCRS, build, loaded.platforms, None)
    assert differs and lines[0] == "firmware: matches no platform; the closest is lab-model-a:"
    assert lines[1] == "  PCR 0 event 0: changed: EV_POST_CODE: firmware of lab-model-x"
    lines, differs = compare(_log("tvmm-2026.2"), "sha256", POLICY_PCRS, build, [], None)  # no platforms: all PCRs
    assert differs and lines[0].startswith("PCR 0 event 0: an extra EV_POST_CODE")
    assert any(line.startswith("PCR 4 event 0: changed") for line in lines)
