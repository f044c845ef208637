"""`{{ name }}` substitution without Jinja: the part of Ansible's templating playbooks need.

Supported: `{{ name }}`, `{{ name.key }}`, `{{ name['key'] }}`, `{{ name[0] }}`, inside any
string of a task's arguments, `loop` or `vars`, and inside variables themselves (an inventory
variable may say `{{ inventory_hostname }}`). A string that is exactly one `{{ ... }}` keeps the
value's type (a list stays a list), as Ansible's native types do. Filters, tests, arithmetic and
`{% %}` blocks are refused with a message that says so: half-supported Jinja would render
something different from what the operator meant, silently.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from typing import Any

_EXPRESSION = re.compile(r"{{((?:(?!}}).)*)}}", re.S)
_SEGMENT = re.compile(r"""\.([A-Za-z_][A-Za-z0-9_]*)|\[(\d+)\]|\['([^']*)'\]|\["([^"]*)"\]""")
_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
MAX_DEPTH = 10
SUPPORTED = "tccdeploy substitutes {{ name }}, {{ name.key }}, {{ name['key'] }} and {{ name[0] }} only"


class TemplateError(ValueError):
    """A template that cannot be rendered: undefined variable or unsupported syntax."""


class Undefined(TemplateError):
    def __init__(self, name: str):
        super().__init__(f"'{name}' is undefined")
        self.name = name


def parse_path(text: str) -> list[str | int]:
    """`a.b[0]['c']` -> ['a', 'b', 0, 'c']; TemplateError for anything else."""
    text = text.strip()
    head = _NAME.match(text)
    if head is None:
        raise TemplateError(f"{{{{ {text} }}}} is not supported: {SUPPORTED}")
    path: list[str | int] = [head.group(0)]
    pos = head.end()
    while pos < len(text):
        match = _SEGMENT.match(text, pos)
        if match is None:
            what = "Jinja filters" if "|" in text[pos:] else "expressions"
            raise TemplateError(f"{{{{ {text} }}}}: {what} are not supported; {SUPPORTED}")
        attr, index, key1, key2 = match.groups()
        path.append(int(index) if index is not None else (attr or key1 or key2 or ""))
        pos = match.end()
    return path


def lookup(path: list[str | int], variables: Mapping[str, Any]) -> Any:
    value: Any = variables
    shown = ""
    for i, part in enumerate(path):
        shown += str(part) if i == 0 else (f".{part}" if isinstance(part, str) else f"[{part}]")
        try:
            if isinstance(value, Mapping):
                value = value[part]
            elif isinstance(value, list) and isinstance(part, int):
                value = value[part]
            else:
                raise KeyError(part)
        except (KeyError, IndexError):
            raise Undefined(shown) from None
    return value


def render(value: Any, variables: Mapping[str, Any], depth: int = 0) -> Any:
    """value with every `{{ ... }}` replaced, recursively through lists and mappings."""
    if depth > MAX_DEPTH:
        raise TemplateError(f"variables refer to each other more than {MAX_DEPTH} levels deep (a loop?)")
    if isinstance(value, str):
        return _render_text(value, variables, depth)
    if isinstance(value, list):
        return [render(v, variables, depth) for v in value]
    if isinstance(value, dict):
        return {k: render(v, variables, depth) for k, v in value.items()}
    return value


def _render_text(text: str, variables: Mapping[str, Any], depth: int) -> Any:
    if "{%" in text or "{#" in text:
        raise TemplateError(f"{text!r}: Jinja blocks and comments are not supported; {SUPPORTED}")
    if "{{" not in text:
        return text
    whole = _EXPRESSION.fullmatch(text.strip())
    if whole is not None:
        return render(lookup(parse_path(whole.group(1)), variables), variables, depth + 1)

    def one(match: re.Match[str]) -> str:
        value = render(lookup(parse_path(match.group(1)), variables), variables, depth + 1)
        if isinstance(value, (dict, list)):
            return json.dumps(value)
        if isinstance(value, bool):
            return "True" if value else "False"  # as Ansible prints them
        return "" if value is None else str(value)

    if text.count("{{") != len(_EXPRESSION.findall(text)):
        raise TemplateError(f"{text!r}: a {{{{ without its }}}}")
    return _EXPRESSION.sub(one, text)


def has_template(value: Any) -> bool:
    if isinstance(value, str):
        return "{{" in value
    if isinstance(value, list):
        return any(has_template(v) for v in value)
    if isinstance(value, dict):
        return any(has_template(v) for v in value.values())
    return False
