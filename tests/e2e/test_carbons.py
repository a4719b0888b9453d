"""XEP-0280 Message Carbons between two resources of one account, with slixmpp's xep_0280.

Every test runs on SQLite and again on PostgreSQL and MySQL (the subclasses at the end).
"""

from twisted.words.protocols.jabber.jid import JID

from tests.e2e.harness import Client, ServerTestCase, eventually, wait_for

PASSWORD = "correct horse"


class CarbonsTests(ServerTestCase):
    async def setUp(self) -> None:
        await self.start_server()
        for user in ("alice", "bob"):
            await self.register(user, PASSWORD)

    async def online(self, jid: str, priority: int = 0, *, carbons: bool = True) -> Client:
        client = self.client(jid, PASSWORD)
        client.xmpp.register_plugin("xep_0280")
        self.assertEqual(await client.connect(), "session_start")
        if carbons:
            await wait_for(client.xmpp.plugin["xep_0280"].enable())
        client.xmpp.send_presence(ppriority=priority)
        await eventually(lambda: self._available(jid))
        return client

    def _available(self, jid: str) -> bool:
        session = self.server.core.sessions.session(JID(jid))
        return session is not None and session.presence is not None

    async def test_sent_and_received_carbons_between_two_resources(self) -> None:
        desk = await self.online("alice@localhost/desk", 1)
        phone = await self.online("alice@localhost/phone", 0)
        bob = await self.online("bob@localhost/home", carbons=False)

        sent = phone.next_event("carbon_sent")
        bob_gets = bob.next_event("message")
        desk.xmpp.send_message(mto="bob@localhost", mbody="from the desk", mtype="chat")
        copy = (await wait_for(sent))["carbon_sent"]
        self.assertEqual(
            (str(copy["from"]), str(copy["to"]), copy["body"]),
            ("alice@localhost/desk", "bob@localhost", "from the desk"),
        )
        self.assertEqual((await wait_for(bob_gets))["body"], "from the desk")

        # To the bare JID: the desk (priority 1) gets it, the phone a copy.
        received = phone.next_event("carbon_received")
        desk_gets = desk.next_event("message", lambda m: m["body"] == "to alice")
        bob.xmpp.send_message(mto="alice@localhost", mbody="to alice", mtype="chat")
        copy = (await wait_for(received))["carbon_received"]
        self.assertEqual((str(copy["from"]), copy["body"]), ("bob@localhost/home", "to alice"))
        await wait_for(desk_gets)

    async def test_a_disabled_resource_gets_no_copies(self) -> None:
        desk = await self.online("alice@localhost/desk", 1)
        phone = await self.online("alice@localhost/phone", 0)
        bob = await self.online("bob@localhost/home", carbons=False)
        await wait_for(phone.xmpp.plugin["xep_0280"].disable())
        copies = []
        phone.xmpp.add_event_handler("carbon_sent", copies.append)
        bob_gets = bob.next_event("message")
        desk.xmpp.send_message(mto="bob@localhost", mbody="unseen", mtype="chat")
        await wait_for(bob_gets)
        # The phone's own round trip after the message: a copy would have come before it.
        await wait_for(phone.xmpp.plugin["xep_0280"].disable())
        self.assertEqual(copies, [])


class CarbonsOnPostgreSQLTests(CarbonsTests):
    storage = "postgresql"


class CarbonsOnMySQLTests(CarbonsTests):
    storage = "mysql"
