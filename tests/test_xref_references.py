"""Cross-references of Platform and TVMMBuild manifests (manifest/xref.py): what one file's
schema cannot see. Each case changes one thing in the examples and expects one code."""

from __future__ import annotations

import shutil
from pathlib import Path

import yaml

from tccdeploy.manifest.loader import load_paths

REPO = Path(__file__).resolve().parent.parent


def examples(tmp_path: Path) -> Path:
    target = tmp_path / "examples"
    shutil.copytree(REPO / "examples", target)
    return target


def edit(path: Path, change) -> None:  # type: ignore[no-untyped-def]
    data = yaml.safe_load(path.read_text())
    change(data)
    path.write_text(yaml.safe_dump(data, sort_keys=False))


def codes(folder: Path) -> list[tuple[str, str]]:
    return [(p.code, p.severity) for p in load_paths([str(folder)]).problems]


def test_the_examples_have_no_reference_problems(tmp_path):
    assert codes(examples(tmp_path)) == []


def test_a_rollout_on_a_build_that_is_not_a_candidate_is_an_error(tmp_path):
    folder = examples(tmp_path)
    edit(folder / "builds" / "tvmm-2026.1.yml", lambda d: d["spec"].update(rollout={"nodes": ["node1"]}))
    assert codes(folder) == [("xref.candidate-rollout", "error")]


def test_a_candidate_platform_without_a_rollout_is_an_error(tmp_path):
    folder = examples(tmp_path)
    edit(folder / "platforms" / "lab-model-b.yml", lambda d: d["spec"].update(status="candidate"))
    assert codes(folder) == [("xref.candidate-rollout", "error")]


def test_two_platforms_of_one_name_are_an_error(tmp_path):
    folder = examples(tmp_path)
    edit(folder / "platforms" / "lab-model-b.yml", lambda d: d["metadata"].update(name="lab-model-a"))
    assert codes(folder) == [("xref.duplicate-platform", "error")]


def test_a_platform_in_another_bank_or_on_unquoted_pcrs_is_an_error(tmp_path):
    folder = examples(tmp_path)

    def other_bank(d):  # type: ignore[no-untyped-def]
        d["spec"]["measurements"]["bank"] = "sha1"
        for entry in d["spec"]["measurements"]["pcrs"]:
            for event in entry["events"]:
                event["digest"] = event["digest"][:40]
    edit(folder / "platforms" / "lab-model-a.yml", other_bank)
    edit(folder / "platforms" / "lab-model-b.yml", lambda d: d["spec"]["measurements"]["pcrs"].append({"pcr": 3, "events": []}))
    assert sorted(codes(folder)) == [("xref.build-bank", "error"), ("xref.build-pcr-not-quoted", "error")]


def test_no_approved_platform_is_a_warning(tmp_path):
    folder = examples(tmp_path)
    for name in ("lab-model-a", "lab-model-b"):
        edit(folder / "platforms" / f"{name}.yml", lambda d: d["spec"].update(status="deprecated"))
    assert codes(folder) == [("xref.no-approved-platform", "warning")]


def test_two_builds_of_one_name_are_an_error_and_no_approved_build_a_warning(tmp_path):
    folder = examples(tmp_path)
    edit(folder / "builds" / "tvmm-2025.4.yml", lambda d: d["metadata"].update(name="tvmm-2026.1"))
    assert codes(folder) == [("xref.duplicate-build", "error")]
    folder = examples(tmp_path / "again")
    for path in (folder / "builds").glob("*.yml"):
        edit(path, lambda d: d["spec"].update(status="deprecated") if d["spec"]["status"] == "approved" else None)
    assert codes(folder) == [("xref.no-approved-build", "warning")]
