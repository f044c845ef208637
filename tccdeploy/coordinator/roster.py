"""The node roster: where a node is, as the TC's operator recorded it.

TCCP's perimeter is physical: a machine is inside because the provider racked it in a site and
the TC's operator wrote its TPM down, not because the engine says so. An address or a site in
the inventory is the engine's claim (a TCP forwarder puts any host at any address), so the TC
admits only EKs on its roster, takes a node's site from the roster entry, and treats the
claimed site and address as consistency checks.

Entries come from two places, both on the TC's side: NodeRoster manifests among the TC's
manifests (reviewed like any other manifest) and `tc roster add|remove` (kept in the registry,
audited). An EK is named by `sha256:` and the SHA-256 of its certificate (DER) or of its public
key (DER SubjectPublicKeyInfo), so an operator can write it down from either.

    perimeter.not-in-roster   the EK is on no site's roster
    perimeter.roster-site     the roster puts the EK in another site than the one claimed
    perimeter.roster-name     the roster names the EK's machine otherwise
    perimeter.roster-conflict the EK is on two sites' rosters (a manifest and the registry disagree)
"""

from __future__ import annotations

import hashlib
import re

from cryptography import x509
from cryptography.hazmat.primitives import serialization

from ..manifest.models import RosterNode
from .refusals import Refused

EK_PATTERN = re.compile(r"^sha256:[0-9a-f]{64}$")


RosterEntry = RosterNode  # one type for a roster entry, from a manifest or from the registry


def ek_identities(certificate_der: bytes) -> tuple[str, str]:
    """(certificate fingerprint, public-key fingerprint) of an EK certificate, as roster names."""
    cert = x509.load_der_x509_certificate(certificate_der)
    spki = cert.public_key().public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    return "sha256:" + hashlib.sha256(certificate_der).hexdigest(), "sha256:" + hashlib.sha256(spki).hexdigest()


def enrolled_identities(identity: dict | None) -> tuple[str, ...]:
    """A node's enrolled EK as a roster names it (certificate, then public-key fingerprint), from
    its registry identity record."""
    if identity is None:
        return ()
    certificate = identity.get("ek_fingerprint")
    return tuple(x for x in ("sha256:" + str(certificate) if certificate else "", identity.get("ek_key_fingerprint") or "") if x)


def normalize(ek: str) -> str:
    """An EK name as an operator may type it (upper case, with colons, bare hex) in roster form."""
    text = ek.strip().lower()
    if text.startswith("sha256:"):
        text = text[7:]
    text = text.replace(":", "")
    value = "sha256:" + text
    if not EK_PATTERN.match(value):
        raise ValueError(f"{ek!r} is not an EK fingerprint: give sha256: and 64 hex digits (the SHA-256 of the EK "
                         "certificate or of its public key, DER)")
    return value


def find(entries: list[RosterEntry], identities: tuple[str, ...] | list[str]) -> list[RosterEntry]:
    return [e for e in entries if e.ek in identities]


def check(entries: list[RosterEntry], node: str, identities: tuple[str, ...] | list[str],
          claimed_site: str | None) -> RosterEntry:
    """The roster entry for this EK, or Refused: the EK must be on exactly one site's roster,
    under this node's name if the entry names one, in the site the engine claims if it claims one."""
    found = find(entries, identities)
    if not found:
        raise Refused("perimeter.not-in-roster",
                      f"{node}'s TPM (EK {identities[-1]}) is on no site's roster: it is not a machine the TC's operator "
                      f"placed inside the perimeter. If it is, the operator adds it on the TC's side: "
                      f"tccdeploy tc roster add SITE {identities[-1]} --name {node}")
    sites = sorted({e.site for e in found})
    if len(sites) > 1:
        raise Refused("perimeter.roster-conflict",
                      f"{node}'s EK is on the rosters of sites {', '.join(sites)}; the TC's operator must keep one")
    entry = found[0]
    if entry.name is not None and entry.name != node:
        raise Refused("perimeter.roster-name",
                      f"the roster names this TPM's machine {entry.name!r}, not {node!r}: one EK is one node")
    if claimed_site is not None and claimed_site != entry.site:
        raise Refused("perimeter.roster-site",
                      f"{node} claims site {claimed_site!r}, but the roster puts its TPM in site {entry.site!r}")
    return entry
