"""The admin helper's fixed, small interface: exactly these operations, none of which touches
the TPM, a VM or a key (those are the TVMM service's, tests/test_tvmm_interface.py)."""

from __future__ import annotations

import json
import subprocess
import sys

from tccdeploy.node.main import handle
from tccdeploy.node.ops import OPS

EXPECTED = {"ping", "command", "facts", "file_state", "file_install", "file_mode", "boot_state", "boot_prepare", "boot_reuse",
            "boot_set_next"}


def test_the_helper_offers_exactly_the_documented_operations():
    assert set(OPS) == EXPECTED


def test_unknown_operations_and_bad_requests_are_structured_errors():
    assert handle({"id": 1, "op": "read_memory"})["error"]["type"] == "UnknownOp"
    answer = handle({"id": 2, "op": "command", "args": {"cmd": ""}})
    assert answer["ok"] is False and answer["error"]["type"] == "OpError"


def test_the_helper_speaks_json_lines_on_stdin_and_stdout():
    requests = b'{"id": 1, "op": "ping"}\nnot json\n'
    proc = subprocess.run([sys.executable, "-m", "tccdeploy.node"], input=requests, capture_output=True, timeout=30)
    lines = [json.loads(line) for line in proc.stdout.splitlines()]
    assert lines[0]["hello"] == "tccdeploy-node"
    assert lines[1]["result"]["ping"] == "pong"
    assert lines[2]["error"]["type"] == "BadRequest"
