"""Two cluster nodes on one PostgreSQL database and the local RabbitMQ, in this process: what
one node caches is changed on the other, and the next use on the first sees it. A block made on
node one stops delivery through node two; a subscription made on node one receives what is
published through node two; a configuration changed on node one is what node two answers."""

import json
import os

from psycopg2.extensions import parse_dsn
from slixmpp.exceptions import IqError
from twisted.trial import unittest
from twisted.words.protocols.jabber.jid import JID

from mim_twisted.auth.scram import derive_all
from mim_twisted.cluster import coherence
from mim_twisted.config import load_config
from mim_twisted.storage.interfaces import RosterItem
from mim_twisted.tap import MimService
from mim_twisted.xmpp.tls import SELF_SIGNED_NAME
from tests import pgsupport
from tests.e2e.harness import Client, eventually, require_asyncio_reactor, wait_for
from tests.e2e.test_pubsub import config_form, payload
from tests.rabbitsupport import require_broker, unique

PASSWORD = "correct horse"
SERVICE = "pubsub.localhost"


class Node:
    def __init__(self, server: MimService, directory: str) -> None:
        self.server = server
        self.port = server.ports[0].getHost().port
        self.certificate = os.path.join(directory, "data", SELF_SIGNED_NAME)


class CoherenceTests(unittest.TestCase):
    async def setUp(self) -> None:
        require_asyncio_reactor()
        require_broker()
        self.dsn = pgsupport.create_temp_database(self)
        self.one = await self.start_node()
        self.two = await self.start_node()
        accounts = self.one.server.database.accounts
        for user in ("alice", "bob", "carol", "owner"):
            await accounts.create_account("localhost", user, derive_all(PASSWORD, 4096))
        await eventually(
            lambda: self.one.server.cluster_bus.connected and self.two.server.cluster_bus.connected
        )

    async def start_node(self) -> Node:
        directory = os.path.abspath(self.mktemp())
        os.makedirs(directory)
        path = os.path.join(directory, "mim.toml")
        with open(path, "w") as f:
            f.write(
                '[server]\ndata_dir = "data"\n[[listeners]]\nport = 0\n'
                "[auth]\nfailure_delay = 0.0\n"
                '[storage]\nbackend = "postgresql"\nauto_migrate = true\n'
                f"[storage.postgresql]\ndsn = {json.dumps(self.dsn)}\npool_size = 2\n"
                f'[cluster]\nenabled = true\nname = "{parse_dsn(self.dsn)["dbname"]}"\n'
                f'node = "{unique("node")}"\n'
            )
        server = MimService(load_config(path))
        server.startService()
        self.addCleanup(server.stopService)
        await server.ready
        return Node(server, directory)

    def heard_on(self, node: Node, kind: str) -> list:
        """What `node` hears of `kind` from now on, after its caches have heard it."""
        heard: list = []
        node.server.cluster_bus.on(kind, lambda sender, payload: heard.append(payload))
        return heard

    async def online(self, node: Node, jid: str, *plugins: str) -> Client:
        client = Client(jid, PASSWORD, node.port, node.certificate, None)
        self.addCleanup(client.close)
        for plugin in plugins:
            client.xmpp.register_plugin(plugin)
        self.assertEqual(await client.connect(), "session_start")
        await wait_for(client.xmpp.get_roster())
        client.xmpp.send_presence()
        return client

    async def test_a_block_on_one_node_stops_delivery_through_the_other(self) -> None:
        rosters = self.one.server.database.rosters
        for owner, contact in (("alice", "bob"), ("bob", "alice")):
            await rosters.put_item("localhost", owner, RosterItem(f"{contact}@localhost", "both"))
        desk = await self.online(self.one, "alice@localhost/desk", "xep_0191")
        phone = await self.online(self.two, "alice@localhost/phone", "xep_0191")
        bob = await self.online(self.two, "bob@localhost/pc")
        # Node two holds alice's list (empty) and delivers bob's message through it.
        await wait_for(phone.xmpp.plugin["xep_0191"].get_blocked())
        heard = phone.next_event("message", lambda m: m["body"] == "before")
        bob.xmpp.send_message(mto="alice@localhost/phone", mbody="before", mtype="chat")
        await wait_for(heard)

        await wait_for(desk.xmpp.plugin["xep_0191"].block(["bob@localhost"]))
        lists = self.two.server.core.blocking.lists
        await eventually(lambda: "bob@localhost" in (lists.cached(JID("alice@localhost")) or ()))
        bounced = bob.next_event("message_error")
        phone_heard = []
        phone.xmpp.add_event_handler("message", phone_heard.append)
        bob.xmpp.send_message(mto="alice@localhost/phone", mbody="after", mtype="chat")
        self.assertEqual((await wait_for(bounced))["error"]["condition"], "service-unavailable")
        self.assertEqual(phone_heard, [])

    async def test_subscribe_on_one_node_publish_on_the_other(self) -> None:
        owner = await self.online(self.two, "owner@localhost/desk", "xep_0060")
        reader_here = await self.online(self.one, "carol@localhost/phone", "xep_0060")
        reader_there = await self.online(self.two, "carol@localhost/laptop", "xep_0060")
        pubsub = owner.xmpp.plugin["xep_0060"]
        await wait_for(pubsub.create_node(SERVICE, "news"))
        # Node two reads the node's (empty) subscriber list for this publication and keeps it.
        await wait_for(pubsub.publish(SERVICE, "news", id="first", payload=payload("one")))

        heard = self.heard_on(self.two, coherence.PUBSUB_NODE_CHANGED)
        await wait_for(reader_here.xmpp.plugin["xep_0060"].subscribe(SERVICE, "news"))
        await eventually(lambda: [SERVICE, "news"] in heard)
        notified = reader_there.next_event("pubsub_publish")
        await wait_for(pubsub.publish(SERVICE, "news", id="second", payload=payload("two")))
        event = await wait_for(notified)
        self.assertEqual(event["pubsub_event"]["items"]["item"]["id"], "second")

    async def test_a_configuration_changed_on_one_node_is_seen_on_the_other(self) -> None:
        desk = await self.online(self.one, "owner@localhost/desk", "xep_0060")
        laptop = await self.online(self.two, "owner@localhost/laptop", "xep_0060")
        await wait_for(desk.xmpp.plugin["xep_0060"].create_node(SERVICE, "conf"))
        there = laptop.xmpp.plugin["xep_0060"]
        await wait_for(there.get_node_config(SERVICE, "conf"))  # held by node two

        heard = self.heard_on(self.two, coherence.PUBSUB_NODE_CHANGED)
        await wait_for(
            desk.xmpp.plugin["xep_0060"].set_node_config(
                SERVICE, "conf", config_form(title="Renamed", access_model="whitelist")
            )
        )
        await eventually(lambda: [SERVICE, "conf"] in heard)
        stored = await wait_for(there.get_node_config(SERVICE, "conf"))
        self.assertEqual(
            stored["pubsub_owner"]["configure"]["form"]["values"]["pubsub#title"], "Renamed"
        )
        # And node two applies it: carol, not on the whitelist, may not subscribe there.
        carol = await self.online(self.two, "carol@localhost/phone", "xep_0060")
        with self.assertRaises(IqError) as raised:
            await wait_for(carol.xmpp.plugin["xep_0060"].subscribe(SERVICE, "conf"))
        self.assertEqual(raised.exception.condition, "not-allowed")
