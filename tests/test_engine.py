"""The engine on the lab's real sshd nodes: reach, time out, refuse bad keys, ship the helper once."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tccdeploy.bundles import helper_bundle
from tccdeploy.engine.helper import RemoteError
from tccdeploy.engine.runner import Engine, exit_code
from tccdeploy.lab.lab import Lab
from tccdeploy.manifest.loader import load_inventory

pytestmark = pytest.mark.slow


def tcc(*args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "tccdeploy", *args], capture_output=True, text=True, timeout=timeout)


@pytest.fixture
def state(tmp_path: Path) -> str:
    return str(tmp_path / "state")


def test_ping_reaches_every_node_and_starts_the_helper(lab: Lab, state: str):
    proc = tcc("ping", "-i", lab.inventory_dir, "--state", state, "--json")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    results = json.loads(proc.stdout)
    assert sorted(r["name"] for r in results) == sorted(n.name for n in lab.nodes)
    assert {r["state"] for r in results} == {"ok"}
    assert all(r["result"]["ping"] == "pong" for r in results)


def test_text_output_is_ansible_style(lab: Lab, state: str):
    proc = tcc("run", "site1", "-i", lab.inventory_dir, "--state", state, "-a", "echo hello")
    assert proc.returncode == 0
    assert "node1 | CHANGED | rc=0 >>\nhello\n" in proc.stdout
    proc = tcc("run", "node1", "-i", lab.inventory_dir, "--state", state, "-a", "false")
    assert proc.returncode == 2 and "node1 | FAILED | rc=1 >>" in proc.stdout


def test_a_stopped_node_is_unreachable_exit_4_and_the_rest_succeed(lab: Lab, lab_node, state: str):
    node = lab_node("node3")
    lab.stop_ssh(node.name)
    proc = tcc("ping", "-i", lab.inventory_dir, "--state", state, "--json")
    assert proc.returncode == 4
    by_name = {r["name"]: r for r in json.loads(proc.stdout)}
    assert by_name["node3"]["state"] == "unreachable" and by_name["node3"]["reason"] == "refused"
    assert all(r["state"] == "ok" for name, r in by_name.items() if name != "node3")


def test_a_frozen_node_times_out_within_the_timeout_without_delaying_others(lab: Lab, lab_node, state: str):
    node = lab_node("node3")
    lab.freeze(node.name)
    start = time.monotonic()
    proc = tcc("ping", "-i", lab.inventory_dir, "--state", state, "--json", "-T", "2")
    elapsed = time.monotonic() - start
    assert proc.returncode == 4
    by_name = {r["name"]: r for r in json.loads(proc.stdout)}
    assert by_name["node3"]["state"] == "unreachable" and by_name["node3"]["reason"] == "timeout"
    assert by_name["node3"]["elapsed"] < 2 + 1.5
    assert max(r["elapsed"] for n, r in by_name.items() if n != "node3") < 2
    assert elapsed < 15


def _inventory_with_known_hosts(lab: Lab, tmp_path: Path, known_hosts: str) -> str:
    copy = tmp_path / "inventory"
    shutil.copytree(lab.inventory_dir, copy)
    group_vars = copy / "group_vars" / "all.yml"
    text = group_vars.read_text().replace(lab.known_hosts, known_hosts)
    group_vars.write_text(text)
    return str(copy)


def test_a_changed_host_key_is_refused_with_both_fingerprints(lab: Lab, tmp_path: Path, state: str):
    lines = Path(lab.known_hosts).read_text().splitlines()
    node1 = lab.node("node1")
    node2_key = next(line for line in lines if f"[{lab.node('node2').address}]" in line).split(" ", 1)[1]
    forged = [f"[{node1.address}]:{lab.ssh_port} {node2_key}" if f"[{node1.address}]" in line else line for line in lines]
    known = tmp_path / "known_hosts"
    known.write_text("\n".join(forged) + "\n")
    proc = tcc("ping", "node1", "-i", _inventory_with_known_hosts(lab, tmp_path, str(known)), "--state", state, "--json")
    assert proc.returncode == 4
    (result,) = json.loads(proc.stdout)
    assert result["reason"] == "host-key-changed"
    assert result["msg"].count("SHA256:") == 2


def test_an_unknown_host_key_is_refused_unless_trusted_explicitly(lab: Lab, tmp_path: Path, state: str):
    empty = tmp_path / "empty_known_hosts"
    empty.write_text("")
    inventory = _inventory_with_known_hosts(lab, tmp_path, str(empty))
    proc = tcc("ping", "node1", "-i", inventory, "--state", state, "--json")
    assert proc.returncode == 4 and json.loads(proc.stdout)[0]["reason"] == "host-key-unknown"
    proc = tcc("ping", "node1", "-i", inventory, "--state", state, "--json", "--trust-new-host-keys")
    assert proc.returncode == 0
    assert "trusting new host key" in proc.stderr
    recorded = Path(state, "known_hosts").read_text()
    assert recorded.startswith(f"[{lab.node('node1').address}]:{lab.ssh_port} ssh-ed25519 ")
    proc = tcc("ping", "node1", "-i", inventory, "--state", state, "--json")  # now known: no flag needed
    assert proc.returncode == 0


def _helper_files(lab: Lab, node) -> list[str]:
    home = Path(lab.node_dir(node, "home"))
    return sorted(p.name for p in home.glob("helper-*.pyz"))


def test_the_engines_ssh_connections_use_aes_gcm(lab: Lab, state: str):
    """AES-GCM where the host offers it (OpenSSH does): the migration and upload streams' speed."""
    with Engine(load_inventory(lab.inventory_dir).select("node4"), state=state) as engine:
        engine.run(lambda s: s.call("ping"))
        transport = engine.sessions["node4"].connection.transport
        assert (transport.local_cipher, transport.remote_cipher) == ("aes256-gcm@openssh.com",) * 2


def test_the_helper_is_uploaded_once_per_version_and_reused(lab: Lab, state: str):
    node = lab.node("node4")
    for path in Path(lab.node_dir(node, "home")).glob("helper-*"):
        path.unlink()
    hosts = load_inventory(lab.inventory_dir).select("node4")
    with Engine(hosts, state=state) as engine:
        engine.run(lambda s: s.call("ping"))
        assert engine.sessions["node4"].helper.uploaded
        pid = engine.run(lambda s: s.call("ping"))[0].data["pid"]
        assert engine.run(lambda s: s.call("ping"))[0].data["pid"] == pid  # one helper process for the run
    with Engine(hosts, state=state) as engine:
        engine.run(lambda s: s.call("ping"))
        assert not engine.sessions["node4"].helper.uploaded
    _, digest = helper_bundle()
    assert _helper_files(lab, node) == [f"helper-{digest}.pyz"]
    helper = Path(lab.node_dir(node, "home"), f"helper-{digest}.pyz")
    assert oct(helper.stat().st_mode & 0o777) == "0o600"
    assert oct(Path(lab.node_dir(node, "home")).stat().st_mode & 0o777) == "0o700"


def test_a_helper_file_that_does_not_match_its_digest_is_replaced(lab: Lab, state: str):
    node = lab.node("node4")
    _, digest = helper_bundle()
    hosts = load_inventory(lab.inventory_dir).select("node4")
    with Engine(hosts, state=state) as engine:
        engine.run(lambda s: s.call("ping"))
    helper = Path(lab.node_dir(node, "home"), f"helper-{digest}.pyz")
    data = helper.read_bytes()
    helper.write_bytes(data + b"\x00")  # still runs (zip), but is not what was shipped
    with Engine(hosts, state=state) as engine:
        result = engine.run(lambda s: s.call("ping"))[0]
        assert result.status == "ok"
        assert engine.sessions["node4"].helper.uploaded
    assert helper.read_bytes() == data


def test_remote_errors_come_back_structured_with_the_traceback(lab: Lab, state: str):
    hosts = load_inventory(lab.inventory_dir).select("node1")
    with Engine(hosts, state=state) as engine:
        session = engine.session(hosts[0])
        with pytest.raises(RemoteError) as info:
            session.call("command", {"cmd": 42})
        assert info.value.kind == "AttributeError" or info.value.kind == "TypeError"
        assert "Traceback" in info.value.traceback
        result = engine.run(lambda s: s.call("command", {"cmd": 42}))[0]
        assert result.status == "failed" and result.traceback
        assert exit_code([result]) == 2
    proc = tcc("run", "node1", "-i", lab.inventory_dir, "--state", state, "-a", "/no/such/binary")
    assert proc.returncode == 2 and "No such file or directory" in proc.stdout


def test_ctrl_c_stops_the_run_and_closes_connections(lab: Lab, state: str):
    before = _established_to(lab)  # another module's engine may still hold some
    proc = subprocess.Popen([sys.executable, "-m", "tccdeploy", "run", "all", "-i", lab.inventory_dir,
                             "--state", state, "-a", "sleep 30"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    time.sleep(2.0)
    proc.send_signal(signal.SIGINT)
    try:  # stopped at once, not when the nodes' commands end (a bound, far from both, not a timing)
        out, err = proc.communicate(timeout=20)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.communicate()
        raise AssertionError("Ctrl-C did not stop the run: it waited for the nodes' commands") from None
    assert proc.returncode == 99 and "User interrupted execution" in err
    assert _established_to(lab) == before


def _established_to(lab: Lab) -> int:
    """Established TCP connections to this lab's nodes' sshd, from /proc/net/tcp (state 01); not
    another lab's (a second test worker runs its own on the same port)."""
    addresses = {node.address for node in lab.nodes}
    count = 0
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        fields = line.split()
        remote, state = fields[2], fields[3]
        host, port = remote.split(":")
        if state == "01" and int(port, 16) == lab.ssh_port and \
                socket.inet_ntoa(bytes.fromhex(host)[::-1]) in addresses:
            count += 1
    return count


def test_connections_are_counted_while_a_run_holds_them(lab: Lab, state: str):
    hosts = load_inventory(lab.inventory_dir).select("site1")
    before = _established_to(lab)  # another module's engine may still hold some
    with Engine(hosts, state=state) as engine:
        engine.run(lambda s: s.call("ping"))
        assert _established_to(lab) == before + len(hosts)  # the check above can see connections
    deadline = time.monotonic() + 3
    while _established_to(lab) > before and time.monotonic() < deadline:
        time.sleep(0.05)
    assert _established_to(lab) == before


def test_inventory_command_matches_ansible_shape(lab: Lab):
    listing = json.loads(tcc("inventory", "-i", lab.inventory_dir, "--list").stdout)
    assert set(listing["all"]["children"]) == {"ungrouped", "site1", "site2", "outside"}
    host = json.loads(tcc("inventory", "-i", lab.inventory_dir, "--host", "node1").stdout)
    assert host["tcc_site"] == "site1" and host["ansible_host"] == lab.node("node1").address
    assert "@all:" in tcc("inventory", "-i", lab.inventory_dir, "--graph").stdout
    assert os.environ.get("TCCDEPLOY_INVENTORY") is None
