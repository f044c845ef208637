"""Sealed image bundles (crypto/bundle.py): sealing a small image with the real qemu-img, and every
refusal of the TC's certificates, of the image and of a bundle on load, by its reason code."""

from __future__ import annotations

import base64
import hashlib
import json
import shutil
import subprocess
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from tccdeploy.coordinator import identity
from tccdeploy.crypto import bundle, customer, wrap
from tccdeploy.crypto.bundle import BundleError

from .brokerkit import _tc_state

pytestmark = pytest.mark.skipif(shutil.which("qemu-img") is None, reason="qemu-img is not installed (scripts/install)")


@pytest.fixture(scope="module")
def tc(tmp_path_factory) -> identity.Identity:  # type: ignore[no-untyped-def]
    state = str(tmp_path_factory.mktemp("tc") / "state")
    _tc_state(state)
    return identity.load(state)


@pytest.fixture(scope="module")
def tc_file(tc, tmp_path_factory) -> Path:  # type: ignore[no-untyped-def]
    path = tmp_path_factory.mktemp("tcfile") / "tc.pem"
    path.write_text(tc.bundle_pem)
    return path


@pytest.fixture(scope="module")
def sealed(tc_file, tmp_path_factory):  # type: ignore[no-untyped-def]
    """One bundle sealed from a 1 MiB raw image, kept pristine: tests that alter it copy it first."""
    root = tmp_path_factory.mktemp("sealed")
    image = root / "web.raw"
    image.write_bytes(b"a customer's disk\n" * 4096 + bytes(1024 * 1024 - 18 * 4096))
    key = Ed25519PrivateKey.generate()
    descriptor = bundle.seal(str(image), bundle.load_tc(str(tc_file)), key, str(root / "bundle"))
    return root / "bundle", descriptor, key


def copy_of(sealed, tmp_path: Path) -> Path:  # type: ignore[no-untyped-def]
    target = tmp_path / "bundle"
    shutil.copytree(sealed[0], target)
    return target


def refusal(call, *args, **kwargs) -> str:  # type: ignore[no-untyped-def]
    with pytest.raises(BundleError) as info:
        call(*args, **kwargs)
    assert str(info.value)
    return info.value.reason


def test_a_sealed_bundle_holds_an_encrypted_disk_and_a_key_only_the_tc_opens_for_this_vm_and_customer(sealed, tc):
    path, descriptor, key = sealed
    info = json.loads(subprocess.run(["qemu-img", "info", "--output", "json", str(path / bundle.DISK)],
                                     capture_output=True, text=True, check=True).stdout)
    assert info["format"] == "qcow2" and info["encrypted"] is True and info["virtual-size"] == 1024 * 1024
    assert info["format-specific"]["data"]["encrypt"]["hash-alg"] == bundle.LUKS_HASH
    assert b"a customer's disk" not in (path / bundle.DISK).read_bytes()
    # nothing in a bundle is secret (the disk encrypted, the key wrapped): 0755, to hand around; no leftovers
    assert path.stat().st_mode & 0o777 == 0o755 and sorted(p.name for p in path.iterdir()) == [bundle.DESCRIPTOR, bundle.DISK]
    assert descriptor["disk"] == {"file": "disk.qcow2", "sha256": descriptor["disk"]["sha256"],
                                        "size": (path / bundle.DISK).stat().st_size, "virtual_size": 1024 * 1024,
                                        "format": "qcow2+luks"}
    assert descriptor["name"] == "web" and descriptor["version"] == bundle.DESCRIPTOR_VERSION
    assert descriptor["created"].endswith("+00:00")  # UTC, whatever the machine's zone
    assert descriptor["customer"] == {"key": customer.public_text(key.public_key()), "id": customer.key_id(key.public_key())}
    assert descriptor["tc"] == {
        "ca_sha256": hashlib.sha256(tc.certificate.public_bytes(serialization.Encoding.DER)).hexdigest(),
        "wrap_sha256": hashlib.sha256(tc.wrap_certificate.public_bytes(serialization.Encoding.DER)).hexdigest()}
    wrapped = base64.b64decode(descriptor["wrapped_key"])
    kvm = wrap.unwrap(tc.wrap_key, wrapped, wrap.sealed_label(descriptor["vm_id"], descriptor["customer"]["id"]))
    assert len(kvm) == 32
    for label in (wrap.sealed_label("0" * 32, descriptor["customer"]["id"]), wrap.sealed_label(descriptor["vm_id"], "other")):
        with pytest.raises(ValueError):
            wrap.unwrap(tc.wrap_key, wrapped, label)
    assert bundle.load(str(path))["descriptor"] == descriptor


def test_the_disk_opens_with_the_sealed_key(sealed, tc, tmp_path):
    path, descriptor, _ = sealed
    kvm = wrap.unwrap(tc.wrap_key, base64.b64decode(descriptor["wrapped_key"]),
                      wrap.sealed_label(descriptor["vm_id"], descriptor["customer"]["id"]))
    secret = tmp_path / "kvm"
    secret.write_bytes(base64.b64encode(kvm))
    secret.chmod(0o600)
    out = subprocess.run(["qemu-img", "convert", "--object", f"secret,id=k,file={secret}", "--image-opts",
                          f"driver=qcow2,file.filename={path / bundle.DISK},encrypt.key-secret=k", "-O", "raw",
                          str(tmp_path / "plain.raw")], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert (tmp_path / "plain.raw").read_bytes().startswith(b"a customer's disk\n" * 4096)


@pytest.mark.parametrize("change, reason", [
    ("no-descriptor", "bundle.descriptor"),
    ("not-json", "bundle.descriptor"),
    ("extra-field", "bundle.descriptor"),
    ("bad-customer-key", "bundle.descriptor"),
    ("renamed", "bundle.signature"),
    ("other-signer", "bundle.signature"),
    ("traversal", "bundle.disk-missing"),
    ("no-disk", "bundle.disk-missing"),
    ("truncated", "bundle.disk-size"),
    ("altered", "bundle.disk-digest"),
])
def test_a_bundle_that_is_not_as_sealed_is_refused(sealed, tmp_path, change, reason):
    path = copy_of(sealed, tmp_path)
    envelope = json.loads((path / bundle.DESCRIPTOR).read_text())
    descriptor = envelope["descriptor"]
    disk = path / bundle.DISK
    if change == "no-descriptor":
        (path / bundle.DESCRIPTOR).unlink()
    elif change == "not-json":
        (path / bundle.DESCRIPTOR).write_text("{")
    elif change == "extra-field":
        descriptor["kvm"] = "in clear"
    elif change == "bad-customer-key":
        descriptor["customer"]["key"] = "ed25519:AAAA"
    elif change == "renamed":
        descriptor["name"] = "other"
    elif change == "other-signer":  # a valid signature by another key than the one it names
        from tccdeploy.crypto.canonical import SEALED_IMAGE, signed_bytes

        envelope["signature"] = base64.b64encode(Ed25519PrivateKey.generate().sign(signed_bytes(SEALED_IMAGE, descriptor))).decode()
    elif change == "traversal":  # the signer names a file outside the bundle: never read
        (tmp_path / "outside.qcow2").write_bytes(disk.read_bytes())
        descriptor["disk"]["file"] = "../outside.qcow2"
    elif change == "no-disk":
        disk.unlink()
    elif change == "truncated":
        disk.write_bytes(disk.read_bytes()[:-1])
    elif change == "altered":
        data = bytearray(disk.read_bytes())
        data[-1] ^= 1
        disk.write_bytes(bytes(data))
    if change in ("extra-field", "bad-customer-key", "renamed", "traversal"):
        key = sealed[2]
        if change == "traversal":  # re-signed by the customer: only the file check stands in the way
            from tccdeploy.crypto.canonical import SEALED_IMAGE, signed_bytes

            envelope["signature"] = base64.b64encode(key.sign(signed_bytes(SEALED_IMAGE, descriptor))).decode()
    if (path / bundle.DESCRIPTOR).exists() and change not in ("not-json",):
        (path / bundle.DESCRIPTOR).write_text(json.dumps(envelope))
    assert refusal(bundle.load, str(path)) == reason


def test_a_bundle_checked_without_its_disk_is_checked_for_its_signature_only(sealed, tmp_path):
    path = copy_of(sealed, tmp_path)
    (path / bundle.DISK).unlink()
    assert bundle.load(str(path), check_disk=False)["descriptor"]["vm_id"] == sealed[1]["vm_id"]


def test_a_descriptor_from_the_network_is_verified_against_the_key_it_names(sealed):
    envelope = json.loads((sealed[0] / bundle.DESCRIPTOR).read_text())
    assert bundle.verify_descriptor(envelope) == envelope["descriptor"]
    assert refusal(bundle.verify_descriptor, {"descriptor": envelope["descriptor"]}) == "bundle.descriptor"
    assert refusal(bundle.verify_descriptor, dict(envelope, signature="!")) == "bundle.descriptor"
    moved = dict(envelope, descriptor=dict(envelope["descriptor"], vm_id="0" * 32))
    assert refusal(bundle.verify_descriptor, moved) == "bundle.signature"


def test_the_tc_certificates_must_be_the_tcs_and_match_the_pin(tc, tc_file, tmp_path):
    keys = bundle.load_tc(str(tc_file), pin=None)
    assert bundle.load_tc(str(tc_file), pin=keys.ca_fingerprint.upper()).ca == tc.certificate
    assert refusal(bundle.load_tc, str(tc_file), pin="0" * 64) == "tc.pin"
    assert refusal(bundle.load_tc, str(tmp_path / "absent.pem")) == "tc.certificate"
    only_ca = tmp_path / "ca.pem"
    only_ca.write_text(tc.pem)
    assert refusal(bundle.load_tc, str(only_ca)) == "tc.certificate"
    # another TC's wrapping certificate beside this TC's CA: sealing to it would hand Kvm to that TC
    other_state = str(tmp_path / "other")
    identity.init(other_state)
    other = identity.load(other_state)
    mixed = tmp_path / "mixed.pem"
    mixed.write_text(tc.pem + other.wrap_certificate.public_bytes(serialization.Encoding.PEM).decode())
    assert refusal(bundle.load_tc, str(mixed)) == "tc.certificate"


def test_sealing_refuses_what_it_cannot_seal_safely(tc_file, tmp_path):
    keys, key = bundle.load_tc(str(tc_file)), Ed25519PrivateKey.generate()
    with pytest.raises(BundleError, match="qemu-img cannot read .*absent.raw: qemu-img: .*No such file") as info:
        bundle.seal(str(tmp_path / "absent.raw"), keys, key, str(tmp_path / "b1"))
    assert info.value.reason == "image.unreadable"
    vdi = tmp_path / "disk.vdi"
    subprocess.run(["qemu-img", "create", "-q", "-f", "vdi", str(vdi), "1M"], check=True)
    with pytest.raises(BundleError, match=r"disk.vdi is vdi; seal a plain raw or qcow2 image") as info:
        bundle.seal(str(vdi), keys, key, str(tmp_path / "b2"))
    assert info.value.reason == "image.format"
    encrypted = tmp_path / "locked.qcow2"  # someone else's encryption: its key is not one the TC would release
    (tmp_path / "pw").write_text("a passphrase")  # (qcow2's old AES scheme: made in no time, unlike LUKS)
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "--object", f"secret,id=s,file={tmp_path / 'pw'}",
                    "-o", "encrypt.format=aes,encrypt.key-secret=s", str(encrypted), "1M"], check=True)
    with pytest.raises(BundleError, match=r"locked.qcow2 is qcow2 \(encrypted\); seal a plain") as info:
        bundle.seal(str(encrypted), keys, key, str(tmp_path / "b4"))
    assert info.value.reason == "image.format"
    raw = tmp_path / "disk.raw"
    raw.write_bytes(bytes(65536))
    (tmp_path / "b3").mkdir()
    (tmp_path / "b3" / "keep.txt").write_text("someone's file")
    assert refusal(bundle.seal, str(raw), keys, key, str(tmp_path / "b3")) == "bundle.exists"
    assert (tmp_path / "b3" / "keep.txt").read_text() == "someone's file"


def test_an_image_qemu_img_cannot_convert_is_refused_and_leaves_no_disk(tc_file, tmp_path):
    base, overlay = tmp_path / "base.qcow2", tmp_path / "overlay.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(base), "1M"], check=True)
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-b", str(base), "-F", "qcow2", str(overlay)], check=True)
    base.unlink()  # qemu-img info still reads the overlay; converting it needs the backing file
    with pytest.raises(BundleError, match="qemu-img could not encrypt .*overlay.qcow2: qemu-img: .*backing file") as info:
        bundle.seal(str(overlay), bundle.load_tc(str(tc_file)), Ed25519PrivateKey.generate(), str(tmp_path / "out"))
    assert info.value.reason == "image.convert"
    assert not (tmp_path / "out" / bundle.DISK).exists() and not (tmp_path / "out" / bundle.DESCRIPTOR).exists()


def test_a_qcow2_image_seals_into_an_empty_folder(tc_file, tmp_path):
    image = tmp_path / "app.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(image), "2M"], check=True)
    (tmp_path / "out").mkdir()
    descriptor = bundle.seal(str(image), bundle.load_tc(str(tc_file)), Ed25519PrivateKey.generate(), str(tmp_path / "out"),
                             name="app-v2")
    assert descriptor["name"] == "app-v2" and descriptor["disk"]["virtual_size"] == 2 * 1024 * 1024
    assert bundle.load(str(tmp_path / "out"))["descriptor"] == descriptor


def test_a_refusal_always_has_its_reason_and_words():
    from tccdeploy.coordinator.receipts import ReceiptError
    from tccdeploy.coordinator.refusals import Refused
    from tccdeploy.crypto.ticket import TicketError
    from tccdeploy.tvmm.interface import ServiceError

    for kind in (BundleError, TicketError, ReceiptError, Refused, ServiceError):
        made = kind("some.reason", "what was wrong")
        assert made.reason == "some.reason" and str(made) == "what was wrong"
        for reason, message in ((None, "words"), ("", "words"), ("some.reason", None), ("some.reason", " ")):
            with pytest.raises(TypeError, match="a refusal needs a reason code and a message"):
                kind(reason, message)


def test_the_descriptor_schema_is_strict_at_every_level():
    """Built when crypto/bundle.py is imported; the builder checked here, at run time."""
    assert bundle._strict({"x": {"type": "string"}}, ["x"]) == {
        "type": "object", "additionalProperties": False, "properties": {"x": {"type": "string"}}, "required": ["x"]}
    schema = bundle.SIGNED_DESCRIPTOR
    for level in (schema, schema["properties"]["descriptor"], schema["properties"]["descriptor"]["properties"]["disk"],
                  schema["properties"]["descriptor"]["properties"]["customer"]):
        assert level["additionalProperties"] is False and set(level["required"]) <= set(level["properties"])


@pytest.mark.parametrize("change, message", [
    ("not-json", "the image descriptor is malformed"),
    ("renamed", "the descriptor's signature does not verify: it was altered"),
    ("altered", "the disk's sha256 does not match the descriptor (altered)"),
    ("truncated", "bytes, the descriptor says"),
])
def test_each_refusal_of_a_bundle_says_what_is_wrong(sealed, tmp_path, change: str, message: str):
    path = copy_of(sealed, tmp_path)
    envelope = json.loads((path / bundle.DESCRIPTOR).read_text())
    disk = path / bundle.DISK
    if change == "not-json":
        with pytest.raises(BundleError) as info:
            bundle.verify_descriptor({"descriptor": envelope["descriptor"]})
        assert str(info.value) == message
        return
    if change == "renamed":
        envelope["descriptor"]["name"] = "other"
        (path / bundle.DESCRIPTOR).write_text(json.dumps(envelope))
    elif change == "altered":
        data = bytearray(disk.read_bytes())
        data[-1] ^= 1
        disk.write_bytes(bytes(data))
    else:
        disk.write_bytes(disk.read_bytes()[:-1])
    with pytest.raises(BundleError) as info:
        bundle.load(str(path))
    if change == "truncated":
        size = disk.stat().st_size
        assert str(info.value) == (f"the disk is {size} bytes, the descriptor says {size + 1} (truncated or altered)")
    else:
        assert str(info.value) == message


def test_percentages_become_the_bytes_newly_done():
    counter = bundle.PercentProgress(800)
    assert counter.feed(b"    (0.00/100%)\r") == 0
    assert counter.feed(b"    (12.50/100%)\r    (25.00/100%)\r") == 200
    assert counter.feed(b"    (25.00/100%)\r") == 0  # the same percentage again: nothing new
    assert counter.feed(b"    (10.00/100%)\r") == 0  # never backwards
    assert counter.feed(b"    (100.00/100%)\r") == 600 and counter.done == 800
    assert counter.feed(b"no percentage here") == 0


def test_only_a_failed_pbkdf_benchmark_is_tried_again():
    flake = "qemu-img: Unable to get accurate CPU usage"
    assert bundle.pbkdf_flake(1, flake)
    assert not bundle.pbkdf_flake(0, flake)  # it worked: no second encryption
    assert not bundle.pbkdf_flake(1, "qemu-img: Could not open 'x': No such file or directory")


def test_sealing_shows_its_progress_in_bytes(tc_file, tmp_path, monkeypatch):
    """Sealing and hashing advance a display by exactly the image's and the disk's sizes, in
    positive steps, under names that say what is done (the display itself: tests/test_progress_and_logs.py)."""
    import contextlib

    from tccdeploy import progress

    shown: list[tuple[str, int | None, list[int]]] = []

    @contextlib.contextmanager
    def transfer(label, total):  # type: ignore[no-untyped-def]
        steps: list[int] = []
        shown.append((label, total, steps))
        yield steps.append

    monkeypatch.setattr(progress, "transfer", transfer)
    image = tmp_path / "app.raw"
    image.write_bytes(bytes(range(256)) * 8192)  # 2 MiB
    descriptor = bundle.seal(str(image), bundle.load_tc(str(tc_file)), Ed25519PrivateKey.generate(), str(tmp_path / "out"))
    (seal_label, seal_total, seal_steps), (hash_label, hash_total, hash_steps) = shown
    assert seal_label == "sealing app.raw" and seal_total == 2 * 1024 * 1024 == sum(seal_steps)
    assert hash_label == f"hashing {bundle.DISK}" and hash_total == descriptor["disk"]["size"] == sum(hash_steps)
    assert all(isinstance(step, int) and step > 0 for step in seal_steps + hash_steps)


def test_a_bundle_folder_is_readable_by_all_whatever_the_umask(tc_file, tmp_path):
    import os

    image = tmp_path / "app.raw"
    image.write_bytes(bytes(65536))
    old = os.umask(0)
    try:
        bundle.seal(str(image), bundle.load_tc(str(tc_file)), Ed25519PrivateKey.generate(), str(tmp_path / "out"))
    finally:
        os.umask(old)
    assert (tmp_path / "out").stat().st_mode & 0o777 == 0o755
