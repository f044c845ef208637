"""Suspension exports a VM's state to the node's disk: a hostile engine would resume it twice (two
copies, or a rollback of the VM's state), or on a node the TC does not trust. The state is
ciphertext under a Ksus only the TC holds; the TC gives one resume, to one trusted node; the
node's service resumes a suspension once, even from a copy of the state written back after
the VM ran. Each refusal named."""

from __future__ import annotations

import pytest

from tccdeploy.engine.helper import RemoteError
from tccdeploy.engine.migrate import copy_disk

from ..labvms import kill_vm
from .conftest import World
from .test_tickets_lab import _running

pytestmark = pytest.mark.slow


def refused(call, reason: str) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(RemoteError) as info:
        call()
    assert info.value.reason == reason, info.value


def tc_refused(response, reason: str) -> None:  # type: ignore[no-untyped-def]
    assert response.status_code in (403, 409) and response.json()["error"] == reason, response.text


def _read_state(session, vm_id: str) -> bytes:  # type: ignore[no-untyped-def]
    return b"".join(session.tvmm_stream_from("disk_send", {"vm_id": vm_id, "offset": 0, "what": "state"}))


def test_a_suspended_vm_resumes_once_on_one_trusted_node(world: World):
    vm_id, _, _ = _running(world, "sleeper", "node1")
    node1 = world.session("node1")
    try:
        begun = world.post("/v1/suspensions", {"vm": "sleeper"})
        assert begun.status_code == 200, begun.text
        suspension = begun.json()["suspension"]
        tc_refused(world.post("/v1/suspensions", {"vm": "sleeper"}), "suspend.open")
        saved = node1.tvmm("vm_suspend", {"ticket": begun.json()["ticket"]}, timeout=300)
        assert saved["status"] == "suspended" and world.qemus(vm_id) == []
        refused(lambda: node1.tvmm("vm_suspend", {"ticket": begun.json()["ticket"]}), "ticket.replayed")
        # The engine reports the suspension with a quote it had made for the ticket, not the save's.
        quoted = node1.tvmm("runtime_log", {"runtime_pcr": 15, "ticket": begun.json()["ticket"]["ticket"]["id"]})
        quoted["evidence"]["events"] = quoted["evidence"]["events"][:-1]  # as if nothing was saved
        tc_refused(world.post(f"/v1/suspensions/{suspension}/end", {"saved": True, "evidence": quoted["evidence"]}),
                   "runtime.log")
        recorded = world.post(f"/v1/suspensions/{suspension}/end", {"saved": True, "evidence": saved["evidence"]})
        assert recorded.status_code == 200 and world.get_vm("sleeper")["state"] == "suspended", recorded.text
        copy = _read_state(node1, vm_id)  # ciphertext: the engine may keep it, it cannot read it
        # Its folder (disk, saved state, no QEMU, no key) looked like an unused copied disk: the
        # engine's discard dropped the VM the TC holds suspended (found in review).
        refused(lambda: node1.tvmm("migrate_in_discard", {"vm_id": vm_id}), "tvmm.not-migrating")

        # No resume on a node the TC does not trust (a hostile engine skips the attestation).
        tc_refused(world.post("/v1/resumes", {"vm": "sleeper", "node": "outside1"}), "release.not-admitted")

        world.ready("node3")  # trusted now: what refuses it below is the suspension's one node
        first = world.post("/v1/resumes", {"vm": "sleeper"})
        assert first.status_code == 200 and first.json()["node"] == "node1", first.text
        tc_refused(world.post("/v1/resumes", {"vm": "sleeper", "node": "node3"}), "suspend.resumed")  # not elsewhere
        ran = node1.tvmm("vm_resume", {"ticket": first.json()["ticket"]}, timeout=300)
        assert ran["running"] and len(world.qemus(vm_id)) == 1
        refused(lambda: node1.tvmm("vm_resume", {"ticket": first.json()["ticket"]}), "ticket.replayed")

        # The provider pulls the plug on the resumed VM, writes the saved state back and has the TC
        # issue the same node a retry ticket: the service resumed this suspension once already.
        kill_vm_keep_disk(world, vm_id)
        node1.tvmm_stream_to("disk_receive", [copy], {"vm_id": vm_id, "offset": 0, "what": "state"})
        node1.tvmm("disk_commit", {"vm_id": vm_id, "sha256": saved["state_sha256"], "what": "state"})
        retry = world.post("/v1/resumes", {"vm": "sleeper"})
        assert retry.status_code == 200, retry.text
        refused(lambda: node1.tvmm("vm_resume", {"ticket": retry.json()["ticket"]}), "tvmm.resumed")
        assert world.qemus(vm_id) == []

        done = world.post(f"/v1/suspensions/{suspension}/resumed", {"evidence": ran["evidence"]})
        assert done.status_code == 200 and world.get_vm("sleeper")["state"] == "running", done.text
        tc_refused(world.post("/v1/resumes", {"vm": "sleeper"}), "suspend.not-suspended")
    finally:
        kill_vm(world.lab, "node1", vm_id)
        vm = world.get_vm("sleeper")
        if vm is not None and vm["state"] != "resuming":
            world.destroy("sleeper")


def kill_vm_keep_disk(world: World, vm_id: str) -> None:
    """The node's root kills the VM's QEMU (a power cut of that VM); its folder stays."""
    import os
    import signal

    path = f"{world.lab.node_dir(world.lab.node('node1'), 'tvmm')}/vms/{vm_id}/qemu.pid"
    with open(path) as fh:
        os.kill(int(fh.read().strip()), signal.SIGKILL)
    os.unlink(path)


def test_a_suspended_vm_resumes_on_another_trusted_node_with_its_disk_and_state(world: World):
    """The CLI's way: suspend on node2, resume on node4 (the disk and the saved state copied there as
    ciphertext); the VM runs there once, and node2 keeps no copy that could run."""
    vm_id, _, _ = _running(world, "traveller", "node2")
    inventory = ["-i", world.lab.inventory_dir]
    try:
        suspended = world.engine_cmd("vm", "suspend", "traveller", *inventory)
        assert suspended.returncode == 0 and "suspended on node2" in suspended.stdout, suspended.stdout + suspended.stderr
        assert world.qemus(vm_id) == []
        untrusted = world.engine_cmd("vm", "resume", "traveller", "--on", "outside1", *inventory)
        assert untrusted.returncode == 2 and "resume.node-untrusted" in untrusted.stderr, untrusted.stderr
        world.ready("node4")
        resumed = world.engine_cmd("vm", "resume", "traveller", "--on", "node4", *inventory)
        assert resumed.returncode == 0 and "resumed on node4" in resumed.stdout, resumed.stdout + resumed.stderr
        vm = world.get_vm("traveller")
        assert vm["state"] == "running" and vm["node"] == "node4" and len(world.qemus(vm_id)) == 1
        again = world.engine_cmd("vm", "resume", "traveller", *inventory)
        assert again.returncode != 0 and "not suspended" in again.stdout + again.stderr
    finally:
        if world.get_vm("traveller") is not None:
            world.destroy("traveller")
        kill_vm(world.lab, "node2", vm_id)
    assert world.qemus(vm_id) == []


def test_a_saved_state_the_engine_rewrote_is_not_resumed(world: World):
    """The engine carries a suspended VM's state to the node that resumes it, so it chooses the
    bytes that node receives: one byte of the ciphertext changed, or a stream of its own making.
    The resume ticket carries the digest the suspending node's TPM evidence gave the TC, so the
    service refuses such a state before it spends the ticket or starts anything; carried as it
    was, the same ticket resumes the VM. In place, on the node that saved it, the state cannot be
    rewritten at all."""
    vm_id, _, _ = _running(world, "forged", "node1")
    node1 = world.session("node1")
    try:
        begun = world.post("/v1/suspensions", {"vm": "forged"})
        assert begun.status_code == 200, begun.text
        saved = node1.tvmm("vm_suspend", {"ticket": begun.json()["ticket"]}, timeout=300)
        ended = world.post(f"/v1/suspensions/{begun.json()['suspension']}/end",
                           {"saved": True, "evidence": saved["evidence"]})
        assert ended.status_code == 200, ended.text
        refused(lambda: node1.tvmm_stream_to("disk_receive", [b"x"], {"vm_id": vm_id, "offset": 0, "what": "state"}),
                "tvmm.disk-complete")
        genuine = _read_state(node1, vm_id)
        world.ready("node3")
        resume = world.post("/v1/resumes", {"vm": "forged", "node": "node3"})
        assert resume.status_code == 200 and resume.json()["node"] == "node3", resume.text
        node3 = world.session("node3")
        flipped = bytearray(genuine)
        flipped[len(flipped) // 2] ^= 0x01
        for forged in (bytes(flipped), b"QEVM\x00\x00\x00\x03" + bytes(4096)):  # altered; the engine's own stream
            copy_disk(node1, node3, vm_id, saved_disk_sha(world, "forged"))
            _write_state(node3, vm_id, forged)
            refused(lambda: node3.tvmm("vm_resume", {"ticket": resume.json()["ticket"]}, timeout=300), "tvmm.no-state")
            assert world.qemus(vm_id) == []
            node3.tvmm("migrate_in_discard", {"vm_id": vm_id})  # the unused copy goes; the engine tries again
        copy_disk(node1, node3, vm_id, saved_disk_sha(world, "forged"))
        _write_state(node3, vm_id, genuine)
        ran = node3.tvmm("vm_resume", {"ticket": resume.json()["ticket"]}, timeout=300)  # not spent by the refusals
        assert ran["running"] and len(world.qemus(vm_id)) == 1
        done = world.post(f"/v1/suspensions/{begun.json()['suspension']}/resumed", {"evidence": ran["evidence"]})
        assert done.status_code == 200, done.text
    finally:
        kill_vm(world.lab, "node1", vm_id)
        kill_vm(world.lab, "node3", vm_id)
        vm = world.get_vm("forged")
        if vm is not None and vm["state"] != "resuming":
            world.destroy("forged")


def saved_disk_sha(world: World, name: str) -> str:
    return str(world.get_vm(name)["image_sha256"])


def _write_state(session, vm_id: str, data: bytes) -> None:  # type: ignore[no-untyped-def]
    """Give the node data as the VM's saved state, as the interface lets the engine."""
    import hashlib

    session.tvmm_stream_to("disk_receive", [data[at:at + (1 << 20)] for at in range(0, len(data), 1 << 20)],
                           {"vm_id": vm_id, "offset": 0, "what": "state"})
    session.tvmm("disk_commit", {"vm_id": vm_id, "sha256": hashlib.sha256(data).hexdigest(), "what": "state"})
