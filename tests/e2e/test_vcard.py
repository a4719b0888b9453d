"""XEP-0054 vcard-temp with slixmpp's xep_0054: one's own vCard across a server restart,
another user's, and the account's deletion.

Every test runs on SQLite, and again on PostgreSQL and MariaDB (the subclasses at the end).
"""

from slixmpp.exceptions import IqError

from tests.e2e.harness import Client, ServerTestCase, wait_for

PASSWORD = "correct horse"


class VCardTests(ServerTestCase):
    async def setUp(self) -> None:
        await self.start_server()
        for user in ("alice", "bob"):
            await self.register(user, PASSWORD)

    async def online(self, jid: str) -> Client:
        client = self.client(jid, PASSWORD)
        client.xmpp.register_plugin("xep_0054")
        self.assertEqual(await client.connect(), "session_start")
        return client

    async def publish(self, client: Client, full_name: str) -> None:
        vcard = client.xmpp.plugin["xep_0054"].make_vcard()
        vcard["FN"] = full_name
        vcard["NICKNAME"] = "al"
        await wait_for(client.xmpp.plugin["xep_0054"].publish_vcard(vcard))

    async def full_name(self, client: Client, jid: str) -> str:
        result = await wait_for(client.xmpp.plugin["xep_0054"].get_vcard(jid, local=False))
        return result["vcard_temp"]["FN"]

    async def test_own_vcard_survives_a_restart_and_others_read_it(self) -> None:
        alice = await self.online("alice@localhost/desk")
        self.assertEqual(await self.full_name(alice, "alice@localhost"), "")
        await self.publish(alice, "Alice Ünver")

        await alice.close()
        await self.server.stopService()
        self.server.startService()
        await self.server.ready
        self.port = self.server.ports[0].getHost().port
        again = await self.online("alice@localhost/phone")
        self.assertEqual(await self.full_name(again, "alice@localhost"), "Alice Ünver")
        bob = await self.online("bob@localhost/home")
        self.assertEqual(await self.full_name(bob, "alice@localhost"), "Alice Ünver")

    async def test_only_the_account_sets_it(self) -> None:
        bob = await self.online("bob@localhost/home")
        iq = bob.xmpp.make_iq_set(ito="alice@localhost")
        iq["vcard_temp"]["FN"] = "Not Alice"
        with self.assertRaises(IqError) as raised:
            await wait_for(iq.send())
        self.assertEqual(raised.exception.condition, "forbidden")

    async def test_deleting_the_account_deletes_its_vcard(self) -> None:
        alice = await self.online("alice@localhost/desk")
        await self.publish(alice, "Alice")
        await alice.close()
        await self.server.database.accounts.remove_account("localhost", "alice")
        bob = await self.online("bob@localhost/home")
        with self.assertRaises(IqError) as raised:
            await self.full_name(bob, "alice@localhost")
        self.assertEqual(raised.exception.condition, "service-unavailable")


class VCardOnPostgreSQLTests(VCardTests):
    storage = "postgresql"


class VCardOnMariaDBTests(VCardTests):
    storage = "mysql"
