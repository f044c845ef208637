"""Inventories read exactly as Ansible reads them, and host patterns as Ansible selects."""

from __future__ import annotations

import atexit
import json
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from tccdeploy.inventory.patterns import PatternError
from tccdeploy.manifest.loader import load_inventory
from tccdeploy.manifest.problems import ManifestError

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
INVENTORIES = sorted(p for p in (HERE / "inventories").iterdir() if p.is_dir()) + [REPO / "inventory" / "lab"]
ANSIBLE_INVENTORY = shutil.which("ansible-inventory") or str(Path(sys.executable).parent / "ansible-inventory")
ANSIBLE_HOME = tempfile.mkdtemp(prefix="tccdeploy-ansible-home-")
atexit.register(shutil.rmtree, ANSIBLE_HOME, True)
ANSIBLE_ENV = {"ANSIBLE_LOCALHOST_WARNING": "False", "ANSIBLE_INVENTORY_UNPARSED_WARNING": "False",
               "PATH": "/usr/bin:/bin", "HOME": ANSIBLE_HOME}


def ansible(*args: str) -> str:
    if not Path(ANSIBLE_INVENTORY).exists():
        pytest.skip("ansible-inventory is not installed (pip install -e '.[test]')")
    proc = subprocess.run([ANSIBLE_INVENTORY, *args], capture_output=True, text=True, env=ANSIBLE_ENV)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


def test_at_least_five_inventories_are_compared():
    assert len(INVENTORIES) >= 6
    kinds = {p.name for p in INVENTORIES}
    assert {"ini-ranges", "nested-children", "vars-dirs", "precedence", "yaml-simple"} <= kinds


@pytest.mark.slow
@pytest.mark.parametrize("path", INVENTORIES, ids=lambda p: p.name)
def test_list_equals_ansible_inventory_list(path: Path):
    theirs = json.loads(ansible("-i", str(path), "--list"))
    theirs["_meta"].pop("profile", None)
    ours = load_inventory(str(path)).as_ansible_list()
    assert ours["_meta"] == theirs["_meta"]  # every host's variables, after precedence
    assert {k: v for k, v in ours.items() if k != "_meta"} == {k: v for k, v in theirs.items() if k != "_meta"}


@pytest.mark.slow
@pytest.mark.parametrize("path", INVENTORIES, ids=lambda p: p.name)
def test_graph_equals_ansible_inventory_graph(path: Path):
    assert load_inventory(str(path)).graph() == ansible("-i", str(path), "--graph").rstrip("\n")


def test_precedence_order_is_ansibles():
    hosts = load_inventory(str(HERE / "inventories" / "precedence")).hosts
    assert hosts["h1"].vars["x"] == "inv-b-child"  # deeper group wins
    assert hosts["h2"].vars["x"] == "inv-a"
    assert hosts["h1"].vars["y"] == "gv-b"  # group_vars/ beat the inventory file's group vars
    assert hosts["h1"].vars["z"] == "hv-h1"  # host_vars/ beat the inventory file's host vars
    assert hosts["h3"].vars["p"] == "inv-host"  # host vars beat group_vars/all
    assert hosts["h3"].vars["q"] == "hv-h3"


def test_every_variable_knows_where_it_was_written():
    hosts = load_inventory(str(HERE / "inventories" / "precedence")).hosts
    origin = hosts["h1"].origins["y"]
    assert origin.doc.file.endswith("group_vars/b.yml") and origin.doc.locate(origin.path) == (1, 1)
    origin = hosts["h1"].origins["x"]
    assert origin.doc.file.endswith("hosts.yml") and origin.doc.locate(origin.path)[0] == 15


@pytest.fixture(scope="module")
def patterns_inventory():
    return load_inventory(str(HERE / "inventories" / "nested-children"))


@pytest.mark.parametrize(
    "pattern, expected",
    [
        ("all", ["w1", "w2", "d1", "u1", "m1"]),
        ("*", ["w1", "w2", "d1", "u1", "m1"]),
        ("eu", ["w1", "w2", "d1"]),
        ("eu_web:us", ["w1", "w2", "u1"]),
        ("eu_web,us", ["w1", "w2", "u1"]),
        ("prod:&monitoring", ["w1"]),
        ("prod:!eu_db", ["w1", "w2", "u1"]),
        ("all:!prod", ["m1"]),
        ("w*", ["w1", "w2"]),
        ("~[dm]1", ["d1", "m1"]),
        ("eu_*", ["w1", "w2", "d1"]),
        ("!monitoring", ["w2", "d1", "u1"]),
    ],
)
def test_host_patterns_select_like_ansible(patterns_inventory, pattern: str, expected: list[str]):
    assert sorted(h.name for h in patterns_inventory.select(pattern)) == sorted(expected)


@pytest.mark.slow
@pytest.mark.parametrize("pattern", ["all", "eu", "eu_web:us", "prod:&monitoring", "prod:!eu_db", "w*", "~[dm]1", "!monitoring"])
def test_host_patterns_select_what_ansible_list_hosts_selects(patterns_inventory, pattern: str):
    assert sorted(h.name for h in patterns_inventory.select(pattern)) == sorted(_ansible_hosts(pattern))


def _ansible_hosts(pattern: str) -> list[str]:
    """What `ansible PATTERN --list-hosts` selects on the same inventory."""
    binary = Path(ANSIBLE_INVENTORY).with_name("ansible")
    proc = subprocess.run([str(binary), pattern, "-i", str(HERE / "inventories" / "nested-children"), "--list-hosts"],
                          capture_output=True, text=True, env=ANSIBLE_ENV)
    assert proc.returncode == 0, proc.stderr
    return [line.strip() for line in proc.stdout.splitlines()[1:] if line.strip()]


@pytest.mark.parametrize("pattern", ["euweb", "prod:&nosuch", "~(unclosed"])
def test_a_pattern_term_that_matches_nothing_is_an_error(patterns_inventory, pattern: str):
    with pytest.raises(PatternError):
        patterns_inventory.select(pattern)


def _errors(tmp_path: Path, name: str, text: str) -> list:
    (tmp_path / name).write_text(text)
    with pytest.raises(ManifestError) as info:
        load_inventory(str(tmp_path / name))
    return info.value.problems


def test_bad_yaml_inventory_is_an_error_with_its_line(tmp_path: Path):
    (problem,) = _errors(tmp_path, "hosts.yml", "all:\n  hosts:\n    a: {ansible_host: 1.2.3.4\n")
    assert problem.code == "yaml.syntax" and problem.line >= 3


def test_unparseable_ini_line_is_an_error_with_its_line(tmp_path: Path):
    problems = _errors(tmp_path, "hosts", "[web]\nw1 ansible_port=22\nw2 oops\n[db:weird]\nd1\n")
    assert [(p.code, p.line) for p in problems] == [("inventory.ini-host", 3), ("inventory.ini-section", 4)]


def test_a_host_with_conflicting_addresses_is_an_error(tmp_path: Path):
    problems = _errors(tmp_path, "hosts.yml",
                       "all:\n  children:\n    a:\n      hosts:\n        n1: {ansible_host: 10.0.0.1}\n"
                       "    b:\n      hosts:\n        n1: {ansible_host: 10.0.0.2}\n")
    (problem,) = problems
    assert problem.code == "inventory.conflicting-address" and problem.line == 8
    assert "hosts.yml:5:" in problem.message


def test_cli_reports_a_bad_pattern_before_connecting(tmp_path: Path):
    (tmp_path / "hosts.yml").write_text("all:\n  hosts:\n    n1: {ansible_host: 127.0.0.1, ansible_port: 9}\n")
    proc = subprocess.run([sys.executable, "-m", "tccdeploy", "ping", "webz", "-i", str(tmp_path / "hosts.yml")],
                          capture_output=True, text=True, timeout=30)
    assert proc.returncode == 1 and "matches no group or host" in proc.stderr
    assert "UNREACHABLE" not in proc.stdout


def test_cli_reports_a_malformed_inventory_with_file_and_line(tmp_path: Path):
    (tmp_path / "hosts").write_text("[web]\nw1 ansible_host=127.0.0.1\nw2 = broken\n")
    proc = subprocess.run([sys.executable, "-m", "tccdeploy", "ping", "-i", str(tmp_path / "hosts")],
                          capture_output=True, text=True, timeout=30)
    assert proc.returncode == 1
    assert f"{tmp_path / 'hosts'}:3:1:" in proc.stderr and "Traceback" not in proc.stderr


def test_a_union_of_four_names_is_not_taken_for_an_ipv6_address():
    from tccdeploy.inventory.patterns import split_terms

    assert split_terms("node1:node2:node3:node4") == ["node1", "node2", "node3", "node4"]
    assert split_terms("fe80::1") == ["fe80::1"] and split_terms("2001:db8:0:1") == ["2001:db8:0:1"]


def test_a_yaml_host_range_that_cannot_expand_is_a_problem_at_its_key(tmp_path: Path):
    (tmp_path / "hosts.yml").write_text('all:\n  hosts:\n    "n[4:a]":\n    "m[5:1]":\n    ok:\n')
    with pytest.raises(ManifestError) as raised:
        load_inventory(str(tmp_path / "hosts.yml"))
    found = [(p.code, p.line, p.message) for p in raised.value.problems]
    assert [(code, line) for code, line, _ in found] == [("inventory.yaml-range", 3), ("inventory.yaml-range", 4)], found
    assert "neither numeric nor single letters" in found[0][2] and "is empty" in found[1][2]
