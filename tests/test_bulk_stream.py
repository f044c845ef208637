"""Disk uploads through OpenSSH's client (engine/bulk.py): the same node protocol to the same
TVMM service, at OpenSSH's speed, pinned to the one host key the engine's own connection
verified. On the lab's real sshd and service; the argv checks are pure."""

from __future__ import annotations

import hashlib
import os
import secrets
import types

import paramiko
import pytest

from tccdeploy.engine import bulk
from tccdeploy.engine.helper import HelperError
from tccdeploy.engine.launch import upload_disk
from tccdeploy.engine.runner import Engine
from tccdeploy.lab.lab import Lab
from tccdeploy.manifest.loader import load_inventory


@pytest.fixture
def session(lab: Lab, tmp_path):  # type: ignore[no-untyped-def]
    engine = Engine(load_inventory(lab.inventory_dir).select("node1"), state=str(tmp_path / "engine"))
    one = engine.session(engine.hosts[0])
    one.tvmm("disk_state", {"vm_id": "00" * 16})  # the service's connection made, its host key verified
    yield one
    engine.close()


def blocks(data: bytes, size: int = 1 << 20):  # type: ignore[no-untyped-def]
    for at in range(0, len(data), size):
        yield data[at:at + size]


@pytest.mark.slow
def test_an_upload_goes_through_openssh_and_resumes_where_it_was_cut(session, tmp_path):
    data = os.urandom(5 * (1 << 20) + 12345)
    vm_id = secrets.token_hex(16)
    stream = bulk.service(session.service_connection)
    assert stream is not None
    try:
        stream.stream_to("disk_receive", blocks(data[:2 << 20]), {"vm_id": vm_id, "offset": 0}, timeout=60)
        assert isinstance(stream.channel, bulk.ProcessChannel)  # OpenSSH's client carried it, not paramiko
    finally:
        stream.close()
    assert session.tvmm("disk_state", {"vm_id": vm_id})["partial_size"] == 2 << 20
    local = tmp_path / "disk.qcow2"
    local.write_bytes(data)
    assert upload_disk(session, vm_id, str(local), hashlib.sha256(data).hexdigest())["changed"]  # resumed, checked


@pytest.mark.slow
def test_a_bulk_stream_goes_only_to_the_host_key_the_engine_verified(session, tmp_path):
    """A node presenting another key (a relay, a reinstalled host) gets nothing: OpenSSH's client
    is given the verified key alone, with strict checking."""
    verified = session.service_connection.host_key
    session.service_connection.host_key = paramiko.Ed25519Key.from_private_key_file(_other_key(tmp_path))
    vm_id = secrets.token_hex(16)
    try:
        stream = bulk.service(session.service_connection)
        assert stream is not None
        with pytest.raises(HelperError, match="Host key verification failed"):
            try:
                stream.stream_to("disk_receive", blocks(b"x" * 4096), {"vm_id": vm_id, "offset": 0}, timeout=30)
            finally:
                stream.close()
    finally:
        session.service_connection.host_key = verified
    assert session.tvmm("disk_state", {"vm_id": vm_id})["partial_size"] == 0


def _other_key(folder) -> str:  # type: ignore[no-untyped-def]
    """A fresh host key's private file, not the node's."""
    import subprocess

    path = os.path.join(folder, "other-host-key")
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", path], check=True)
    return path


def test_the_client_is_strict_pinned_and_carries_no_secret(tmp_path):
    key = paramiko.Ed25519Key.from_private_key_file(_other_key(tmp_path))
    target = types.SimpleNamespace(port=2222, timeout=7.5, key_file="/home/ops/.ssh/id_ed25519", user="tcctvmm",
                                   address="127.0.5.1", known_hosts_name="[127.0.5.1]:2222")
    connection = types.SimpleNamespace(target=target, host_key=key)
    (tmp_path / "pin").mkdir()
    pinned = bulk.pinned_known_hosts(connection, str(tmp_path / "pin"))  # type: ignore[arg-type]
    assert open(pinned).read() == f"[127.0.5.1]:2222 ssh-ed25519 {key.get_base64()}\n"
    assert os.stat(pinned).st_mode & 0o777 == 0o600
    argv = bulk.ssh_command("/usr/bin/ssh", connection, pinned)  # type: ignore[arg-type]
    text = " ".join(argv)
    for option in ("-F /dev/null", "StrictHostKeyChecking=yes", f"UserKnownHostsFile={pinned}",
                   "GlobalKnownHostsFile=/dev/null", "BatchMode=yes", "UpdateHostKeys=no", "-p 2222", "-l tcctvmm"):
        assert option in text, option
    assert argv[-3:] == ["--", "127.0.5.1", "tccdeploy-tvmm serve"]
    assert "PRIVATE" not in text and key.get_base64() not in text  # paths on the command line, never keys


def test_without_ssh_or_when_turned_off_the_stream_stays_on_paramiko(monkeypatch):
    connection = types.SimpleNamespace(host_key=object())
    monkeypatch.setenv("TCCDEPLOY_BULK_SSH", "0")
    assert bulk.service(connection) is None  # type: ignore[arg-type]
    monkeypatch.delenv("TCCDEPLOY_BULK_SSH")
    monkeypatch.setattr(bulk.shutil, "which", lambda name: None)
    assert bulk.service(connection) is None  # type: ignore[arg-type]
    monkeypatch.undo()
    assert bulk.service(types.SimpleNamespace(host_key=None)) is None  # type: ignore[arg-type]  (not verified yet)
