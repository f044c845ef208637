"""UEFI secure boot for the lab's real-boot nodes: the lab's own keys, signed images, enrolled NVRAM.

A provider's servers boot with secure boot on, the owner's keys enrolled: the firmware runs only
EFI images a db certificate signed, and measures its secure-boot configuration (SecureBoot, PK,
KEK, db, dbx) and the db certificate that admitted each image into PCR 7. The lab does what such
an owner does, with Debian's tools:

- its own keys (keys(), in the lab's CA folder, private keys 0600): a platform key (PK, also
  the KEK) and an image-signing key whose certificate goes into db;
- systemd-boot and every kernel signed with the db key by `sbsign` (sbsigntool). Authenticode
  digests leave the signature out, so the signed files measure (PCR 4) as the unsigned ones;
- the NVRAM: a copy of OVMF's VARS with PK, KEK and db enrolled and secure boot on, by
  `virt-fw-vars` (virt-firmware); the firmware is Debian's secure-boot OVMF, which needs SMM.

Secure boot keeps unsigned code from booting; attestation is still what sees the rest: root on
the host can turn secure boot off or enroll its own certificate in the NVRAM file (tamper()),
or boot another signed kernel. PCR 7 and PCR 4 show each.
"""

from __future__ import annotations

import datetime
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.x509.oid import NameOID

from .ca import write_private
from .tpm import LabError

OVMF_CODE = "/usr/share/OVMF/OVMF_CODE_4M.secboot.fd"  # Debian's OVMF with secure boot and SMM
OWNER_GUID = "6c61622d-7463-6364-6570-6c6f792d7362"  # the lab's signature owner ("lab-tccdeploy-sb")
QEMU_ARGS = ("-global", "driver=cfi.pflash01,property=secure,value=on", "-global", "ICH9-LPC.disable_s3=1")
MACHINE = "q35,smm=on"  # the secure-boot firmware keeps its variable store behind SMM
TAMPERS = {
    "secureboot": "secure boot turned off in the NVRAM (SecureBootEnable, as the firmware's setup does: PCR 7)",
    "efivar": "the host's own certificate added to db in the NVRAM (an EFI variable changed: PCR 7)",
}


@dataclass(frozen=True)
class Keys:
    """The paths of the lab's secure-boot keys and certificates (PEM)."""

    pk_key: str
    pk_cert: str
    db_key: str
    db_cert: str


def keys(directory: str, owner: str = "tccdeploy lab") -> Keys:
    """owner's PK and db keys in directory, made the first time (RSA 2048: what OVMF verifies);
    owner names them in their certificates' subjects, as the firmware's PCR 7 events show them."""
    out = Keys(*(os.path.join(directory, name) for name in ("pk.key", "pk.pem", "db.key", "db.pem")))
    if all(os.path.isfile(path) for path in (out.pk_key, out.pk_cert, out.db_key, out.db_cert)):
        return out
    os.makedirs(directory, mode=0o700, exist_ok=True)
    for key_path, cert_path, name in ((out.pk_key, out.pk_cert, "platform key"), (out.db_key, out.db_cert, "image signing")):
        _self_signed(key_path, cert_path, owner, f"{owner} {name}")
    return out


def _self_signed(key_path: str, cert_path: str, organisation: str, common_name: str) -> None:
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    name = x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, organisation),
                      x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
    now = datetime.datetime.now(datetime.UTC)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(hours=1))
            .not_valid_after(now + datetime.timedelta(days=3650))
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .sign(key, hashes.SHA256()))
    write_private(key_path, key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                              serialization.NoEncryption()))
    with open(cert_path, "wb") as fh:
        fh.write(cert.public_bytes(serialization.Encoding.PEM))


def sign(source: str, target: str, signing: Keys) -> None:
    """target: source with an Authenticode signature by the db key (sbsign; its key is a file path)."""
    _run(["sbsign", "--key", signing.db_key, "--cert", signing.db_cert, "--output", target, source], "sbsign")


def enroll(vars_template: str, target: str, signing: Keys) -> None:
    """target: the NVRAM template with PK, KEK and db enrolled and secure boot on."""
    _run([*_virt_fw_vars(), "--input", vars_template, "--output", target,
          "--set-pk", OWNER_GUID, signing.pk_cert, "--add-kek", OWNER_GUID, signing.pk_cert,
          "--add-db", OWNER_GUID, signing.db_cert, "--secure-boot"], "virt-fw-vars")


def tamper(nvram: str, what: str, rogue_cert: str) -> None:
    """Change the node's NVRAM as root on the host can: the file is the host's, not the firmware's."""
    if what == "secureboot":
        change = ["--set-false", "SecureBootEnable"]
    elif what == "efivar":
        change = ["--add-db", OWNER_GUID, rogue_cert]
    else:
        raise LabError(f"unknown secure-boot tamper {what!r}; choose one of: {', '.join(TAMPERS)}")
    _run([*_virt_fw_vars(), "--inplace", nvram, *change], "virt-fw-vars")


def _virt_fw_vars() -> list[str]:
    """virt-firmware's CLI, from this Python's environment (pyproject's dependency)."""
    return [sys.executable, "-m", "virt.firmware.vars"]


def _run(argv: list[str], tool: str) -> None:
    if argv[0] != sys.executable and shutil.which(argv[0]) is None:
        raise LabError(f"{tool} is missing: run scripts/install (it installs sbsigntool)")
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=120)
    if proc.returncode != 0:
        raise LabError(f"{tool} failed: {(proc.stderr or proc.stdout).strip()[-400:]}")
