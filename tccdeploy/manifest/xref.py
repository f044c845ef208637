"""Cross-reference checks: what the schemas cannot see because it spans files.

Each check is one function with the problem codes it can raise named in its docstring, so a
reader finds every rule in one place. They run over schema-valid objects only.
"""

from __future__ import annotations

import datetime
import hashlib
import ipaddress
import os
from collections.abc import Iterator
from typing import TYPE_CHECKING

from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding

from ..crypto.files import sha256_file
from .models import Perimeter, Platform, TVMMBuild, version_key
from .problems import Problem
from .schema import MANIFEST_KINDS

if TYPE_CHECKING:
    from ..inventory import Host, Inventory
    from .loader import LoadResult

MODULES = (
    "tvmm_deploy", "enroll", "attest", "evict", "launch", "migrate", "drain", "enforce",
    "command", "copy", "template", "wait_for_ssh", "ping", "debug", "fail", "set_fact", "meta",
)
# What a task may be instead of a module call: a block, or an include of tasks or a role.
STRUCTURES = ("block", "include_tasks", "import_tasks", "include_role", "import_role")

TASK_KEYWORDS = (
    "name", "when", "loop", "loop_control", "register", "tags", "ignore_errors", "delegate_to", "vars",
    "changed_when", "failed_when", "notify", "listen", "run_once", "until", "retries", "delay", "check_mode",
    "diff", "no_log", "become", "become_user", "become_method", "rescue", "always",
)
SECTIONS = ("pre_tasks", "tasks", "post_tasks", "handlers")
# Full names a playbook may call the same modules by: tccdeploy's collection and Ansible's builtins.
PREFIXES = ("tccdeploy.tccp.", "ansible.builtin.")


def canonical(key: str) -> str:
    """A task key without its collection: tccdeploy.tccp.attest -> attest."""
    for prefix in PREFIXES:
        if key.startswith(prefix):
            return key[len(prefix):]
    return key


def check(result: LoadResult) -> list[Problem]:
    problems: list[Problem] = []
    problems += perimeters(result)
    perimeter = result.perimeter
    problems += builds(result, perimeter)
    problems += platforms(result, perimeter)
    for inventory in result.inventories:
        problems += inventory_hosts(inventory, result, perimeter)
    problems += requests(result, perimeter)
    problems += rosters(result, perimeter)
    for doc in result.playbooks:
        problems += list(playbook_tasks(doc))
    return problems


def perimeters(result: LoadResult) -> list[Problem]:
    """xref.perimeter-count, xref.duplicate-site, xref.overlapping-sites, xref.runtime-pcr, xref.ca-*."""
    problems: list[Problem] = []
    if len(result.perimeters) > 1:
        names = ", ".join(f"{p.name} ({p.source.file})" for p in result.perimeters if p.source)
        for p in result.perimeters[1:]:
            assert p.source is not None
            problems.append(p.source.problem(
                ("kind",), "xref.perimeter-count", f"more than one Perimeter: {names}",
                "an inventory is governed by exactly one Perimeter; validate each perimeter's files separately",
            ))
    for perimeter in result.perimeters:
        doc = perimeter.source
        assert doc is not None
        seen: dict[str, int] = {}
        for i, site in enumerate(perimeter.sites):
            if site.name in seen:
                problems.append(doc.problem(("spec", "sites", i, "name"), "xref.duplicate-site",
                                            f"site {site.name!r} is defined twice (also sites[{seen[site.name]}])",
                                            "give every site its own name"))
            seen.setdefault(site.name, i)
        for i, a in enumerate(perimeter.sites):
            for j, b in enumerate(perimeter.sites[i + 1:], start=i + 1):
                for nb_i, nb in enumerate(b.networks):
                    if any(na.version == nb.version and na.overlaps(nb) for na in a.networks):
                        problems.append(doc.problem(
                            ("spec", "sites", j, "networks", nb_i), "xref.overlapping-sites",
                            f"network {nb} of site {b.name!r} overlaps site {a.name!r}",
                            "a node's address must tell its site; make the sites' networks disjoint",
                        ))
        if perimeter.attestation.runtime_pcr in perimeter.attestation.pcrs:
            problems.append(doc.problem(
                ("spec", "attestation", "runtimePcr"), "xref.runtime-pcr",
                f"the runtime PCR {perimeter.attestation.runtime_pcr} is one of the boot PCRs "
                f"{list(perimeter.attestation.pcrs)}",
                "VM events would change the trusted key's PCR policy: pick a PCR no build measures (e.g. 15)"))
        for i, ca in enumerate(perimeter.manufacturer_cas):
            problems += _check_ca(doc, ("spec", "manufacturerCAs", i, "certificate"), ca.certificate, ca.sha256)
            if ca.intermediates is not None:
                problems += _check_intermediates(doc, ("spec", "manufacturerCAs", i, "intermediates"), ca.intermediates)
    return problems


def rosters(result: LoadResult, perimeter) -> list[Problem]:  # type: ignore[no-untyped-def]
    """xref.roster-site (a roster site the perimeter lacks), xref.roster-duplicate (one EK or one
    node name twice: one EK is one node)."""
    problems: list[Problem] = []
    seen_ek: dict[str, str] = {}
    seen_name: dict[str, str] = {}
    for roster in result.rosters:
        doc = roster.source
        assert doc is not None
        sites = doc.data["spec"]["sites"]
        for i, site in enumerate(sites):
            if perimeter is not None and perimeter.site(site["name"]) is None:
                problems.append(doc.problem(("spec", "sites", i, "name"), "xref.roster-site",
                                            f"site {site['name']!r} is not in perimeter {perimeter.name!r}",
                                            f"use one of: {', '.join(s.name for s in perimeter.sites)}"))
            for j, node in enumerate(site["nodes"]):
                where = f"{site['name']} nodes[{j}]"
                if node["ek"] in seen_ek:
                    problems.append(doc.problem(("spec", "sites", i, "nodes", j, "ek"), "xref.roster-duplicate",
                                                f"EK {node['ek'][:23]}... is listed twice (also {seen_ek[node['ek']]})",
                                                "one EK is one machine in one site: keep one entry"))
                seen_ek.setdefault(node["ek"], where)
                if "name" in node:
                    if node["name"] in seen_name:
                        problems.append(doc.problem(("spec", "sites", i, "nodes", j, "name"), "xref.roster-duplicate",
                                                    f"node name {node['name']!r} is listed twice (also "
                                                    f"{seen_name[node['name']]})", "give each machine its own name"))
                    seen_name.setdefault(node["name"], where)
    return problems


def _check_intermediates(doc, path, file: str) -> list[Problem]:  # type: ignore[no-untyped-def]
    """xref.ca-missing, xref.ca-invalid, xref.ca-not-ca for an intermediates bundle."""
    if not os.path.isfile(file):
        return [doc.problem(path, "xref.ca-missing", f"intermediate CA bundle {file} does not exist",
                            "the path is relative to the perimeter file; put the vendor's intermediate CAs (PEM) there")]
    try:
        with open(file, "rb") as fh:
            certs = x509.load_pem_x509_certificates(fh.read(4 * 1024 * 1024))
    except ValueError as exc:
        return [doc.problem(path, "xref.ca-invalid", f"{file} is not a PEM bundle of certificates ({exc})",
                            "give the intermediate CA certificates in PEM form, one after the other")]
    problems = []
    for cert in certs:
        try:
            is_ca = cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
        except x509.ExtensionNotFound:
            is_ca = False
        if not is_ca:
            problems.append(doc.problem(path, "xref.ca-not-ca", f"{cert.subject.rfc4514_string()} in {file} is not a CA "
                                                                "certificate (no basicConstraints CA:TRUE)",
                                        "keep only the manufacturer's intermediate CA certificates in the bundle"))
    return problems


def _check_ca(doc, path, file: str, pinned: str | None) -> list[Problem]:  # type: ignore[no-untyped-def]
    if not os.path.isfile(file):
        return [doc.problem(path, "xref.ca-missing", f"manufacturer CA certificate {file} does not exist",
                            "the path is relative to the perimeter file; put the CA's PEM file there")]
    try:
        with open(file, "rb") as fh:
            raw = fh.read(1024 * 1024)
        cert = (x509.load_pem_x509_certificate(raw) if b"-----BEGIN" in raw
                else x509.load_der_x509_certificate(raw))
    except (ValueError, TypeError) as exc:
        return [doc.problem(path, "xref.ca-invalid", f"{file} is not an X.509 certificate ({exc})",
                            "give the CA certificate in PEM or DER form")]
    problems: list[Problem] = []
    try:
        is_ca = cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    except x509.ExtensionNotFound:
        is_ca = False
    if not is_ca:
        problems.append(doc.problem(path, "xref.ca-not-ca", f"{file} is not a CA certificate (no basicConstraints CA:TRUE)",
                                    "name the manufacturer's CA certificate, not an EK certificate"))
    now = datetime.datetime.now(datetime.UTC)
    if cert.not_valid_after_utc < now:
        problems.append(doc.problem(path, "xref.ca-expired", f"{file} expired on {cert.not_valid_after_utc:%Y-%m-%d}",
                                    "EK certificates it issued may still verify; get the manufacturer's current CA",
                                    "warning"))
    # Over the DER encoding, as `openssl x509 -fingerprint -sha256` computes it.
    digest = hashlib.sha256(cert.public_bytes(Encoding.DER)).hexdigest()
    if pinned and digest != pinned:
        problems.append(doc.problem(path, "xref.ca-fingerprint",
                                    f"{file} has SHA-256 fingerprint {digest}, not the pinned {pinned}",
                                    "the file was replaced: check where it came from before changing the pin"))
    return problems


def builds(result: LoadResult, perimeter: Perimeter | None) -> list[Problem]:
    """xref.duplicate-build, xref.no-approved-build (warning), xref.build-artifact, xref.build-bank,
    xref.artifact-digest, xref.artifact-missing, xref.cmdline-digest, xref.platform-overlap, and
    those of _references."""
    problems: list[Problem] = _once_and_approved(result.builds, "xref.duplicate-build", "xref.no-approved-build",
                                                 "give each build its own name; versions go in spec.version")
    for build in result.builds:
        doc = build.source
        assert doc is not None
        data = doc.data
        for i, entry in enumerate(data["spec"]["measurements"]["pcrs"]):
            for j, event in enumerate(entry["events"]):
                if "artifact" in event and event["artifact"] not in build.artifacts:
                    problems.append(doc.problem(
                        ("spec", "measurements", "pcrs", i, "events", j, "artifact"), "xref.build-artifact",
                        f"event names artifact {event['artifact']!r}, which this build does not list",
                        f"add it under spec.artifacts (listed: {', '.join(build.artifacts) or 'none'})"))
                if "artifact" in event and build.bank != "sha256":
                    problems.append(doc.problem(
                        ("spec", "measurements", "pcrs", i, "events", j), "xref.build-bank",
                        "an artifact event stands for its sha256 digest, but this build's bank is " + build.bank,
                        "give the digest in the build's bank explicitly"))
            owners = [p.name for p in result.platforms if entry["pcr"] in p.pcrs]
            if owners:
                problems.append(doc.problem(
                    ("spec", "measurements", "pcrs", i, "pcr"), "xref.platform-overlap",
                    f"PCR {entry['pcr']} is the platform's (Platform {', '.join(owners)} lists it): a build may "
                    "not measure it too",
                    "keep firmware PCRs in the Platform manifests and the TVMM's in the builds"))
        problems += _references(build, perimeter)
        for name, art in build.artifacts.items():
            path = ("spec", "artifacts", name)
            if art.value is not None and hashlib.sha256(art.value.encode()).hexdigest() != art.sha256:
                actual = hashlib.sha256(art.value.encode()).hexdigest()
                problems.append(doc.problem(path + ("sha256",), "xref.cmdline-digest",
                                            f"sha256 does not match value (its digest is {actual})",
                                            "fix the digest or the value"))
            if art.path is not None:
                if not os.path.isfile(art.path):
                    problems.append(doc.problem(path + ("path",), "xref.artifact-missing",
                                                f"artifact file {art.path} does not exist",
                                                "the path is relative to the build manifest"))
                else:
                    actual = sha256_file(art.path)
                    if actual != art.sha256:
                        problems.append(doc.problem(path + ("sha256",), "xref.artifact-digest",
                                                    f"{art.path} has sha256 {actual}, not the one listed",
                                                    "the file changed: rebuild the manifest from the new artifact, or restore the file"))
    return problems


def platforms(result: LoadResult, perimeter: Perimeter | None) -> list[Problem]:
    """xref.duplicate-platform, xref.no-approved-platform (warning), and those of _references."""
    problems = _once_and_approved(result.platforms, "xref.duplicate-platform", "xref.no-approved-platform",
                                  "give each hardware model's firmware its own name")
    for platform in result.platforms:
        problems += _references(platform, perimeter)
    return problems


def _once_and_approved(refs: list[TVMMBuild] | list[Platform], duplicate: str, none_approved: str,
                       hint: str) -> list[Problem]:
    """Each build or platform defined once; a warning when none is approved (no node can be admitted)."""
    problems: list[Problem] = []
    seen: dict[str, TVMMBuild | Platform] = {}
    what = "TVMM build" if duplicate == "xref.duplicate-build" else "Platform"
    for ref in refs:
        doc = ref.source
        assert doc is not None
        if ref.name in seen:
            other = seen[ref.name].source
            problems.append(doc.problem(("metadata", "name"), duplicate,
                                        f"{what} {ref.name!r} is defined twice (also in {other.file if other else 'elsewhere'})",
                                        hint))
        seen.setdefault(ref.name, ref)
    if refs and not any(r.status == "approved" for r in refs):
        doc = refs[0].source
        assert doc is not None
        problems.append(doc.problem(("spec", "status"), none_approved,
                                    f"no {what} is approved: no node can be admitted", f"approve a {what.split()[-1].lower()}",
                                    "warning"))
    return problems


def _references(ref: TVMMBuild | Platform, perimeter: Perimeter | None) -> list[Problem]:
    """Reference measurements against the perimeter, for builds and platforms alike:
    xref.build-pcr-not-quoted, xref.build-bank, xref.candidate-rollout."""
    doc = ref.source
    assert doc is not None
    what = "this build" if ref.kind == "build" else "this platform"
    problems: list[Problem] = []
    for i, entry in enumerate(doc.data["spec"]["measurements"]["pcrs"]):
        if perimeter is not None and entry["pcr"] not in perimeter.attestation.pcrs:
            problems.append(doc.problem(
                ("spec", "measurements", "pcrs", i, "pcr"), "xref.build-pcr-not-quoted",
                f"PCR {entry['pcr']} is measured by {what} but not quoted by the perimeter's policy "
                f"(pcrs {list(perimeter.attestation.pcrs)})",
                "add the PCR to the Perimeter's spec.attestation.pcrs, or it would never be verified"))
    if perimeter is not None and ref.bank != perimeter.attestation.bank:
        problems.append(doc.problem(("spec", "measurements", "bank"), "xref.build-bank",
                                    f"{what} measures bank {ref.bank} but the perimeter quotes {perimeter.attestation.bank}",
                                    "give the reference digests in the perimeter's bank"))
    if ref.status == "candidate" and ref.rollout is None:
        problems.append(doc.problem(("spec", "status"), "xref.candidate-rollout",
                                    f"{what} is a candidate but names no rollout: it would be admitted nowhere",
                                    "list the nodes of the staged rollout under spec.rollout.nodes"))
    elif ref.status != "candidate" and ref.rollout is not None:
        problems.append(doc.problem(("spec", "rollout"), "xref.candidate-rollout",
                                    f"{what} is {ref.status}, so spec.rollout would be ignored: it is for candidates only",
                                    "remove spec.rollout once the rollout is done, or set status: candidate"))
    return problems


def _parse_ip(text: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    try:
        return ipaddress.ip_address(text)
    except ValueError:
        return None


def inventory_hosts(inventory: Inventory, result: LoadResult, perimeter: Perimeter | None) -> list[Problem]:
    """One problem per place: a group variable wrong for ten hosts is one fix, so one report."""
    merged: dict[tuple[str, int, int, str], tuple[Problem, int]] = {}
    for problem in _inventory_hosts(inventory, result, perimeter):
        key = (problem.file, problem.line, problem.column, problem.code)
        first, count = merged.get(key, (problem, 0))
        merged[key] = (first, count + 1)
    out = []
    for problem, count in merged.values():
        if count > 1:
            from dataclasses import replace

            problem = replace(problem, message=f"{problem.message} (and {count - 1} more host(s) from this line)")
        out.append(problem)
    return out


def _inventory_hosts(inventory: Inventory, result: LoadResult, perimeter: Perimeter | None) -> list[Problem]:
    """xref.no-perimeter, xref.unknown-site, xref.address-not-ip, xref.address-outside-site,
    xref.duplicate-address, xref.unknown-build, xref.no-site (warning)."""
    problems: list[Problem] = []
    by_address: dict[str, Host] = {}
    build_names = {b.name for b in result.builds}
    if perimeter is None and not result.perimeters and inventory.hosts and inventory.documents:
        problems.append(inventory.documents[0].problem(
            (), "xref.no-perimeter", "no Perimeter among the validated files: sites and addresses not checked",
            "validate the inventory together with its Perimeter manifest", "warning"))
    for host in inventory.hosts.values():
        site_name = host.vars.get("tcc_site")
        address = host.address
        addr_origin = host.where("ansible_host")
        ip = _parse_ip(address)
        if ip is not None:
            canonical = str(ip)
            if canonical in by_address and addr_origin is not None:
                other = by_address[canonical]
                problems.append(addr_origin.problem(
                    "xref.duplicate-address",
                    f"hosts {other.name!r} and {host.name!r} share address {canonical}",
                    "every node has its own address; the perimeter check depends on it"))
            by_address.setdefault(canonical, host)
        if site_name is None:
            where = host.where()
            if where is not None and perimeter is not None:
                problems.append(where.problem(
                    "xref.no-site", f"host {host.name!r} has no tcc_site: it is outside the perimeter and will never be admitted",
                    "set tcc_site to a perimeter site if it should run VMs", "warning"))
        elif perimeter is not None:
            origin = host.where("tcc_site")
            site = perimeter.site(str(site_name))
            if site is None:
                names = ", ".join(s.name for s in perimeter.sites)
                if origin:
                    problems.append(origin.problem(
                        "xref.unknown-site", f"host {host.name!r}: site {site_name!r} is not in perimeter {perimeter.name!r}",
                        f"sites are: {names}"))
            elif ip is None:
                if addr_origin:
                    problems.append(addr_origin.problem(
                        "xref.address-not-ip",
                        f"host {host.name!r} is in site {site.name!r} but its address {address!r} is not an IP address",
                        "set ansible_host to the node's IP address so the perimeter can be checked"))
            elif not site.contains(ip):
                nets = ", ".join(str(n) for n in site.networks)
                if addr_origin:
                    problems.append(addr_origin.problem(
                        "xref.address-outside-site",
                        f"host {host.name!r} address {address} is not in site {site.name!r} networks ({nets})",
                        "fix ansible_host or tcc_site, or add the network to the site"))
        build = host.vars.get("tcc_build")
        if build is not None and result.builds and str(build) not in build_names:
            origin = host.where("tcc_build")
            if origin:
                problems.append(origin.problem(
                    "xref.unknown-build", f"host {host.name!r}: TVMM build {build!r} is not defined",
                    f"builds are: {', '.join(sorted(build_names))}"))
    return problems


def requests(result: LoadResult, perimeter: Perimeter | None) -> list[Problem]:
    """xref.unknown-site, xref.unknown-build, xref.unsatisfiable-version (warning)."""
    problems: list[Problem] = []
    build_names = {b.name for b in result.builds}
    for req in result.requests:
        doc = req.source
        assert doc is not None
        base = ("spec", "constraints")
        if perimeter is not None:
            for i, site in enumerate(req.sites):
                if perimeter.site(site) is None:
                    problems.append(doc.problem(base + ("sites", i), "xref.unknown-site",
                                                f"site {site!r} is not in perimeter {perimeter.name!r}",
                                                f"sites are: {', '.join(s.name for s in perimeter.sites)}"))
        if result.builds:
            for i, name in enumerate(req.builds):
                if name not in build_names:
                    problems.append(doc.problem(base + ("builds", i), "xref.unknown-build",
                                                f"TVMM build {name!r} is not defined",
                                                f"builds are: {', '.join(sorted(build_names))}"))
            if req.min_build_version is not None:
                wanted = version_key(req.min_build_version)
                if not any(b.admissible and version_key(b.version) >= wanted for b in result.builds):
                    problems.append(doc.problem(base + ("minBuildVersion",), "xref.unsatisfiable-version",
                                                f"no approved build has version {req.min_build_version} or later",
                                                "the request could not be placed anywhere", "warning"))
    return problems


def playbook_tasks(doc) -> Iterator[Problem]:  # type: ignore[no-untyped-def]
    """xref.task-module: a task calls exactly one module, or is one block or include;
    xref.task-rescue: rescue and always belong to a block."""
    for i, play in enumerate(doc.data or []):
        if isinstance(play, dict):
            for section in SECTIONS:
                yield from task_list(doc, play.get(section), (i, section))


def task_list(doc, tasks, base: tuple) -> Iterator[Problem]:  # type: ignore[no-untyped-def]
    """The checks of playbook_tasks over one list of tasks (a play's section, a block, a file)."""
    for j, task in enumerate(tasks if isinstance(tasks, list) else []):
        if not isinstance(task, dict):
            continue
        task = {canonical(k): v for k, v in task.items()}
        where = (*base, j)
        actions = [k for k in task if k in MODULES or k in STRUCTURES]
        if any(k not in actions and k not in TASK_KEYWORDS for k in task):
            continue  # the schema already reports the unknown key
        if len(actions) != 1:
            yield doc.problem(
                where, "xref.task-module",
                "task calls no module" if not actions else f"task does {len(actions)} things: {', '.join(actions)}",
                f"a task calls exactly one of: {', '.join(MODULES)}; or is a block or one of {', '.join(STRUCTURES[1:])}")
            continue
        if actions[0] != "block":
            for key in ("rescue", "always"):
                if key in task:
                    yield doc.problem((*where, key), "xref.task-rescue", f"{key} without block",
                                      f"{key} belongs to a block: put the tasks under block: and keep {key}: beside it")
        for key in ("block", "rescue", "always"):
            if actions[0] == "block":
                yield from task_list(doc, task.get(key), (*where, key))


__all__ = ["check", "MANIFEST_KINDS"]
