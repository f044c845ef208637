"""Ansible's common filters and tests, for `apply`'s sandboxed Jinja2.

Ansible's names and behaviour (documented in ansible-core's filter and test guides), written
here for tccdeploy: the ones real playbooks use to shape data. Anything that reads the
controller (lookups, file and path tests, `password_hash` with its randomness, network
filters from collections) is not here, and a template naming it is refused by name
(templar.py), because a playbook that half-works on the controller is worse than one that
stops and says what to change.
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
import shlex
from collections.abc import Callable, Iterable, Mapping
from itertools import zip_longest
from typing import Any

import yaml


class FilterError(ValueError):
    """A filter given what it cannot work on: the task fails with this message."""


def _listed(value: Any) -> Any:
    """A lazy sequence from a Jinja filter (map, select...) as the list it yields."""
    if isinstance(value, (str, bytes, Mapping, list)) or not isinstance(value, Iterable):
        return value
    return list(value)


# -- data ------------------------------------------------------------------------------------
def to_json(value: Any, **kwargs: Any) -> str:
    return json.dumps(value, default=str, **{k: v for k, v in kwargs.items() if k in ("indent", "sort_keys")})


def to_nice_json(value: Any, indent: int = 4, sort_keys: bool = True, **_: Any) -> str:
    return json.dumps(value, indent=indent, sort_keys=sort_keys, separators=(",", ": "), default=str)


def from_json(value: Any) -> Any:
    try:
        return json.loads(value)
    except (TypeError, ValueError) as exc:
        raise FilterError(f"from_json: not JSON ({exc})") from None


def to_yaml(value: Any, **kwargs: Any) -> str:
    return yaml.safe_dump(value, allow_unicode=True, default_flow_style=kwargs.get("default_flow_style"),
                          sort_keys=kwargs.get("sort_keys", True))


def to_nice_yaml(value: Any, indent: int = 4, **kwargs: Any) -> str:
    return yaml.safe_dump(value, indent=indent, allow_unicode=True, default_flow_style=False,
                          sort_keys=kwargs.get("sort_keys", True))


def from_yaml(value: Any) -> Any:
    if not isinstance(value, str):
        return value
    try:
        return yaml.safe_load(value)
    except yaml.YAMLError as exc:
        raise FilterError(f"from_yaml: not YAML ({exc})") from None


def to_bool(value: Any) -> bool:
    """Ansible's `bool`: yes/on/1/true (any case) are true, everything else false."""
    if isinstance(value, bool):
        return value
    if value is None:
        return False
    return str(value).strip().lower() in ("yes", "on", "1", "true", "y", "t")


def b64encode(value: Any, encoding: str = "utf-8") -> str:
    return base64.b64encode(str(value).encode(encoding)).decode("ascii")


def b64decode(value: Any, encoding: str = "utf-8") -> str:
    try:
        return base64.b64decode(str(value)).decode(encoding)
    except (ValueError, UnicodeDecodeError) as exc:
        raise FilterError(f"b64decode: {exc}") from None


def combine(*terms: Any, recursive: bool = False, list_merge: str = "replace") -> dict[str, Any]:
    if list_merge not in ("replace", "keep", "append", "prepend"):
        raise FilterError(f"combine: list_merge must be replace, keep, append or prepend, not {list_merge!r}")
    dicts: list[Any] = []
    for term in terms:
        term = _listed(term)
        dicts.extend(term if isinstance(term, list) else [term])
    out: dict[str, Any] = {}
    for d in dicts:
        if not isinstance(d, Mapping):
            raise FilterError(f"combine expects dictionaries, got {type(d).__name__}")
        out = _merge(out, d, recursive, list_merge)
    return out


def _merge(a: Mapping[str, Any], b: Mapping[str, Any], recursive: bool, list_merge: str) -> dict[str, Any]:
    out = dict(a)
    for key, value in b.items():
        old = out.get(key)
        if recursive and isinstance(old, Mapping) and isinstance(value, Mapping):
            out[key] = _merge(old, value, recursive, list_merge)
        elif isinstance(old, list) and isinstance(value, list) and list_merge != "replace":
            out[key] = {"keep": old, "append": old + value, "prepend": value + old}[list_merge]
        else:
            out[key] = value
    return out


def dict2items(value: Any, key_name: str = "key", value_name: str = "value") -> list[dict[str, Any]]:
    if not isinstance(value, Mapping):
        raise FilterError(f"dict2items requires a dictionary, got {type(value).__name__} instead.")
    return [{key_name: k, value_name: v} for k, v in value.items()]


def items2dict(value: Any, key_name: str = "key", value_name: str = "value") -> dict[Any, Any]:
    value = _listed(value)
    if not isinstance(value, list):
        raise FilterError(f"items2dict requires a list, got {type(value).__name__} instead.")
    try:
        return {item[key_name]: item[value_name] for item in value}
    except (KeyError, TypeError) as exc:
        raise FilterError(f"items2dict: every item needs {key_name!r} and {value_name!r} ({exc})") from None


def flatten(value: Any, levels: int | None = None, skip_nulls: bool = True) -> list[Any]:
    out: list[Any] = []
    for item in _listed(value):
        if item is None and skip_nulls:
            continue
        if isinstance(item, list) and (levels is None or levels > 0):
            out.extend(flatten(item, None if levels is None else levels - 1, skip_nulls))
        else:
            out.append(item)
    return out


def _unique(items: Iterable[Any]) -> list[Any]:
    out: list[Any] = []
    for item in items:
        if item not in out:
            out.append(item)
    return out


def union(a: Any, b: Any) -> list[Any]:
    return _unique(list(a) + list(b))


def intersect(a: Any, b: Any) -> list[Any]:
    return _unique(x for x in a if x in b)


def difference(a: Any, b: Any) -> list[Any]:
    return _unique(x for x in a if x not in b)


def symmetric_difference(a: Any, b: Any) -> list[Any]:
    return _unique([x for x in a if x not in b] + [x for x in b if x not in a])


def zip_(*lists: Any) -> list[list[Any]]:
    return [list(t) for t in zip(*lists, strict=False)]


def zip_longest_(*lists: Any, fillvalue: Any = None) -> list[list[Any]]:
    return [list(t) for t in zip_longest(*lists, fillvalue=fillvalue)]


def ternary(value: Any, true_val: Any, false_val: Any, none_val: Any = None) -> Any:
    if value is None and none_val is not None:
        return none_val
    return true_val if value else false_val


def mandatory(value: Any, msg: str | None = None) -> Any:
    from jinja2 import Undefined

    if isinstance(value, Undefined):
        raise FilterError(msg or f"Mandatory variable {value._undefined_name!r} not defined.")
    return value


def split(value: Any, sep: str | None = None, maxsplit: int = -1) -> list[str]:
    return str(value).split(sep, maxsplit)


def type_debug(value: Any) -> str:
    return type(value).__name__


def basename(value: Any) -> str:
    return str(value).rstrip("/").rsplit("/", 1)[-1] if "/" in str(value).rstrip("/") else str(value)


def dirname(value: Any) -> str:
    text = str(value)
    return text.rsplit("/", 1)[0] if "/" in text else ""


def hash_(value: Any, algorithm: str = "sha1") -> str:
    if algorithm not in ("md5", "sha1", "sha224", "sha256", "sha384", "sha512"):
        raise FilterError(f"hash: unknown algorithm {algorithm!r}")
    return hashlib.new(algorithm, str(value).encode()).hexdigest()


def checksum(value: Any) -> str:
    return hash_(value, "sha1")


# -- regular expressions -----------------------------------------------------------------------
def _flags(ignorecase: bool, multiline: bool) -> int:
    return (re.I if ignorecase else 0) | (re.M if multiline else 0)


def _compile(pattern: str, ignorecase: bool = False, multiline: bool = False) -> re.Pattern[str]:
    try:
        return re.compile(pattern, _flags(ignorecase, multiline))
    except re.error as exc:
        raise FilterError(f"invalid regular expression {pattern!r}: {exc}") from None


def regex_search(value: Any, pattern: str, *groups: str, ignorecase: bool = False, multiline: bool = False) -> Any:
    match = _compile(pattern, ignorecase, multiline).search(str(value))
    if match is None:
        return None
    if not groups:
        return match.group(0)
    out = []
    for g in groups:
        if g.startswith("\\g<"):
            out.append(match.group(g[3:-1]))
        elif g.startswith("\\"):
            out.append(match.group(int(g[1:])))
        else:
            raise FilterError(f"regex_search: unknown group {g!r} (give '\\\\1' or '\\\\g<name>')")
    return out


def regex_replace(value: Any, pattern: str = "", replacement: str = "", ignorecase: bool = False,
                  multiline: bool = False, count: int = 0) -> str:
    return _compile(pattern, ignorecase, multiline).sub(replacement, str(value), count=count)


def regex_findall(value: Any, pattern: str, ignorecase: bool = False, multiline: bool = False) -> list[Any]:
    return _compile(pattern, ignorecase, multiline).findall(str(value))


def regex_escape(value: Any, re_type: str = "python") -> str:
    if re_type != "python":
        raise FilterError(f"regex_escape: only re_type='python' is supported, not {re_type!r}")
    return re.escape(str(value))


# -- tests -----------------------------------------------------------------------------------
def _result(value: Any, name: str) -> Mapping[str, Any]:
    if not isinstance(value, Mapping):
        raise FilterError(f"the '{name}' test expects a registered task result (a dictionary), "
                          f"got {type(value).__name__}")
    return value


def failed(value: Any) -> bool:
    return bool(_result(value, "failed").get("failed", False))


def succeeded(value: Any) -> bool:
    return not _result(value, "succeeded").get("failed", False)


def changed(value: Any) -> bool:
    result = _result(value, "changed")
    if "results" in result and "changed" not in result:
        return any(r.get("changed") for r in result["results"] if isinstance(r, Mapping))
    return bool(result.get("changed", False))


def skipped(value: Any) -> bool:
    return bool(_result(value, "skipped").get("skipped", False))


def finished(value: Any) -> bool:
    return bool(_result(value, "finished").get("finished", True))


def match(value: Any, pattern: str, ignorecase: bool = False, multiline: bool = False) -> bool:
    return _compile(pattern, ignorecase, multiline).match(str(value)) is not None


def search(value: Any, pattern: str, ignorecase: bool = False, multiline: bool = False) -> bool:
    return _compile(pattern, ignorecase, multiline).search(str(value)) is not None


def regex(value: Any, pattern: str, ignorecase: bool = False, multiline: bool = False,
          match_type: str = "search") -> bool:
    if match_type not in ("search", "match", "fullmatch"):
        raise FilterError(f"regex: match_type must be search, match or fullmatch, not {match_type!r}")
    compiled = _compile(pattern, ignorecase, multiline)
    return getattr(compiled, match_type)(str(value)) is not None


_VERSION_PART = re.compile(r"\d+|[A-Za-z]+")
_OPERATORS: dict[str, Callable[[Any, Any], bool]] = {
    "<": lambda a, b: a < b, "lt": lambda a, b: a < b, "<=": lambda a, b: a <= b, "le": lambda a, b: a <= b,
    ">": lambda a, b: a > b, "gt": lambda a, b: a > b, ">=": lambda a, b: a >= b, "ge": lambda a, b: a >= b,
    "==": lambda a, b: a == b, "=": lambda a, b: a == b, "eq": lambda a, b: a == b,
    "!=": lambda a, b: a != b, "<>": lambda a, b: a != b, "ne": lambda a, b: a != b,
}


def _version_key(text: str) -> tuple[tuple[int, int | str], ...]:
    """Loose version order (numbers numerically, letters after numbers), as Ansible's default."""
    return tuple((0, int(p)) if p.isdigit() else (1, p) for p in _VERSION_PART.findall(text))


def version(value: Any, other: Any, operator: str = "eq", strict: bool = False, version_type: str | None = None) -> bool:
    if operator not in _OPERATORS:
        raise FilterError(f"version: unknown operator {operator!r}; operators are {', '.join(_OPERATORS)}")
    if strict or version_type not in (None, "loose"):
        raise FilterError("version: only the default loose comparison is supported (no strict or version_type)")
    if str(value) == "" or str(other) == "":
        raise FilterError("version: cannot compare an empty version")
    return _OPERATORS[operator](_version_key(str(value)), _version_key(str(other)))


def subset(a: Any, b: Any) -> bool:
    return set(a) <= set(b)


def superset(a: Any, b: Any) -> bool:
    return set(a) >= set(b)


def contains(seq: Any, value: Any) -> bool:
    return value in seq


def truthy(value: Any, convert_bool: bool = False) -> bool:
    return to_bool(value) if convert_bool else bool(value)


def falsy(value: Any, convert_bool: bool = False) -> bool:
    return not truthy(value, convert_bool)


FILTERS: dict[str, Callable[..., Any]] = {
    "to_json": to_json, "to_nice_json": to_nice_json, "from_json": from_json,
    "to_yaml": to_yaml, "to_nice_yaml": to_nice_yaml, "from_yaml": from_yaml,
    "bool": to_bool, "b64encode": b64encode, "b64decode": b64decode,
    "combine": combine, "dict2items": dict2items, "items2dict": items2dict, "flatten": flatten,
    "union": union, "intersect": intersect, "difference": difference, "symmetric_difference": symmetric_difference,
    "zip": zip_, "zip_longest": zip_longest_, "ternary": ternary, "mandatory": mandatory, "split": split,
    "type_debug": type_debug, "basename": basename, "dirname": dirname, "hash": hash_, "checksum": checksum,
    "quote": shlex.quote, "regex_search": regex_search, "regex_replace": regex_replace,
    "regex_findall": regex_findall, "regex_escape": regex_escape,
}

TESTS: dict[str, Callable[..., bool]] = {
    "failed": failed, "failure": failed, "succeeded": succeeded, "success": succeeded, "successful": succeeded,
    "changed": changed, "change": changed, "skipped": skipped, "skip": skipped, "finished": finished,
    "match": match, "search": search, "regex": regex, "version": version, "version_compare": version,
    "subset": subset, "issubset": subset, "superset": superset, "issuperset": superset, "contains": contains,
    "truthy": truthy, "falsy": falsy, "any": lambda v: any(v), "all": lambda v: all(v),
}
