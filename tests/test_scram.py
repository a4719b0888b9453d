"""SCRAM credentials and ScramServer against the RFC 5802 and RFC 7677 examples."""

import base64
import hashlib
import hmac

from twisted.trial import unittest

from mim_twisted.auth.errors import SaslError
from mim_twisted.auth.scram import (
    HASHES,
    ScramCredentials,
    ScramServer,
    derive_all,
    derive_credentials,
    verify_password,
)


def client_final(
    mechanism: str,
    password: str,
    client_first_bare: bytes,
    server_first: bytes,
    gs2_header: bytes = b"n,,",
    extensions: bytes = b"",
) -> tuple[bytes, bytes]:
    """A SCRAM client's final message and the server-final it expects, computed independently.

    ``extensions`` (e.g. ``b",x=1"``) go between r= and p=, where the proof covers them.
    """
    hash_name = HASHES[mechanism]
    fields = dict(field.split(b"=", 1) for field in server_first.split(b","))
    salted = hashlib.pbkdf2_hmac(
        hash_name, password.encode(), base64.b64decode(fields[b"s"]), int(fields[b"i"])
    )
    client_key = hmac.digest(salted, b"Client Key", hash_name)
    stored_key = hashlib.new(hash_name, client_key).digest()
    without_proof = b"c=" + base64.b64encode(gs2_header) + b",r=" + fields[b"r"] + extensions
    auth_message = b",".join([client_first_bare, server_first, without_proof])
    signature = hmac.digest(stored_key, auth_message, hash_name)
    proof = bytes(k ^ s for k, s in zip(client_key, signature, strict=True))
    server_key = hmac.digest(salted, b"Server Key", hash_name)
    server_signature = hmac.digest(server_key, auth_message, hash_name)
    return (
        without_proof + b",p=" + base64.b64encode(proof),
        b"v=" + base64.b64encode(server_signature),
    )


class RFCVectorMixin:
    """One RFC example exchange (user "user", password "pencil"), replayed against ScramServer."""

    mechanism: str
    salt: str
    server_nonce: str
    client_first: bytes
    server_first: bytes
    client_final: bytes
    server_final: bytes

    def credentials(self, password: str = "pencil") -> ScramCredentials:
        return derive_credentials(
            self.mechanism, password, salt=base64.b64decode(self.salt), iterations=4096
        )

    def server(self) -> ScramServer:
        return ScramServer(self.mechanism, nonce=self.server_nonce)

    def test_exchange(self) -> None:
        server = self.server()
        first = server.read_client_first(self.client_first)
        self.assertEqual((first.username, first.authzid, first.gs2_header), ("user", None, "n,,"))
        self.assertEqual(server.server_first(self.credentials()), self.server_first)
        self.assertEqual(server.read_client_final(self.client_final), self.server_final)

    def test_independent_client(self) -> None:
        """The test's own client agrees with the RFC, so the other tests can rely on it."""
        final, server_final = client_final(
            self.mechanism, "pencil", self.client_first[3:], self.server_first
        )
        self.assertEqual((final, server_final), (self.client_final, self.server_final))

    def test_wrong_password(self) -> None:
        server = self.server()
        server.read_client_first(self.client_first)
        server.server_first(self.credentials("pencil2"))
        error = self.assertRaises(SaslError, server.read_client_final, self.client_final)
        self.assertEqual(error.condition, "not-authorized")

    def test_no_step_after_failure(self) -> None:
        server = self.server()
        server.read_client_first(self.client_first)
        server.server_first(self.credentials("pencil2"))
        self.assertRaises(SaslError, server.read_client_final, self.client_final)
        error = self.assertRaises(SaslError, server.read_client_final, self.client_final)
        self.assertEqual(error.condition, "malformed-request")


class SCRAMSHA1VectorTests(RFCVectorMixin, unittest.TestCase):
    """RFC 5802 §5."""

    mechanism = "SCRAM-SHA-1"
    salt = "QSXCR+Q6sek8bf92"
    server_nonce = "3rfcNHYJY1ZVvWVs7j"
    client_first = b"n,,n=user,r=fyko+d2lbbFgONRv9qkxdawL"
    server_first = b"r=fyko+d2lbbFgONRv9qkxdawL3rfcNHYJY1ZVvWVs7j,s=QSXCR+Q6sek8bf92,i=4096"
    client_final = (
        b"c=biws,r=fyko+d2lbbFgONRv9qkxdawL3rfcNHYJY1ZVvWVs7j,p=v0X8v3Bz2T0CJGbJQyF0X+HI4Ts="
    )
    server_final = b"v=rmF9pqV8S7suAoZWja4dJRkFsKQ="


class SCRAMSHA256VectorTests(RFCVectorMixin, unittest.TestCase):
    """RFC 7677 §3."""

    mechanism = "SCRAM-SHA-256"
    salt = "W22ZaJ0SNY7soEsUEjb6gQ=="
    server_nonce = "%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0"
    client_first = b"n,,n=user,r=rOprNGfwEbeRWgbNEkqO"
    server_first = (
        b"r=rOprNGfwEbeRWgbNEkqO%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0,s=W22ZaJ0SNY7soEsUEjb6gQ==,i=4096"
    )
    client_final = (
        b"c=biws,r=rOprNGfwEbeRWgbNEkqO%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0,"
        b"p=dHzbZapWIk4jUhN+Ute9ytag9zjfMHgsqmmiz7AndVQ="
    )
    server_final = b"v=6rriTRBi23WpRR/wtup+mMhUZUn/dB5nLTJRsjl95G4="


class ScramServerTests(unittest.TestCase):
    mechanism = "SCRAM-SHA-256"

    def setUp(self) -> None:
        self.credentials = derive_credentials(self.mechanism, "secret")

    def exchange(self, client_first: bytes, gs2_header: bytes = b"n,,") -> tuple[bytes, bytes]:
        """Run the first two steps; the client-final a correct client would send, and the reply."""
        self.server = ScramServer(self.mechanism, nonce="srv")
        self.server.read_client_first(client_first)
        server_first = self.server.server_first(self.credentials)
        bare = client_first[len(gs2_header) :]
        return client_final(self.mechanism, "secret", bare, server_first, gs2_header)

    def assertFails(self, condition: str, step, data: bytes) -> SaslError:
        error = self.assertRaises(SaslError, step, data)
        self.assertEqual(error.condition, condition)
        return error

    def test_success_with_authzid_and_escaped_username(self) -> None:
        gs2_header = b"y,a=admin=2Cboss@example.org,"
        final, server_final = self.exchange(gs2_header + b"n=us=3Der,r=abc", gs2_header)
        self.assertEqual(self.server.read_client_final(final), server_final)

    def test_client_first_fields(self) -> None:
        server = ScramServer(self.mechanism)
        first = server.read_client_first(b"y,a=admin=2Cboss,n=us=3Der,r=abc,x=ignored")
        self.assertEqual(first.gs2_header, "y,a=admin=2Cboss,")
        self.assertEqual(first.authzid, "admin,boss")
        self.assertEqual(first.username, "us=er")
        self.assertEqual(first.nonce, "abc")
        self.assertEqual(first.bare, "n=us=3Der,r=abc,x=ignored")

    def test_username_saslprepped(self) -> None:
        first = ScramServer(self.mechanism).read_client_first(b"n,,n=I\xc2\xadX,r=abc")
        self.assertEqual(first.username, "IX")

    def test_bad_gs2_headers(self) -> None:
        for data in [
            b"p=tls-unique,,n=user,r=abc",
            b"x,,n=user,r=abc",
            b"n,b=admin,n=user,r=abc",
            b"n,a=,n=user,r=abc",
            b"n,n=user,r=abc",
            b"n",
        ]:
            self.assertFails(
                "malformed-request", ScramServer(self.mechanism).read_client_first, data
            )

    def test_bad_client_first_bare(self) -> None:
        for data in [
            b"n,,m=ext,n=user,r=abc",
            b"n,,n=user",
            b"n,,r=abc,n=user",
            b"n,,n=us=2Xer,r=abc",
            b"n,,n=,r=abc",
            b"n,,n=user,r=a\x7fb",
            b"n,,n=user,r=",
            b"n,,n=\xff,r=abc",
        ]:
            self.assertFails(
                "malformed-request", ScramServer(self.mechanism).read_client_first, data
            )

    def test_prohibited_username(self) -> None:
        server = ScramServer(self.mechanism)
        self.assertFails("not-authorized", server.read_client_first, b"n,,n=a\x07b,r=abc")

    def test_wrong_nonce(self) -> None:
        final, _ = self.exchange(b"n,,n=user,r=abc")
        forged = final.replace(b",r=abc", b",r=abd")
        self.assertFails("not-authorized", self.server.read_client_final, forged)

    def test_channel_binding_mismatch(self) -> None:
        """A client that said "y" must repeat "y" in c=, or someone changed the header."""
        final, _ = self.exchange(b"y,,n=user,r=abc", b"y,,")
        forged = final.replace(b"c=" + base64.b64encode(b"y,,"), b"c=biws")
        self.assertFails("not-authorized", self.server.read_client_final, forged)

    def test_wrong_proof(self) -> None:
        final, _ = self.exchange(b"n,,n=user,r=abc")
        without_proof, proof = final.split(b",p=")
        forged = bytes([base64.b64decode(proof)[0] ^ 1]) + base64.b64decode(proof)[1:]
        data = without_proof + b",p=" + base64.b64encode(forged)
        self.assertFails("not-authorized", self.server.read_client_final, data)

    def test_malformed_client_final(self) -> None:
        final, _ = self.exchange(b"n,,n=user,r=abc")
        without_proof, proof = final.split(b",p=")
        for data in [
            without_proof,
            b"p=" + proof,
            final.replace(b"c=", b"x="),
            final.replace(b"c=biws", b"c=bi*ws"),
            without_proof + b",p=" + base64.b64encode(b"short"),
        ]:
            server = ScramServer(self.mechanism, nonce="srv")
            server.read_client_first(b"n,,n=user,r=abc")
            server.server_first(self.credentials)
            self.assertFails("malformed-request", server.read_client_final, data)

    def test_extension_in_client_final_ignored(self) -> None:
        self.server = ScramServer(self.mechanism, nonce="srv")
        self.server.read_client_first(b"n,,n=user,r=abc")
        server_first = self.server.server_first(self.credentials)
        final, server_final = client_final(
            self.mechanism, "secret", b"n=user,r=abc", server_first, extensions=b",x=ext"
        )
        self.assertIn(b",x=ext,p=", final)
        self.assertEqual(self.server.read_client_final(final), server_final)

    def test_steps_out_of_order(self) -> None:
        server = ScramServer(self.mechanism)
        self.assertFails("malformed-request", server.read_client_final, b"c=biws,r=abc,p=")
        server = ScramServer(self.mechanism)
        server.read_client_first(b"n,,n=user,r=abc")
        self.assertFails("malformed-request", server.read_client_first, b"n,,n=user,r=abc")

    def test_credentials_of_another_mechanism(self) -> None:
        server = ScramServer("SCRAM-SHA-1")
        server.read_client_first(b"n,,n=user,r=abc")
        self.assertRaises(ValueError, server.server_first, self.credentials)


class UnknownUserTests(unittest.TestCase):
    mechanism = "SCRAM-SHA-256"

    def server_first(self, username: bytes, decoy_name: str | None = None) -> bytes:
        server = ScramServer(self.mechanism, nonce="server")
        server.read_client_first(b"n,,n=" + username + b",r=client")
        return server.server_first(None, decoy_name=decoy_name)

    def test_fails_only_at_the_end(self) -> None:
        server = ScramServer(self.mechanism)
        server.read_client_first(b"n,,n=nobody,r=abc")
        server_first = server.server_first(None)
        final, _ = client_final(self.mechanism, "anything", b"n=nobody,r=abc", server_first)
        error = self.assertRaises(SaslError, server.read_client_final, final)
        self.assertEqual(error.condition, "not-authorized")

    def test_server_first_looks_real(self) -> None:
        fields = dict(field.split(b"=", 1) for field in self.server_first(b"nobody").split(b","))
        self.assertEqual(fields[b"r"], b"clientserver")
        self.assertEqual(len(base64.b64decode(fields[b"s"])), 16)
        self.assertEqual(fields[b"i"], b"4096")

    def test_server_first_stable_per_name(self) -> None:
        self.assertEqual(self.server_first(b"nobody"), self.server_first(b"nobody"))
        self.assertNotEqual(self.server_first(b"nobody"), self.server_first(b"noone"))

    def test_decoy_name(self) -> None:
        """Spellings of one account name share a salt when the caller names the account."""
        self.assertEqual(
            self.server_first(b"Nobody", "nobody@example.org"),
            self.server_first(b"nobody", "nobody@example.org"),
        )

    def test_salt_differs_per_mechanism(self) -> None:
        other = ScramServer("SCRAM-SHA-1", nonce="server")
        other.read_client_first(b"n,,n=nobody,r=client")
        self.assertNotEqual(other.server_first(None), self.server_first(b"nobody"))


class CredentialsTests(unittest.TestCase):
    def test_text_round_trip(self) -> None:
        for mechanism in HASHES:
            credentials = derive_credentials(mechanism, "pencil", iterations=10)
            text = credentials.to_text()
            self.assertTrue(text.startswith("v1,10,"))
            self.assertEqual(ScramCredentials.from_text(mechanism, text), credentials)

    def test_malformed_text(self) -> None:
        text = derive_credentials("SCRAM-SHA-256", "pencil", iterations=10).to_text()
        version, iterations, salt, stored, server = text.split(",")
        for bad in [
            "",
            text + ",extra",
            ",".join(["v2", iterations, salt, stored, server]),
            ",".join([version, "0", salt, stored, server]),
            ",".join([version, "-1", salt, stored, server]),
            ",".join([version, "ten", salt, stored, server]),
            ",".join([version, iterations, "", stored, server]),
            ",".join([version, iterations, salt, stored[:-4], server]),
            ",".join([version, iterations, salt, stored, "!!" + server[2:]]),
        ]:
            self.assertRaises(ValueError, ScramCredentials.from_text, "SCRAM-SHA-256", bad)
        # Keys of the wrong length for the mechanism.
        self.assertRaises(ValueError, ScramCredentials.from_text, "SCRAM-SHA-1", text)
        self.assertRaises(ValueError, ScramCredentials.from_text, "SCRAM-MD5", text)

    def test_derive_all(self) -> None:
        stored = derive_all("pencil", iterations=10)
        self.assertEqual(set(stored), {"SCRAM-SHA-1", "SCRAM-SHA-256"})
        parsed = [ScramCredentials.from_text(name, text) for name, text in stored.items()]
        self.assertNotEqual(parsed[0].salt, parsed[1].salt)
        self.assertTrue(all(verify_password(c, "pencil") for c in parsed))

    def test_random_salt(self) -> None:
        first, second = (derive_credentials("SCRAM-SHA-1", "pencil") for _ in range(2))
        self.assertEqual(len(first.salt), 16)
        self.assertNotEqual(first.salt, second.salt)

    def test_verify_password(self) -> None:
        credentials = derive_credentials("SCRAM-SHA-256", "pencil", iterations=10)
        self.assertTrue(verify_password(credentials, "pencil"))
        self.assertFalse(verify_password(credentials, "Pencil"))
        self.assertFalse(verify_password(credentials, "pencil\u0007"))

    def test_password_saslprepped(self) -> None:
        credentials = derive_credentials("SCRAM-SHA-256", "I\u00adX", iterations=10)
        self.assertTrue(verify_password(credentials, "\u2168"))

    def test_bad_passwords_refused(self) -> None:
        for password in ["", "\u00ad", "a\u0007"]:
            self.assertRaises(ValueError, derive_credentials, "SCRAM-SHA-1", password)
        self.assertRaises(ValueError, derive_credentials, "SCRAM-SHA-1", "x", iterations=0)
        self.assertRaises(ValueError, derive_credentials, "SCRAM-MD5", "pencil")
