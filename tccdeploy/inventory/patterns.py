"""Ansible host patterns for --limit and a play's `hosts:`.

    all  *  web  node1  web:db  web,db  web:&site1  web:!node3  *.example.com  ~node[0-9]+

Terms are separated by ':' or ','; unions are taken first, then '&' intersections, then '!'
exclusions, as Ansible does. A term matches a group (all its hosts, through children), else a
host name, else a glob or (with ~) a regular expression over group and host names. Unlike
Ansible, which warns and goes on, a term that matches nothing is an error: a typo in --limit
must not silently run on fewer hosts, or none.
"""

from __future__ import annotations

import difflib
import fnmatch
import re
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from . import Host, Inventory


class PatternError(ValueError):
    """A host pattern that matches nothing or cannot be parsed; the message says which term."""


def split_terms(pattern: str | list[str]) -> list[str]:
    if isinstance(pattern, list):
        return [t for p in pattern for t in split_terms(p)]
    terms: list[str] = []
    for chunk in pattern.split(","):
        chunk = chunk.strip()
        if not chunk:
            continue
        if chunk.startswith("~") or chunk.count(":") > 1 and _looks_like_ipv6(chunk):
            terms.append(chunk)
            continue
        terms.extend(t.strip() for t in re.split(r":(?=[!&]?[^:])", chunk) if t.strip())
    return terms


def _looks_like_ipv6(text: str) -> bool:
    return bool(re.fullmatch(r"[!&]?[0-9a-fA-F:]+", text)) and ("::" in text or text.count(":") >= 3)


def _match_term(inventory: Inventory, term: str) -> list[str]:
    if term in ("all", "*"):
        return list(inventory.hosts)
    if term in inventory.groups:
        return inventory.group_hosts(term)
    if term in inventory.hosts:
        return [term]
    if term.startswith("~"):
        try:
            regex = re.compile(term[1:])
        except re.error as exc:
            raise PatternError(f"bad regular expression in {term!r}: {exc}") from None
        test = regex.match
    elif any(c in term for c in "*?["):
        def test(name: str) -> bool:  # type: ignore[misc]
            return fnmatch.fnmatchcase(name, term)
    else:
        return []
    names: list[str] = []
    for group in inventory.groups:
        if test(group):
            names.extend(inventory.group_hosts(group))
    names.extend(h for h in inventory.hosts if test(h))
    return names


def select(inventory: Inventory, pattern: str | list[str]) -> list[Host]:
    """The hosts pattern selects, in inventory order; PatternError when a term matches nothing."""
    terms = split_terms(pattern)
    if not terms:
        raise PatternError("empty host pattern")
    union: set[str] = set()
    intersections: list[set[str]] = []
    exclusions: set[str] = set()
    for term in terms:
        op, name = (term[0], term[1:]) if term[0] in "!&" else ("", term)
        matched = _match_term(inventory, name)
        if not matched and name not in inventory.groups:
            known = list(inventory.groups) + list(inventory.hosts)
            close = difflib.get_close_matches(name, known, n=3)
            hint = f"; did you mean {', '.join(close)}?" if close else ""
            raise PatternError(f"host pattern {term!r} matches no group or host{hint}")
        if op == "&":
            intersections.append(set(matched))
        elif op == "!":
            exclusions.update(matched)
        else:
            union.update(matched)
    if all(t[0] in "!&" for t in terms):
        union = set(inventory.hosts)
    for other in intersections:
        union &= other
    union -= exclusions
    return [inventory.hosts[name] for name in inventory.hosts if name in union]
