"""Stream management (XEP-0198) with slixmpp's own plugin: a client whose TCP connection dies
mid-conversation resumes without losing a message; one that does not come back in time finds
its messages in offline storage.

Every test runs on SQLite and again on PostgreSQL and MySQL (the subclasses at the end).
"""

import asyncio

from twisted.words.protocols.jabber.jid import JID
from twisted.words.xish import domish

from tests.e2e.harness import Client, ServerTestCase, eventually, wait_for

PASSWORD = "correct horse"


class StreamManagementTestCase(ServerTestCase):
    resume_timeout = 30.0

    async def setUp(self) -> None:
        await self.start_server(f"[stream_management]\nresume_timeout = {self.resume_timeout}\n")
        for user in ("alice", "bob"):
            await self.register(user, PASSWORD)

    async def online(self, jid: str, *, managed: bool = False) -> Client:
        client = self.client(jid, PASSWORD)
        if managed:
            client.xmpp.register_plugin("xep_0198")
        enabled = client.next_event("sm_enabled") if managed else None
        self.assertEqual(await client.connect(), "session_start")
        if enabled is not None:
            await wait_for(enabled)
        client.xmpp.send_presence()
        await eventually(lambda: self.session(jid) is not None and self.session(jid).presence)
        return client

    def session(self, jid: str):
        return self.server.core.sessions.session(JID(jid))

    async def conversation_cut_off(self) -> tuple[Client, Client]:
        """bob writes to alice; her connection dies with one message written to it that she
        never read, and bob writes another while she is away."""
        alice = await self.online("alice@localhost/phone", managed=True)
        bob = await self.online("bob@localhost/desk")
        received = alice.next_event("message")
        bob.xmpp.send_message(mto="alice@localhost/phone", mbody="first", mtype="chat")
        self.assertEqual((await wait_for(received))["body"], "first")
        session = self.session("alice@localhost/phone")
        alice.xmpp.plugin["xep_0198"].send_ack()
        await eventually(lambda: not session.ledger.unacked)
        # alice's client stops reading: what the server writes now is lost with the connection.
        alice.xmpp.transport.pause_reading()
        bob.xmpp.send_message(mto="alice@localhost/phone", mbody="in flight", mtype="chat")
        await eventually(lambda: session.ledger.unacked)
        alice.xmpp.transport.abort()  # no </stream:stream>: the network is gone
        await eventually(lambda: session.connection is None)
        bob.xmpp.send_message(mto="alice@localhost", mbody="while away", mtype="chat")
        await eventually(lambda: any(b"while away" in data for data in _serialised(session)))
        return alice, bob


class ResumptionTests(StreamManagementTestCase):
    async def test_a_lost_connection_is_resumed_without_losing_a_message(self) -> None:
        alice, bob = await self.conversation_cut_off()
        bodies: list[str] = []
        alice.xmpp.add_event_handler("message", lambda message: bodies.append(message["body"]))
        resumed = alice.next_event("session_resumed")
        alice.xmpp.connect("127.0.0.1", self.port)
        await wait_for(resumed)
        await eventually(lambda: len(bodies) >= 2)
        self.assertEqual(bodies, ["in flight", "while away"])
        session = self.session("alice@localhost/phone")
        self.assertIsNotNone(session.presence)  # still available, as before the cut
        self.assertEqual(self.server.core.router.stream_management.resumptions, 1)
        # The conversation goes on over the new connection.
        received = bob.next_event("message")
        alice.xmpp.send_message(mto="bob@localhost/desk", mbody="back", mtype="chat")
        self.assertEqual((await wait_for(received))["body"], "back")


class ResumeTimeoutTests(StreamManagementTestCase):
    resume_timeout = 0.5

    async def test_messages_go_offline_when_the_session_is_not_resumed(self) -> None:
        await self.conversation_cut_off()
        await eventually(lambda: self.session("alice@localhost/phone") is None)
        await eventually(lambda: self.server.core.router.stream_management.timeouts == 1)
        await self.stored_offline("alice", 2)
        later = self.client("alice@localhost/laptop", PASSWORD)
        bodies: list[str] = []
        later.xmpp.add_event_handler("message", lambda message: bodies.append(message["body"]))
        self.assertEqual(await later.connect(), "session_start")
        later.xmpp.send_presence()
        await eventually(lambda: len(bodies) >= 2)
        self.assertEqual(bodies, ["in flight", "while away"])

    async def stored_offline(self, user: str, count: int) -> None:
        for _ in range(200):
            if await self.server.database.offline.count("localhost", user) >= count:
                return
            await wait_for(asyncio.sleep(0.05))
        self.fail(f"{count} messages not stored offline for {user}")


def _serialised(session: object) -> list[bytes]:
    """The session's unacknowledged stanzas, serialised."""
    return [
        stanza.toXml().encode()
        if isinstance(stanza, domish.Element)
        else stanza.encode()
        if isinstance(stanza, str)
        else stanza
        for stanza in session.ledger.unacked
    ]


class ResumptionOnPostgreSQLTests(ResumptionTests):
    storage = "postgresql"


class ResumptionOnMySQLTests(ResumptionTests):
    storage = "mysql"


class ResumeTimeoutOnPostgreSQLTests(ResumeTimeoutTests):
    storage = "postgresql"


class ResumeTimeoutOnMySQLTests(ResumeTimeoutTests):
    storage = "mysql"
