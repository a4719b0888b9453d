"""Client State Indication (XEP-0352) with slixmpp's own plugin: an inactive client gets its
messages at once and its contacts' presence once it is active again, only the latest.

Every test runs on SQLite and again on PostgreSQL and MySQL (the subclasses at the end).
"""

import asyncio

from twisted.words.protocols.jabber.jid import JID

from mim_twisted.storage.interfaces import RosterItem
from tests.e2e.harness import Client, ServerTestCase, eventually, wait_for

PASSWORD = "correct horse"


class ClientStateTests(ServerTestCase):
    async def setUp(self) -> None:
        await self.start_server()
        for user in ("alice", "bob"):
            await self.register(user, PASSWORD)
        for owner, contact in (("alice", "bob"), ("bob", "alice")):
            item = RosterItem(f"{contact}@localhost", subscription="both")
            await self.server.database.rosters.put_item("localhost", owner, item)

    async def online(self, jid: str, *, csi: bool = False) -> Client:
        client = self.client(jid, PASSWORD)
        if csi:
            client.xmpp.register_plugin("xep_0352")
        self.assertEqual(await client.connect(), "session_start")
        client.xmpp.send_presence()
        await eventually(lambda: self.session(jid) is not None and self.session(jid).presence)
        return client

    def session(self, jid: str):
        return self.server.core.sessions.session(JID(jid))

    async def test_presence_is_held_back_until_active(self) -> None:
        alice = await self.online("alice@localhost/phone", csi=True)
        await eventually(lambda: alice.xmpp.plugin["xep_0352"].enabled)  # <csi/> offered
        bob_online = alice.next_event("got_online", lambda p: p["from"].bare == "bob@localhost")
        bob = await self.online("bob@localhost/desk")
        await wait_for(bob_online)
        shows: list[str] = []
        alice.xmpp.add_event_handler(
            "changed_status",
            lambda p: p["from"].bare == "bob@localhost" and shows.append(p["show"]),
        )
        alice.xmpp.plugin["xep_0352"].send_inactive()
        session = self.session("alice@localhost/phone")
        await eventually(lambda: session.client_state is not None and session.client_state.inactive)
        bob.xmpp.send_presence(pshow="away")
        dnd = bob.xmpp.make_presence(pshow="dnd")
        dnd_id = dnd["id"] = "dnd-update"
        dnd.send()
        bob_session = self.session("bob@localhost/desk")
        await eventually(lambda: bob_session.presence.getAttribute("id") == dnd_id)
        await self.server.core.presence.idle()
        self.assertEqual(len(session.client_state), 1)  # the latest of bob's updates
        received = alice.next_event("message")
        bob.xmpp.send_message(mto="alice@localhost/phone", mbody="urgent", mtype="chat")
        self.assertEqual((await wait_for(received))["body"], "urgent")
        self.assertEqual(shows, [])
        alice.xmpp.plugin["xep_0352"].send_active()
        await eventually(lambda: shows)
        await wait_for(asyncio.sleep(0.1))
        self.assertEqual(shows, ["dnd"])


class ClientStateOnPostgreSQLTests(ClientStateTests):
    storage = "postgresql"


class ClientStateOnMySQLTests(ClientStateTests):
    storage = "mysql"
