"""The Ansible collection's files and the bridge its plugins call, without a lab: the modules'
documentation says what the playbook schema says, the bridge refuses what it cannot do by name,
and ansible-doc reads every plugin."""

from __future__ import annotations

import ast
import json
import subprocess
from pathlib import Path

import pytest
import yaml

from tccdeploy import ansible_bridge as bridge
from tccdeploy.manifest.schema import schema_text

from .conftest import REPO
from .helpers_apply import BIN

COLLECTION = REPO / "collections" / "ansible_collections" / "tccdeploy" / "tccp"


def _documentation(path: Path) -> dict:
    tree = ast.parse(path.read_text())
    for node in tree.body:
        if isinstance(node, ast.Assign) and getattr(node.targets[0], "id", "") == "DOCUMENTATION":
            return yaml.safe_load(ast.literal_eval(node.value))
    raise AssertionError(f"{path} has no DOCUMENTATION")


@pytest.mark.parametrize("module", bridge.TCC_MODULES)
def test_each_module_documents_the_options_the_playbook_schema_gives_it(module):
    schema = json.loads(schema_text("Playbook"))
    ref = schema["$defs"]["task"]["properties"][module]["$ref"].split("/")[-1]
    options = set(schema["$defs"][ref].get("properties", {}))
    doc = _documentation(COLLECTION / "plugins" / "modules" / f"{module}.py")
    assert doc["module"] == module and doc["short_description"]
    assert set(doc.get("options") or {}) == options
    assert "tccdeploy.tccp.tc" in doc["extends_documentation_fragment"]
    assert f'MODULE = "{module}"' in (COLLECTION / "plugins" / "action" / f"{module}.py").read_text()


def test_galaxy_metadata_names_the_collection():
    galaxy = yaml.safe_load((COLLECTION / "galaxy.yml").read_text())
    assert (galaxy["namespace"], galaxy["name"]) == ("tccdeploy", "tccp")


def test_the_bridge_needs_a_served_tc_and_says_so():
    result = bridge.run("attest", {"admit": True}, {"inventory_hostname": "node1", "groups": {"all": ["node1"]},
                                                     "hostvars": {"node1": {}}})
    assert result["failed"] and "tc_url" in result["msg"] and "TCCDEPLOY_TC" in result["msg"]
    assert "no module 'shell'" in bridge.run("shell", {}, {})["msg"]


def test_the_bridge_takes_settings_from_arguments_then_the_environment():
    args = {"admit": True, "tc_url": "https://tc:1", "state": "/s"}
    got = bridge.settings(args, {"TCCDEPLOY_ENGINE_DIR": "/e", "TCCDEPLOY_TC": "https://other", "TCCDEPLOY_MANIFESTS": "/m"})
    assert got == {"tc_url": "https://tc:1", "engine_dir": "/e", "state": "/s", "manifests": ["/m"]}
    assert args == {"admit": True}  # the module's own arguments only


def test_the_bridge_builds_hosts_with_their_groups_and_connection_variables_only():
    task_vars = {"groups": {"all": ["n1", "n2"], "site1": ["n1"], "ungrouped": ["n2"]},
                 "hostvars": {"n1": {"ansible_host": "127.0.0.2", "tcc_capacity": 2, "secret_note": "x"}, "n2": {}}}
    hosts = bridge.hosts_from(task_vars)
    assert hosts["n1"].groups == ["site1"] and hosts["n1"].vars == {"ansible_host": "127.0.0.2", "tcc_capacity": 2}
    assert hosts["n2"].groups == [] and hosts["n2"].vars == {}
    assert bridge.group_name("tvmm-2026.1") == "tvmm_2026_1"


@pytest.mark.skipif(not (BIN / "ansible-doc").exists(), reason="ansible-core is not installed")
def test_ansible_doc_reads_every_plugin(tmp_path):
    env_path = {"ANSIBLE_COLLECTIONS_PATH": str(REPO / "collections")}
    import os

    for kind, names in (("module", bridge.TCC_MODULES), ("inventory", ("tc",))):
        for name in names:
            done = subprocess.run([str(BIN / "ansible-doc"), "-t", kind, "--json", f"tccdeploy.tccp.{name}"],
                                  capture_output=True, text=True, timeout=120,
                                  env=dict(os.environ, **env_path, ANSIBLE_HOME=str(tmp_path)))
            assert done.returncode == 0 and f"tccdeploy.tccp.{name}" in done.stdout, done.stderr
