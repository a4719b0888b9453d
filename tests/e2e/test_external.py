"""slixmpp logs in with a client certificate and no password (SASL EXTERNAL, XEP-0178), and every
way a certificate can fail to prove an identity is refused with the right SASL condition."""

import asyncio
import os
import ssl

from tests import certfactory
from tests.certfactory import Authority, Issued
from tests.e2e.harness import STREAM_HEADER, RawClient, ServerTestCase, wait_for
from tests.test_external import NS_SASL, failure, mechanisms, sasl_answer


class ExternalTestCase(ServerTestCase):
    """A server that requests client certificates signed by `self.ca`."""

    methods = '["standard"]'
    policy = "no_external"
    cert_accounts = "existing"
    allow_self_signed = "false"

    async def setUp(self) -> None:
        self.ca = Authority()
        self.certificates = os.path.abspath(self.mktemp())
        ca_file = self.ca.write_pem(self.certificates)
        await self.start_server(
            f'[tls]\nverify_peer = true\nclient_ca = ["{ca_file}"]\n'
            f'client_cert_failure = "{self.policy}"\n'
            f"allow_self_signed_client = {self.allow_self_signed}\n"
        )
        for user in ("alice", "bob", "kate"):
            await self.register(user, "wonderland")

    def server_config(self, directory: str) -> str:
        return (
            super()
            .server_config(directory)
            .replace(
                "[auth]\n",
                f'[auth]\nsasl_external = {self.methods}\ncert_accounts = "{self.cert_accounts}"\n',
            )
        )

    def files(self, issued: Issued) -> tuple[str, str]:
        return issued.write_pem(self.certificates, f"client{len(os.listdir(self.certificates))}")

    def external(self, jid: str, issued: Issued | None, authzid: str | None = None):
        """A slixmpp client that presents ``issued`` and insists on EXTERNAL, with no password."""
        certificate = self.files(issued) if issued is not None else None
        return self.client(jid, "", "EXTERNAL", client_certificate=certificate, authzid=authzid)

    async def login(self, jid: str, issued: Issued, authzid: str | None = None) -> str:
        """Log in with EXTERNAL; the bound full JID."""
        client = self.external(jid, issued, authzid)
        self.assertEqual(await client.connect(), "session_start")
        return client.bound_jid

    async def refused(self, issued: Issued, authzid: str | None = None) -> str:
        """Try EXTERNAL; the condition of the SASL failure (the client gives up after it)."""
        client = self.external("bob@localhost", issued, authzid)
        refusal = client.next_event("failed_auth")
        self.assertEqual(await client.connect(), "failed_auth")
        self.assertEqual(len(self.server.core.sessions), 0)
        # By qualified name: slixmpp's ["condition"] would take one in any namespace.
        element = (await wait_for(refusal)).xml
        self.assertEqual(element.tag, f"{{{NS_SASL}}}failure")
        [condition] = [child.tag for child in element if child.tag != f"{{{NS_SASL}}}text"]
        namespace, name = condition[1:].split("}")
        self.assertEqual(namespace, NS_SASL)
        return name

    async def starttls(self, issued: Issued | None) -> RawClient:
        """A raw connection that presented ``issued`` on STARTTLS; its features are read."""
        raw = self.raw()
        await raw.connect()
        await raw.send(STREAM_HEADER)
        await raw.read_until(b"</stream:features>")
        await raw.send(b"<starttls xmlns='urn:ietf:params:xml:ns:xmpp-tls'/>")
        await raw.read_until(b"<proceed")
        context = ssl.create_default_context(cafile=self.certificate)
        if issued is not None:
            context.load_cert_chain(*self.files(issued))
        await raw.starttls(context)
        return raw

    async def features_after_starttls(self, issued: Issued | None) -> tuple[RawClient, bytes]:
        raw = await self.starttls(issued)
        await raw.send(STREAM_HEADER)
        return raw, await raw.read_until(b"</stream:features>")


class StandardTests(ExternalTestCase):
    async def test_single_xmpp_addr_without_authzid(self) -> None:
        issued = self.ca.issue("bob", ["bob@localhost"])
        jid = await self.login("bob@localhost/laptop", issued)
        self.assertEqual(jid, "bob@localhost/laptop")
        self.assertEqual(len(self.server.core.sessions), 1)

    async def test_single_xmpp_addr_with_its_own_authzid(self) -> None:
        # MongooseIM 3.3 refused this one with invalid-authzid.
        issued = self.ca.issue("bob", ["bob@localhost"])
        jid = await self.login("bob@localhost/laptop", issued, authzid="bob@localhost")
        self.assertEqual(jid, "bob@localhost/laptop")

    async def test_two_xmpp_addrs_with_an_authzid_naming_one(self) -> None:
        issued = self.ca.issue("kate", ["kate@fed1", "kate@localhost"])
        jid = await self.login("kate@localhost/phone", issued, authzid="kate@localhost")
        self.assertEqual(jid, "kate@localhost/phone")

    async def test_two_xmpp_addrs_without_authzid(self) -> None:
        issued = self.ca.issue("not-alice", ["alice@localhost", "alice@fed1"])
        self.assertEqual(await self.refused(issued), "invalid-authzid")

    async def test_wrong_domain(self) -> None:
        self.assertEqual(await self.refused(self.ca.issue("bob", ["bob@fed1"])), "not-authorized")

    async def test_mismatched_authzid(self) -> None:
        issued = self.ca.issue("bob", ["bob@localhost"])
        self.assertEqual(await self.refused(issued, "alice@localhost"), "not-authorized")
        issued = self.ca.issue("grace", ["grace@fed1", "grace@reg1"])
        self.assertEqual(await self.refused(issued, "grace@localhost"), "not-authorized")

    async def test_cn_only_is_not_an_identity(self) -> None:
        self.assertEqual(await self.refused(self.ca.issue("bob")), "not-authorized")
        self.assertEqual(
            await self.refused(self.ca.issue("bob"), "bob@localhost"), "not-authorized"
        )

    async def test_no_such_account(self) -> None:
        issued = self.ca.issue("carol", ["carol@localhost"])
        self.assertEqual(await self.refused(issued), "not-authorized")

    async def test_another_attempt_on_the_same_stream(self) -> None:
        raw, features = await self.features_after_starttls(
            self.ca.issue("kate", ["kate@localhost", "kate@fed1"])
        )
        self.assertEqual(mechanisms(features)[0], "EXTERNAL")
        await raw.send(
            b"<auth xmlns='urn:ietf:params:xml:ns:xmpp-sasl' mechanism='EXTERNAL'>=</auth>"
        )
        answer = sasl_answer(await raw.read_until(b"</failure>"))
        self.assertEqual(answer, failure("invalid-authzid"))
        await raw.send(
            b"<auth xmlns='urn:ietf:params:xml:ns:xmpp-sasl' mechanism='EXTERNAL'>"
            b"a2F0ZUBsb2NhbGhvc3Q=</auth>"  # kate@localhost
        )
        answer = sasl_answer(await raw.read_until(b"/>"))
        self.assertEqual(answer, (f"{{{NS_SASL}}}success", None, []))

    async def test_unverified_certificates_get_no_external(self) -> None:
        """Expired, not yet valid, untrusted CA, self-signed: the connection goes on without
        EXTERNAL, which is invalid-mechanism if forced; passwords still work."""
        for issued in (
            self.ca.issue("bob", ["bob@localhost"], validity=certfactory.EXPIRED),
            self.ca.issue("bob", ["bob@localhost"], validity=certfactory.NOT_YET_VALID),
            Authority("Untrusted CA").issue("bob", ["bob@localhost"]),
            certfactory.self_signed("bob", ["bob@localhost"]),
        ):
            raw, features = await self.features_after_starttls(issued)
            self.assertNotIn(b"EXTERNAL", features)
            self.assertIn("SCRAM-SHA-256", mechanisms(features))
            await raw.send(
                b"<auth xmlns='urn:ietf:params:xml:ns:xmpp-sasl' mechanism='EXTERNAL'>=</auth>"
            )
            answer = sasl_answer(await raw.read_until(b"</failure>"))
            self.assertEqual(answer, failure("invalid-mechanism"))
            raw.close()
        client = self.external("bob@localhost", self.ca.issue("bob", validity=certfactory.EXPIRED))
        self.assertEqual(await client.connect(), "failed_auth")
        expired = self.files(self.ca.issue("bob", ["bob@localhost"], validity=certfactory.EXPIRED))
        client = self.client(
            "bob@localhost", "wonderland", "SCRAM-SHA-256", client_certificate=expired
        )
        self.assertEqual(await client.connect(), "session_start")

    async def test_without_certificate(self) -> None:
        raw, features = await self.features_after_starttls(None)
        self.assertNotIn(b"EXTERNAL", features)
        client = self.client("alice@localhost/desk", "wonderland", "SCRAM-SHA-256")
        self.assertEqual(await client.connect(), "session_start")
        client = self.external("alice@localhost", None)
        self.assertEqual(await client.connect(), "failed_auth")

    async def test_external_is_preferred_by_default(self) -> None:
        # Without use_mech, slixmpp picks EXTERNAL when offered and still needs no password.
        files = self.files(self.ca.issue("bob", ["bob@localhost"]))
        client = self.client("bob@localhost/laptop", "", client_certificate=files)
        self.assertEqual(await client.connect(), "session_start")


class CommonNameTests(ExternalTestCase):
    methods = '["standard", "common_name"]'

    async def test_cn_only(self) -> None:
        jid = await self.login("alice@localhost/desk", self.ca.issue("alice"))
        self.assertEqual(jid, "alice@localhost/desk")
        jid = await self.login("alice@localhost/desk2", self.ca.issue("alice"), "alice@localhost")
        self.assertEqual(jid, "alice@localhost/desk2")

    async def test_cn_with_another_authzid(self) -> None:
        issued = self.ca.issue("not-kate")
        self.assertEqual(await self.refused(issued, "kate@localhost"), "invalid-authzid")

    async def test_xmpp_addrs_still_decide(self) -> None:
        issued = self.ca.issue("kate", ["kate@fed1"])
        self.assertEqual(await self.refused(issued), "not-authorized")


class AutoAccountTests(ExternalTestCase):
    cert_accounts = "auto"

    async def test_certificate_identity_without_account(self) -> None:
        jid = await self.login("carol@localhost/desk", self.ca.issue("c", ["carol@localhost"]))
        self.assertEqual(jid, "carol@localhost/desk")


class SelfSignedTests(ExternalTestCase):
    allow_self_signed = "true"

    async def test_self_signed_allowed(self) -> None:
        issued = certfactory.self_signed("bob", ["bob@localhost"])
        self.assertEqual(await self.login("bob@localhost/x", issued), "bob@localhost/x")

    async def test_expired_self_signed(self) -> None:
        issued = certfactory.self_signed("bob", ["bob@localhost"], validity=certfactory.EXPIRED)
        raw, features = await self.features_after_starttls(issued)
        self.assertNotIn(b"EXTERNAL", features)


class DisconnectPolicyTests(ExternalTestCase):
    policy = "disconnect"

    async def assertHandshakeFails(self, issued: Issued) -> None:
        """The server aborts the TLS handshake: the client never reads a stream header again
        (with TLS 1.3 the client may finish its side first and learn it on the next read)."""
        try:
            raw = await self.starttls(issued)
            await raw.send(STREAM_HEADER)
            data = await raw.read_until(b"</stream:features>")
        except (ssl.SSLError, ConnectionError):
            data = b""
        self.assertNotIn(b"<stream:stream", data)

    async def test_expired(self) -> None:
        issued = self.ca.issue("bob", ["bob@localhost"], validity=certfactory.EXPIRED)
        await self.assertHandshakeFails(issued)
        client = self.external("bob@localhost", issued)
        self.assertEqual(await client.connect(), "disconnected")

    async def test_untrusted_authority(self) -> None:
        await self.assertHandshakeFails(Authority("Untrusted CA").issue("bob", ["bob@localhost"]))

    async def test_valid_certificate_and_no_certificate_still_work(self) -> None:
        issued = self.ca.issue("bob", ["bob@localhost"])
        self.assertEqual(await self.login("bob@localhost/laptop", issued), "bob@localhost/laptop")
        client = self.client("alice@localhost/desk", "wonderland", "SCRAM-SHA-256")
        self.assertEqual(await client.connect(), "session_start")

    async def test_failed_handshakes_leave_no_stream(self) -> None:
        issued = self.ca.issue("bob", validity=certfactory.NOT_YET_VALID)
        await self.assertHandshakeFails(issued)
        factory = self.server.factories[0]
        for _ in range(100):
            if not factory.streams:
                break
            await wait_for(asyncio.sleep(0.02))
        self.assertEqual(factory.streams, set())
