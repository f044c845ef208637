"""The TVMM service's narrow interface: exactly the documented operations, each argument checked
against its JSON schema before any code of the operation runs, every refusal named; no free-form
argument (path, command, QEMU option, TPM) anywhere; and the service is one deterministic file."""

from __future__ import annotations

import json
import subprocess
import sys
import zipfile
from io import BytesIO
from pathlib import Path

import pytest
from jsonschema import Draft202012Validator

from tccdeploy.bundles import helper_bundle, service_bundle
from tccdeploy.tvmm import config
from tccdeploy.tvmm.interface import HANDLERS, OPERATIONS, problems
from tccdeploy.tvmm.service import handle

EXPECTED = {"identity", "ak_create", "ak_activate", "quote", "nv_certify", "tk_create", "tk_check", "disk_state",
            "disk_receive", "disk_commit", "disk_send", "launch", "vm_status", "vm_stop", "vm_start", "vm_end", "vm_suspend",
            "vm_resume",
            "migrate_out_start", "migrate_out_stream", "migrate_out_end", "migrate_in_start", "migrate_in_stream",
            "migrate_in_finish", "migrate_in_settle", "migrate_in_discard", "runtime_log"}
VM = "0123456789abcdef0123456789abcdef"


def test_the_service_offers_exactly_the_documented_operations_each_with_a_schema():
    assert set(HANDLERS) == set(OPERATIONS) == EXPECTED
    for name, schema in OPERATIONS.items():
        Draft202012Validator.check_schema(schema)
        assert schema["additionalProperties"] is False, name


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_no_argument_is_free_form(name):
    """Every string has a pattern or an enum (or is a PEM certificate, bounded), every integer a
    range, every array bounded items: nothing names a path, a command or an option."""
    def walk(schema, where):  # type: ignore[no-untyped-def]
        kind = schema.get("type")
        if kind == "string":
            assert "pattern" in schema or "enum" in schema or where.endswith("destination_certificate"), where
            assert "maxLength" in schema or "enum" in schema or "pattern" in schema, where
        if kind == "integer":
            assert ("minimum" in schema and "maximum" in schema) or "enum" in schema, where
        if kind == "array":
            assert "maxItems" in schema, where
            walk(schema["items"], where + "[]")
        for key, value in schema.get("properties", {}).items():
            walk(value, f"{where}.{key}")

    walk(OPERATIONS[name], name)
    assert not {"tcti", "path", "eventlog", "extra_args", "label", "argv"} & set(OPERATIONS[name]["properties"])


SAMPLES = [
    ("quote", {"nonce": "AAAA", "bank": "sha256", "pcrs": [0, 4]}),
    ("quote", {"nonce": "AAAA", "bank": "sha256", "pcrs": [0, 4], "eventlog": "/etc/shadow"}),
    ("quote", {"nonce": "AAAA", "bank": "md5", "pcrs": [0]}),
    ("quote", {"nonce": "AAAA", "bank": "sha256", "pcrs": [24]}),
    ("quote", {"nonce": "AAAA", "bank": "sha256", "pcrs": [1, 1]}),
    ("quote", {"nonce": "AAAA", "bank": "sha256", "pcrs": []}),
    ("quote", {"nonce": "A" * 200, "bank": "sha256", "pcrs": [0]}),
    ("quote", {"nonce": "AA!A", "bank": "sha256", "pcrs": [0]}),
    ("quote", {"nonce": "AAAA", "bank": "sha256", "pcrs": [True]}),
    ("quote", {"bank": "sha256", "pcrs": [0]}),
    ("nv_certify", {"index": 0x01C00002, "nonce": "AAAA"}),
    ("nv_certify", {"index": 0x01500001, "nonce": "AAAA"}),
    ("disk_state", {"vm_id": "../../etc/passwd"}),
    ("disk_state", {"vm_id": VM}),
    ("disk_receive", {"vm_id": VM, "offset": -1}),
    ("disk_send", {"vm_id": VM, "offset": 0, "size": 64 * 1024 * 1024}),
    ("launch", {"ticket": {"ticket": {}, "signature": "AAAA", "certificate": "AAAA"}}),
    ("launch", {"vm_id": VM, "name": "web", "wrapped_key": "AAAA", "sha256": "0" * 64, "memory_mib": 64, "vcpus": 1}),
    ("launch", {"ticket": {"ticket": {}, "signature": "AAAA", "certificate": "AAAA", "extra_args": ["-S"]}}),
    ("vm_stop", {"vm_id": VM, "action": "dump-guest-memory"}),
    ("vm_end", {"vm_id": VM, "action": "destroy"}),
    ("migrate_out_end", {"vm_id": VM, "commit": True}),
    ("migrate_in_settle", {"vm_id": VM, "resume": True, "ticket": {"ticket": {}, "signature": "", "certificate": ""}}),
    ("tk_check", {"ciphertext": "AAAA", "label": "tccdeploy-vm:" + VM}),
    ("identity", {"tcti": "swtpm:path=/tmp/evil.sock"}),
]


@pytest.mark.parametrize(("name", "value"), SAMPLES)
def test_the_validator_agrees_with_jsonschema(name, value):
    expected = not list(Draft202012Validator(OPERATIONS[name]).iter_errors(value))
    assert (not problems(OPERATIONS[name], value)) == expected


@pytest.mark.parametrize(("request_", "reason"), [
    ({"id": 1, "op": "command", "args": {"cmd": "id"}}, "tvmm.unknown-op"),
    ({"id": 1, "op": "file_state", "args": {"path": "/etc/shadow"}}, "tvmm.unknown-op"),
    ({"id": 1, "op": ["identity"]}, "tvmm.unknown-op"),
    ({"id": 1, "op": "identity", "args": {}, "become": "root"}, "tvmm.request"),
    ({"id": 1, "op": "identity", "args": {"tcti": "swtpm:path=/tmp/mine.sock"}}, "tvmm.args"),
    ({"id": 1, "op": "quote", "args": {"nonce": "AAAA", "bank": "sha256", "pcrs": [0], "eventlog": "/etc/shadow"}},
     "tvmm.args"),
    ({"id": 1, "op": "tk_check", "args": {"ciphertext": "AAAA", "label": "tccdeploy-vm:" + VM}}, "tvmm.args"),
    ({"id": 1, "op": "disk_state", "args": {"vm_id": "../../../etc"}}, "tvmm.args"),
    ({"id": 1, "op": "launch", "args": {"vm_id": VM, "name": "web", "wrapped_key": "AAAA", "sha256": "0" * 64,
                                        "memory_mib": 64, "vcpus": 1, "extra_args": ["-gdb", "tcp::1234"]}},
     "tvmm.args"),
    ({"id": 1, "op": "tk_create", "args": {"bank": "sha256", "pcrs": [0], "nonce": "AAAA",
                                           "tc_ca": "-----BEGIN CERTIFICATE-----\n$(reboot)\n-----END CERTIFICATE-----\n"}},
     "tvmm.args"),
    ({"id": 1, "op": "vm_control", "args": {"vm_id": VM, "action": "destroy"}}, "tvmm.unknown-op"),
    ({"id": 1, "op": "vm_start", "args": {"vm_id": VM, "action": "dump-guest-memory"}}, "tvmm.args"),
    ({"id": 1, "op": "migrate_out_end", "args": {"vm_id": VM, "commit": False}}, "tvmm.args"),
    ({"id": 1, "op": "identity", "args": []}, "tvmm.args"),
])
def test_a_request_outside_the_interface_is_refused_before_any_operation_runs(request_, reason, monkeypatch):
    ran = []
    monkeypatch.setattr("tccdeploy.tvmm.interface.HANDLERS",
                        {name: (lambda **kw: ran.append(kw) or {}) for name in OPERATIONS})
    monkeypatch.setattr("tccdeploy.tvmm.service.HANDLERS", {name: (lambda **kw: ran.append(kw) or {}) for name in OPERATIONS})
    answer = handle(request_)
    assert answer["ok"] is False and answer["error"]["reason"] == reason, answer
    assert not ran


def test_the_service_reads_its_tpm_and_folders_from_its_installation_only(tmp_path: Path):
    path = tmp_path / "config.json"
    path.write_text(json.dumps({"node": "n1", "tpm": "swtpm:path=/x", "state_dir": str(tmp_path), "eventlog": "/e"}))
    assert config.load(str(path)).tpm == "swtpm:path=/x"
    assert config.load(None).tpm == "device:/dev/tpmrm0"
    path.write_text(json.dumps({"node": "n1", "extra_args": ["-monitor"]}))
    with pytest.raises(config.ConfigError, match="unknown setting"):
        config.load(str(path))


def test_the_service_file_is_deterministic_and_holds_no_admin_operation():
    first, digest = service_bundle()
    service_bundle.cache_clear()
    again, same = service_bundle()
    assert first == again and digest == same
    names = zipfile.ZipFile(BytesIO(first)).namelist()
    assert "tccdeploy/tvmm/service.py" in names and "tccdeploy/node/protocol.py" in names
    assert not [n for n in names if n.startswith("tccdeploy/node/") and not n.endswith(("__init__.py", "protocol.py"))]
    helper = zipfile.ZipFile(BytesIO(helper_bundle()[0])).namelist()
    assert not [n for n in helper if "/tvmm/" in n]  # the engine's helper carries no TPM or VM code


def test_the_service_speaks_the_wire_and_names_what_it_runs(tmp_path: Path):
    data, digest = service_bundle()
    (tmp_path / "tccdeploy-tvmm.pyz").write_bytes(data)
    (tmp_path / "config.json").write_text(json.dumps({"node": "n9", "tpm": f"swtpm:path={tmp_path}/none",
                                                      "state_dir": str(tmp_path / "state"), "eventlog": "/none"}))
    requests = b'{"id": 1, "op": "command", "args": {"cmd": "id"}}\nnot json\n{"id": 2, "op": "identity"}\n'
    proc = subprocess.run([sys.executable, str(tmp_path / "tccdeploy-tvmm.pyz"), "serve", "--config",
                           str(tmp_path / "config.json")], input=requests, capture_output=True, timeout=60)
    lines = [json.loads(line) for line in proc.stdout.splitlines()]
    assert lines[0] == {"hello": "tccdeploy-tvmm", "protocol": 2, "node": "n9", "digest": digest}
    assert lines[1]["error"]["reason"] == "tvmm.unknown-op"
    assert lines[2]["error"]["type"] == "BadRequest"
    assert lines[3]["error"]["reason"] == "tvmm.tpm"  # its own TPM, which is not there
    usage = subprocess.run([sys.executable, str(tmp_path / "tccdeploy-tvmm.pyz"), "serve", "--tcti", "x"],
                           capture_output=True, text=True, timeout=60)
    assert usage.returncode == 2 and "usage: tccdeploy-tvmm" in usage.stderr
