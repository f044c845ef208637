"""`when`, `changed_when` and `failed_when` without Jinja: a small, closed grammar.

    condition := term (' or ' term)*          term := factor (' and ' factor)*
    factor    := 'not ' factor | test | comparison | operand
    test      := path ' is ' ['not '] (defined | undefined | none | failed | changed | succeeded
                                       | success | skipped)
    comparison:= operand ('==' | '!=' | 'in' | 'not in' | '<' | '<=' | '>' | '>=') operand
    operand   := 'quoted' | "quoted" | number | true | false | none | [list] | path

A list of conditions must all hold, as in Ansible. Anything outside the grammar (parentheses,
filters, method calls) is refused with a message that says what is supported, never guessed at.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

import yaml

from .templar import TemplateError, Undefined, lookup, parse_path

TESTS = ("defined", "undefined", "none", "failed", "changed", "succeeded", "success", "skipped")
_COMPARISON = re.compile(r"^(.*?)\s*(==|!=|<=|>=|<|>|\bnot in\b|\bin\b)\s*(.*)$")
_TEST = re.compile(r"^(.*?)\s+is\s+(not\s+)?([a-z]+)$")
SUPPORTED = ("conditions are: VAR, not VAR, VAR is [not] defined|undefined|none|failed|changed|succeeded|skipped, "
             "A == B, A != B, A in B, A < B (and <=, >, >=), joined with and / or")


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
    text = str(condition).strip()
    if text.startswith("{{") and text.endswith("}}"):
        text = text[2:-2].strip()  # Ansible accepts (and warns about) templated conditions
    if not text:
        raise ConditionError(f"empty condition; {SUPPORTED}")
    if "(" in text or "|" in text:
        raise ConditionError(f"{text!r}: parentheses and filters are not supported; {SUPPORTED}")
    return any(all(_factor(f.strip(), variables) for f in _split(term, " and ")) for term in _split(text, " or "))


def _split(text: str, word: str) -> list[str]:
    """Split on word outside quotes and brackets."""
    parts, depth, quote, start, i = [], 0, "", 0, 0
    while i < len(text):
        ch = text[i]
        if quote:
            quote = "" if ch == quote else quote
        elif ch in "'\"":
            quote = ch
        elif ch == "[":
            depth += 1
        elif ch == "]":
            depth -= 1
        elif depth == 0 and text.startswith(word, i):
            parts.append(text[start:i])
            i += len(word)
            start = i
            continue
        i += 1
    parts.append(text[start:])
    return parts


def _factor(text: str, variables: Mapping[str, Any]) -> bool:
    if text.startswith("not "):
        return not _factor(text[4:].strip(), variables)
    test = _TEST.match(text)
    if test is not None and test.group(3) in TESTS:
        outcome = _test(test.group(1).strip(), test.group(3), variables)
        return not outcome if test.group(2) else outcome
    if test is not None:
        raise ConditionError(f"{text!r}: unknown test {test.group(3)!r}; tests are {', '.join(TESTS)}")
    comparison = _COMPARISON.match(text)
    if comparison is not None and comparison.group(1) and comparison.group(3):
        left = _operand(comparison.group(1).strip(), variables)
        right = _operand(comparison.group(3).strip(), variables)
        op = " ".join(comparison.group(2).split())
        try:
            return {
                "==": lambda: left == right, "!=": lambda: left != right,
                "in": lambda: left in right, "not in": lambda: left not in right,
                "<": lambda: left < right, "<=": lambda: left <= right,
                ">": lambda: left > right, ">=": lambda: left >= right,
            }[op]()
        except TypeError as exc:
            raise ConditionError(f"{text!r}: cannot compare {left!r} and {right!r} ({exc})") from None
    return _truthy(_operand(text, variables))


def _test(path: str, name: str, variables: Mapping[str, Any]) -> bool:
    try:
        value = lookup(parse_path(path), variables)
    except Undefined:
        if name in ("defined", "undefined"):
            return name == "undefined"
        raise
    if name in ("defined", "undefined"):
        return name == "defined"
    if name == "none":
        return value is None
    if not isinstance(value, Mapping):
        raise ConditionError(f"{path} is {name}: {path} is not a registered task result")
    if name == "failed":
        return bool(value.get("failed"))
    if name == "changed":
        return bool(value.get("changed"))
    if name == "skipped":
        return bool(value.get("skipped"))
    return not value.get("failed")  # succeeded / success


def _operand(text: str, variables: Mapping[str, Any]) -> Any:
    if not text:
        raise ConditionError(f"a comparison is missing a side; {SUPPORTED}")
    if text[0] in "'\"[" or text[0].isdigit() or text[0] == "-" or text in ("true", "false", "True", "False", "none", "None"):
        try:
            value = yaml.safe_load(text)
        except yaml.YAMLError:
            raise ConditionError(f"{text!r} is not a valid literal") from None
        return None if text in ("none", "None") else value
    try:
        path = parse_path(text)
    except TemplateError:
        raise ConditionError(f"{text!r} is not a condition tccdeploy understands; {SUPPORTED}") from None
    return lookup(path, variables)


def _truthy(value: Any) -> bool:
    if isinstance(value, str):
        word = value.strip().lower()
        if word in ("true", "yes", "on", "1", "y"):
            return True
        if word in ("false", "no", "off", "0", "n", ""):
            return False
        raise ConditionError(f"the condition's value is the string {value!r}, not a boolean; compare it: VAR == 'value'")
    return bool(value)
