"""`when`, `changed_when`, `failed_when` and `until`: Jinja expressions that must be booleans.

As in ansible-core 2.19: the condition is a bare expression (a `{{ }}` around it is accepted),
a list of conditions must all hold, and a result that is not a boolean (a non-empty string
such as 'yes', a number) is an error that says so, rather than a guess at what was meant:
compare it, or pass it through `| bool`.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from .templar import TemplateError, expression


class ConditionError(TemplateError):
    pass


def evaluate(condition: Any, variables: Mapping[str, Any]) -> bool:
    """True when condition (a string, a bool, or a list of them, all required) holds."""
    if isinstance(condition, list):
        return all(evaluate(c, variables) for c in condition)
    if isinstance(condition, bool):
        return condition
    if condition is None:
        return True
    text = str(condition)
    value = expression(text, variables)
    if not isinstance(value, bool):
        raise ConditionError(
            f"conditional result ({bool(value)}) was derived from value of type '{type(value).__name__}' "
            f"in {text.strip()!r}; conditionals must have a boolean result: compare the value "
            f"(VAR == 'x', VAR | length > 0) or convert it (VAR | bool)")
    return value
