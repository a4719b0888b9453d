"""STARTTLS for clients: the server's TLS identity (the configured certificate or a generated
self-signed one), and, when the listener asks for them, the verification of client certificates.

Client certificates are requested, never required: a client without one goes on with a password
mechanism. One that presents a certificate failing verification (untrusted issuer, expired, not
yet valid, self-signed unless allowed) either completes the handshake without a usable
certificate (policy "no_external") or has its handshake aborted (policy "disconnect").
"""

import datetime
import os
from collections.abc import Sequence
from dataclasses import dataclass

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from OpenSSL import SSL, crypto
from twisted.internet import ssl
from twisted.internet.interfaces import IOpenSSLServerConnectionCreator
from zope.interface import implementer

SELF_SIGNED_NAME = "self-signed.pem"

# TLS 1.2 suites with forward secrecy (ECDHE, DHE) and an AEAD cipher (AES-GCM,
# ChaCha20-Poly1305) only: no CBC, no SHA-1 MAC. This OpenSSL cipher string does not touch TLS
# 1.3, whose suites OpenSSL configures apart and which all qualify.
DEFAULT_CIPHERS = "ECDHE+AESGCM:ECDHE+CHACHA20:DHE+AESGCM:DHE+CHACHA20"


def check_ciphers(ciphers: str) -> None:
    """ValueError unless the OpenSSL cipher string selects at least one TLS 1.2 suite."""
    context = SSL.Context(SSL.TLS_METHOD)
    try:
        context.set_cipher_list(ciphers.encode("ascii"))
    except (SSL.Error, UnicodeEncodeError):
        raise ValueError("selects no cipher suite this OpenSSL knows") from None


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


def load_certificates(path: str) -> list[x509.Certificate]:
    """The certificates of a PEM file; ValueError naming the file if it holds none."""
    with open(path, "rb") as f:
        data = f.read()
    try:
        return x509.load_pem_x509_certificates(data)
    except ValueError:
        raise ValueError(f"{path}: no PEM certificate in the file") from None


def server_tls_options(
    certificate_path: str,
    key_path: str,
    client_ca: Sequence[str] = (),
    ciphers: str = DEFAULT_CIPHERS,
) -> ssl.CertificateOptions:
    """TLS 1.2+ server options from PEM files (the certificate file may carry its chain).

    ``ciphers`` is an OpenSSL cipher string for TLS 1.2 (see DEFAULT_CIPHERS).

    ``client_ca`` are PEM files of the authorities client certificates are verified against;
    the verification itself is set up per connection by ClientCertificateCheck.
    """
    chain = load_certificates(certificate_path)
    with open(key_path, "rb") as f:
        data = f.read()
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except (ValueError, TypeError):  # TypeError: the key is encrypted
        raise ValueError(f"{key_path}: no unencrypted PEM private key in the file") from None
    authorities = [
        crypto.X509.from_cryptography(authority)
        for path in client_ca
        for authority in load_certificates(path)
    ]
    return ssl.CertificateOptions(
        privateKey=key,
        certificate=chain[0],
        extraCertChain=chain[1:],
        raiseMinimumTo=ssl.TLSVersion.TLSv1_2,
        acceptableCiphers=ssl.AcceptableCiphers.fromOpenSSLCipherString(ciphers),
        # The trusted authorities go into the context's store; whether and how a client
        # certificate is verified is decided per connection.
        verify=bool(authorities),
        caCerts=authorities or None,
        requireCertificate=False,
    )


@dataclass(frozen=True)
class ClientCertificatePolicy:
    """How a listener that requests client certificates (``tls.verify_peer``) treats them."""

    allow_self_signed: bool = False  # tls.allow_self_signed_client
    disconnect_on_failure: bool = False  # tls.client_cert_failure = "disconnect"


# OpenSSL verification errors (X509_V_ERR_*) worth naming in the log.
_SELF_SIGNED_LEAF = 18
_VERIFY_ERRORS = {
    2: "the issuer's certificate is unknown",
    7: "the signature does not verify",
    9: "not yet valid",
    10: "expired",
    18: "self-signed",
    19: "self-signed certificate in the chain",
    20: "issued by an untrusted authority",
    21: "cannot verify the first certificate",
    24: "invalid CA certificate",
    26: "not for client authentication",
}


@implementer(IOpenSSLServerConnectionCreator)
class ClientCertificateCheck:
    """The server side of STARTTLS on one connection that requests a client certificate.

    Pass it to ``transport.startTLS``. Once the handshake is done, `verified_certificate` is the
    certificate the client presented if it passed verification against the trusted authorities
    of ``options``, and `problem` says why there is none.
    """

    def __init__(self, options: ssl.CertificateOptions, policy: ClientCertificatePolicy) -> None:
        self._options = options
        self._policy = policy
        self._connection: SSL.Connection | None = None
        self._errors: list[str] = []

    def serverConnectionForTLS(self, tlsProtocol: object) -> SSL.Connection:
        connection = self._options.serverConnectionForTLS(tlsProtocol)
        # Request a certificate without requiring one; VERIFY_CLIENT_ONCE: not again on a
        # renegotiation.
        connection.set_verify(SSL.VERIFY_PEER | SSL.VERIFY_CLIENT_ONCE, self._verify)
        self._connection = connection
        return connection

    def _verify(
        self, connection: SSL.Connection, certificate: object, errno: int, depth: int, ok: int
    ) -> bool:
        # Called by OpenSSL for every certificate of the chain, and again for every error.
        if ok:
            return True
        if errno == _SELF_SIGNED_LEAF and depth == 0 and self._policy.allow_self_signed:
            return True
        reason = _VERIFY_ERRORS.get(errno, f"OpenSSL verify error {errno}")
        self._errors.append(reason if depth == 0 else f"{reason} (chain depth {depth})")
        return not self._policy.disconnect_on_failure

    @property
    def verified_certificate(self) -> x509.Certificate | None:
        """The client's certificate if it presented one that passed verification."""
        if self._connection is None or self._errors:
            return None
        return self._connection.get_peer_certificate(as_cryptography=True)

    @property
    def rejected(self) -> bool:
        """Whether the handshake was refused because of the client's certificate."""
        return bool(self._errors) and self._policy.disconnect_on_failure

    @property
    def problem(self) -> str | None:
        """Why there is no verified certificate, None if there is one."""
        if self._errors:
            return ", ".join(dict.fromkeys(self._errors))
        if self.verified_certificate is None:
            return "no client certificate"
        return None
