"""Cluster nodes serving one domain over one PostgreSQL database and the local RabbitMQ.

`ClusterTests` runs two nodes in this process (each a whole server with its own listener and
broker connection, on the test's reactor): what a user does on one node reaches users on the
other as on one server. `ClusterProcessTests` starts nodes as separate `twistd -n mim`
processes: three nodes, and a node killed with SIGKILL.
"""

import asyncio
import json
import os
import signal
import sys

from psycopg2.extensions import parse_dsn
from slixmpp.exceptions import IqError
from slixmpp.xmlstream import ET
from twisted.internet import defer, reactor
from twisted.words.protocols.jabber.jid import JID

from mim_twisted.admin import AdminCommands
from mim_twisted.auth.scram import derive_all
from mim_twisted.cluster.sessions import RemoteSession
from mim_twisted.config import load_config
from mim_twisted.storage import open_database
from mim_twisted.storage.interfaces import RosterItem
from mim_twisted.tap import MimService
from mim_twisted.xmpp.tls import SELF_SIGNED_NAME
from tests import pgsupport
from tests.certfactory import Authority
from tests.e2e.harness import (
    Client,
    ServerTestCase,
    eventually,
    free_port,
    require_asyncio_reactor,
    wait_for,
)
from tests.e2e.test_im import pushed_subscription
from tests.e2e.test_twistd import ProcessOutput, _wait_until_listening
from tests.rabbitsupport import BrokerRelay, require_broker, unique

PASSWORD = "correct horse"
TWISTD = os.path.join(os.path.dirname(sys.executable), "twistd")
NS_PUBSUB_EVENT = "http://jabber.org/protocol/pubsub#event"
MOOD = "urn:example:mood"


def mood(text: str) -> ET.Element:
    element = ET.Element(f"{{{MOOD}}}mood")
    element.text = text
    return element


def node_config(
    directory: str,
    dsn: str,
    node: str,
    port: int,
    rabbit_port: int = 5672,
    extra: str = "",
    node_timeout: float = 2,
) -> str:
    return (
        f'[server]\ndomains = ["localhost"]\ndata_dir = "data"\n'
        f'[[listeners]]\naddress = "127.0.0.1"\nport = {port}\n'
        "[auth]\nfailure_delay = 0.0\n"
        '[storage]\nbackend = "postgresql"\nauto_migrate = true\n'
        f"[storage.postgresql]\ndsn = {json.dumps(dsn)}\npool_size = 2\n"
        f'[cluster]\nenabled = true\nname = "{parse_dsn(dsn)["dbname"]}"\nnode = "{node}"\n'
        f"node_timeout = {node_timeout}\n"
        f"heartbeat_interval = 0.5\nrabbit = {{ port = {rabbit_port} }}\n{extra}"
    )


class Node:
    """One node of the test's cluster: its server, port and certificate."""

    def __init__(self, server: MimService, directory: str) -> None:
        self.server = server
        self.port = server.ports[0].getHost().port
        self.certificate = os.path.join(directory, "data", SELF_SIGNED_NAME)
        self.name = server.config.cluster.node


class ClusterTests(ServerTestCase):
    async def setUp(self) -> None:
        require_asyncio_reactor()
        require_broker()
        self.dsn = pgsupport.create_temp_database(self)
        self.one = await self.start_node()
        self.two = await self.start_node()
        self.server = self.one.server  # for register()
        for user in ("alice", "bob", "carol"):
            await self.register(user, PASSWORD)
        await self.until_connected(self.one, self.two)

    async def start_node(self, rabbit_port: int = 5672, extra: str = "") -> Node:
        directory = os.path.abspath(self.mktemp())
        os.makedirs(directory)
        path = os.path.join(directory, "mim.toml")
        with open(path, "w") as f:
            f.write(node_config(directory, self.dsn, unique("node"), 0, rabbit_port, extra))
        server = MimService(load_config(path))
        server.startService()
        self.addCleanup(server.stopService)
        await server.ready
        return Node(server, directory)

    async def until_connected(self, *nodes: Node) -> None:
        await eventually(lambda: all(node.server.cluster_bus.connected for node in nodes))

    def client_on(self, node: Node, jid: str) -> Client:
        client = Client(jid, PASSWORD, node.port, node.certificate, None)
        self.addCleanup(client.close)
        return client

    async def online(
        self, node: Node, jid: str, priority: int = 0, *, approve: bool = False
    ) -> Client:
        """Logged in on `node`, roster fetched, initial presence sent and known everywhere."""
        client = self.client_on(node, jid)
        client.xmpp.auto_authorize = approve
        client.xmpp.auto_subscribe = approve
        self.assertEqual(await client.connect(), "session_start")
        await wait_for(client.xmpp.get_roster())
        client.xmpp.send_presence(ppriority=priority)
        await eventually(lambda: self.available_everywhere(jid))
        return client

    def available_everywhere(self, jid: str) -> bool:
        for node in (self.one, self.two):
            session = node.server.core.sessions.session(JID(jid))
            if session is None or session.presence is None:
                return False
        return True

    async def befriend(self, alice: Client, bob: Client) -> None:
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

    async def test_messages_to_full_and_bare_jids_across_nodes(self) -> None:
        high = await self.online(self.two, "alice@localhost/high", priority=5)
        low = await self.online(self.one, "alice@localhost/low", priority=1)
        bob = await self.online(self.one, "bob@localhost/home")
        self.assertIsInstance(
            self.one.server.core.sessions.session(JID("alice@localhost/high")), RemoteSession
        )
        to_high = high.next_event("message")
        bob.xmpp.send_message(mto="alice@localhost", mbody="to the bare JID", mtype="chat")
        self.assertEqual((await wait_for(to_high))["body"], "to the bare JID")
        to_bob = bob.next_event("message")
        high.xmpp.send_message(mto="bob@localhost/home", mbody="back", mtype="chat")
        message = await wait_for(to_bob)
        self.assertEqual((message["body"], message["from"].full), ("back", "alice@localhost/high"))
        self.assertEqual(low.xmpp.boundjid.full, "alice@localhost/low")

    async def test_subscription_presence_and_roster_pushes_across_nodes(self) -> None:
        alice = await self.online(self.one, "alice@localhost/home", approve=True)
        bob = await self.online(self.two, "bob@localhost/home", approve=True)
        await self.befriend(alice, bob)
        # A second resource of alice's on the other node gets bob's presence and her pushes.
        phone = self.client_on(self.two, "alice@localhost/phone")
        bob_seen = phone.next_event("got_online", lambda p: p["from"].bare == "bob@localhost")
        self.assertEqual(await phone.connect(), "session_start")
        await wait_for(phone.xmpp.get_roster())
        phone.xmpp.send_presence()
        await wait_for(bob_seen)
        await wait_for(alice.xmpp.update_roster("carol@localhost", name="Carol"))
        await eventually(lambda: "carol@localhost" in phone.xmpp.client_roster)
        bob_goes = alice.next_event("got_offline", lambda p: p["from"].bare == "bob@localhost")
        await bob.close()
        await wait_for(bob_goes)

    async def test_offline_message_stored_on_one_node_delivered_on_the_other(self) -> None:
        alice = await self.online(self.one, "alice@localhost/home")
        alice.xmpp.send_message(mto="carol@localhost", mbody="while you were out", mtype="chat")
        offline = self.one.server.database.offline
        while not await offline.count("localhost", "carol"):
            await wait_for(asyncio.sleep(0.05))
        carol = self.client_on(self.two, "carol@localhost/back")
        delivered = carol.next_event("message")
        self.assertEqual(await carol.connect(), "session_start")
        carol.xmpp.send_presence()
        self.assertEqual((await wait_for(delivered))["body"], "while you were out")

    async def test_the_same_full_jid_on_another_node_replaces_the_older_session(self) -> None:
        older = await self.online(self.one, "alice@localhost/same")
        gone = older.next_event("disconnected")
        newer = self.client_on(self.two, "alice@localhost/same")
        self.assertEqual(await newer.connect(), "session_start")
        await wait_for(gone)
        await eventually(
            lambda: (
                self.one.server.core.sessions.session(JID("alice@localhost/same")) is not None
                and isinstance(
                    self.one.server.core.sessions.session(JID("alice@localhost/same")),
                    RemoteSession,
                )
            )
        )

    async def test_the_admin_socket_of_a_node_kicks_its_own_sessions(self) -> None:
        here = await self.online(self.one, "alice@localhost/here")
        there = await self.online(self.two, "alice@localhost/there")
        gone = here.next_event("disconnected")
        ended = await AdminCommands(self.one.server, reactor).kick({"jid": "alice@localhost"})
        self.assertEqual(ended, ["alice@localhost/here"])
        await wait_for(gone)
        await wait_for(asyncio.sleep(0.3))
        self.assertIsNotNone(self.two.server.core.sessions.session(JID("alice@localhost/there")))
        self.assertTrue(there.xmpp.is_connected())

    async def test_pep_notifications_across_nodes(self) -> None:
        await self.befriend_in_store("alice", "bob")
        alice = await self.pep_online(self.one, "alice@localhost/desk")
        bob = await self.pep_online(self.two, "bob@localhost/phone", MOOD)
        # The caps bob's node learned are known on alice's.
        await eventually(lambda: self.wants(self.one, "bob@localhost/phone", MOOD))
        notified = bob.next_event("pubsub_publish")
        await wait_for(
            alice.xmpp.plugin["xep_0060"].publish(None, MOOD, id="m1", payload=mood("happy"))
        )
        message = await wait_for(notified)
        [item] = message.xml.findall(f"{{{NS_PUBSUB_EVENT}}}event/{{{NS_PUBSUB_EVENT}}}items/*")
        self.assertEqual((message["from"].full, item.get("id")), ("alice@localhost", "m1"))

    async def befriend_in_store(self, user: str, contact: str) -> None:
        rosters = self.one.server.database.rosters
        for owner, other in ((user, contact), (contact, user)):
            await rosters.put_item(
                "localhost", owner, RosterItem(f"{other}@localhost", subscription="both")
            )

    async def pep_online(self, node: Node, jid: str, *interests: str) -> Client:
        client = self.client_on(node, jid)
        for plugin in ("xep_0030", "xep_0060", "xep_0115", "xep_0163"):
            client.xmpp.register_plugin(plugin)
        for namespace in interests:
            client.xmpp.plugin["xep_0030"].add_feature(f"{namespace}+notify")
        self.assertEqual(await client.connect(), "session_start")
        await wait_for(client.xmpp.plugin["xep_0115"].update_caps(broadcast=False))
        client.xmpp.send_presence()
        await eventually(lambda: self.available_everywhere(jid))
        return client

    def wants(self, node: Node, jid: str, namespace: str) -> bool:
        session = node.server.core.sessions.session(JID(jid))
        return session is not None and node.server.core.caps.wants_notify(session, namespace)

    async def test_broker_connection_dropped_and_restored(self) -> None:
        relay = BrokerRelay()
        self.addCleanup(lambda: defer.ensureDeferred(relay.close()))
        three = await self.start_node(relay.port)
        await self.until_connected(three)
        alice = await self.online(self.one, "alice@localhost/home")
        carol = self.client_on(three, "carol@localhost/home")
        self.assertEqual(await carol.connect(), "session_start")
        carol.xmpp.send_presence()
        await eventually(lambda: self.available_everywhere("carol@localhost/home"))
        relay.cut()
        await eventually(lambda: not three.server.cluster_bus.connected)
        # Local delivery goes on while the broker is away.
        bob = self.client_on(three, "bob@localhost/home")
        self.assertEqual(await bob.connect(), "session_start")
        bob.xmpp.send_presence()
        to_carol = carol.next_event("message")
        bob.xmpp.send_message(mto="carol@localhost/home", mbody="local", mtype="chat")
        self.assertEqual((await wait_for(to_carol))["body"], "local")
        # What it had for other nodes waits, and goes once the broker is back; what other
        # nodes sent it meanwhile waits in its queue.
        to_alice = alice.next_event("message")
        carol.xmpp.send_message(mto="alice@localhost/home", mbody="held", mtype="chat")
        to_carol = carol.next_event("message")
        alice.xmpp.send_message(mto="carol@localhost/home", mbody="queued", mtype="chat")
        await wait_for(asyncio.sleep(0.3))
        relay.restore()
        self.assertEqual((await wait_for(to_alice, timeout=20))["body"], "held")
        self.assertEqual((await wait_for(to_carol, timeout=20))["body"], "queued")

    async def test_pubsub_notification_to_a_resource_on_another_node(self) -> None:
        owner = await self.pubsub_online(self.one, "alice@localhost/desk")
        reader_here = await self.pubsub_online(self.one, "bob@localhost/desk")
        reader_there = await self.pubsub_online(self.two, "bob@localhost/phone")
        pubsub = owner.xmpp.plugin["xep_0060"]
        await wait_for(pubsub.create_node("pubsub.localhost", "news"))
        await wait_for(reader_here.xmpp.plugin["xep_0060"].subscribe("pubsub.localhost", "news"))
        notified = [client.next_event("pubsub_publish") for client in (reader_here, reader_there)]
        await wait_for(pubsub.publish("pubsub.localhost", "news", id="first", payload=mood("hi")))
        for message in notified:
            [item] = (await wait_for(message)).xml.findall(
                f"{{{NS_PUBSUB_EVENT}}}event/{{{NS_PUBSUB_EVENT}}}items/*"
            )
            self.assertEqual(item.get("id"), "first")

    async def pubsub_online(self, node: Node, jid: str) -> Client:
        client = self.client_on(node, jid)
        client.xmpp.register_plugin("xep_0060")
        self.assertEqual(await client.connect(), "session_start")
        client.xmpp.send_presence()
        await eventually(lambda: self.available_everywhere(jid))
        return client

    async def test_a_full_buffer_stores_messages_offline(self) -> None:
        relay = BrokerRelay()
        self.addCleanup(lambda: defer.ensureDeferred(relay.close()))
        three = await self.start_node(relay.port, "max_buffered_messages = 1\n")
        await self.until_connected(three)
        alice = await self.online(self.one, "alice@localhost/home")
        carol = self.client_on(three, "carol@localhost/home")
        self.assertEqual(await carol.connect(), "session_start")
        carol.xmpp.send_presence()
        await eventually(lambda: self.available_everywhere("carol@localhost/home"))
        relay.cut()
        bus = three.server.cluster_bus
        await eventually(lambda: not bus.connected)
        carol.xmpp.send_message(mto="alice@localhost/home", mbody="held", mtype="chat")
        await eventually(lambda: bus.waiting == 1)
        # The buffer is full: the next message is stored offline (RFC 6121 §8.5.3.2.1).
        carol.xmpp.send_message(mto="alice@localhost/home", mbody="kept", mtype="chat")
        offline = three.server.database.offline
        while not await offline.count("localhost", "alice"):
            await wait_for(asyncio.sleep(0.05))
        to_alice = alice.next_event("message")
        relay.restore()
        self.assertEqual((await wait_for(to_alice, timeout=20))["body"], "held")

    async def test_stanzas_waiting_for_a_node_taken_for_dead_are_handled_by_the_others(self):
        relay = BrokerRelay()
        self.addCleanup(lambda: defer.ensureDeferred(relay.close()))
        three = await self.start_node(relay.port)
        await self.until_connected(three)
        alice = await self.online(self.one, "alice@localhost/home")
        alice.xmpp.register_plugin("xep_0030")
        carol = self.client_on(three, "carol@localhost/home")
        self.assertEqual(await carol.connect(), "session_start")
        carol.xmpp.send_presence()
        await eventually(lambda: self.available_everywhere("carol@localhost/home"))
        relay.cut()
        await eventually(lambda: not three.server.cluster_bus.connected)
        # Into the queue of a node that will not read it again: once the others take it for
        # dead, the message is stored offline and the request refused (RFC 6121 §8.5.3.2).
        alice.xmpp.send_message(mto="carol@localhost/home", mbody="waited", mtype="chat")
        with self.assertRaises(IqError) as raised:
            await wait_for(
                alice.xmpp.plugin["xep_0030"].get_info(jid="carol@localhost/home", timeout=20),
                timeout=25,
            )
        self.assertEqual(raised.exception.condition, "service-unavailable")
        carol_again = self.client_on(self.two, "carol@localhost/phone")
        self.assertEqual(await carol_again.connect(), "session_start")
        stored = carol_again.next_event("message")
        carol_again.xmpp.send_presence()
        self.assertEqual((await wait_for(stored))["body"], "waited")

    async def node_taken_for_dead(self) -> tuple:
        """A third node behind a relay, its user bob alice's contact on node one, cut from the
        broker until the others take it for dead (node_timeout is 2 s) and end bob's session:
        (relay, the node, alice, bob)."""
        relay = BrokerRelay()
        self.addCleanup(lambda: defer.ensureDeferred(relay.close()))
        three = await self.start_node(relay.port)
        await self.until_connected(three)
        alice = await self.online(self.one, "alice@localhost/home", approve=True)
        bob = await self.online(three, "bob@localhost/home", approve=True)
        await self.befriend(alice, bob)
        bob_gone = alice.next_event("got_offline", lambda p: p["from"].bare == "bob@localhost")
        relay.cut()
        await wait_for(bob_gone, timeout=10)
        return relay, three, alice, bob

    async def test_a_node_taken_for_dead_and_back_makes_its_users_available_again(self):
        relay, three, alice, bob = await self.node_taken_for_dead()
        bob_back = alice.next_event("got_online", lambda p: p["from"].bare == "bob@localhost")
        relay.restore()
        await wait_for(bob_back, timeout=20)
        await eventually(lambda: self.available_everywhere("bob@localhost/home"))

    async def test_a_node_taken_for_dead_and_back_ends_sessions_bound_again_elsewhere(self):
        relay, three, alice, bob = await self.node_taken_for_dead()
        # Bob's client, finding its server gone, logs in on another node.
        bob_again = await self.online(self.two, "bob@localhost/home")
        conflict = bob.next_event("stream_error")
        relay.restore()
        self.assertEqual((await wait_for(conflict, timeout=20))["condition"], "conflict")
        await eventually(lambda: self.available_everywhere("bob@localhost/home"))
        for node in (self.one, three):
            session = node.server.core.sessions.session(JID("bob@localhost/home"))
            self.assertEqual(getattr(session, "node", None), self.two.name)
        to_bob = bob_again.next_event("message")
        alice.xmpp.send_message(mto="bob@localhost/home", mbody="which one?", mtype="chat")
        self.assertEqual((await wait_for(to_bob))["body"], "which one?")

    async def test_sasl_external_on_one_node_message_to_the_other(self) -> None:
        authority = Authority()
        certificates = os.path.abspath(self.mktemp())
        ca_file = authority.write_pem(certificates)
        verifying = await self.start_node(
            extra=f'[tls]\nverify_peer = true\nclient_ca = ["{ca_file}"]\n'
        )
        await self.until_connected(verifying)
        bob = await self.online(self.one, "bob@localhost/desk")
        alice = Client(
            "alice@localhost/phone", "", verifying.port, verifying.certificate, "EXTERNAL"
        )
        self.addCleanup(alice.close)
        alice.xmpp.ssl_context.load_cert_chain(
            *authority.issue("alice", ["alice@localhost"]).write_pem(certificates, "alice")
        )
        self.assertEqual(await alice.connect(), "session_start")
        self.assertEqual(alice.bound_jid, "alice@localhost/phone")
        to_bob = bob.next_event("message")
        alice.xmpp.send_message(mto="bob@localhost", mbody="by certificate", mtype="chat")
        message = await wait_for(to_bob)
        self.assertEqual(
            (message["from"].full, message["body"]), (alice.bound_jid, "by certificate")
        )
        to_alice = alice.next_event("message")
        bob.xmpp.send_message(mto=alice.bound_jid, mbody="answered", mtype="chat")
        self.assertEqual((await wait_for(to_alice))["body"], "answered")


class ClusterProcessTests(ServerTestCase):
    """Nodes as `twistd -n mim` processes."""

    async def setUp(self) -> None:
        require_asyncio_reactor()
        require_broker()
        self.dsn = pgsupport.create_temp_database(self)
        database = await open_database("postgresql", postgresql_dsn=self.dsn, auto_migrate=True)
        for user in ("alice", "bob", "carol"):
            await database.accounts.create_account("localhost", user, derive_all(PASSWORD, 4096))
        await database.close()

    async def spawn(
        self, name: str | None = None, node_timeout: float = 2
    ) -> tuple[int, str, object, ProcessOutput]:
        directory = os.path.abspath(self.mktemp())
        os.makedirs(directory)
        port = free_port()
        config = os.path.join(directory, "mim.toml")
        with open(config, "w") as f:
            f.write(
                node_config(
                    directory, self.dsn, name or unique("node"), port, node_timeout=node_timeout
                )
            )
        process = ProcessOutput()
        transport = reactor.spawnProcess(
            process,
            TWISTD,
            [TWISTD, "-n", "--pidfile=", "mim", "-c", config],
            env=os.environ,
            path=directory,
        )
        self.addCleanup(self._stop, transport, process)
        await _wait_until_listening(port, process)
        return port, os.path.join(directory, "data", SELF_SIGNED_NAME), transport, process

    async def _stop(self, transport, process: ProcessOutput) -> None:
        if not process.ended.called:
            transport.signalProcess(signal.SIGTERM)
        await process.ended

    async def login(self, node, jid: str) -> Client:
        port, certificate, _, _ = node
        client = Client(jid, PASSWORD, port, certificate, None)
        client.xmpp.auto_authorize = True
        client.xmpp.auto_subscribe = True
        self.addCleanup(client.close)
        self.assertEqual(await client.connect(), "session_start")
        await wait_for(client.xmpp.get_roster())
        client.xmpp.send_presence()
        return client

    async def test_three_nodes_and_a_node_killed(self) -> None:
        nodes = [await self.spawn() for _ in range(3)]
        alice = await self.login(nodes[0], "alice@localhost/a")
        bob = await self.login(nodes[1], "bob@localhost/b")
        carol = await self.login(nodes[2], "carol@localhost/c")
        for friend in ("bob@localhost", "carol@localhost"):
            sees = alice.next_event("got_online", lambda p, f=friend: p["from"].bare == f)
            alice.xmpp.send_presence(pto=friend, ptype="subscribe")
            await wait_for(sees, timeout=20)
        to_carol = carol.next_event("message")
        bob.xmpp.send_message(mto="carol@localhost/c", mbody="across", mtype="chat")
        self.assertEqual((await wait_for(to_carol))["body"], "across")
        bob_gone = alice.next_event("got_offline", lambda p: p["from"].bare == "bob@localhost")
        nodes[1][2].signalProcess(signal.SIGKILL)
        # node_timeout is 2 s; heartbeats every 0.5 s.
        await wait_for(bob_gone, timeout=8)

    async def test_a_killed_node_started_again_ends_its_previous_sessions(self) -> None:
        name = unique("node")
        alice = await self.login(await self.spawn(node_timeout=60), "alice@localhost/a")
        killed = await self.spawn(name, node_timeout=60)
        await self.login(killed, "bob@localhost/b")
        sees = alice.next_event("got_online", lambda p: p["from"].bare == "bob@localhost")
        alice.xmpp.send_presence(pto="bob@localhost", ptype="subscribe")
        await wait_for(sees, timeout=20)
        bob_gone = alice.next_event("got_offline", lambda p: p["from"].bare == "bob@localhost")
        killed[2].signalProcess(signal.SIGKILL)
        await killed[3].ended
        # Long before the other node would take it for dead.
        await self.spawn(name, node_timeout=60)
        await wait_for(bob_gone, timeout=8)
