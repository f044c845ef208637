"""A hostile engine against admission: it begins an admission on a trusted verdict, then has
the node fail an attestation (or boots it into other software) before it answers the challenge.
The TC recorded the node untrusted, and the admission still completed (found in review)."""

from __future__ import annotations

import pytest

from tccdeploy.coordinator import admission
from tccdeploy.coordinator.admission import AdmissionRefused
from tccdeploy.coordinator.store import Registry

from ..test_admission import _answer, _begin, _tk, registry, setup, tc  # noqa: F401 - the fixtures


def test_a_first_admission_does_not_complete_after_an_untrusted_verdict(registry: Registry, setup, tc):  # noqa: F811
    """An untrusted verdict quarantines an admitted node; a node only enrolled has no admission to
    lose, and its admission under way completed after the TC had recorded it untrusted (found in
    review). The admission's write now refuses while a later verdict failed."""
    perimeter, node, attestation = setup
    ciphertext = _begin(registry, perimeter, attestation, _tk(node))
    registry.add_attestation("n1", {"verdict": "untrusted", "reasons": [{"code": "build.unknown"}]})
    with pytest.raises(AdmissionRefused) as info:
        admission.finish(registry, perimeter, tc, "n1", _answer(ciphertext))
    assert info.value.reason == "admit.not-trusted"
    assert registry.node("n1")["state"] == "enrolled" and registry.certificate("n1") is None
