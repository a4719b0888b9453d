"""slixmpp logs in to a real server: STARTTLS, each SASL mechanism, wrong passwords, binding."""

from tests.e2e.harness import ServerTestCase, wait_for

NS_SASL = "urn:ietf:params:xml:ns:xmpp-sasl"
NOT_AUTHORIZED = f"{{{NS_SASL}}}not-authorized"


class LoginTests(ServerTestCase):
    async def setUp(self) -> None:
        await self.start_server()
        await self.register("alice", "wonderland")

    async def test_scram_sha_256_over_starttls(self) -> None:
        client = self.client("alice@localhost/laptop", "wonderland", "SCRAM-SHA-256")
        self.assertEqual(await client.connect(), "session_start")
        self.assertEqual(client.bound_jid, "alice@localhost/laptop")
        self.assertEqual(len(self.server.core.sessions), 1)

    async def test_scram_sha_1(self) -> None:
        client = self.client("alice@localhost/phone", "wonderland", "SCRAM-SHA-1")
        self.assertEqual(await client.connect(), "session_start")

    async def test_plain(self) -> None:
        client = self.client("alice@localhost/phone", "wonderland", "PLAIN")
        self.assertEqual(await client.connect(), "session_start")

    async def refused(self, jid: str, password: str, mechanism: str) -> list[str]:
        """Log in, expecting a refusal; the qualified names of the <failure/>'s children."""
        client = self.client(jid, password, mechanism)
        failure = client.next_event("failed_auth")
        self.assertEqual(await client.connect(), "failed_auth")
        element = (await wait_for(failure)).xml
        self.assertEqual(element.tag, f"{{{NS_SASL}}}failure")
        return [child.tag for child in element]

    async def test_wrong_password_is_refused(self) -> None:
        for mechanism in ("SCRAM-SHA-256", "SCRAM-SHA-1", "PLAIN"):
            children = await self.refused("alice@localhost", "queen of hearts", mechanism)
            self.assertEqual(children, [NOT_AUTHORIZED], mechanism)
        self.assertEqual(len(self.server.core.sessions), 0)

    async def test_unknown_user_is_refused(self) -> None:
        # The same answer as for a wrong password: nothing tells which accounts exist.
        for mechanism in ("SCRAM-SHA-256", "PLAIN"):
            children = await self.refused("nobody@localhost", "wonderland", mechanism)
            self.assertEqual(children, [NOT_AUTHORIZED], mechanism)

    async def test_server_generates_a_resource(self) -> None:
        client = self.client("alice@localhost", "wonderland")
        self.assertEqual(await client.connect(), "session_start")
        jid = client.xmpp.boundjid
        self.assertEqual(jid.bare, "alice@localhost")
        self.assertTrue(jid.resource)

    async def test_binding_the_same_full_jid_replaces_the_old_session(self) -> None:
        first = self.client("alice@localhost/desk", "wonderland")
        self.assertEqual(await first.connect(), "session_start")
        first_lost = first.xmpp.disconnected
        second = self.client("alice@localhost/desk", "wonderland")
        self.assertEqual(await second.connect(), "session_start")
        await wait_for(first_lost)
        self.assertEqual(len(self.server.core.sessions), 1)
