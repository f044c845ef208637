"""Enrollment, attestation and admission on the lab's real swtpm TPMs."""

from __future__ import annotations

import base64
import dataclasses
import json
import os
import time
from contextlib import contextmanager

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import padding

from tccdeploy.coordinator.admission import OID_BUILD, OID_SITE
from tccdeploy.coordinator.enrollment import EnrollmentRefused
from tccdeploy.coordinator.identity import init as tc_init
from tccdeploy.coordinator.service import Coordinator
from tccdeploy.coordinator.verifier import Evidence
from tccdeploy.engine.attestation import attest, enroll
from tccdeploy.engine.helper import RemoteError
from tccdeploy.engine.runner import Engine
from tccdeploy.lab.lab import Lab
from tccdeploy.manifest.loader import load_inventory, load_manifests

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def tc(lab: Lab, tmp_path_factory):
    manifests = load_manifests([lab.manifests_dir])
    state = str(tmp_path_factory.mktemp("tc"))
    tc_init(state)
    coordinator = Coordinator.from_manifests(manifests, state)
    yield coordinator
    coordinator.close()


@pytest.fixture(scope="module")
def engine(lab: Lab, tc: Coordinator):
    inventory = load_inventory(lab.inventory_dir)
    with Engine(inventory.select("all"), state=tc.state) as instance:
        results = {r.host: r for r in instance.run(enroll(tc))}
        instance.enrolled = results  # type: ignore[attr-defined]
        yield instance


def _by_name(results):
    return {r.host: r for r in results}


def _hosts(engine: Engine, *names: str):
    """The hosts, with fresh sessions: a lab reset (reboot) between tests drops connections."""
    for name in names:
        session = engine.sessions.pop(name, None)
        if session is not None:
            session.close()
    return [h for h in engine.hosts if h.name in names]


def test_genuine_tpms_on_the_roster_enroll_the_rogue_vendor_and_the_outsider_do_not(engine: Engine, tc: Coordinator):
    results = engine.enrolled  # type: ignore[attr-defined]
    assert results["roguetpm1"].status == "failed" and results["roguetpm1"].reason == "ek.untrusted-manufacturer"
    # A genuine TPM outside the perimeter: its address is the engine's word, the roster is the TC's.
    assert results["outside1"].status == "failed" and results["outside1"].reason == "perimeter.not-in-roster"
    assert tc.registry.node("outside1") is None
    for name in ("node1", "node2", "node3", "node4"):
        assert results[name].status == "changed", results[name].msg
        assert tc.registry.node(name)["site"] == lab_site(name)


def lab_site(name: str) -> str:
    return "site1" if name in ("node1", "node2") else "site2"


def test_enrolling_again_with_the_same_tpm_changes_nothing(engine: Engine, tc: Coordinator):
    before = (tc.registry.identity("node2"), tc.registry.node("node2"))
    result = engine.run(enroll(tc), _hosts(engine, "node2"))[0]
    assert result.status == "ok" and result.data["enrolled"], result.msg
    assert (tc.registry.identity("node2"), tc.registry.node("node2")) == before


def test_good_nodes_are_admitted_and_the_others_refused_with_their_reason(lab: Lab, engine: Engine, tc: Coordinator):
    results = _by_name(engine.run(attest(tc, admit_nodes=True)))
    for name in ("node1", "node2", "node3", "node4"):
        assert results[name].status == "changed" and results[name].data["admitted"], results[name].msg
        assert tc.registry.node(name)["state"] == "admitted"
    assert results["outside1"].reason == "node.not-enrolled"
    assert results["roguetpm1"].reason == "node.not-enrolled"
    cert = x509.load_pem_x509_certificate(tc.registry.certificate("node3")["pem"].encode())
    assert cert.extensions.get_extension_for_oid(OID_SITE).value.value[2:] == b"site2"
    assert cert.extensions.get_extension_for_oid(OID_BUILD).value.value[2:] == b"tvmm-2026.1"


def _tk_check(session, certificate_pem: str) -> bool:
    """Encrypt a random challenge to the node certificate's key and ask the node's TPM to open it."""
    cert = x509.load_pem_x509_certificate(certificate_pem.encode())
    secret = os.urandom(32)
    ciphertext = cert.public_key().encrypt(secret, padding.OAEP(padding.MGF1(hashes.SHA256()), hashes.SHA256(),
                                                                b"tccdeploy-tk-check\x00"))
    try:
        answer = session.tvmm("tk_check", {"ciphertext": base64.b64encode(ciphertext).decode()})
    except RemoteError as exc:
        assert "policy" in str(exc).lower()
        return False
    import hashlib

    return answer["digest"] == hashlib.sha256(secret).hexdigest()


def test_tamper_is_refused_quarantines_and_the_earlier_tk_no_longer_decrypts(lab: Lab, lab_node, engine: Engine, tc: Coordinator):
    node = lab_node("node2")
    host = _hosts(engine, node.name)
    engine.run(attest(tc, admit_nodes=True), host)
    pem = tc.registry.certificate(node.name)["pem"]
    session = engine.session(host[0])
    assert _tk_check(session, pem)
    lab.tamper(node.name)
    result = engine.run(attest(tc), host)[0]
    assert result.status == "failed" and result.data["reasons"] == ["build.unknown"]
    assert tc.registry.node(node.name)["state"] == "quarantined" and tc.registry.certificate(node.name) is None
    assert not _tk_check(session, pem)  # the TPM itself refuses: PCR policy


def test_hidden_tamper_fails_the_log_replay(lab: Lab, lab_node, engine: Engine, tc: Coordinator):
    node = lab_node("node2")
    lab.tamper(node.name, hide=True)
    result = engine.run(attest(tc), _hosts(engine, node.name))[0]
    assert "eventlog.replay" in result.data["reasons"]


def test_revoked_build_is_refused(lab: Lab, lab_node, engine: Engine, tc: Coordinator):
    node = lab_node("node2")
    lab.reboot(node.name, "tvmm-2025.4")
    result = engine.run(attest(tc), _hosts(engine, node.name))[0]
    assert result.data["reasons"] == ["build.revoked"] and result.data["build"] == "tvmm-2025.4"


def test_reboot_into_the_same_build_is_readmitted(lab: Lab, lab_node, engine: Engine, tc: Coordinator):
    node = lab_node("node1")
    host = _hosts(engine, node.name)
    engine.run(attest(tc, admit_nodes=True), host)
    lab.reboot(node.name)
    result = engine.run(attest(tc, admit_nodes=True), _hosts(engine, node.name))[0]
    # The same approved boot: its PCR-bound key still opens, so the admission holds (as the
    # playbook's attest module decides): nothing to change.
    assert result.status == "ok" and result.data["admitted"]
    assert result.data["warnings"] == ["node.rebooted"]
    assert tc.registry.node(node.name)["state"] == "admitted"


def _quote(engine: Engine, lab: Lab, name: str, nonce: bytes, pcrs=None) -> Evidence:
    host = _hosts(engine, name)[0]
    session = engine.session(host)
    answer = session.tvmm("quote", {"nonce": base64.b64encode(nonce).decode(),
                                    "bank": "sha256", "pcrs": pcrs or [0, 4, 8, 9, 11]})
    from tccdeploy.engine.attestation import host_key

    return Evidence(base64.b64decode(answer["attest"]), base64.b64decode(answer["signature"]),
                    {int(k): bytes.fromhex(v) for k, v in answer["pcrs"].items()}, base64.b64decode(answer["eventlog"]),
                    nonce, ssh_host_key=host_key(session))


def _codes(verdict) -> list[str]:
    return [r["code"] for r in verdict.reasons]


def test_real_quotes_replayed_or_from_another_node_are_refused(lab: Lab, engine: Engine, tc: Coordinator):
    nonce = tc.nonce("node1")
    evidence = _quote(engine, lab, "node1", nonce)
    verdict, first = tc.verify("node1", "site1", lab.node("node1").address, evidence)
    assert verdict.trusted, verdict.reasons
    # The same evidence again makes no new verdict (a retry gets the one recorded); other evidence
    # on a used nonce is a replay.
    assert tc.verify("node1", "site1", lab.node("node1").address, dataclasses.replace(evidence))[1] == first
    later = _quote(engine, lab, "node1", nonce)
    replay, _ = tc.verify("node1", "site1", lab.node("node1").address, later)
    assert _codes(replay) == ["nonce.replayed"]
    nonce = tc.nonce("node1")
    other = _quote(engine, lab, "node3", nonce)  # node3's TPM answers node1's nonce
    other.ssh_host_key = evidence.ssh_host_key
    verdict, _ = tc.verify("node1", "site1", lab.node("node1").address, other)
    assert "quote.signature" in _codes(verdict)


def test_a_real_quote_over_fewer_pcrs_is_refused(lab: Lab, engine: Engine, tc: Coordinator):
    nonce = tc.nonce("node1")
    verdict, _ = tc.verify("node1", "site1", lab.node("node1").address, _quote(engine, lab, "node1", nonce, [0, 4]))
    assert "quote.pcr-selection" in _codes(verdict)


def test_an_expired_nonce_is_refused(lab: Lab, engine: Engine, tc: Coordinator):
    short = Coordinator(dataclasses.replace(tc.perimeter, attestation=dataclasses.replace(tc.perimeter.attestation, nonce_ttl=1)),
                        tc.builds, tc.state, rosters=tc.rosters, platforms=tc.platforms)
    try:
        nonce = short.nonce("node1")
        evidence = _quote(engine, lab, "node1", nonce)
        time.sleep(1.2)
        verdict, _ = short.verify("node1", "site1", lab.node("node1").address, evidence)
        assert _codes(verdict) == ["nonce.expired"]
    finally:
        short.close()


def _ek_of(engine: Engine, name: str) -> str:
    from tccdeploy.coordinator.roster import ek_identities

    host = _hosts(engine, name)[0]
    identity = engine.session(host).tvmm("identity", {})
    return ek_identities(base64.b64decode(identity["ek_certificate"]))[0]


@contextmanager
def _tpm_swapped(lab: Lab, name: str, other: str):  # type: ignore[no-untyped-def]
    """The machine's TPM is replaced (a mainboard swap): its service, started again as at a boot,
    now opens other's TPM."""
    path = lab.service_dir(lab.node(name), "config.json")
    with open(path) as fh:
        original = fh.read()
    settings = json.loads(original)
    settings["tpm"] = lab.tcti(lab.node(other))
    with open(path, "w") as fh:
        json.dump(settings, fh)
    lab.restart_service(name)
    try:
        yield
    finally:
        with open(path, "w") as fh:
            fh.write(original)
        lab.restart_service(name)


def test_a_changed_tpm_is_refused_until_the_tc_operator_replaces_it(lab: Lab, engine: Engine, tc: Coordinator):
    host = _hosts(engine, "node4")[0]
    own_ak = tc.registry.identity("node4")["ak_public"]
    try:
        with _tpm_swapped(lab, "node4", "outside1"), Engine([host], state=tc.state) as other:
            assert other.run(enroll(tc))[0].reason == "perimeter.not-in-roster"  # a TPM the operator never racked
            tc.roster_add(_ek_of(engine, "outside1"), "site2")  # the operator racks a new machine...
            assert other.run(enroll(tc))[0].reason == "ek.changed"  # ...but node4 keeps its TPM until the operator says
            assert tc.registry.identity("node4")["ak_public"] == own_ak
            assert tc.replace_tpm("node4", "mainboard swapped") and tc.registry.node("node4")["state"] == "retired"
            assert other.run(enroll(tc))[0].status == "changed"
            assert tc.registry.identity("node4")["ek_fingerprint"] == _ek_of(engine, "outside1")[7:]
    finally:  # node4 gets its own TPM back, the same way
        tc.replace_tpm("node4", "test over")
        tc.roster_remove(_ek_of(engine, "outside1"))
        assert engine.run(enroll(tc), _hosts(engine, "node4"))[0].status == "changed"
    kinds = [e["kind"] for e in tc.registry.audit_entries(node="node4")]
    assert "node.replace-tpm" in kinds and "enrollment.refused" in kinds


def test_an_ak_not_bound_to_the_ek_is_refused(lab: Lab, lab_node, engine: Engine, tc: Coordinator):
    lab_node("node1")  # the failed activation may count against node1's TPM (dictionary attack); reset after
    node1, node3 = _hosts(engine, "node1")[0], _hosts(engine, "node3")[0]
    s1, s3 = engine.session(node1), engine.session(node3)
    identity = s1.tvmm("identity", {})
    foreign_ak = s3.tvmm("ak_create", {})  # an AK from another TPM
    with pytest.raises(EnrollmentRefused) as info:  # one EK is one node: node1's TPM under another name
        tc.enrollment_challenge("node1-impostor", base64.b64decode(identity["ek_certificate"]),
                                base64.b64decode(identity["ek_public"]), base64.b64decode(foreign_ak["ak_public"]),
                                "SHA256:x", None, node1.address)
    assert info.value.reason == "perimeter.roster-name"
    tc.replace_tpm("node1", "test: let node1's TPM enroll afresh")
    challenge = tc.enrollment_challenge("node1", base64.b64decode(identity["ek_certificate"]),
                                        base64.b64decode(identity["ek_public"]), base64.b64decode(foreign_ak["ak_public"]),
                                        "SHA256:x", None, node1.address)
    with pytest.raises(RemoteError):  # node1's TPM has the EK but not that AK
        s1.tvmm("ak_activate", {"credential": base64.b64encode(challenge.credential).decode(),
                                "secret": base64.b64encode(challenge.secret).decode()})
    with pytest.raises(EnrollmentRefused) as info:
        tc.enrollment_finish("node1", os.urandom(32))
    assert info.value.reason == "ak.not-bound"
    assert tc.registry.identity("node1") is None and tc.registry.node("node1")["state"] == "retired"
    assert engine.run(enroll(tc), [node1])[0].status == "changed"  # node1 with its own AK again
    assert engine.run(attest(tc), _hosts(engine, "node3"))[0].status == "ok"  # node3's AK was only pending: kept


def test_swapped_ek_certificate_is_refused(lab: Lab, engine: Engine, tc: Coordinator):
    node1, node3 = _hosts(engine, "node1")[0], _hosts(engine, "node3")[0]
    own = engine.session(node1).tvmm("identity", {})
    other = engine.session(node3).tvmm("identity", {})
    from .attestkit import Node

    with pytest.raises(EnrollmentRefused) as info:
        tc.enrollment_challenge("node1", base64.b64decode(other["ek_certificate"]), base64.b64decode(own["ek_public"]),
                                Node().ak_public, "SHA256:x")
    assert info.value.reason == "ek.key-mismatch"


def test_nodes_command_lists_and_shows_history(lab: Lab, engine: Engine, tc: Coordinator):
    import json
    import subprocess
    import sys

    engine.run(attest(tc, admit_nodes=True), _hosts(engine, "node3", "outside1"))
    run = [sys.executable, "-m", "tccdeploy", "nodes", "--state", tc.state]
    listing = json.loads(subprocess.run([*run, "--json"], capture_output=True, text=True, check=True).stdout)
    by_name = {row["name"]: row for row in listing}
    assert "outside1" not in by_name and by_name["node3"]["state"] == "admitted"
    shown = subprocess.run([*run, "show", "node3"], capture_output=True, text=True, check=True).stdout
    assert shown.startswith("node3: admitted, site site2") and "trusted" in shown
    assert subprocess.run([*run, "show", "nosuch"], capture_output=True, text=True).returncode == 1
