"""The TC's records as the engine sees them: typed, read-only, the same from the embedded TC and
over HTTPS (the API sends `as_dict()`, the client rebuilds them with `from_row`). Fields the TC
keeps for itself (wrapped keys, quarantine bookkeeping) are not part of them."""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, TypeVar

R = TypeVar("R")


@functools.cache
def _field_names(cls: type) -> frozenset[str]:
    """A record class's field names, read once: from_row runs for every VM a placement weighs,
    inside the decision's serialized write."""
    return frozenset(f.name for f in dataclasses.fields(cls))


class _Record:
    @classmethod
    def from_row(cls: type[R], row: Mapping[str, Any]) -> R:
        """From a registry row or a JSON object: the fields this record has, nothing else."""
        names = _field_names(cls)  # type: ignore[arg-type]
        return cls(**{k: v for k, v in row.items() if k in names})

    def as_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)  # type: ignore[call-overload, no-any-return]


@dataclass(frozen=True)
class NodeRecord(_Record):
    name: str
    state: str
    site: str | None = None
    address: str | None = None
    build: str | None = None
    platform: str | None = None
    last_attestation: float | None = None
    verdict: str | None = None
    reasons: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class VMRecord(_Record):
    vm_id: str
    name: str
    customer: str
    node: str | None
    state: str
    image_sha256: str = ""
    request: str = ""
    vcpus: int = 0
    memory_mib: int = 0
    anti_affinity: str | None = None
    launched: float | None = None
    updated: float | None = None


@dataclass(frozen=True)
class RequestRecord(_Record):
    id: str
    customer: str
    vm: str
    vm_id: str
    image_sha256: str
    spec: dict[str, Any]
    state: str
    received: float | None = None


@dataclass(frozen=True)
class MigrationRecord(_Record):
    id: int
    vm_id: str
    source: str
    destination: str
    state: str
    started: float | None = None
    ended: float | None = None
    reason: str | None = None
    in_ticket: str | None = None  # the destination's evidence must name it (repair asks for it)


@dataclass(frozen=True)
class IdentitySummary(_Record):
    ek_fingerprint: str
    manufacturer: str
