"""A hostile provider cuts a node's power right after the node spent a ticket, hoping the node
forgets it and takes the same ticket again after the reboot (a key released twice).

The service records a spent ticket before it unwraps the key (tvmm/tickets.py) with
atomic_write, which must be durable when it returns: the file is fsynced and then its directory,
or the rename can be lost with the power. A real-boot node showed it (tests/adversary/
test_realboot.py): killed seconds after its enrollment, its state disk held only the temporary
file. No test here can cut a disk's power in-process, so this one checks the order of the
fsyncs the record's write makes, and the real-boot module cuts a real guest's power."""

from __future__ import annotations

import json
import time

import pytest

from tccdeploy.tvmm import config, tickets


@pytest.fixture
def service_state(tmp_path):
    settings = tmp_path / "config.json"
    settings.write_text(json.dumps({"node": "node1", "state_dir": str(tmp_path / "state")}))
    previous = config._current
    config.use(config.load(str(settings)))
    yield tmp_path / "state"
    config._current = previous


def test_a_spent_tickets_record_is_on_disk_directory_and_all_before_the_key_is_unwrapped(service_state, fsyncs):
    synced = fsyncs
    tickets.spend({"id": "ticket-1", "expires": int(time.time()) + 60})
    record = service_state / tickets.USED_FILE
    assert json.loads(record.read_text())["used"] == {"ticket-1": pytest.approx(time.time() + 60, abs=5)}
    # the temporary file's contents first, then the directory that holds the rename
    assert len(synced) == 2 and synced[0].startswith(str(record) + ".") and synced[1] == str(service_state)


def test_a_settled_migrations_record_stays_gone_after_a_power_cut(service_state, fsyncs):
    """The provider cuts the power right after a node settled its end of a migration: the
    record's removal is in its directory on disk, or the VM would wait for a settlement again
    after the reboot (a real-boot node showed it: its enforcement round then met a migration
    already committed)."""
    from tccdeploy.tvmm import vm

    vm_id = "ab" * 16
    directory = vm.vm_dir(vm_id, create=True)
    vm.mark_migration(vm_id, "7", "destination")
    assert vm.pending_migration(vm_id) == {"migration": "7", "role": "destination", "was_running": True}
    synced = fsyncs
    synced.clear()  # the record's own write above
    vm.clear_migration(vm_id)
    assert vm.pending_migration(vm_id) is None and synced == [directory]


def test_a_removed_vm_folder_stays_gone_after_a_power_cut(tmp_path, fsyncs):
    """A VM destroyed or moved away: its folder (encrypted disk, wrapped key) must not be back
    after a reboot; and removing what is gone already is no error (a retried settlement)."""
    from tccdeploy.crypto.files import durable_remove

    folder = tmp_path / "vms" / "vm-1"
    folder.mkdir(parents=True)
    (folder / "disk.qcow2").write_bytes(b"x")
    synced = fsyncs
    durable_remove(str(folder))
    assert not folder.exists() and synced == [str(tmp_path / "vms")]
    durable_remove(str(folder))
    durable_remove(str(tmp_path / "vms" / "no-such-file"))
    assert synced == [str(tmp_path / "vms")] * 3
