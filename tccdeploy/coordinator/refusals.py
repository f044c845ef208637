"""One refusal type for every decision the TC declines, and the catalogue of their reason codes.

A refusal is a decision, not an error: it carries a stable reason code (what an operator
searches for, what a test asserts, what the API returns as `error`) and a message that says
what was wrong and what to do. Subclasses exist only where a caller handles one phase apart
(the engine's enroll and admit steps); everything else is `Refused`.
"""

from __future__ import annotations


class Refused(Exception):
    def __init__(self, reason: str, message: str):
        # A refusal nobody can act on is a bug of its own: the code and the words are required.
        if not isinstance(reason, str) or not reason or not isinstance(message, str) or not message.strip():
            raise TypeError(f"a refusal needs a reason code and a message (got {reason!r}, {message!r})")
        super().__init__(message)
        self.reason = reason


class EnrollmentRefused(Refused):
    """Enrollment declined: the node keeps whatever the registry had before."""


class AdmissionRefused(Refused):
    """Admission declined: no node certificate, the node's state unchanged."""
