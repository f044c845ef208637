"""The node's split: the engine's logins reach the TVMM service's protocol and nothing behind it.

A hostile engine has the admin login on every node (where its helper runs any command) and the
TVMM user's key, which runs only the booted service. With a key the TC released to a node in
hand, it tries to unwrap it through the admin login (the TPM, the service's state, the service's
own code run as admin) and through every service operation; it tries to reach QEMU's QMP socket,
to add QEMU options, to run something else as the TVMM user, and to change the service on the
node. Each fails with its named reason and no key or memory comes out.
"""

from __future__ import annotations

import base64
import json
import subprocess
from pathlib import Path

import pytest

from tccdeploy.crypto import ticket as tickets
from tccdeploy.engine.helper import RemoteError
from tccdeploy.lab.lab import SERVICE_FILE, TVMM_USER

from ..labvms import kill_vm
from .conftest import World, read_json

pytestmark = pytest.mark.slow


def admin(world: World, node: str, *argv: str) -> dict:
    """Run argv on node as its admin login, through the engine's own helper."""
    host = next(h for h in world.engine.hosts if h.name == node)
    return world.engine.session(host).call("command", {"cmd": list(argv), "timeout": 60})


def admin_python(world: World, node: str, code: str) -> dict:
    return admin(world, node, world.lab.meta["python"], "-c", code)


def _released(world: World, name: str, node: str) -> tuple[str, dict, Path]:
    """acme's image, submitted, and its key released to node by the TC: (vm_id, launch ticket, bundle)."""
    bundle = world.seal("acme", name)
    submitted = world.submit("acme", world.sign("acme", name, bundle))
    assert submitted.returncode == 0, submitted.stderr
    request_id = json.loads(submitted.stdout)["id"]
    world.ready(node)  # a fresh verdict, as the release needs
    response = world.post(f"/v1/requests/{request_id}/release", {"node": node})
    assert response.status_code == 200, response.text
    return read_json(bundle / "descriptor.json")["descriptor"]["vm_id"], response.json()["ticket"], bundle


def test_the_admin_login_reaches_neither_the_tpm_nor_the_services_state(world: World):
    node = world.lab.node("node1")
    sock = world.lab.tpm_socket(node)
    private = world.lab.node_dir(node, "tvmm")
    opened = admin_python(world, "node1", f"import socket; s = socket.socket(socket.AF_UNIX); s.connect({sock!r})")
    assert opened["rc"] != 0 and "PermissionError" in opened["stderr"]
    listed = admin(world, "node1", "ls", private)
    assert listed["rc"] != 0 and "Permission denied" in listed["stderr"]
    tpm = admin(world, "node1", "tpm2_getrandom", "-T", f"swtpm:path={sock}", "8")
    assert tpm["rc"] != 0
    # The installed service is root's: the admin login cannot change what the TVMM user runs.
    service = world.lab.service_dir(node, SERVICE_FILE)
    write = admin_python(world, "node1", f"open({service!r}, 'ab').write(b'x')")
    assert write["rc"] != 0 and "PermissionError" in write["stderr"]


def test_a_released_key_cannot_be_unwrapped_through_the_admin_login_or_any_operation(world: World):
    vm_id, ticket, _ = _released(world, "unwrap", "node1")
    wrapped = ticket["ticket"]["kvm"]
    label = tickets.label("launch", "kvm", vm_id, ticket["ticket"]["customer"], ticket["ticket"]["id"])
    node = world.lab.node("node1")
    # The service's own code, run as the admin login against the node's TPM and state: refused by
    # the operating system before the TPM is asked anything.
    code = ("import base64\nfrom tccdeploy.tvmm import config, tpm\n"
            f"config.use(config.Config(node='node1', tpm={world.lab.tcti(node)!r}, "
            f"state_dir={world.lab.node_dir(node, 'tvmm')!r}, eventlog=''))\n"
            f"print(tpm.tk_decrypt(base64.b64decode({wrapped!r}), {label!r}).hex())")
    attempt = admin_python(world, "node1", code)
    assert attempt["rc"] != 0 and ("no trusted key" in attempt["stderr"] or "Permission" in attempt["stderr"])
    assert attempt["stdout"] == ""
    session = world.session("node1")
    # tk_check opens only the TC's admission challenges (its label is fixed): the TPM refuses.
    with pytest.raises(RemoteError) as check:
        session.tvmm("tk_check", {"ciphertext": wrapped})
    assert check.value.reason == "tvmm.tk-refused"
    with pytest.raises(RemoteError) as labelled:
        session.tvmm("tk_check", {"ciphertext": wrapped, "label": label.decode()})
    assert labelled.value.reason == "tvmm.args"
    # The key in another ticket: the engine cannot sign one (altered, the TC's signature fails).
    other = "f" * 32
    forged = json.loads(json.dumps(ticket))
    forged["ticket"]["vm_id"] = other
    with pytest.raises(RemoteError) as relabelled:
        session.tvmm("launch", {"ticket": forged})
    assert relabelled.value.reason == "ticket.signature"
    assert world.qemus(other) == [] and world.qemus(vm_id) == []


def test_qemu_options_and_free_form_arguments_are_refused(world: World):
    session = world.session("node2")
    vm_id = "e" * 32
    base = {"vm_id": vm_id, "name": "web", "wrapped_key": "AAAA", "sha256": "0" * 64, "memory_mib": 64, "vcpus": 1}
    attempts = [
        ("launch", base | {"extra_args": ["-monitor", "tcp:127.0.0.1:4444,server,nowait"]}),
        ("launch", base | {"name": "web,debug-threads=on -gdb tcp::1234"}),
        ("migrate_in_start", base | {"wrapped_kmig": "AAAA", "extra_args": ["-object", "memory-backend-file"]}),
        ("quote", {"nonce": "AAAA", "bank": "sha256", "pcrs": [0], "eventlog": f"{world.lab.node_dir(world.lab.node('node2'), 'tvmm')}/tk.json"}),
        ("identity", {"tcti": "swtpm:path=/tmp/engine-controlled.sock"}),
        ("vm_stop", {"vm_id": vm_id, "action": "dump-guest-memory"}),
        ("vm_end", {"ticket": {}, "vm_id": vm_id}),
        ("disk_state", {"vm_id": "../../service"}),
    ]
    for op, args in attempts:
        with pytest.raises(RemoteError) as info:
            session.tvmm(op, args)
        assert info.value.reason == "tvmm.args", (op, info.value)
    for op in ("command", "file_state", "qmp", "human-monitor-command"):
        with pytest.raises(RemoteError) as info:
            session.tvmm(op, {})
        assert info.value.reason == "tvmm.unknown-op"
    assert world.qemus(vm_id) == []


def test_qmp_is_out_of_the_admin_logins_reach(world: World):
    vm_id, ticket, bundle = _released(world, "qmp", "node3")
    host = next(h for h in world.engine.hosts if h.name == "node3")
    from tccdeploy.engine.launch import upload_disk

    session = world.session("node3")
    sha256 = read_json(bundle / "descriptor.json")["descriptor"]["disk"]["sha256"]
    upload_disk(session, vm_id, str(bundle / "disk.qcow2"), sha256)
    started = session.tvmm("launch", {"ticket": ticket})
    try:
        assert started["running"] and host is not None
        qmp = f"{world.lab.node_dir(world.lab.node('node3'), 'tvmm')}/vms/{vm_id}/qmp.sock"
        assert Path(qmp).exists()  # (root sees it; the admin login must not)
        opened = admin_python(world, "node3", f"import socket; s = socket.socket(socket.AF_UNIX); s.connect({qmp!r})")
        assert opened["rc"] != 0 and "PermissionError" in opened["stderr"]
        # QEMU runs as the TVMM user: the admin login cannot ptrace it or read its memory either.
        pid = world.qemus(vm_id)[0]
        peek = admin_python(world, "node3", f"open('/proc/{pid}/mem', 'rb')")
        assert peek["rc"] != 0 and "PermissionError" in peek["stderr"]
    finally:
        kill_vm(world.lab, "node3", vm_id)  # (never recorded by the TC: the lab's root cleans up)
    assert world.qemus(vm_id) == []


def test_the_tvmm_login_runs_the_booted_service_whatever_is_asked(world: World):
    """sshd's forced command: a shell, another command or SFTP as the TVMM user all get the service."""
    node = world.lab.node("node4")
    ssh = ["ssh", "-i", world.lab.ssh_key, "-o", f"UserKnownHostsFile={world.lab.known_hosts}",
           "-o", "StrictHostKeyChecking=yes", "-o", "BatchMode=yes", "-p", str(world.lab.ssh_port),
           f"{TVMM_USER}@{node.address}"]
    for command in ("cat /etc/shadow", "sh -i", "python3 -c 'print(1)'"):
        proc = subprocess.run([*ssh, command], input=b"", capture_output=True, timeout=60)
        hello = json.loads(proc.stdout.splitlines()[0])
        assert hello["hello"] == "tccdeploy-tvmm" and hello["node"] == "node4"
    forward = subprocess.run([*ssh, "-W", f"{node.address}:{world.lab.ssh_port}"], input=b"", capture_output=True,
                             timeout=60)
    assert forward.returncode != 0 and b"SSH-2.0" not in forward.stdout  # restrict: no forwarding either
    digest = json.loads(subprocess.run([*ssh, "x"], input=b"", capture_output=True, timeout=60).stdout.splitlines()[0])["digest"]
    installed = Path(world.lab.service_dir(node, SERVICE_FILE)).read_bytes()
    import hashlib

    assert digest == hashlib.sha256(installed).hexdigest()


def test_a_changed_service_is_a_changed_boot_and_is_not_admitted(world: World):
    """The provider replaces the service in the node's boot directory: the next boot measures it,
    the TC no longer recognises the build, and the trusted key made for the old boot is dead."""
    node = world.lab.node("node4")
    boot = Path(world.lab.boot_dir(node)) / node.build / "tvmm-service"
    original = boot.read_bytes()
    try:
        patched = admin_python(world, "node4", f"open({str(boot)!r}, 'ab').write(b'# backdoor')")
        assert patched["rc"] == 0, patched["stderr"]  # the admin may edit what the next boot loads...
        world.lab.reboot("node4", next_boot=True)
        result = world.engine_cmd("attest", "node4", "-i", world.lab.inventory_dir, "--json")
        assert result.returncode != 0
        assert "build.unknown" in result.stdout, result.stdout  # ...and that boot is not trusted
        assert world.node_state("node4") == "quarantined"
        with pytest.raises(RemoteError) as info:  # the changed service cannot use the old TK either
            world.session("node4").tvmm("tk_check", {"ciphertext": base64.b64encode(bytes(256)).decode()})
        assert info.value.reason == "tvmm.tk-refused"
    finally:
        boot.write_bytes(original)
        world.restore("node4")
