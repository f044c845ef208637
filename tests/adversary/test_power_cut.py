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
import os
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


def test_a_spent_tickets_record_is_on_disk_directory_and_all_before_the_key_is_unwrapped(service_state, monkeypatch):
    synced: list[str] = []
    real = os.fsync

    def fsync(fd: int) -> None:
        synced.append(os.readlink(f"/proc/self/fd/{fd}"))
        real(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    tickets.spend({"id": "ticket-1", "expires": int(time.time()) + 60})
    record = service_state / tickets.USED_FILE
    assert json.loads(record.read_text()) == {"ticket-1": pytest.approx(time.time() + 60, abs=5)}
    # the temporary file's contents first, then the directory that holds the rename
    assert len(synced) == 2 and synced[0].startswith(str(record) + ".") and synced[1] == str(service_state)
