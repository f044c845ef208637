"""A clock moved to replay: the record that a customer's signed query was used is purged as it
ages; moving the TC's clock forward (so a purge runs), then back (so the query's signed time is
fresh again) must not make the used query new again (issue 15). The replay horizon only rises,
and a token that may have been purged is refused."""

from __future__ import annotations

import base64
import datetime
import time

import pytest

from tccdeploy.coordinator import keybroker, store
from tccdeploy.coordinator.keybroker import check_customer_query, sign_customer_query
from tccdeploy.coordinator.refusals import Refused
from tccdeploy.crypto.canonical import CUSTOMER_QUERY, signed_bytes


@pytest.fixture
def world(broker_world):
    return broker_world


def test_a_used_customer_query_stays_used_when_the_clock_goes_forward_and_back(world, monkeypatch):
    record = world.accepted("acme")
    query = sign_customer_query(world.keys["acme"], record["id"], "status")
    assert check_customer_query(world.tc.registry, record["id"], "status", query["time"], query["signature"])
    real = time.time

    def shift(seconds: float) -> None:
        for module in (store, keybroker):
            monkeypatch.setattr(module.time, "time", lambda: real() + seconds)

    shift(3 * 3600)  # forward: the next nonce issued purges old records
    world.tc.nonce("n0")
    shift(10)  # and back: the query's signed time is within the allowed skew again
    with pytest.raises(Refused) as info:
        check_customer_query(world.tc.registry, record["id"], "status", query["time"], query["signature"])
    assert info.value.reason == "query.replay-horizon"  # its record may be gone: refused, not trusted
    # Fail closed: until the clock passes the horizon again, no query is taken on a clock that went back.
    fresh = sign_customer_query(world.keys["acme"], record["id"], "status")
    with pytest.raises(Refused) as info:
        check_customer_query(world.tc.registry, record["id"], "status", fresh["time"], fresh["signature"])
    assert info.value.reason == "query.replay-horizon"
    # Once the clock is past the horizon again, queries signed then are taken.
    later = 3 * 3600 + 400
    shift(later)
    when = (datetime.datetime.now(datetime.UTC) + datetime.timedelta(seconds=later)).isoformat(timespec="seconds")
    signature = world.keys["acme"].sign(signed_bytes(CUSTOMER_QUERY, {"op": "status", "request": record["id"], "time": when}))
    assert check_customer_query(world.tc.registry, record["id"], "status", when, base64.b64encode(signature).decode())


def test_without_a_clock_jump_queries_work_and_a_replay_is_named(world):
    record = world.accepted("acme")
    query = sign_customer_query(world.keys["acme"], record["id"], "status")
    world.tc.nonce("n0")  # a purge with nothing old to purge
    assert check_customer_query(world.tc.registry, record["id"], "status", query["time"], query["signature"])
    with pytest.raises(Refused) as info:
        check_customer_query(world.tc.registry, record["id"], "status", query["time"], query["signature"])
    assert info.value.reason == "query.replayed"
