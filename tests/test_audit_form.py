"""The audit log nobody can poison (issue 15): whatever a request carries into an entry (a number
or a list where a VM id belongs, lone surrogates, NUL, huge integers, NaN, odd keys), what is
hashed is exactly what is stored and read back, so `audit verify` stays ok; refused input is
kept as a fingerprint, never as data."""

from __future__ import annotations

import math

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tccdeploy.coordinator import audit, auditform

from .brokerkit import World

JSONISH = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=True, allow_infinity=True) | st.text(),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4)
    | st.tuples(inner, inner),
    max_leaves=12)


def test_the_poisoning_request_of_issue_15_leaves_the_chain_intact(tmp_path):
    """A refusal recorded with a VM id that is a number, a list, a lone surrogate, NUL or 2**70:
    each is stored as what was hashed, and the chain verifies."""
    world = World(tmp_path)
    try:
        for vm in (5, [], {"a": 1}, "\ud800", "a\x00b", 2**70, 1.5, "x" * 300):
            stored = audit.append(world.tc.registry, "request.refused", None, vm, reason="request.signature",
                                  raw=vm, nested={"v": [vm, math.nan]})
            assert stored["vm"] is None or isinstance(stored["vm"], str)
        check = audit.verify(world.tc.registry)
        assert check.ok, check.problem
        rows = world.tc.registry.audit_entries()
        assert rows[0]["vm"] == auditform.text(5) and rows[0]["vm"].startswith("sha256:")  # a fingerprint, not 5
        assert rows[3]["vm"].startswith("sha256:") and rows[4]["vm"].startswith("sha256:")  # surrogate, NUL
    finally:
        world.close()


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(node=JSONISH, vm=JSONISH, data=st.dictionaries(st.text(max_size=8), JSONISH, max_size=5))
def test_any_entry_is_stored_as_it_was_hashed(tmp_path, node, vm, data):
    world = _world(tmp_path)
    stored = audit.append(world.tc.registry, "fuzz", node, vm, **{f"k{i}": v for i, v in enumerate(data.values())})
    read = world.tc.registry.audit_entries()[-1]
    assert {k: read[k] for k in ("kind", "node", "vm", "data", "hash")} == \
        {k: stored[k] for k in ("kind", "node", "vm", "data", "hash")}
    assert audit.verify(world.tc.registry).ok


_WORLDS: dict[str, World] = {}


def _world(tmp_path) -> World:  # type: ignore[no-untyped-def]
    """One TC for all of hypothesis's examples in a test (its registry grows; the chain must hold)."""
    key = str(tmp_path)
    if key not in _WORLDS:
        _WORLDS[key] = World(tmp_path)
    return _WORLDS[key]


def _sha(raw: bytes) -> str:
    import hashlib

    return "sha256:" + hashlib.sha256(raw).hexdigest()


def test_column_text_is_kept_up_to_256_characters_and_fingerprinted_beyond_or_when_it_is_not_text():
    assert auditform.text(None) is None
    assert auditform.text("n" * 256) == "n" * 256
    assert auditform.text("n" * 257) == _sha(b"n" * 257)
    assert auditform.text("\ud800") == _sha("\ud800".encode("utf-8", "surrogatepass"))
    assert auditform.text("a\x00b") == _sha(b"a\x00b")
    assert auditform.text(5) == _sha(b"5") and auditform.text([1]) == _sha(b"[1]")
    assert auditform.text("\ud800" * 300) == _sha(("\ud800" * 300).encode("utf-8", "surrogatepass"))


def test_data_keeps_what_every_database_and_json_reader_holds_and_turns_the_rest_to_text():
    assert auditform.data(None) is None and auditform.data(True) is True and auditform.data(False) is False
    assert auditform.data(2**63 - 1) == 2**63 - 1 and auditform.data(-(2**63) + 1) == -(2**63) + 1
    assert auditform.data(2**63) == str(2**63) and auditform.data(-(2**63)) == str(-(2**63))
    assert auditform.data(1.5) == 1.5
    assert auditform.data(math.inf) == "inf" and auditform.data(-math.inf) == "-inf" and auditform.data(math.nan) == "nan"
    assert auditform.data("x" * auditform.MAX_TEXT) == "x" * auditform.MAX_TEXT
    assert auditform.data("x" * (auditform.MAX_TEXT + 1)) == "x" * auditform.MAX_TEXT + "..."
    assert auditform.data("\ud800") == _sha("\ud800".encode("utf-8", "surrogatepass"))
    assert auditform.data((1, "a")) == [1, "a"]
    assert auditform.data({1: "a", "\ud800": 2}) == {"1": "a", _sha("\ud800".encode("utf-8", "surrogatepass")): 2}
    assert auditform.data(b"x") == "b'x'"
