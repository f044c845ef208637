"""Encrypted launch on the lab with real QEMU: only where the key was released, only while trusted."""

from __future__ import annotations

import base64
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tccdeploy.coordinator.identity import load as tc_load
from tccdeploy.coordinator.keybroker import Refused
from tccdeploy.coordinator.receipts import ReceiptError
from tccdeploy.coordinator.receipts import verify as verify_receipt
from tccdeploy.crypto import bundle as bundles
from tccdeploy.crypto import customer, wrap
from tccdeploy.crypto import ticket as tickets
from tccdeploy.crypto.request import sign_request
from tccdeploy.engine.attestation import attest, enroll
from tccdeploy.engine.helper import RemoteError
from tccdeploy.engine.launch import launch, upload_disk
from tccdeploy.engine.runner import Engine
from tccdeploy.lab.lab import Lab
from tccdeploy.manifest.loader import load_inventory

from .labvms import kill_everywhere, kill_vm
from .tcworld import coordinator_with_customer  # noqa: E402

pytestmark = pytest.mark.slow

REQUEST = """apiVersion: tccdeploy/v1
kind: PlacementRequest
metadata:
  name: {name}
spec:
  image: {image}
  vcpus: 1
  memoryMiB: 64
  constraints: {constraints}
"""


@pytest.fixture(scope="module")
def world(lab: Lab, tmp_path_factory):
    """A TC with one registered customer, and the lab's nodes enrolled and admitted."""
    root = tmp_path_factory.mktemp("launch")
    tc, state = coordinator_with_customer(lab, root)
    raw = root / "disk.raw"
    with open(raw, "wb") as fh:
        fh.write(b"TCCDEPLOY-GUEST-MARKER" + bytes(4 * 1024 * 1024))
    engine = Engine(load_inventory(lab.inventory_dir).select("all"), state=state)
    enrolled = {r.host: r for r in engine.run(enroll(tc))}
    admitted = {r.host: r for r in engine.run(attest(tc, admit_nodes=True))}
    for name in ("node1", "node2", "node3"):
        assert enrolled[name].status == "changed", enrolled[name].msg
        assert admitted[name].status == "changed", admitted[name].msg
    counter = iter(range(1000))

    class World:
        pass

    w = World()
    w.root, w.tc, w.engine, w.key_path, w.raw, w.state = root, tc, engine, str(root / "customer.pem"), raw, state

    def request(constraints: str = "{sites: [site1]}", seal: bool = True, name: str | None = None):
        name = name or f"vm-{next(counter)}"
        image = root / f"{name}.sealed"
        if seal:
            bundles.seal(str(raw), bundles.load_tc(str(root / "tc.pem")), customer.load(w.key_path), str(image), name)
        path = root / f"{name}.yml"
        path.write_text(REQUEST.format(name=name, image=image.name, constraints=constraints))
        return path

    w.request = request
    yield w
    for vm in tc.registry.vms():
        kill_everywhere(lab, vm["vm_id"])
    engine.close()
    tc.close()


def _launch(w, path):  # type: ignore[no-untyped-def]
    envelope = sign_request(str(path), w.key_path)
    for name in list(w.engine.sessions):  # lab resets between tests drop connections
        w.engine.sessions.pop(name).close()
    return envelope, launch(w.engine, w.tc, envelope, envelope["bundle"])


def test_a_sealed_image_launches_on_a_trusted_node_and_the_receipt_verifies(lab: Lab, world):
    envelope, result = _launch(world, world.request())
    assert result.node in ("node1", "node2") and result.receipt
    # where request -> running went (issue 20): the engine's steps, and the real service's own
    assert list(result.steps)[:7] == ["accept", "placement", "attestation", "upload", "key release", "node launch",
                                      "node: ticket and disk checks"]
    assert {"node: TPM unwrap", "node: QEMU start", "node: disk opened, VM running", "node: TPM evidence", "receipt"} \
        <= set(result.steps) and all(v >= 0 for v in result.steps.values())
    assert sum(v for k, v in result.steps.items() if k.startswith("node: ")) <= result.steps["node launch"]
    vm = world.tc.registry.vm(envelope["request"]["manifest"]["metadata"]["name"])
    assert vm["state"] == "running" and vm["node"] == result.node
    status = world.engine.session(next(h for h in world.engine.hosts if h.name == result.node)).tvmm(
        "vm_status", {"vm_id": vm["vm_id"]})
    assert status["status"] == "running"
    tc_cert = tc_load(world.state).certificate
    body = verify_receipt(result.receipt, tc_cert)
    assert body["node"] == result.node and body["tvmm_build"] == "tvmm-2026.1"
    assert body["image_sha256"] == vm["image_sha256"]
    path = world.root / "receipt.json"
    path.write_text(json.dumps(result.receipt))
    proc = subprocess.run([sys.executable, "-m", "tccdeploy", "receipt", "verify", str(path), "--tc", str(world.root / "tc.pem")],
                          capture_output=True, text=True)
    assert proc.returncode == 0 and proc.stdout.startswith("VALID")
    raw = path.read_bytes()
    for i in range(0, len(raw), max(1, len(raw) // 40)):
        altered = bytearray(raw)
        altered[i] = (altered[i] + 1) % 256
        try:
            parsed = json.loads(bytes(altered))
            verify_receipt(parsed, tc_cert)
        except (ReceiptError, ValueError, UnicodeDecodeError):
            continue
        # What verified must be the same document: a changed space, or a float's last digit that
        # parses to the same double (1764780000.1234567 and ...568 can be one number).
        assert parsed == json.loads(raw), f"byte {i} changed the receipt and it still verified"


def test_a_replayed_request_is_refused(lab: Lab, world):
    envelope, _ = _launch(world, world.request())
    with pytest.raises(Refused) as info:
        launch(world.engine, world.tc, envelope, envelope["bundle"])
    assert info.value.reason == "request.replayed"


def test_constraints_only_untrusted_nodes_meet_are_refused_with_reasons(lab: Lab, world):
    with pytest.raises(Refused) as info:
        _launch(world, world.request("{builds: [tvmm-2025.4]}"))
    assert info.value.reason == "placement.none"
    assert "build tvmm-2026.1 not in ['tvmm-2025.4']" in str(info.value)
    assert "node1: build tvmm-2026.1 not in" in str(info.value)


def _release(world, node: str):  # type: ignore[no-untyped-def]
    """Accept a fresh request and have the TC release its key to node."""
    path = world.request()
    envelope = sign_request(str(path), world.key_path)
    record = world.tc.accept_request(envelope, bundles.load(envelope["bundle"]))
    host = next(h for h in world.engine.hosts if h.name == node)
    world.engine.sessions.pop(node, None)
    admitted = world.tc.registry.node(node)["state"] == "admitted"
    result = world.engine.run(attest(world.tc, admit_nodes=not admitted), [host])[0]
    assert result.status in ("ok", "changed"), result.msg
    return record, world.tc.release_key(record["id"], node), envelope


def _start(world, node: str, record, ticket: dict, bundle_dir: str):  # type: ignore[no-untyped-def]
    host = next(h for h in world.engine.hosts if h.name == node)
    session = world.engine.session(host)
    upload_disk(session, record["vm_id"], os.path.join(bundle_dir, "disk.qcow2"), record["image_sha256"])
    return session.tvmm("launch", {"ticket": ticket})


def test_a_launch_ticket_for_another_node_is_refused_there(lab: Lab, world):
    record, release, envelope = _release(world, "node1")
    with pytest.raises(RemoteError) as info:
        _start(world, "node2", record, release["ticket"], envelope["bundle"])
    assert info.value.reason == "ticket.node"


def test_qemu_refuses_the_disk_under_a_wrong_key(lab: Lab, world):
    """A ticket the TC signed (the test holds the TC's keys) carrying another key for the VM: the
    TPM opens it (right TK, right label), QEMU's LUKS layer does not."""
    from cryptography import x509

    record, release, envelope = _release(world, "node1")
    body = dict(release["ticket"]["ticket"], id=tickets.new_id())
    cert = x509.load_pem_x509_certificate(world.tc.registry.certificate("node1")["pem"].encode())
    label = tickets.label("launch", "kvm", record["vm_id"], body["customer"], body["id"])
    body["kvm"] = base64.b64encode(wrap.wrap(cert.public_key(), os.urandom(32), label)).decode()
    signer = world.tc.identity().purpose("ticket")
    with pytest.raises(RemoteError) as info:
        _start(world, "node1", record, tickets.issue(signer.key, signer.certificate, body), envelope["bundle"])
    assert info.value.reason == "tvmm.disk-key"


def test_after_a_tamper_the_node_cannot_unwrap_a_key_released_before(lab: Lab, lab_node, world):
    lab_node("node2")
    record, release, envelope = _release(world, "node2")
    lab.tamper("node2")
    with pytest.raises(RemoteError) as info:
        _start(world, "node2", record, release["ticket"], envelope["bundle"])
    assert info.value.reason == "tvmm.tk-refused"


def test_no_key_goes_to_a_quarantined_node(lab: Lab, lab_node, world):
    lab_node("node2")
    path = world.request()
    envelope = sign_request(str(path), world.key_path)
    record = world.tc.accept_request(envelope, bundles.load(envelope["bundle"]))
    lab.tamper("node2")
    world.engine.sessions.pop("node2", None)
    world.engine.run(attest(world.tc), [h for h in world.engine.hosts if h.name == "node2"])
    with pytest.raises(Refused) as info:
        world.tc.release_key(record["id"], "node2")
    assert info.value.reason == "release.not-admitted"
    world.engine.sessions.pop("node2", None)
    lab.reboot("node2")
    world.engine.run(attest(world.tc, admit_nodes=True), [h for h in world.engine.hosts if h.name == "node2"])


@pytest.mark.parametrize("damage, reason", [
    ("truncate", "bundle.disk-size"), ("flip", "bundle.disk-digest"), ("descriptor", "bundle.signature"),
    ("missing", "bundle.descriptor"),
])
def test_a_damaged_bundle_is_refused_before_anything_reaches_a_node(lab: Lab, world, damage: str, reason: str):
    path = world.request()
    envelope = sign_request(str(path), world.key_path)
    bundle_dir = Path(envelope["bundle"])
    disk = bundle_dir / "disk.qcow2"
    if damage == "truncate":
        with open(disk, "r+b") as fh:
            fh.truncate(disk.stat().st_size - 4096)
    elif damage == "flip":
        data = bytearray(disk.read_bytes())
        data[len(data) // 2] ^= 1
        disk.write_bytes(bytes(data))
    elif damage == "descriptor":
        document = json.loads((bundle_dir / "descriptor.json").read_text())
        document["descriptor"]["disk"]["size"] += 1
        (bundle_dir / "descriptor.json").write_text(json.dumps(document))
    else:
        shutil.rmtree(bundle_dir)
    accepted_before = len(world.tc.registry._all("SELECT id FROM requests"))
    with pytest.raises(bundles.BundleError) as info:
        launch(world.engine, world.tc, envelope, envelope["bundle"])
    assert info.value.reason == reason
    assert len(world.tc.registry._all("SELECT id FROM requests")) == accepted_before  # nothing accepted, nothing sent


def test_a_bundle_signed_by_an_unregistered_key_is_refused(lab: Lab, world):
    stranger, _ = customer.init(str(world.root / "stranger.pem"))
    image = world.root / "stranger.sealed"
    bundles.seal(str(world.raw), bundles.load_tc(str(world.root / "tc.pem")), stranger, str(image), "stranger")
    path = world.root / "stranger.yml"
    path.write_text(REQUEST.format(name="stranger", image=image.name, constraints="{}"))
    envelope = sign_request(str(path), str(world.root / "stranger.pem"))
    with pytest.raises(Refused) as info:
        launch(world.engine, world.tc, envelope, envelope["bundle"])
    assert info.value.reason == "request.signature"


def _kvm_forms(world, descriptor) -> list[bytes]:  # type: ignore[no-untyped-def]
    kvm = wrap.unwrap(tc_load(world.state).wrap_key, base64.b64decode(descriptor["wrapped_key"]), wrap.sealed_label(descriptor["vm_id"], descriptor["customer"]["id"]))
    return [kvm, kvm.hex().encode(), base64.b64encode(kvm)]


def test_no_plaintext_key_on_disk_in_argv_or_logs(lab: Lab, world):
    envelope, result = _launch(world, world.request())
    descriptor = bundles.load(envelope["bundle"])["descriptor"]
    forms = _kvm_forms(world, descriptor)
    # Read every file from another process: this one has the registry open, and closing any
    # descriptor of its files here would drop SQLite's POSIX locks on them. The key's forms go
    # over stdin (never argv).
    scan = ("import os, sys\nforms = [bytes.fromhex(f) for f in sys.stdin.read().split()]\n"
            "for root in sys.argv[1:]:\n"
            "    for folder, _, files in os.walk(root):\n"
            "        for name in files:\n"
            "            path = os.path.join(folder, name)\n"
            "            try:\n"
            "                data = open(path, 'rb').read()\n"
            "            except OSError:\n"
            "                continue\n"
            "            if any(form in data for form in forms):\n"
            "                print(path)\n")
    found = subprocess.run([sys.executable, "-c", scan, lab.dir, world.state, str(world.root)], capture_output=True,
                           text=True, input=" ".join(f.hex() for f in forms), check=True)
    assert found.stdout == "", f"the VM key is in {found.stdout}"
    for pid in [p for p in os.listdir("/proc") if p.isdigit()]:
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as fh:
                cmdline = fh.read()
        except OSError:
            continue
        assert not any(form in cmdline for form in forms), f"the VM key is in the argv of PID {pid}"


def test_vm_stop_start_destroy(lab: Lab, world):
    envelope, result = _launch(world, world.request())
    name = envelope["request"]["manifest"]["metadata"]["name"]
    run = [sys.executable, "-m", "tccdeploy", "vm"]
    common = ["-i", lab.inventory_dir, "--state", world.state, "-m", lab.manifests_dir]
    env = dict(os.environ, TCCDEPLOY_STATE=world.state)
    from tccdeploy.coordinator.store import Registry

    def state() -> str | None:  # read as the next command would: a fresh registry connection
        registry = Registry(world.tc.registry.path)
        try:
            row = registry.vm(name)
            return row["state"] if row else None
        finally:
            registry.close()

    assert subprocess.run([*run, "stop", name, *common], capture_output=True, env=env).returncode == 0
    assert state() == "stopped"
    proc = subprocess.run([*run, "start", name, *common], capture_output=True, text=True, env=env)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert state() == "running", proc.stdout + proc.stderr
    assert subprocess.run([*run, "destroy", name, *common], capture_output=True, env=env).returncode == 0
    assert state() is None
    vm_dirs = [p for p in Path(lab.node_dir(lab.node(result.node), "tvmm", "vms")).iterdir()]
    assert descriptor_absent(vm_dirs, envelope)


def descriptor_absent(vm_dirs, envelope) -> bool:  # type: ignore[no-untyped-def]
    vm_id = envelope["request"]["image"]["vm_id"]
    return all(p.name != vm_id for p in vm_dirs)


def test_an_interrupted_upload_resumes_and_is_digest_checked(lab: Lab, world):
    path = world.request()
    envelope = sign_request(str(path), world.key_path)
    descriptor = bundles.load(envelope["bundle"])["descriptor"]
    host = next(h for h in world.engine.hosts if h.name == "node3")
    world.engine.sessions.pop("node3", None)
    session = world.engine.session(host)
    local = os.path.join(envelope["bundle"], "disk.qcow2")
    class Dropped(Exception):
        pass

    def cut_after_one_mib():  # type: ignore[no-untyped-def]
        with open(local, "rb") as src:
            yield src.read(1024 * 1024)
        raise Dropped("the connection drops after 1 MiB")

    with pytest.raises(Dropped):
        session.tvmm_stream_to("disk_receive", cut_after_one_mib(), {"vm_id": descriptor["vm_id"], "offset": 0})
    deadline = time.monotonic() + 30  # (the cut session's process writes what it got, then ends)
    while session.tvmm("disk_state", {"vm_id": descriptor["vm_id"]})["partial_size"] != 1024 * 1024:
        assert time.monotonic() < deadline, "the first MiB was not kept"
        time.sleep(0.05)
    with pytest.raises(RemoteError) as wrong:  # a write that is not at the end is refused
        session.tvmm_stream_to("disk_receive", [b"AAAA"], {"vm_id": descriptor["vm_id"], "offset": 0})
    assert wrong.value.reason == "tvmm.disk-offset"
    result = upload_disk(session, descriptor["vm_id"], local, descriptor["disk"]["sha256"])
    assert result["changed"] and session.tvmm("disk_state", {"vm_id": descriptor["vm_id"]})["complete"]
    with pytest.raises(RemoteError) as missing:
        session.tvmm("disk_commit", {"vm_id": "0" * 32, "sha256": descriptor["disk"]["sha256"]})
    assert missing.value.reason == "tvmm.disk-digest"
    kill_vm(lab, "node1", descriptor["vm_id"])


def test_every_decision_is_in_the_audit_log_and_the_chain_verifies(lab: Lab, world):
    from tccdeploy.coordinator import audit

    envelope, result = _launch(world, world.request())
    with pytest.raises(Refused):
        launch(world.engine, world.tc, envelope, envelope["bundle"])  # a replay: refused, and audited
    kinds = {e["kind"] for e in world.tc.registry.audit_entries()}
    assert {"enrollment", "attestation", "admission", "request", "key-release", "launch", "request.refused"} <= kinds
    proc = subprocess.run([sys.executable, "-m", "tccdeploy", "audit", "verify", "--state", world.state],
                          capture_output=True, text=True)
    assert proc.returncode == 0 and proc.stdout.startswith("ok:")
    assert audit.verify(world.tc.registry).ok
    shown = subprocess.run([sys.executable, "-m", "tccdeploy", "audit", "show", "--node", result.node, "--state", world.state],
                           capture_output=True, text=True).stdout
    assert "key-release" in shown and "launch" in shown
