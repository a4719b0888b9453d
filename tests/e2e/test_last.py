"""XEP-0012 Last Activity with slixmpp's xep_0012: a contact who logged out, and the uptime.

Every test runs on SQLite and again on PostgreSQL and MySQL (the subclasses at the end).
"""

import asyncio

from slixmpp.exceptions import IqError
from twisted.words.protocols.jabber.jid import JID

from mim_twisted.storage.interfaces import RosterItem
from tests.e2e.harness import Client, ServerTestCase, eventually, wait_for

PASSWORD = "correct horse"


class LastActivityTests(ServerTestCase):
    async def setUp(self) -> None:
        await self.start_server()
        for user in ("alice", "bob", "carol"):
            await self.register(user, PASSWORD)
        # alice and bob share their presence.
        rosters = self.server.database.rosters
        await rosters.put_item(
            "localhost", "alice", RosterItem("bob@localhost", subscription="both")
        )
        await rosters.put_item(
            "localhost", "bob", RosterItem("alice@localhost", subscription="both")
        )

    async def online(self, jid: str) -> Client:
        client = self.client(jid, PASSWORD)
        client.xmpp.register_plugin("xep_0012")
        self.assertEqual(await client.connect(), "session_start")
        client.xmpp.send_presence()
        await eventually(lambda: self._available(jid))
        return client

    def _available(self, jid: str) -> bool:
        session = self.server.core.sessions.session(JID(jid))
        return session is not None and session.presence is not None

    async def last_activity(self, client: Client, jid: str) -> tuple[int, str]:
        iq = await wait_for(client.xmpp.plugin["xep_0012"].get_last_activity(jid))
        return iq["last_activity"]["seconds"], iq["last_activity"]["status"] or ""

    async def test_last_activity_of_a_contact_who_logged_out(self) -> None:
        alice = await self.online("alice@localhost/desk")
        bob = await self.online("bob@localhost/phone")
        self.assertEqual(await self.last_activity(alice, "bob@localhost"), (0, ""))

        bob.xmpp.send_presence(ptype="unavailable", pstatus="Gone fishing")
        await eventually(lambda: not self._available("bob@localhost/phone"))
        await bob.close()
        await wait_for(asyncio.sleep(1.1))
        seconds, status = await self.last_activity(alice, "bob@localhost")
        self.assertEqual(status, "Gone fishing")
        self.assertIn(seconds, (1, 2, 3))

        carol = await self.online("carol@localhost/home")
        with self.assertRaises(IqError) as raised:
            await self.last_activity(carol, "bob@localhost")
        self.assertEqual(raised.exception.condition, "forbidden")

    async def test_server_uptime(self) -> None:
        alice = await self.online("alice@localhost/desk")
        seconds, _ = await self.last_activity(alice, "localhost")
        self.assertGreaterEqual(seconds, 0)
        self.assertLess(seconds, 60)


class LastActivityOnPostgreSQLTests(LastActivityTests):
    storage = "postgresql"


class LastActivityOnMySQLTests(LastActivityTests):
    storage = "mysql"
