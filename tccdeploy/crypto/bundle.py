"""Sealed image bundles: a LUKS-encrypted qcow2 under a fresh key Kvm, and a signed descriptor.

    BUNDLE/disk.qcow2        the encrypted disk (qemu-img, LUKS with a minimal iteration time:
                             Kvm is 256 random bits, key stretching buys nothing)
    BUNDLE/descriptor.json   {"descriptor": {...}, "signature": "<Ed25519, base64>"}

Kvm exists in clear only in this process's memory and in a pipe to qemu-img; it leaves wrapped
to the TC's key-wrapping key (RSA-OAEP-SHA256, label bound to the VM id). Sealing streams, so
memory stays bounded whatever the image size.
"""

from __future__ import annotations

import base64
import datetime
import hashlib
import json
import os
import re
import subprocess
from dataclasses import dataclass
from typing import Any

import fastjsonschema
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from . import customer
from .canonical import SEALED_IMAGE, signed_bytes
from .files import sha256_file
from .reasoned import Reasoned
from .wrap import sealed_label, wrap

DISK = "disk.qcow2"
DESCRIPTOR = "descriptor.json"
LUKS_ITER_TIME_MS = 10
# PBKDF2 with SHA-512 for the LUKS header: Kvm is 256 random bits, so the KDF's strength is moot,
# but QEMU sizes it by timing a first batch of iterations with the thread's CPU clock, and SHA-256
# (hardware-accelerated) finishes that batch within one clock tick often enough on a busy machine
# that the measure reads zero and qemu-img gives up ("Unable to get accurate CPU usage"); SHA-512
# takes several ticks. Measured with the other core loaded: SHA-256 failed 4 of 6, SHA-512 0 of 8.
LUKS_HASH = "sha512"


class BundleError(Reasoned):
    pass


# 2: the sealed key's OAEP label binds the customer's key id as well as the VM id.
# 3: the VM id is made from the customer's key id and vm_salt (customer.bound_id): no other
#    customer can claim it first.
DESCRIPTOR_VERSION = 3


def _strict(properties: dict[str, Any], required: list[str]) -> dict[str, Any]:
    return {"type": "object", "additionalProperties": False, "properties": properties, "required": required}


HEX32 = {"type": "string", "pattern": "^[0-9a-f]{32}$"}
HEX64 = {"type": "string", "pattern": "^[0-9a-f]{64}$"}
_B64 = {"type": "string", "pattern": "^[A-Za-z0-9+/]*={0,2}$", "maxLength": 64 * 1024}
# The signed descriptor's shape, to the last field: one definition for the customer's tools
# (load, inspect) and for the TC's API, which takes it from anyone.
SIGNED_DESCRIPTOR = _strict({
    "descriptor": _strict({
        "type": {"const": "tccdeploy-sealed-image"}, "version": {"type": "integer", "minimum": 1, "maximum": 1000},
        "vm_id": HEX32, "vm_salt": HEX32, "name": {"type": "string", "maxLength": 128},
        "disk": _strict({"file": {"type": "string", "maxLength": 255}, "sha256": HEX64,
                         "size": {"type": "integer", "minimum": 0}, "virtual_size": {"type": "integer", "minimum": 0},
                         "format": {"type": "string", "maxLength": 64}}, ["file", "sha256", "size"]),
        "wrapped_key": _B64, "created": {"type": "string", "maxLength": 64},
        "tc": _strict({"ca_sha256": HEX64, "wrap_sha256": HEX64}, ["ca_sha256", "wrap_sha256"]),
        "customer": _strict({"key": {"type": "string", "maxLength": 128}, "id": {"type": "string", "maxLength": 64}},
                            ["key", "id"])},
        ["type", "version", "vm_id", "disk", "wrapped_key", "customer"]),
    "signature": _B64}, ["descriptor", "signature"])
_check_shape = fastjsonschema.compile(SIGNED_DESCRIPTOR)


@dataclass(frozen=True)
class TCKeys:
    ca: x509.Certificate
    wrap: x509.Certificate

    @property
    def ca_fingerprint(self) -> str:
        return hashlib.sha256(self.ca.public_bytes(serialization.Encoding.DER)).hexdigest()


def load_tc(path: str, pin: str | None = None) -> TCKeys:
    """The TC's CA and key-wrapping certificates (`tccdeploy tc show -o FILE`), checked."""
    try:
        with open(path, "rb") as fh:
            certs = x509.load_pem_x509_certificates(fh.read())
    except (OSError, ValueError) as exc:
        raise BundleError("tc.certificate", f"cannot read the TC certificates in {path}: {exc}") from None
    cas = [c for c in certs if c.issuer == c.subject]
    wraps = [c for c in certs if c.issuer != c.subject and isinstance(c.public_key(), rsa.RSAPublicKey)]
    if len(cas) != 1 or len(wraps) != 1:
        raise BundleError("tc.certificate", f"{path} must hold the TC's CA certificate and its key-wrapping certificate")
    ca, wrap_cert = cas[0], wraps[0]
    ca_key = ca.public_key()
    try:
        assert isinstance(ca_key, ec.EllipticCurvePublicKey) and wrap_cert.signature_hash_algorithm is not None
        ca_key.verify(wrap_cert.signature, wrap_cert.tbs_certificate_bytes, ec.ECDSA(wrap_cert.signature_hash_algorithm))
    except Exception:  # noqa: BLE001
        raise BundleError("tc.certificate", "the key-wrapping certificate is not signed by the TC's CA") from None
    keys = TCKeys(ca, wrap_cert)
    if pin and keys.ca_fingerprint != pin.lower():
        raise BundleError("tc.pin", f"the TC's CA fingerprint is {keys.ca_fingerprint}, not the pinned {pin}")
    return keys


def _image_info(path: str) -> dict[str, Any]:
    proc = subprocess.run(["qemu-img", "info", "--output", "json", path], capture_output=True, text=True)
    if proc.returncode != 0:
        raise BundleError("image.unreadable", f"qemu-img cannot read {path}: {proc.stderr.strip()}")
    info = json.loads(proc.stdout)
    if info.get("format") not in ("raw", "qcow2") or info.get("encrypted"):
        raise BundleError("image.format", f"{path} is {info.get('format')}{' (encrypted)' if info.get('encrypted') else ''}; "
                                          "seal a plain raw or qcow2 image")
    return info


_PERCENT = re.compile(rb"\((\d+(?:\.\d+)?)/100%\)")


def percents(output: bytes) -> list[float]:
    """The percentages qemu-img -p prints ("    (12.34/100%)\r"), in order."""
    return [float(m.group(1)) for m in _PERCENT.finditer(output)]


class PercentProgress:
    """qemu-img -p's percentages as the bytes newly done, for a display to advance by."""

    def __init__(self, size: int):
        self.size, self.done = size, 0

    def feed(self, output: bytes) -> int:
        step = 0
        for percent in percents(output):
            now = int(self.size * percent / 100)
            if now > self.done:
                step += now - self.done
                self.done = now
        return step


def pbkdf_flake(returncode: int, stderr: str) -> bool:
    """QEMU times its PBKDF benchmark with getrusage; should it measure nothing and give up
    ("Unable to get accurate CPU usage", see LUKS_HASH), another run measures fine."""
    return returncode != 0 and "accurate CPU usage" in stderr


def _convert(argv: list[str], secret_fd: int, size: int, label: str) -> tuple[int, str]:
    """qemu-img convert, its -p percentages shown as bytes: its exit status and its stderr."""
    import tempfile

    from .. import progress

    with tempfile.TemporaryFile() as errors, progress.transfer(label, size) as advance:
        proc = subprocess.Popen(argv, pass_fds=(secret_fd,), stdout=subprocess.PIPE, stderr=errors)
        assert proc.stdout is not None
        counter = PercentProgress(size)
        out = proc.stdout.fileno()
        for output in iter(lambda: os.read(out, 4096), b""):
            step = counter.feed(output)
            if step:
                advance(step)
        proc.wait()
        errors.seek(0)
        return proc.returncode, errors.read().decode(errors="replace")


def _digest(path: str) -> str:
    """sha256_file, shown on the progress display (files.py, shared with the node's service, stays as it is)."""
    from .. import progress

    digest = hashlib.sha256()
    with progress.transfer(f"hashing {os.path.basename(path)}", os.path.getsize(path)) as advance, \
            open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
            advance(len(chunk))
    return digest.hexdigest()


def seal(disk: str, tc: TCKeys, key: Ed25519PrivateKey, out: str, name: str | None = None) -> dict[str, Any]:
    """Encrypt disk into bundle directory out; return the signed descriptor."""
    info = _image_info(disk)
    if os.path.exists(out) and os.listdir(out):
        raise BundleError("bundle.exists", f"{out} exists and is not empty; choose a new bundle directory")
    os.makedirs(out, mode=0o755, exist_ok=True)
    vm_id, vm_salt = customer.new_id("vm", key.public_key())
    kvm = os.urandom(32)
    passphrase = base64.b64encode(kvm)  # LUKS wants UTF-8 text; base64 keeps all 256 bits
    target = os.path.join(out, DISK)
    for _attempt in range(10):
        read_end, write_end = os.pipe()
        try:
            with os.fdopen(write_end, "wb") as secret:  # 44 bytes: the pipe takes them without a reader
                secret.write(passphrase)
            returncode, stderr = _convert(
                ["qemu-img", "convert", "-p", "-f", info["format"], "-O", "qcow2",
                 "--object", f"secret,id=kvm,file=/dev/fd/{read_end}",
                 "-o", f"encrypt.format=luks,encrypt.key-secret=kvm,encrypt.iter-time={LUKS_ITER_TIME_MS},"
                       f"encrypt.hash-alg={LUKS_HASH}",
                 disk, target + ".partial"],
                read_end, int(info["virtual-size"]), f"sealing {os.path.basename(disk)}",
            )
        finally:
            os.close(read_end)
        if not pbkdf_flake(returncode, stderr):
            break
    if returncode != 0:
        raise BundleError("image.convert", f"qemu-img could not encrypt {disk}: {stderr.strip()}")
    os.replace(target + ".partial", target)
    public = tc.wrap.public_key()
    assert isinstance(public, rsa.RSAPublicKey)
    descriptor = {
        "type": "tccdeploy-sealed-image",
        "version": DESCRIPTOR_VERSION,
        "vm_id": vm_id,
        "vm_salt": vm_salt,
        "name": name or os.path.splitext(os.path.basename(disk))[0],
        "disk": {"file": DISK, "sha256": _digest(target), "size": os.path.getsize(target),
                 "virtual_size": int(info["virtual-size"]), "format": "qcow2+luks"},
        "wrapped_key": base64.b64encode(wrap(public, kvm, sealed_label(vm_id, customer.key_id(key.public_key())))).decode(),
        "tc": {"ca_sha256": tc.ca_fingerprint,
               "wrap_sha256": hashlib.sha256(tc.wrap.public_bytes(serialization.Encoding.DER)).hexdigest()},
        "created": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "customer": {"key": customer.public_text(key.public_key()), "id": customer.key_id(key.public_key())},
    }
    del kvm, passphrase
    envelope = {"descriptor": descriptor,
                "signature": base64.b64encode(key.sign(signed_bytes(SEALED_IMAGE, descriptor))).decode()}
    with open(os.path.join(out, DESCRIPTOR), "w") as fh:
        json.dump(envelope, fh, indent=2)
    return descriptor


def verify_descriptor(envelope: dict[str, Any]) -> dict[str, Any]:
    """The descriptor, once its signature by the customer key it names verifies (the TC checks
    this itself when a request reaches it over the network, without the disk)."""
    try:
        descriptor, signature = envelope["descriptor"], base64.b64decode(envelope["signature"], validate=True)
        public = customer.parse_public(descriptor["customer"]["key"])
        public.verify(signature, signed_bytes(SEALED_IMAGE, descriptor))
    except (KeyError, TypeError, ValueError, customer.CustomerKeyError):
        raise BundleError("bundle.descriptor", "the image descriptor is malformed") from None
    except Exception:  # noqa: BLE001 - InvalidSignature
        raise BundleError("bundle.signature", "the descriptor's signature does not verify: it was altered") from None
    return descriptor  # type: ignore[no-any-return]


def load(bundle: str, check_disk: bool = True) -> dict[str, Any]:
    """Read and check a bundle: signature by the key it names, disk present, size and digest."""
    try:
        with open(os.path.join(bundle, DESCRIPTOR)) as fh:
            envelope = json.load(fh)
        _check_shape(envelope)
        descriptor = envelope["descriptor"]
        customer.parse_public(descriptor["customer"]["key"])
    except fastjsonschema.JsonSchemaValueException as exc:
        raise BundleError("bundle.descriptor", f"{bundle}'s descriptor is malformed: {exc.message}") from None
    except (OSError, ValueError, KeyError, TypeError, customer.CustomerKeyError) as exc:
        raise BundleError("bundle.descriptor", f"{bundle} has no valid descriptor: {exc}") from None
    verify_descriptor(envelope)
    if check_disk:
        disk = os.path.join(bundle, descriptor["disk"]["file"])
        if os.path.basename(descriptor["disk"]["file"]) != descriptor["disk"]["file"] or not os.path.isfile(disk):
            raise BundleError("bundle.disk-missing", f"the bundle's disk {disk} is missing")
        size = os.path.getsize(disk)
        if size != descriptor["disk"]["size"]:
            raise BundleError("bundle.disk-size", f"the disk is {size} bytes, the descriptor says {descriptor['disk']['size']} "
                                                  "(truncated or altered)")
        if sha256_file(disk) != descriptor["disk"]["sha256"]:
            raise BundleError("bundle.disk-digest", "the disk's sha256 does not match the descriptor (altered)")
    return envelope
