"""`tccdeploy validate` and `tccdeploy schema` as CI pipelines and people use them."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import yaml

from tccdeploy.cli import main
from tccdeploy.lab.builds import LAB_BUILDS, LAB_PLATFORMS, build_manifest, platform_manifest

REPO = Path(__file__).resolve().parent.parent
INVALID = REPO / "tests" / "invalid"


def run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "tccdeploy", *args], capture_output=True, text=True, cwd=REPO)


def test_examples_are_valid():
    proc = run("validate", "examples", "inventory", "playbooks")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "ok:" in proc.stdout


def test_examples_cover_every_kind():
    from tccdeploy.manifest.loader import load_paths

    result = load_paths([str(REPO / "examples"), str(REPO / "inventory"), str(REPO / "playbooks")])
    assert len(result.perimeters) == 1 and len(result.perimeter.sites) == 2
    statuses = sorted(b.status for b in result.builds)
    assert statuses == ["approved", "approved", "candidate", "revoked"]
    assert sorted(p.name for p in result.platforms) == ["lab-model-a", "lab-model-b"]
    assert result.requests and result.inventories and result.playbooks


def test_example_builds_match_what_the_lab_measures():
    for build in LAB_BUILDS:
        committed = yaml.safe_load((REPO / "examples" / "builds" / f"{build.name}.yml").read_text())
        assert committed == build_manifest(build), REGENERATE
    for platform in LAB_PLATFORMS:
        committed = yaml.safe_load((REPO / "examples" / "platforms" / f"{platform.name}.yml").read_text())
        assert committed == platform_manifest(platform), REGENERATE


REGENERATE = "regenerate: tccdeploy lab builds --out examples/builds --platforms examples/platforms"


def test_invalid_exits_1_and_reports_every_problem_at_once(tmp_path: Path):
    import shutil

    case = tmp_path / "case"
    shutil.copytree(INVALID / "xref-unknown-site", case)
    (case / "perimeter.yml").write_text(
        (case / "perimeter.yml").read_text().replace("../../../examples", str(REPO / "examples"))
    )
    hosts = case / "inventory" / "hosts.yml"
    hosts.write_text(hosts.read_text().replace("ansible_host: 127.0.1.2", "ansible_host: 127.0.1.2\n          ansible_port: 0"))
    proc = run("validate", str(case))
    assert proc.returncode == 1
    assert "xref.unknown-site" in proc.stdout and "schema.minimum" in proc.stdout
    assert "hosts.yml:5:9:" in proc.stdout and "hosts.yml:12:11:" in proc.stdout


def test_json_format_is_machine_readable():
    proc = run("validate", "--format", "json", str(INVALID / "schema-status"))
    assert proc.returncode == 1
    report = json.loads(proc.stdout)
    assert report["valid"] is False and report["errors"] == 1
    (problem,) = report["problems"]
    assert problem["code"] == "schema.enum" and problem["path"] == "$.spec.status"
    assert {"file", "line", "column", "message", "hint", "severity"} <= set(problem)


def test_github_format_annotates_the_line():
    proc = run("validate", "--format", "github", str(INVALID / "schema-status"))
    assert proc.returncode == 1
    assert proc.stdout.startswith("::error file=")
    assert ",line=10,col=3," in proc.stdout


def test_usage_error_exits_2():
    assert run("validate").returncode == 2
    assert run("validate", "--format", "xml", "examples").returncode == 2


def test_missing_path_is_an_error_not_a_traceback():
    proc = run("validate", "no/such/dir")
    assert proc.returncode == 1 and "no such file or directory" in proc.stdout
    assert "Traceback" not in proc.stderr


def test_hostile_yaml_gives_a_clear_error(tmp_path: Path):
    (tmp_path / "bomb.yml").write_text(
        "a: &a [x, x, x, x, x, x, x, x, x]\n"
        + "".join(f"{chr(98 + i)}: &{chr(98 + i)} [{', '.join(['*' + chr(97 + i)] * 9)}]\n" for i in range(8))
    )
    (tmp_path / "obj.yml").write_text("!!python/object/apply:os.system ['touch pwned']\n")
    proc = run("validate", str(tmp_path))
    assert proc.returncode == 1
    assert "yaml.too-many-nodes" in proc.stdout and "yaml.tag" in proc.stdout
    assert not (REPO / "pwned").exists()


def test_strict_turns_warnings_into_errors():
    assert run("validate", "inventory", "examples").returncode == 0
    assert run("validate", "--strict", "inventory", "examples").returncode == 1


def test_schema_prints_each_kind(capsys):
    for kind in ("Perimeter", "tvmmbuild", "Inventory", "PlacementRequest", "playbook", "vars"):
        assert main(["schema", kind]) == 0
        assert json.loads(capsys.readouterr().out)["$schema"].endswith("2020-12/schema")
    assert main(["schema", "Nope"]) == 2
