"""The node service's runtime event list (tvmm/runtime.py) against the PCR it mirrors.

The list's logic is checked here with the four TPM calls it makes played by a software PCR (the
real TPM runs in the lab tests, which launch, migrate, suspend and end VMs through it)."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest

from tccdeploy.crypto.runtime import replay
from tccdeploy.tvmm import config, runtime

PCR = 15


class SoftwarePcr:
    """resetCount, one PCR, extend and read, and a quote that returns the value it covers."""

    def __init__(self) -> None:
        self.reset, self.value = 1, bytes(32)

    def extend(self, pcr: int, digest: bytes) -> None:
        self.value = hashlib.sha256(self.value + digest).digest()

    def restart(self) -> None:
        """TPM Restart (Shutdown(STATE), Startup(CLEAR): a resume from hibernation): the PCRs clear,
        resetCount stays."""
        self.value = bytes(32)


@pytest.fixture
def tpm(tmp_path, monkeypatch):  # type: ignore[no-untyped-def]
    previous = config._current
    config.use(config.Config(node="node1", tpm="none", state_dir=str(tmp_path), eventlog=""))
    pcr = SoftwarePcr()
    monkeypatch.setattr(runtime, "reset_count", lambda: pcr.reset)
    monkeypatch.setattr(runtime, "runtime_value", lambda index: pcr.value)
    monkeypatch.setattr(runtime, "extend_runtime", pcr.extend)
    monkeypatch.setattr(runtime, "runtime_quote", lambda index, qualifying: (b"attest", b"signature", pcr.value))
    yield pcr
    config._current = previous


def ticket(n: int) -> dict:  # type: ignore[type-arg]
    return {"id": f"t{n}", "tk_name": "000b" + "ab" * 32, "runtime_pcr": PCR}


def test_each_event_names_its_ticket_and_tk_and_the_list_replays_to_the_pcr(tpm):
    evidence = runtime.record(ticket(1), {"event": "launched", "vm_id": "a" * 32})
    assert evidence["events"] == [{"event": "launched", "vm_id": "a" * 32, "ticket": "t1", "tk": "000b" + "ab" * 32}]
    assert replay(evidence["events"]) == tpm.value == bytes.fromhex(evidence["value"])


def test_after_a_tpm_restart_the_list_starts_over_and_replays_again(tpm):
    """The list was kept by resetCount alone: after a Restart the PCR was clear and the old list
    kept, so every event's evidence from then on failed to replay at the TC (found in review)."""
    runtime.record(ticket(1), {"event": "launched", "vm_id": "a" * 32})
    tpm.restart()
    assert runtime.evidence(PCR, "t1")["events"] == []  # nothing since the restart
    evidence = runtime.record(ticket(2), {"event": "launched", "vm_id": "b" * 32})
    assert [e["ticket"] for e in evidence["events"]] == ["t2"]
    assert replay(evidence["events"]) == tpm.value


def test_an_event_written_but_not_extended_is_dropped_by_the_next(tpm):
    """A crash between the list's write and the PCR's extend leaves one event too many: the next
    event drops it, so the list replays again."""
    runtime.record(ticket(1), {"event": "launched", "vm_id": "a" * 32})
    log = Path(config.current().path(runtime.LOG_FILE))
    stored = json.loads(log.read_text())
    stored["events"].append({"event": "destroyed", "vm_id": "a" * 32, "ticket": "t9", "tk": "x"})
    log.write_text(json.dumps(stored))
    evidence = runtime.record(ticket(2), {"event": "launched", "vm_id": "b" * 32})
    assert [e["ticket"] for e in evidence["events"]] == ["t1", "t2"] and replay(evidence["events"]) == tpm.value
