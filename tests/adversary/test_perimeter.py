"""Where a node is, is the TC's record: forwarded addresses, site claims and forged asset tags."""

from __future__ import annotations

import dataclasses
import socket
import threading

import pytest

from tccdeploy.engine.attestation import enroll
from tccdeploy.engine.runner import Engine

from .conftest import World, b64, refused

pytestmark = pytest.mark.slow


class Forwarder:
    """A TCP forwarder on an in-site address, as a provider would put in front of an outside host."""

    def __init__(self, listen: tuple[str, int], target: tuple[str, int]):
        self.server = socket.create_server(listen)
        self.target = target
        self.stopped = False
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        while not self.stopped:
            try:
                client, _ = self.server.accept()
            except OSError:
                return
            upstream = socket.create_connection(self.target)
            for a, b in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pipe, args=(a, b), daemon=True).start()

    @staticmethod
    def _pipe(src: socket.socket, dst: socket.socket) -> None:
        try:
            while data := src.recv(65536):
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    def close(self) -> None:
        self.stopped = True
        self.server.close()


def test_a_forwarded_address_does_not_put_an_outside_host_inside(world: World, tmp_path):
    """outside1 has a genuine TPM and the approved build; a forwarder on 127.K.1.77 makes it look
    like a site1 machine to anything that trusts addresses. The roster does not."""
    lab = world.lab
    outside = lab.node("outside1")
    inside_address = outside.address.rsplit(".", 2)[0] + ".1.77"
    known = tmp_path / "known_hosts"
    key = (lab.node_dir(outside, "ssh_host_ed25519_key.pub"))
    with open(key) as fh:
        key_type, key_text = fh.read().split()[:2]
    known.write_text(f"[{inside_address}]:{lab.ssh_port} {key_type} {key_text}\n")
    host = next(h for h in world.engine.hosts if h.name == "outside1")
    disguised = dataclasses.replace(host, name="node9", vars=dict(host.vars, ansible_host=inside_address, tcc_site="site1",
                                                                   tcc_known_hosts=str(known)))
    before, audited = world.decisions(), world.audit_count()
    forwarder = Forwarder((inside_address, lab.ssh_port), (outside.address, lab.ssh_port))
    try:
        from tccdeploy.coordinator.client import RemoteCoordinator

        tc = RemoteCoordinator(world.service.url, str(world.service.engine_dir))
        with Engine([disguised], state=str(tmp_path / "engine")) as engine:
            result = engine.run(enroll(tc))[0]
        tc.close()
    finally:
        forwarder.close()
    assert result.status == "failed" and result.reason == "perimeter.not-in-roster", result.msg
    assert world.decisions() == before and world.audit_kinds_since(audited) == ["enrollment.refused"]


def test_a_site_claim_that_is_not_the_rosters_is_refused(world: World):
    """node1 is racked in site1; the engine claims site2 for it (say, to meet a customer's site constraint)."""
    try:
        evidence = world.quote("node1", world.nonce("node1"))
        response = world.post("/v1/attestations", {"node": "node1", "site": "site2",
                                                   "address": world.lab.node("node1").address, "evidence": evidence})
        assert response.status_code == 200
        verdict = response.json()
        assert verdict["verdict"] == "untrusted" and "perimeter.roster-site" in [r["code"] for r in verdict["reasons"]]
        with world.api() as client:
            assert client.get("/v1/nodes/node1").json()["node"]["site"] == "site1"  # the TC's record, not the claim
    finally:
        world.restore("node1")


def _owner_index_with_the_tag(world: World, name: str, index: int, value: bytes) -> None:
    """What the provider can do with owner authorisation: define its own NV index holding the tag."""
    from tpm2_pytss import ESAPI, ESYS_TR, TPM2_ALG, TPM2B_NV_PUBLIC, TPMA_NV, TPMS_NV_PUBLIC

    attrs = TPMA_NV.OWNERWRITE | TPMA_NV.OWNERREAD | TPMA_NV.AUTHREAD | TPMA_NV.NO_DA
    public = TPM2B_NV_PUBLIC(nvPublic=TPMS_NV_PUBLIC(nvIndex=index, nameAlg=TPM2_ALG.SHA256, attributes=attrs,
                                                     dataSize=len(value)))
    with ESAPI(world.tcti(name)) as esys:
        handle = esys.nv_define_space(None, public, auth_handle=ESYS_TR.OWNER)
        esys.nv_write(handle, value, 0, auth_handle=ESYS_TR.OWNER)


def _platform_index_refused_to_the_owner(world: World, name: str) -> None:
    """And what it cannot: the lab's firmware disabled the platform hierarchy before the OS."""
    from tpm2_pytss import ESAPI, ESYS_TR, TPM2_ALG, TPM2B_NV_PUBLIC, TPMA_NV, TPMS_NV_PUBLIC, TSS2_Exception

    attrs = TPMA_NV.PLATFORMCREATE | TPMA_NV.PPWRITE | TPMA_NV.PPREAD | TPMA_NV.AUTHREAD
    public = TPM2B_NV_PUBLIC(nvPublic=TPMS_NV_PUBLIC(nvIndex=0x01500009, nameAlg=TPM2_ALG.SHA256, attributes=attrs,
                                                     dataSize=4))
    with ESAPI(world.tcti(name)) as esys, pytest.raises(TSS2_Exception):
        esys.nv_define_space(None, public, auth_handle=ESYS_TR.PLATFORM)


def _certify(world: World, name: str, index: int, nonce: bytes) -> dict[str, str]:
    certified = world.session(name).tvmm("nv_certify", {"index": index, "nonce": b64(nonce)})
    return {"asset_attest": certified["attest"], "asset_signature": certified["signature"],
            "asset_nv_public": certified["nv_public"]}


def test_an_asset_tag_in_an_index_the_provider_made_is_refused(world: World):
    """node3 (site2, tagged) presents a certification of an owner index holding site2's tag."""
    policy = world.policy
    tag_index = int(policy["asset_tags"]["site2"])
    forged_index = tag_index + 0x100
    _platform_index_refused_to_the_owner(world, "node3")
    _owner_index_with_the_tag(world, "node3", forged_index, b"site2-rack-a")
    try:
        nonce = world.nonce("node3")
        evidence = world.quote("node3", nonce) | _certify(world, "node3", forged_index, nonce)
        verdict = world.post("/v1/attestations", {"node": "node3", "site": "site2",
                                                  "address": world.lab.node("node3").address, "evidence": evidence}).json()
        assert verdict["verdict"] == "untrusted"
        assert [r["code"] for r in verdict["reasons"]] == ["perimeter.asset-tag-index"]
        # The same forgery presented as the site's index (a wrong name for the certified index) fails too.
        nonce = world.nonce("node3")
        real = _certify(world, "node3", tag_index, nonce)
        evidence = world.quote("node3", nonce) | _certify(world, "node3", forged_index, nonce)
        evidence["asset_nv_public"] = real["asset_nv_public"]
        verdict = world.post("/v1/attestations", {"node": "node3", "site": "site2",
                                                  "address": world.lab.node("node3").address, "evidence": evidence}).json()
        assert [r["code"] for r in verdict["reasons"]] == ["perimeter.asset-tag-index"]
    finally:
        _remove_index(world, "node3", forged_index)
        world.restore("node3")


def _remove_index(world: World, name: str, index: int) -> None:
    from tpm2_pytss import ESAPI, ESYS_TR, TPM2_HANDLE

    with ESAPI(world.tcti(name)) as esys:
        esys.nv_undefine_space(esys.tr_from_tpmpublic(TPM2_HANDLE(index)), auth_handle=ESYS_TR.OWNER)


def test_an_asset_tag_certified_over_another_nonce_is_refused(world: World):
    """A certification made earlier (or over a nonce the engine chose, all zeros here) is not fresh."""
    tag_index = int(world.policy["asset_tags"]["site2"])
    try:
        nonce = world.nonce("node3")
        evidence = world.quote("node3", nonce) | _certify(world, "node3", tag_index, bytes(32))
        response = world.post("/v1/attestations", {"node": "node3", "site": "site2",
                                                   "address": world.lab.node("node3").address, "evidence": evidence})
        verdict = response.json()
        assert [r["code"] for r in verdict["reasons"]] == ["perimeter.asset-tag-nonce"]
        refused(world.post("/v1/attestations", {"node": "node3", "address": "127.0.0.1", "evidence": dict(
            evidence, asset_nonce=b64(bytes(32)))}), "request.schema")  # the engine no longer names the nonce
    finally:
        world.restore("node3")
