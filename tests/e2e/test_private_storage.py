"""XEP-0049 private XML storage with slixmpp's xep_0049 (and xep_0048's bookmarks as the
payload): a round trip across a server restart, refusals, and the account's deletion.

Every test runs on SQLite, and again on PostgreSQL and MariaDB (the subclasses at the end).
"""

from slixmpp.exceptions import IqError
from slixmpp.plugins.xep_0048.stanza import Bookmarks

from tests.e2e.harness import Client, ServerTestCase, wait_for

PASSWORD = "correct horse"


class PrivateStorageTests(ServerTestCase):
    async def setUp(self) -> None:
        await self.start_server()
        for user in ("alice", "bob"):
            await self.register(user, PASSWORD)

    async def online(self, jid: str) -> Client:
        client = self.client(jid, PASSWORD)
        client.xmpp.register_plugin("xep_0049")
        client.xmpp.plugin["xep_0049"].register(Bookmarks)
        self.assertEqual(await client.connect(), "session_start")
        return client

    async def bookmarks(self, client: Client) -> list[tuple[str, str]]:
        result = await wait_for(client.xmpp.plugin["xep_0049"].retrieve("bookmarks"))
        return [
            (str(conference["jid"]), conference["nick"])
            for conference in result["private"]["bookmarks"]["conferences"]
        ]

    async def test_bookmarks_survive_a_restart(self) -> None:
        alice = await self.online("alice@localhost/desk")
        self.assertEqual(await self.bookmarks(alice), [])
        bookmarks = Bookmarks()
        bookmarks.add_conference("café@muc.localhost", "Al", autojoin=True)
        await wait_for(alice.xmpp.plugin["xep_0049"].store(bookmarks))

        await alice.close()
        await self.server.stopService()
        self.server.startService()
        await self.server.ready
        self.port = self.server.ports[0].getHost().port
        again = await self.online("alice@localhost/phone")
        self.assertEqual(await self.bookmarks(again), [("café@muc.localhost", "Al")])
        # Bob's storage is his own.
        bob = await self.online("bob@localhost/home")
        self.assertEqual(await self.bookmarks(bob), [])

    async def test_another_account_is_forbidden(self) -> None:
        bob = await self.online("bob@localhost/home")
        iq = bob.xmpp.make_iq_get(ito="alice@localhost")
        iq["private"].enable("bookmarks")
        with self.assertRaises(IqError) as raised:
            await wait_for(iq.send())
        self.assertEqual(raised.exception.condition, "forbidden")

    async def test_deleting_the_account_deletes_its_data(self) -> None:
        alice = await self.online("alice@localhost/desk")
        bookmarks = Bookmarks()
        bookmarks.add_conference("room@muc.localhost", "Al")
        await wait_for(alice.xmpp.plugin["xep_0049"].store(bookmarks))
        await alice.close()
        await self.server.database.accounts.remove_account("localhost", "alice")
        await self.register("alice", PASSWORD)
        again = await self.online("alice@localhost/desk")
        self.assertEqual(await self.bookmarks(again), [])


class PrivateStorageOnPostgreSQLTests(PrivateStorageTests):
    storage = "postgresql"


class PrivateStorageOnMariaDBTests(PrivateStorageTests):
    storage = "mysql"
