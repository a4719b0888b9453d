"""XEP-0191 Blocking Command with slixmpp's xep_0191: a blocked contact's messages and presence
are not delivered, the block list is pushed to the other resource and kept across a restart.

Every test runs on SQLite and again on PostgreSQL and MySQL (the subclasses at the end).
"""

import asyncio

from slixmpp.exceptions import IqError
from twisted.words.protocols.jabber.jid import JID

from mim_twisted.storage.interfaces import RosterItem
from tests.e2e.harness import Client, ServerTestCase, eventually, wait_for

PASSWORD = "correct horse"
NS_BLOCKING = "urn:xmpp:blocking"


class BlockingTests(ServerTestCase):
    async def setUp(self) -> None:
        await self.start_server()
        for user in ("alice", "bob"):
            await self.register(user, PASSWORD)
        # alice and bob share their presence.
        rosters = self.server.database.rosters
        for owner, contact in (("alice", "bob"), ("bob", "alice")):
            item = RosterItem(f"{contact}@localhost", subscription="both")
            await rosters.put_item("localhost", owner, item)

    async def online(self, jid: str) -> Client:
        client = self.client(jid, PASSWORD)
        client.xmpp.register_plugin("xep_0191")
        self.assertEqual(await client.connect(), "session_start")
        await wait_for(client.xmpp.get_roster())
        client.xmpp.send_presence()
        await eventually(lambda: self._available(jid))
        return client

    def _available(self, jid: str) -> bool:
        session = self.server.core.sessions.session(JID(jid))
        return session is not None and session.presence is not None

    async def test_a_blocked_contact_is_not_heard(self) -> None:
        bob = await self.online("bob@localhost/phone")
        laptop = await self.online("bob@localhost/laptop")
        await wait_for(laptop.xmpp.plugin["xep_0191"].get_blocked())
        alice = await self.online("alice@localhost/desk")
        await eventually(lambda: bool(bob.xmpp.client_roster["alice@localhost"].resources))

        alice_sees_bob_go = alice.next_event(
            "presence_unavailable", lambda p: p["from"].full == "bob@localhost/phone"
        )
        pushed = laptop.next_event("blocked")
        await wait_for(bob.xmpp.plugin["xep_0191"].block(["alice@localhost"]))
        await wait_for(alice_sees_bob_go)
        push = await wait_for(pushed)
        pushed_items = push.xml.findall(f"{{{NS_BLOCKING}}}block/{{{NS_BLOCKING}}}item")
        self.assertEqual([item.get("jid") for item in pushed_items], ["alice@localhost"])
        blocked = await wait_for(bob.xmpp.plugin["xep_0191"].get_blocked_jids())
        self.assertEqual({str(jid) for jid in blocked}, {"alice@localhost"})

        # Nothing from alice reaches bob: her message bounces, her presence is not delivered.
        heard = []
        bob.xmpp.add_event_handler("message", heard.append)
        bob.xmpp.add_event_handler("presence_available", heard.append)
        bounce = alice.next_event("message_error")
        alice.xmpp.send_presence(pstatus="still here")
        alice.xmpp.send_message(mto="bob@localhost", mbody="hello?", mtype="chat")
        self.assertEqual((await wait_for(bounce))["error"]["condition"], "service-unavailable")
        # And bob cannot write to her.
        with self.assertRaises(IqError) as raised:
            await wait_for(
                bob.xmpp.plugin["xep_0030"].get_info(jid="alice@localhost/desk", timeout=5)
            )
        self.assertEqual(raised.exception.condition, "not-acceptable")
        await wait_for(asyncio.sleep(0.2))
        self.assertEqual(heard, [])

    async def test_the_block_list_outlives_a_restart(self) -> None:
        bob = await self.online("bob@localhost/phone")
        await wait_for(bob.xmpp.plugin["xep_0191"].block(["eve@example.org", "example.net"]))
        await bob.close()
        await self.server.stopService()
        await self.start_server_again()
        bob = await self.online("bob@localhost/phone")
        blocked = await wait_for(bob.xmpp.plugin["xep_0191"].get_blocked_jids())
        self.assertEqual({str(jid) for jid in blocked}, {"eve@example.org", "example.net"})
        await wait_for(bob.xmpp.plugin["xep_0191"].unblock(["example.net"]))
        blocked = await wait_for(bob.xmpp.plugin["xep_0191"].get_blocked_jids())
        self.assertEqual({str(jid) for jid in blocked}, {"eve@example.org"})

    async def start_server_again(self) -> None:
        """A new server on the same configuration and database."""
        from mim_twisted.tap import MimService

        self.server = MimService(self.server.config)
        self.server.startService()
        self.addCleanup(self.server.stopService)
        await self.server.ready
        self.port = self.server.ports[0].getHost().port


class BlockingOnPostgreSQLTests(BlockingTests):
    storage = "postgresql"


class BlockingOnMySQLTests(BlockingTests):
    storage = "mysql"
