"""Running `tccdeploy apply` and `ansible-playbook` as a user would, and reading their recaps."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

BIN = Path(sys.executable).parent
# Where ansible-playbook, ansible-galaxy and ansible-inventory come from: this venv, or another
# one (TCCDEPLOY_TEST_ANSIBLE_BIN: a fresh virtualenv with only ansible-core and tccdeploy
# installed, to check the collection works outside the development environment).
ANSIBLE_BIN = Path(os.environ.get("TCCDEPLOY_TEST_ANSIBLE_BIN") or BIN)
RECAP = re.compile(r"^(\S+)\s+: ok=(\d+)\s+changed=(\d+)\s+unreachable=(\d+)\s+failed=(\d+)\s+skipped=(\d+)\s+"
                   r"rescued=(\d+)\s+ignored=(\d+)\s*$")
FIELDS = ("ok", "changed", "unreachable", "failed", "skipped", "rescued", "ignored")


def recap(output: str) -> dict[str, dict[str, int]]:
    out: dict[str, dict[str, int]] = {}
    seen = False
    for line in output.splitlines():
        if line.startswith("PLAY RECAP"):
            seen = True
            continue
        match = RECAP.match(line) if seen else None
        if match:
            out[match.group(1)] = dict(zip(FIELDS, (int(g) for g in match.groups()[1:]), strict=True))
    return out


def apply(*args: str, state: str | None = None, timeout: float = 600) -> subprocess.CompletedProcess:
    env = dict(os.environ, NO_COLOR="1")
    if state:
        env["TCCDEPLOY_STATE"] = state
    return subprocess.run([str(BIN / "tccdeploy"), "apply", *args], capture_output=True, text=True, env=env,
                          timeout=timeout)


def ansible_playbook(*args: str, timeout: float = 300, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    home = tempfile.mkdtemp(prefix="tccdeploy-test-ansible-")
    env = dict(os.environ, **(env or {}), ANSIBLE_HOME=home, ANSIBLE_LOCALHOST_WARNING="False", ANSIBLE_NOCOLOR="1",
               ANSIBLE_DEPRECATION_WARNINGS="False", ANSIBLE_SSH_ARGS="-o ControlMaster=no -o ControlPersist=no",
               ANSIBLE_HOST_KEY_CHECKING="True")
    try:
        return subprocess.run([str(ANSIBLE_BIN / "ansible-playbook"), *args], capture_output=True, text=True, env=env,
                              timeout=timeout)
    finally:
        import shutil

        shutil.rmtree(home, ignore_errors=True)
