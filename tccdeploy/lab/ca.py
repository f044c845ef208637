"""The lab's TPM manufacturer CAs: one the perimeter trusts, one it does not (rogue TPMs)."""

from __future__ import annotations

import datetime
import os

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.x509.oid import NameOID


def write_private(path: str, data: bytes) -> None:
    """Write a secret file 0600 from the first byte (never world-readable, even briefly)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as fh:
        fh.write(data)


def make_ca(directory: str, organisation: str) -> tuple[str, str]:
    """Create a CA key (0600) and self-signed certificate in directory; return their paths."""
    os.makedirs(directory, mode=0o700, exist_ok=True)
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    name = x509.Name([
        x509.NameAttribute(NameOID.ORGANIZATION_NAME, organisation),
        x509.NameAttribute(NameOID.COMMON_NAME, f"{organisation} EK Root CA"),
    ])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(hours=1))
        .not_valid_after(now + datetime.timedelta(days=3650))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(False, False, False, False, False, True, True, False, False), critical=True
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    key_path = os.path.join(directory, "key.pem")
    cert_path = os.path.join(directory, "cert.pem")
    write_private(
        key_path,
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.TraditionalOpenSSL,
            serialization.NoEncryption(),
        ),
    )
    with open(cert_path, "wb") as fh:
        fh.write(cert.public_bytes(serialization.Encoding.PEM))
    with open(os.path.join(directory, "serial"), "w") as fh:
        fh.write("1\n")
    # swtpm_localca reads these three: the CA that signs the EK certificates it makes.
    with open(os.path.join(directory, "localca.conf"), "w") as fh:
        fh.write(
            f"statedir = {directory}\nsigningkey = {key_path}\nissuercert = {cert_path}\n"
            f"certserial = {os.path.join(directory, 'serial')}\n"
        )
    with open(os.path.join(directory, "localca.options"), "w") as fh:
        fh.write(f"--platform-manufacturer {organisation.replace(' ', '-')}\n--platform-version 1.0\n"
                 "--platform-model tccdeploy-lab-node\n")
    with open(os.path.join(directory, "swtpm_setup.conf"), "w") as fh:
        fh.write(
            "create_certs_tool = /usr/bin/swtpm_localca\n"
            f"create_certs_tool_config = {os.path.join(directory, 'localca.conf')}\n"
            f"create_certs_tool_options = {os.path.join(directory, 'localca.options')}\n"
            "active_pcr_banks = sha1,sha256\n"
        )
    return key_path, cert_path
