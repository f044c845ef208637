"""The security team hears of what a hostile engine tried, whatever the engine does.

Webhook events come from the TC's own audit log, so the provider's engine (a valid engine
certificate, calling the API as it likes) cannot add, hold back or reorder them, and has no
route to the webhooks themselves: they are the TC operator's, set on the TC's machine. Here an
engine tries to enroll a TPM the TC refuses; the refusal reaches a receiver that drops and
refuses the first deliveries, signed with the webhook's secret, and one that was pending when
the TC stopped arrives after it starts again."""

from __future__ import annotations

import json
import os
import subprocess
import time

from tccdeploy.coordinator import webhooks

from ..conftest import REPO
from ..helpers_apply import BIN
from ..tcservice import Service
from ..webhookkit import Receiver

BOGUS = {"node": "rogue", "ek_certificate": "AAAA", "ek_public": "", "ak_public": "", "ssh_host_key": "SHA256:x",
         "address": "127.0.1.7"}


def test_a_refused_engine_action_reaches_the_security_team_through_drops_and_a_restart(tmp_path, monkeypatch):
    monkeypatch.setenv("TCCDEPLOY_WEBHOOK_BACKOFF", "0.1")
    receiver = Receiver(drop=1, fail=1)
    service = Service(tmp_path / "tc", str(REPO / "examples"))
    env = dict(os.environ, TCCDEPLOY_STATE=str(tmp_path / "tc"))
    try:
        added = subprocess.run([str(BIN / "tccdeploy"), "tc", "webhooks", "add", "soc", receiver.url,
                                "--secret-file", str(tmp_path / "soc.secret"), "--events", "refused"],
                               env=env, capture_output=True, text=True, timeout=60)
        assert added.returncode == 0, added.stderr
        secret = (tmp_path / "soc.secret").read_text().strip()
        with service.client() as engine:
            for method in ("GET", "POST", "DELETE"):  # no route: webhooks are not the engine's
                assert engine.request(method, "/v1/webhooks").status_code in (404, 405)
            refused = engine.post("/v1/enrollments", json=BOGUS)
            assert refused.status_code == 403
        (event,) = receiver.wait(1)
        assert event["type"] == "dev.tccdeploy.refused" and event["subject"] == "rogue"
        assert event["data"]["kind"] == "enrollment.refused" and event["data"]["reason"] == refused.json()["error"]
        assert receiver.attempts == 3  # dropped, refused, then taken
        headers, body = receiver.accepted[0]
        assert webhooks.verify(secret, headers, body)

        receiver.fail = 10_000  # the receiver is down: the next event waits in the registry
        with service.client() as engine:
            assert engine.post("/v1/enrollments", json=dict(BOGUS, node="rogue2")).status_code == 403
        deadline = time.monotonic() + 20
        while receiver.attempts < 4 and time.monotonic() < deadline:  # it tried, and the receiver said no
            time.sleep(0.05)
        service.stop()
        status = json.loads(subprocess.run([str(BIN / "tccdeploy"), "tc", "webhooks", "status", "--json"], env=env,
                                           capture_output=True, text=True, timeout=60).stdout)
        assert status[0]["pending"] == 1 and status[0]["last_error"] == "HTTP 503"
        receiver.fail = 0
        receiver.attempts = 0
        service = Service(tmp_path / "tc", str(REPO / "examples"), setup=False)
        events = receiver.wait(2, timeout=10)  # at once: its own stopped process's lease is taken back
        assert [e["subject"] for e in events] == ["rogue", "rogue2"]
        assert all(webhooks.verify(secret, h, b) for h, b in receiver.accepted)
    finally:
        service.stop()
        receiver.close()
