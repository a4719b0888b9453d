"""TLS 1.2 is offered only with forward-secret AEAD suites unless `tls.ciphers` says otherwise;
TLS 1.3 is left as OpenSSL has it."""

import datetime
import os
import ssl

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.x509.oid import NameOID
from twisted.trial import unittest

from mim_twisted.config import ConfigError, load_config
from tests.e2e.harness import STREAM_HEADER, ServerTestCase

STARTTLS = b"<starttls xmlns='urn:ietf:params:xml:ns:xmpp-tls'/>"
HANDSHAKE_REFUSED = (ssl.SSLError, ConnectionError)


def write_rsa_certificate(directory: str) -> str:
    """A PEM file with an RSA key and a self-signed certificate for localhost."""
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])
    now = datetime.datetime.now(datetime.UTC)
    certificate = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName("localhost")]), False)
        .sign(key, hashes.SHA256())
    )
    path = os.path.join(directory, "rsa.pem")
    with open(path, "wb") as f:
        f.write(
            key.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            )
            + certificate.public_bytes(serialization.Encoding.PEM)
        )
    return path


class CipherTestCase(ServerTestCase):
    async def negotiated(self, cipher: str | None, tls12: bool = True) -> tuple[str, str]:
        """STARTTLS with a client limited to TLS 1.2 and `cipher` (an OpenSSL cipher string);
        the negotiated (suite, version)."""
        raw = self.raw()
        await raw.connect()
        await raw.send(STREAM_HEADER + STARTTLS)
        await raw.read_until(b"<proceed")
        context = ssl.create_default_context(cafile=self.certificate)
        if tls12:
            context.maximum_version = ssl.TLSVersion.TLSv1_2
        if cipher is not None:
            context.set_ciphers(cipher)
        await raw.starttls(context)
        connection = raw.writer.get_extra_info("ssl_object")
        return connection.cipher()[0], connection.version()


class EcdsaCertificateTests(CipherTestCase):
    """The generated certificate has a P-256 key."""

    async def setUp(self) -> None:
        await self.start_server()

    async def test_cbc_suites_are_refused(self) -> None:
        for cipher in ("ECDHE-ECDSA-AES256-SHA", "ECDHE-ECDSA-AES128-SHA256"):
            with self.assertRaises(HANDSHAKE_REFUSED):
                await self.negotiated(cipher)

    async def test_aead_suites_are_accepted(self) -> None:
        for cipher in ("ECDHE-ECDSA-AES128-GCM-SHA256", "ECDHE-ECDSA-CHACHA20-POLY1305"):
            self.assertEqual(await self.negotiated(cipher), (cipher, "TLSv1.2"))

    async def test_tls13_is_untouched(self) -> None:
        name, version = await self.negotiated(None, tls12=False)
        self.assertEqual(version, "TLSv1.3")
        self.assertTrue(name.startswith("TLS_"), name)


class RsaCertificateTests(CipherTestCase):
    async def setUp(self) -> None:
        directory = os.path.abspath(self.mktemp())
        os.makedirs(directory)
        pem = write_rsa_certificate(directory)
        await self.start_server(f'[tls]\ncertificate = "{pem}"\nprivate_key = "{pem}"\n')
        self.certificate = pem

    async def test_cbc_and_static_rsa_suites_are_refused(self) -> None:
        for cipher in ("AES256-SHA", "AES128-SHA", "AES128-GCM-SHA256", "ECDHE-RSA-AES256-SHA"):
            with self.assertRaises(HANDSHAKE_REFUSED):
                await self.negotiated(cipher)

    async def test_forward_secret_aead_suites_are_accepted(self) -> None:
        for cipher in ("ECDHE-RSA-AES256-GCM-SHA384", "ECDHE-RSA-CHACHA20-POLY1305"):
            self.assertEqual(await self.negotiated(cipher), (cipher, "TLSv1.2"))


class ConfiguredCiphersTests(CipherTestCase):
    extra_config = '[tls]\nciphers = "ECDHE+AESGCM:ECDHE+AES"\n'

    async def setUp(self) -> None:
        await self.start_server()

    async def test_the_configured_suites_are_offered(self) -> None:
        cipher = "ECDHE-ECDSA-AES256-SHA"
        self.assertEqual(await self.negotiated(cipher), (cipher, "TLSv1.2"))


class CipherConfigTests(unittest.TestCase):
    def load(self, value: str) -> object:
        path = self.mktemp()
        with open(path, "w") as f:
            f.write(f"[tls]\nciphers = {value}\n")
        return load_config(path)

    def test_default(self) -> None:
        self.assertEqual(
            load_config(None).tls.ciphers, "ECDHE+AESGCM:ECDHE+CHACHA20:DHE+AESGCM:DHE+CHACHA20"
        )

    def test_a_string_that_selects_nothing_names_the_key(self) -> None:
        with self.assertRaises(ConfigError) as raised:
            self.load('"NOT-A-CIPHER"')
        self.assertRegex(str(raised.exception), r"^\S+: tls\.ciphers: selects no cipher suite")
        self.assertNotIn("\n", str(raised.exception))

    def test_not_a_string(self) -> None:
        with self.assertRaises(ConfigError) as raised:
            self.load("3")
        self.assertIn(
            "tls.ciphers: must be an OpenSSL cipher string (got 3)", str(raised.exception)
        )
