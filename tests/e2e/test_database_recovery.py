"""The server on PostgreSQL or MySQL after the database ended its connections, as a restart
does.

The test servers are shared, so the tests end the connections of their own database instead of
restarting the server; the clients of a restart see the same.
"""

from slixmpp.xmlstream import ET
from twisted.logger import formatEvent, globalLogPublisher

from tests import mysqlsupport, pgsupport
from tests.e2e.harness import Client, ServerTestCase, wait_for

PASSWORD = "survives restarts"
SERVICE = "pubsub.localhost"
NS_EVENT = "http://jabber.org/protocol/pubsub#event"


class DatabaseRecoveryTests(ServerTestCase):
    storage = "postgresql"
    outage_log = "PostgreSQL connection lost: "

    async def setUp(self) -> None:
        self.messages: list[str] = []
        globalLogPublisher.addObserver(self.observe)
        self.addCleanup(globalLogPublisher.removeObserver, self.observe)
        await self.start_server()
        for user in ("alice", "bob"):
            await self.register(user, PASSWORD)

    def observe(self, event: dict) -> None:
        self.messages.append(formatEvent(event))

    async def online(self, jid: str) -> Client:
        client = self.client(jid, PASSWORD)
        client.xmpp.register_plugin("xep_0060")
        # A few seconds at most: the harness allows 15.
        client.xmpp.connect("127.0.0.1", self.port)
        self.assertEqual(await wait_for(client.outcome, timeout=5), "session_start")
        # Available once the server has read the roster: its own presence comes back then.
        available = client.next_event("presence_available", lambda p: p["from"] == jid)
        client.xmpp.send_presence()
        await wait_for(available, timeout=5)
        return client

    def terminate_backends(self) -> None:
        pgsupport.terminate_backends(self.server.config.storage.postgresql.dsn)

    async def test_login_and_publish_after_the_connections_ended(self) -> None:
        bob = await self.online("bob@localhost/desk")
        await wait_for(bob.xmpp.plugin["xep_0060"].create_node(SERVICE, "news"))
        self.terminate_backends()

        alice = await self.online("alice@localhost/phone")
        await wait_for(alice.xmpp.plugin["xep_0060"].subscribe(SERVICE, "news"), timeout=5)
        entry = ET.Element("{urn:example:news}entry")
        entry.text = "still here"
        notified = alice.next_event("pubsub_publish")
        await wait_for(
            bob.xmpp.plugin["xep_0060"].publish(SERVICE, "news", id="1", payload=entry),
            timeout=5,
        )
        [item] = (await wait_for(notified)).xml.findall(
            f"{{{NS_EVENT}}}event/{{{NS_EVENT}}}items/{{{NS_EVENT}}}item"
        )
        self.assertEqual(item.get("id"), "1")
        # One line for the outage, whatever number of requests met it.
        outage = [m for m in self.messages if m.startswith(self.outage_log)]
        self.assertEqual(len(outage), 1, self.messages)

    async def test_messages_between_online_users_flow_meanwhile(self) -> None:
        alice = await self.online("alice@localhost/phone")
        bob = await self.online("bob@localhost/desk")
        self.terminate_backends()
        received = bob.next_event("message")
        alice.xmpp.send_message(mto="bob@localhost/desk", mbody="hello", mtype="chat")
        self.assertEqual((await wait_for(received, timeout=5))["body"], "hello")


class DatabaseRecoveryOnMySQLTests(DatabaseRecoveryTests):
    storage = "mysql"
    outage_log = "MySQL connection lost: "

    def terminate_backends(self) -> None:
        options = self.server.config.storage.mysql.connect_options()
        self.assertGreater(mysqlsupport.terminate_connections(options), 0)
