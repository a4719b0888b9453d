"""The server's TLS identity: loading the configured certificate or generating a self-signed one."""

import datetime
import os

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from twisted.internet import ssl

SELF_SIGNED_NAME = "self-signed.pem"


def generate_self_signed(path: str, domains: list[str], *, valid_days: int = 3650) -> None:
    """Write a PEM file holding a new P-256 key and a self-signed certificate for the domains."""
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.UTC)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, domains[0])])
    certificate = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=valid_days))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName(d) for d in domains]), False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    ) + certificate.public_bytes(serialization.Encoding.PEM)
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    # The file holds the private key: create it readable by the owner only.
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(pem)


def ensure_certificate(
    certificate: str, private_key: str, data_dir: str, domains: list[str]
) -> tuple[str, str, bool]:
    """The (certificate, key) files to use, generating a self-signed pair on first start.

    Returns the paths and whether a new certificate was generated.
    """
    if certificate:
        return certificate, private_key or certificate, False
    path = os.path.join(data_dir, SELF_SIGNED_NAME)
    if os.path.exists(path):
        return path, path, False
    generate_self_signed(path, domains)
    return path, path, True


def server_tls_options(certificate_path: str, key_path: str) -> ssl.CertificateOptions:
    """TLS 1.2+ server options from PEM files (the certificate file may carry its chain)."""
    with open(certificate_path, "rb") as f:
        chain = x509.load_pem_x509_certificates(f.read())
    with open(key_path, "rb") as f:
        key = serialization.load_pem_private_key(f.read(), password=None)
    return ssl.CertificateOptions(
        privateKey=key,
        certificate=chain[0],
        extraCertChain=chain[1:],
        raiseMinimumTo=ssl.TLSVersion.TLSv1_2,
    )
