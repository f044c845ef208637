"""One refusal type for every decision the TC declines, and the catalogue of their reason codes.

A refusal is a decision, not an error: it carries a stable reason code (what an operator
searches for, what a test asserts, what the API returns as `error`) and a message that says
what was wrong and what to do. Subclasses exist only where a caller handles one phase apart
(the engine's enroll and admit steps); everything else is `Refused`.
"""

from __future__ import annotations

from ..crypto.reasoned import Reasoned


class Refused(Reasoned):
    """A decision the TC declines (crypto/reasoned.py: the code and the words are required)."""


class EnrollmentRefused(Refused):
    """Enrollment declined: the node keeps whatever the registry had before."""


class AdmissionRefused(Refused):
    """Admission declined: no node certificate, the node's state unchanged."""


def engine_revoked(name: str) -> Refused:
    """An engine whose certificate the registry no longer lists (or never did): the one answer to
    any route it calls, whichever process checks it (api.Api, or fronts.answer for a front)."""
    return Refused("auth.engine-revoked", f"engine {name}'s certificate is unknown or removed")
