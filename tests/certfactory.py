"""Certificates for the client-certificate tests, made with `cryptography` (P-256 keys: fast).

`Authority` is a CA that issues client certificates (and server ones, `issue_server`);
`self_signed` makes one without a CA.
Either takes the xmppAddrs to put in the SubjectAltName (none, one or several), the subject CN
(or none), and the validity period; `raw_xmpp_addrs` adds id-on-xmppAddr values that are not
valid UTF8Strings. `write_pem` stores a certificate and its key as PEM files for TLS clients.
"""

import datetime
import os
from dataclasses import dataclass

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

ID_ON_XMPPADDR = x509.ObjectIdentifier("1.3.6.1.5.5.7.8.5")

NOW = datetime.datetime.now(datetime.UTC)
VALID = (NOW - datetime.timedelta(days=1), NOW + datetime.timedelta(days=30))
EXPIRED = (NOW - datetime.timedelta(days=30), NOW - datetime.timedelta(days=1))
NOT_YET_VALID = (NOW + datetime.timedelta(days=1), NOW + datetime.timedelta(days=30))


def utf8_string(text: str) -> bytes:
    """DER encoding of an ASN.1 UTF8String."""
    data = text.encode("utf-8")
    if len(data) < 0x80:
        return bytes([0x0C, len(data)]) + data
    length = len(data).to_bytes((len(data).bit_length() + 7) // 8, "big")
    return bytes([0x0C, 0x80 | len(length)]) + length + data


@dataclass(frozen=True)
class Issued:
    certificate: x509.Certificate
    key: ec.EllipticCurvePrivateKey

    def write_pem(self, directory: str, name: str) -> tuple[str, str]:
        """Write ``name``-cert.pem and ``name``-key.pem; return their paths."""
        os.makedirs(directory, exist_ok=True)
        certificate = os.path.join(directory, f"{name}-cert.pem")
        key = os.path.join(directory, f"{name}-key.pem")
        with open(certificate, "wb") as f:
            f.write(self.certificate.public_bytes(serialization.Encoding.PEM))
        with open(key, "wb") as f:
            f.write(
                self.key.private_bytes(
                    serialization.Encoding.PEM,
                    serialization.PrivateFormat.PKCS8,
                    serialization.NoEncryption(),
                )
            )
        return certificate, key


def _name(common_name: str | None) -> x509.Name:
    attributes = [x509.NameAttribute(NameOID.ORGANIZATION_NAME, "mim-twisted tests")]
    if common_name is not None:
        attributes.append(x509.NameAttribute(NameOID.COMMON_NAME, common_name))
    return x509.Name(attributes)


def _client_certificate(
    issuer_name: x509.Name,
    issuer_key: ec.EllipticCurvePrivateKey,
    key: ec.EllipticCurvePrivateKey,
    *,
    common_name: str | None,
    xmpp_addrs: tuple[str, ...],
    raw_xmpp_addrs: tuple[bytes, ...],
    validity: tuple[datetime.datetime, datetime.datetime],
    subject: x509.Name | None = None,
) -> x509.Certificate:
    builder = (
        x509.CertificateBuilder()
        .subject_name(subject or _name(common_name))
        .issuer_name(issuer_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(validity[0])
        .not_valid_after(validity[1])
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
    )
    names: list[x509.GeneralName] = [
        x509.OtherName(ID_ON_XMPPADDR, utf8_string(addr)) for addr in xmpp_addrs
    ]
    names += [x509.OtherName(ID_ON_XMPPADDR, raw) for raw in raw_xmpp_addrs]
    if names:
        # Like the certificates of MongooseIM's suite: an e-mail address next to the xmppAddrs.
        names.append(x509.RFC822Name(f"{common_name or 'someone'}@mail.example.com"))
        builder = builder.add_extension(x509.SubjectAlternativeName(names), critical=False)
    return builder.sign(issuer_key, hashes.SHA256())


class Authority:
    """A certification authority for client certificates."""

    def __init__(self, name: str = "mim-twisted Test CA", validity=VALID) -> None:
        self.key = ec.generate_private_key(ec.SECP256R1())
        self.name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
        self.certificate = (
            x509.CertificateBuilder()
            .subject_name(self.name)
            .issuer_name(self.name)
            .public_key(self.key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(validity[0])
            .not_valid_after(validity[1])
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(
                x509.KeyUsage(
                    digital_signature=False,
                    content_commitment=False,
                    key_encipherment=False,
                    data_encipherment=False,
                    key_agreement=False,
                    key_cert_sign=True,
                    crl_sign=True,
                    encipher_only=False,
                    decipher_only=False,
                ),
                critical=True,
            )
            .sign(self.key, hashes.SHA256())
        )

    def issue(
        self,
        common_name: str | None = None,
        xmpp_addrs: tuple[str, ...] | list[str] = (),
        *,
        raw_xmpp_addrs: tuple[bytes, ...] = (),
        validity=VALID,
        subject: x509.Name | None = None,
    ) -> Issued:
        key = ec.generate_private_key(ec.SECP256R1())
        certificate = _client_certificate(
            self.name,
            self.key,
            key,
            common_name=common_name,
            xmpp_addrs=tuple(xmpp_addrs),
            raw_xmpp_addrs=raw_xmpp_addrs,
            validity=validity,
            subject=subject,
        )
        return Issued(certificate, key)

    def issue_server(self, host: str) -> Issued:
        """A server certificate for `host` (a DNS name), as a TLS server presents it."""
        key = ec.generate_private_key(ec.SECP256R1())
        certificate = (
            x509.CertificateBuilder()
            .subject_name(_name(host))
            .issuer_name(self.name)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(VALID[0])
            .not_valid_after(VALID[1])
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
            .add_extension(x509.SubjectAlternativeName([x509.DNSName(host)]), critical=False)
            .sign(self.key, hashes.SHA256())
        )
        return Issued(certificate, key)

    def write_pem(self, directory: str, name: str = "ca") -> str:
        os.makedirs(directory, exist_ok=True)
        path = os.path.join(directory, f"{name}.pem")
        with open(path, "wb") as f:
            f.write(self.certificate.public_bytes(serialization.Encoding.PEM))
        return path


def self_signed(
    common_name: str | None = None,
    xmpp_addrs: tuple[str, ...] | list[str] = (),
    *,
    validity=VALID,
) -> Issued:
    """A client certificate signed by its own key."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = _name(common_name)
    certificate = _client_certificate(
        name,
        key,
        key,
        common_name=common_name,
        xmpp_addrs=tuple(xmpp_addrs),
        raw_xmpp_addrs=(),
        validity=validity,
        subject=name,
    )
    return Issued(certificate, key)
