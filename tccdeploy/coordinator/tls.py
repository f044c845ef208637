"""Certificates for `tc serve`: the TC's HTTPS server certificate and its engines' client
certificates, all issued by the TC's own CA, so a client pins one certificate (the TC's CA,
which customers already pin for receipts) and the server trusts engines it issued itself.

An engine certificate names the engine in its CN, carries the clientAuth usage and a role OU,
and is recorded in the registry by serial: removing an engine revokes it at once (the server
looks the serial up on every request).
"""

from __future__ import annotations

import datetime
import ipaddress
import os

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from ..crypto.files import atomic_write
from .identity import Identity

ENGINE_OU = "tccdeploy engine"
SERVER_OU = "tccdeploy coordinator service"
SERVER_DAYS = 90
ENGINE_DAYS = 365


def _write(path: str, data: bytes, secret: bool) -> None:
    atomic_write(path, data, 0o600 if secret else 0o644)


def _leaf(tc: Identity, common_name: str, unit: str, usage: x509.ObjectIdentifier, days: int,
          sans: list[x509.GeneralName] | None = None) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.UTC)
    builder = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, unit),
                                 x509.NameAttribute(NameOID.COMMON_NAME, common_name)]))
        .issuer_name(tc.certificate.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.KeyUsage(True, False, False, False, True, False, False, False, False), critical=True)
        .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(tc.key.public_key()), critical=False)
    )
    if sans:
        builder = builder.add_extension(x509.SubjectAlternativeName(sans), critical=False)
    return key, builder.sign(tc.key, hashes.SHA256())


def _pem_key(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())


def server_certificate(tc: Identity, folder: str, hosts: list[str]) -> tuple[str, str]:
    """(key file, certificate file) for the addresses/names the service answers on; made anew
    at each start (short-lived, nothing to rotate by hand)."""
    sans: list[x509.GeneralName] = []
    for host in hosts:
        try:
            sans.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            sans.append(x509.DNSName(host))
    key, cert = _leaf(tc, hosts[0], SERVER_OU, ExtendedKeyUsageOID.SERVER_AUTH, SERVER_DAYS, sans)
    os.makedirs(folder, mode=0o700, exist_ok=True)
    key_path, cert_path = os.path.join(folder, "server-key.pem"), os.path.join(folder, "server-cert.pem")
    _write(key_path, _pem_key(key), secret=True)
    _write(cert_path, cert.public_bytes(serialization.Encoding.PEM), secret=False)
    return key_path, cert_path


def engine_certificate(tc: Identity, name: str, folder: str) -> x509.Certificate:
    """An engine's client certificate and key (0600) in folder, with the TC's CA to pin."""
    key, cert = _leaf(tc, name, ENGINE_OU, ExtendedKeyUsageOID.CLIENT_AUTH, ENGINE_DAYS)
    os.makedirs(folder, mode=0o700, exist_ok=True)
    _write(os.path.join(folder, "engine-key.pem"), _pem_key(key), secret=True)
    _write(os.path.join(folder, "engine-cert.pem"), cert.public_bytes(serialization.Encoding.PEM), secret=False)
    _write(os.path.join(folder, "tc-ca.pem"), tc.certificate.public_bytes(serialization.Encoding.PEM), secret=False)
    return cert


def engine_name(cert: x509.Certificate) -> str | None:
    """The engine a client certificate names, or None when it is not an engine certificate."""
    units = [a.value for a in cert.subject.get_attributes_for_oid(NameOID.ORGANIZATIONAL_UNIT_NAME)]
    names = [a.value for a in cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)]
    try:
        usages = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    except x509.ExtensionNotFound:
        return None
    if ENGINE_OU not in units or ExtendedKeyUsageOID.CLIENT_AUTH not in usages or not names:
        return None
    return str(names[0])
