"""Typed models of validated manifests, for the rest of tccdeploy.

Built only from data that passed the schema, so the constructors below can index freely;
defaults live here (and are documented in the schemas) so every consumer sees the same ones.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass, field
from typing import Any

from .yamlload import Document

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network


@dataclass(frozen=True)
class AssetTag:
    nv_index: int
    value: str


@dataclass(frozen=True)
class Site:
    name: str
    networks: tuple[IPNetwork, ...]
    asset_tag: AssetTag | None = None
    description: str = ""

    def contains(self, address: str | ipaddress.IPv4Address | ipaddress.IPv6Address) -> bool:
        if isinstance(address, str):
            try:
                address = ipaddress.ip_address(address)
            except ValueError:
                return False
        return any(address.version == net.version and address in net for net in self.networks)


@dataclass(frozen=True)
class ManufacturerCA:
    name: str
    certificate: str  # absolute path: the root, the trust anchor
    sha256: str | None = None
    intermediates: str | None = None  # absolute path: a PEM bundle of intermediate CAs


@dataclass(frozen=True)
class AttestationPolicy:
    bank: str
    pcrs: tuple[int, ...]
    max_quote_age: int = 300
    interval: int = 60
    nonce_ttl: int = 30
    grace_period: int = 120
    certificate_lifetime: int = 3600
    on_failure: str = "evacuate"
    readmit: str = "operator"
    runtime_pcr: int = 15  # extended by the TVMM service with each VM event; not in pcrs


@dataclass(frozen=True)
class Perimeter:
    name: str
    sites: tuple[Site, ...]
    manufacturer_cas: tuple[ManufacturerCA, ...]
    attestation: AttestationPolicy
    coordinator: dict[str, Any] = field(default_factory=dict)
    source: Document | None = field(default=None, compare=False, repr=False)

    def site(self, name: str) -> Site | None:
        return next((s for s in self.sites if s.name == name), None)

    @classmethod
    def from_document(cls, doc: Document, data: dict[str, Any], base_dir: str) -> Perimeter:
        import os

        spec = data["spec"]
        sites = tuple(
            Site(
                name=s["name"],
                networks=tuple(ipaddress.ip_network(n) for n in s["networks"]),
                asset_tag=(
                    AssetTag(int(s["assetTag"]["nvIndex"], 16), s["assetTag"]["value"])
                    if "assetTag" in s
                    else None
                ),
                description=s.get("description", ""),
            )
            for s in spec["sites"]
        )
        cas = tuple(
            ManufacturerCA(c["name"], os.path.join(base_dir, c["certificate"]), c.get("sha256"),
                           os.path.join(base_dir, c["intermediates"]) if "intermediates" in c else None)
            for c in spec["manufacturerCAs"]
        )
        a = spec["attestation"]
        policy = AttestationPolicy(
            bank=a["bank"],
            pcrs=tuple(sorted(a["pcrs"])),
            max_quote_age=a.get("maxQuoteAgeSeconds", 300),
            interval=a.get("intervalSeconds", 60),
            nonce_ttl=a.get("nonceTtlSeconds", 30),
            grace_period=a.get("gracePeriodSeconds", 120),
            certificate_lifetime=a.get("certificateLifetimeSeconds", 3600),
            on_failure=a.get("onFailure", "evacuate"),
            readmit=a.get("readmit", "operator"),
            runtime_pcr=a.get("runtimePcr", 15),
        )
        return cls(data["metadata"]["name"], sites, cas, policy, spec.get("coordinator", {}), doc)


@dataclass(frozen=True)
class Artifact:
    name: str
    sha256: str
    path: str | None = None
    value: str | None = None


@dataclass(frozen=True)
class ReferenceEvent:
    digest: str
    type: str | None = None
    artifact: str | None = None
    description: str = ""


def version_key(version: str) -> tuple[tuple[int, ...], int, str]:
    """Order versions number by number; a -suffix (pre-release) sorts before the plain one."""
    main, _, suffix = version.partition("-")
    return tuple(int(p) for p in main.split(".")), 0 if suffix else 1, suffix


ADMISSIBLE = ("candidate", "approved", "deprecated")  # candidate: only on its rollout's nodes


@dataclass(frozen=True)
class Rollout:
    """The nodes a candidate may run on: roster names or EK fingerprints (sha256:...), as the
    TC's own records name a node; never the engine's word."""

    nodes: tuple[str, ...]

    def names(self, node: str | None, eks: tuple[str, ...] = ()) -> bool:
        return (node is not None and node in self.nodes) or any(ek and ek in self.nodes for ek in eks)


def _reference_pcrs(spec: dict[str, Any], artifacts: dict[str, Artifact]) -> dict[int, tuple[ReferenceEvent, ...]]:
    pcrs: dict[int, tuple[ReferenceEvent, ...]] = {}
    for entry in spec["measurements"]["pcrs"]:
        events = []
        for e in entry["events"]:
            if "artifact" in e:
                art = artifacts.get(e["artifact"])
                digest = art.sha256 if art else ""
            else:
                digest = e["digest"]
            events.append(ReferenceEvent(digest, e.get("type"), e.get("artifact"), e.get("description", "")))
        pcrs[entry["pcr"]] = pcrs.get(entry["pcr"], ()) + tuple(events)
    return pcrs


def _rollout(spec: dict[str, Any]) -> Rollout | None:
    return Rollout(tuple(spec["rollout"]["nodes"])) if "rollout" in spec else None


@dataclass(frozen=True)
class TVMMBuild:
    name: str
    version: str
    status: str
    artifacts: dict[str, Artifact]
    bank: str
    pcrs: dict[int, tuple[ReferenceEvent, ...]]
    source: Document | None = field(default=None, compare=False, repr=False)
    rollout: Rollout | None = None
    kind = "build"

    @property
    def admissible(self) -> bool:
        """Admitted somewhere: approved or deprecated everywhere, a candidate on its rollout's nodes."""
        return self.status in ADMISSIBLE

    @classmethod
    def from_document(cls, doc: Document, data: dict[str, Any], base_dir: str) -> TVMMBuild:
        import os

        spec = data["spec"]
        artifacts = {
            name: Artifact(
                name,
                a["sha256"],
                os.path.join(base_dir, a["path"]) if "path" in a else None,
                a.get("value"),
            )
            for name, a in spec.get("artifacts", {}).items()
        }
        return cls(
            data["metadata"]["name"], spec["version"], spec["status"], artifacts,
            spec["measurements"]["bank"], _reference_pcrs(spec, artifacts), doc, _rollout(spec),
        )


@dataclass(frozen=True)
class Platform:
    """A hardware model's firmware reference: the events its firmware measures into the PCRs the
    platform owns. Composed with a TVMMBuild on the other PCRs, so the same TVMM software is
    one build however many models it runs on."""

    name: str
    status: str
    bank: str
    pcrs: dict[int, tuple[ReferenceEvent, ...]]  # every PCR the platform owns, possibly with no events
    model: str = ""
    version: str = ""
    source: Document | None = field(default=None, compare=False, repr=False)
    rollout: Rollout | None = None
    kind = "platform"

    @property
    def admissible(self) -> bool:
        return self.status in ADMISSIBLE

    @classmethod
    def from_document(cls, doc: Document, data: dict[str, Any], base_dir: str) -> Platform:
        spec = data["spec"]
        return cls(data["metadata"]["name"], spec["status"], spec["measurements"]["bank"], _reference_pcrs(spec, {}),
                   spec.get("model", ""), spec.get("version", ""), doc, _rollout(spec))


@dataclass(frozen=True)
class PlacementRequest:
    name: str
    image: str
    vcpus: int
    memory_mib: int
    sites: tuple[str, ...] = ()
    builds: tuple[str, ...] = ()
    min_build_version: str | None = None
    anti_affinity_group: str | None = None
    source: Document | None = field(default=None, compare=False, repr=False)

    @classmethod
    def from_document(cls, doc: Document, data: dict[str, Any], base_dir: str) -> PlacementRequest:
        import os

        spec = data["spec"]
        c = spec.get("constraints", {})
        return cls(
            data["metadata"]["name"],
            os.path.join(base_dir, spec["image"]),
            spec["vcpus"],
            spec["memoryMiB"],
            tuple(c.get("sites", ())),
            tuple(c.get("builds", ())),
            c.get("minBuildVersion"),
            c.get("antiAffinityGroup"),
            doc,
        )


@dataclass(frozen=True)
class RosterNode:
    """One machine of the roster (the TC's roster.py uses this for its own entries too)."""

    ek: str
    site: str
    name: str | None = None
    capacity: int | None = None
    source: str = "registry"  # where the entry comes from: a NodeRoster file, or the registry (`tc roster add`)


@dataclass(frozen=True)
class NodeRoster:
    """The TC operator's machines per site (coordinator/roster.py says why the TC needs it)."""

    name: str
    nodes: tuple[RosterNode, ...]
    source: Document | None = field(default=None, compare=False, repr=False)

    @classmethod
    def from_document(cls, doc: Document, data: dict[str, Any], base_dir: str) -> NodeRoster:
        nodes = tuple(RosterNode(n["ek"], s["name"], n.get("name"), n.get("capacity"), doc.file)
                      for s in data["spec"]["sites"] for n in s["nodes"])
        return cls(data["metadata"]["name"], nodes, doc)
