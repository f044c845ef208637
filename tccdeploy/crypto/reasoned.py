"""The one shape of a decision that says no: a stable reason code and words a person can act on.

Shared by every side (the TC's refusals, the service's, a customer's checks of bundles and
receipts, tickets), so each rejection is named the same way and none can be made without its
name or its message: a mistake that drops either fails where it is made, not in front of an
operator reading an empty error."""

from __future__ import annotations


class Reasoned(Exception):
    def __init__(self, reason: str, message: str):
        if not isinstance(reason, str) or not reason or not isinstance(message, str) or not message.strip():
            raise TypeError(f"a refusal needs a reason code and a message (got {reason!r}, {message!r})")
        super().__init__(message)
        self.reason = reason

    def __reduce__(self) -> tuple[type, tuple[str, str]]:
        """Whole across a pickle (the TC's front processes get their decision process's refusals
        this way): the default would call __init__ with the message alone."""
        return type(self), (self.reason, str(self))
