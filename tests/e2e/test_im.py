"""Two and three slixmpp clients: subscriptions, presence, messages, offline storage, roster pushes.

Every test runs on SQLite and again on PostgreSQL (the subclass at the end).
"""

import asyncio

from twisted.words.protocols.jabber.jid import JID

from tests.e2e.harness import Client, ServerTestCase, eventually, wait_for

PASSWORD = "correct horse"
NS_ROSTER = "jabber:iq:roster"
NS_DELAY = "urn:xmpp:delay"


def pushed_subscription(iq: object, contact: str) -> str | None:
    """The subscription a roster push (an <iq type='set'/>) gives the contact, if it names it."""
    if iq["type"] != "set":
        return None
    for item in iq.xml.findall(f"{{{NS_ROSTER}}}query/{{{NS_ROSTER}}}item"):
        if item.get("jid") == contact:
            return item.get("subscription")
    return None


class InstantMessagingTests(ServerTestCase):
    async def setUp(self) -> None:
        await self.start_server()
        for user in ("alice", "bob", "carol"):
            await self.register(user, PASSWORD)

    async def online(self, jid: str, priority: int = 0, *, approve: bool = False) -> Client:
        """Log in, fetch the roster and send initial presence."""
        client = self.client(jid, PASSWORD)
        client.xmpp.auto_authorize = approve
        client.xmpp.auto_subscribe = approve
        self.assertEqual(await client.connect(), "session_start")
        await wait_for(client.xmpp.get_roster())
        client.xmpp.send_presence(ppriority=priority)
        await eventually(lambda: self._available(jid))
        return client

    def _available(self, jid: str) -> bool:
        session = self.server.core.sessions.session(JID(jid))
        return session is not None and session.presence is not None

    async def befriend(self, alice: Client, bob: Client) -> None:
        """alice subscribes to bob; bob (auto-approving) subscribes back: both become 'both'.

        Each approves the other's request, and the server pushes each the result: slixmpp
        updates its roster from the presence alone, so the pushes are checked themselves.
        """
        pushes = [
            client.next_event(
                "roster_update",
                lambda iq, contact=contact: pushed_subscription(iq, contact) == "both",
            )
            for client, contact in ((alice, "bob@localhost"), (bob, "alice@localhost"))
        ]
        alice_sees_bob = alice.next_event("got_online", lambda p: p["from"].bare == "bob@localhost")
        alice.xmpp.send_presence(pto="bob@localhost", ptype="subscribe")
        await wait_for(alice_sees_bob)
        for push in pushes:
            await wait_for(push)
        await eventually(
            lambda: (
                alice.xmpp.client_roster["bob@localhost"]["subscription"] == "both"
                and bob.xmpp.client_roster["alice@localhost"]["subscription"] == "both"
            )
        )

    async def test_subscription_handshake_and_presence(self) -> None:
        alice = await self.online("alice@localhost/home", approve=True)
        bob = await self.online("bob@localhost/home", approve=True)
        await self.befriend(alice, bob)
        # Both rosters are stored, not only pushed.
        _, items = await self.server.database.rosters.get_roster("localhost", "alice")
        self.assertEqual([(i.jid, i.subscription) for i in items], [("bob@localhost", "both")])

        bob_goes = alice.next_event("got_offline", lambda p: p["from"].bare == "bob@localhost")
        await bob.close()
        await wait_for(bob_goes)

    async def test_subscription_request_to_an_offline_user_waits_for_them(self) -> None:
        alice = await self.online("alice@localhost/home")
        alice.xmpp.send_presence(pto="carol@localhost", ptype="subscribe")
        await eventually(lambda: alice.xmpp.client_roster["carol@localhost"]["pending_out"])
        carol = self.client("carol@localhost/late", PASSWORD)
        carol.xmpp.auto_authorize = False
        request = carol.next_event("presence_subscribe")
        self.assertEqual(await carol.connect(), "session_start")
        carol.xmpp.send_presence()
        self.assertEqual((await wait_for(request))["from"].bare, "alice@localhost")

    async def test_new_session_receives_contacts_presence(self) -> None:
        alice = await self.online("alice@localhost/home", approve=True)
        bob = await self.online("bob@localhost/home", approve=True)
        await self.befriend(alice, bob)
        second = self.client("alice@localhost/phone", PASSWORD)
        bob_seen = second.next_event("got_online", lambda p: p["from"].bare == "bob@localhost")
        self.assertEqual(await second.connect(), "session_start")
        second.xmpp.send_presence()
        await wait_for(bob_seen)

    async def test_messages_to_full_and_bare_jids(self) -> None:
        high = await self.online("alice@localhost/high", priority=5)
        low = await self.online("alice@localhost/low", priority=1)
        bob = await self.online("bob@localhost/home")
        to_high = high.next_event("message")
        bob.xmpp.send_message(mto="alice@localhost", mbody="to the bare JID", mtype="chat")
        self.assertEqual((await wait_for(to_high))["body"], "to the bare JID")
        to_low = low.next_event("message")
        bob.xmpp.send_message(mto="alice@localhost/low", mbody="to low", mtype="chat")
        message = await wait_for(to_low)
        self.assertEqual(message["body"], "to low")
        self.assertEqual(message["from"].full, "bob@localhost/home")

    async def test_offline_messages_are_delivered_with_a_delay_stamp(self) -> None:
        alice = await self.online("alice@localhost/home")
        alice.xmpp.send_message(mto="carol@localhost", mbody="while you were out", mtype="chat")
        await self.stored_offline("carol")
        carol = self.client("carol@localhost/back", PASSWORD)
        delivered = carol.next_event("message")
        self.assertEqual(await carol.connect(), "session_start")
        carol.xmpp.send_presence()
        message = await wait_for(delivered)
        self.assertEqual(message["body"], "while you were out")
        self.assertTrue(message["delay"]["stamp"])
        self.assertEqual(await self.server.database.offline.count("localhost", "carol"), 0)

    async def test_a_message_right_after_initial_presence_is_live(self) -> None:
        # Bob's own stream orders the presence before the message: whatever the server is still
        # doing for the presence, the message must not be stored, and comes after the stored one.
        alice = await self.online("alice@localhost/home")
        alice.xmpp.send_message(mto="bob@localhost", mbody="stored", mtype="chat")
        await self.stored_offline("bob")
        bob = self.client("bob@localhost/home", PASSWORD)
        received: list = []
        bob.xmpp.add_event_handler("message", received.append)
        self.assertEqual(await bob.connect(), "session_start")
        bob.xmpp.send_presence()
        bob.xmpp.send_message(mto="bob@localhost", mbody="live", mtype="chat")
        await eventually(lambda: len(received) == 2)
        self.assertEqual(
            [(m["body"], m.xml.find(f"{{{NS_DELAY}}}delay") is not None) for m in received],
            [("stored", True), ("live", False)],
        )
        self.assertEqual(await self.server.database.offline.count("localhost", "bob"), 0)

    async def stored_offline(self, user: str) -> None:
        for _ in range(500):
            if await self.server.database.offline.count("localhost", user):
                return
            await wait_for(asyncio.sleep(0.02))
        self.fail(f"nothing was stored for {user}")

    async def test_message_to_an_unknown_user_bounces(self) -> None:
        alice = await self.online("alice@localhost/home")
        bounce = alice.next_event("message_error")
        alice.xmpp.send_message(mto="nobody@localhost", mbody="hello?", mtype="chat")
        self.assertEqual((await wait_for(bounce))["error"]["condition"], "service-unavailable")

    async def test_roster_push_reaches_the_other_resource(self) -> None:
        one = await self.online("alice@localhost/one")
        two = await self.online("alice@localhost/two")
        await wait_for(one.xmpp.update_roster("dave@localhost", name="Dave", groups=["Friends"]))
        await eventually(lambda: "dave@localhost" in two.xmpp.client_roster)
        self.assertEqual(two.xmpp.client_roster["dave@localhost"]["name"], "Dave")


class InstantMessagingOnPostgreSQLTests(InstantMessagingTests):
    storage = "postgresql"


class InstantMessagingOnMySQLTests(InstantMessagingTests):
    storage = "mysql"
