"""Stopping the server under load: what it had taken in is finished before the database closes.

A client queues PubSub publications and sends messages to an offline user, then the server is
stopped: every publication it read is answered before the connection closes (and stored), every
message is stored offline, and nothing is logged as an error (trial fails a test on a logged
failure or an unhandled error in a Deferred).
"""

import asyncio
from collections.abc import Callable

from slixmpp.exceptions import IqError, IqTimeout
from slixmpp.xmlstream import ET
from twisted.internet import defer

from mim_twisted.pubsub.protocol import MAX_IN_FLIGHT
from mim_twisted.tap import open_storage
from tests.e2e.harness import Client, ServerTestCase, wait_for
from tests.e2e.test_pubsub import config_form

PASSWORD = "stop gracefully"
SERVICE = "pubsub.localhost"
PUBLICATIONS = MAX_IN_FLIGHT  # as many as one session may have queued
MESSAGES = 100  # limits.max_offline_messages: all of them fit


class HeldWrites:
    """The PubSub store's item writes, each waiting until `release` is called."""

    def __init__(self, store: object, patch: Callable[..., object]) -> None:
        self.released = False
        self.waiting: list[defer.Deferred] = []
        for name in ("publish_item", "publish_items"):
            patch(store, name, self._held(getattr(store, name)))

    def _held(self, write: Callable[..., defer.Deferred]) -> Callable[..., defer.Deferred]:
        def write_when_released(*args: object) -> defer.Deferred:
            if self.released:
                return write(*args)
            waiting: defer.Deferred = defer.Deferred()
            self.waiting.append(waiting)
            return waiting.addCallback(lambda _: write(*args))

        return write_when_released

    def release(self) -> None:
        self.released = True
        for waiting in self.waiting:
            waiting.callback(None)


class CleanStopTests(ServerTestCase):
    # One queue, so that the publications are still waiting in it when the stop begins.
    extra_config = "[pubsub]\nworkers = 1\n"

    async def online(self, jid: str) -> Client:
        client = self.client(jid, PASSWORD)
        client.xmpp.register_plugin("xep_0060")
        client.xmpp.register_plugin("xep_0199")
        self.assertEqual(await client.connect(), "session_start")
        client.xmpp.send_presence()
        return client

    async def test_stop_under_load(self) -> None:
        await self.start_server()
        for user in ("alice", "bob"):
            await self.register(user, PASSWORD)
        alice = await self.online("alice@localhost/desk")
        pubsub = alice.xmpp.plugin["xep_0060"]
        await wait_for(pubsub.create_node(SERVICE, "news", config=config_form(max_items="1000")))

        async def publish(number: int) -> str:
            entry = ET.Element("{urn:example:news}entry")
            entry.text = f"item {number}"
            try:
                await pubsub.publish(SERVICE, "news", id=f"i{number}", payload=entry, timeout=30)
            except IqError as error:
                return error.condition
            except IqTimeout:
                return "no answer"
            return "published"

        # The node's writes wait until the stop has begun, so that its queue still holds
        # publications then, however fast the database is.
        writes = HeldWrites(self.server.pubsub.node_cache.store, self.patch)
        publications = [asyncio.ensure_future(publish(n)) for n in range(PUBLICATIONS)]
        for number in range(MESSAGES):
            alice.xmpp.send_message(mto="bob@localhost", mbody=f"message {number}", mtype="chat")
        # One stream's stanzas are handled in order: once the ping is answered, the server has
        # taken in every publication and message before it.
        await wait_for(alice.xmpp.plugin["xep_0199"].ping("localhost", timeout=30))
        self.assertGreater(sum(self.server.pubsub.pool.pending()), 0)
        disconnected = alice.next_event("disconnected")
        stopped = self.server.stopService()
        writes.release()
        await stopped
        await wait_for(disconnected)
        outcomes = await wait_for(asyncio.gather(*publications))
        self.assertEqual(outcomes, ["published"] * PUBLICATIONS)

        database = await open_storage(self.server.config)
        self.addCleanup(database.close)
        items = await database.pubsub.get_items(SERVICE, "news")
        self.assertEqual(len(items), PUBLICATIONS)
        self.assertEqual(await database.offline.count("localhost", "bob"), MESSAGES)

    async def test_requests_after_the_stop_began_are_refused(self) -> None:
        await self.start_server()
        await self.register("alice", PASSWORD)
        alice = await self.online("alice@localhost/desk")
        pubsub = alice.xmpp.plugin["xep_0060"]
        await wait_for(pubsub.create_node(SERVICE, "news"))
        # PubSub stops before the connections are closed: a request then is answered <wait/>.
        await self.server.pubsub_host.stopService()
        with self.assertRaises(IqError) as refused:
            await wait_for(pubsub.publish(SERVICE, "news", id="late", timeout=10))
        self.assertEqual(refused.exception.condition, "resource-constraint")
        self.assertEqual(refused.exception.etype, "wait")


class CleanStopOnPostgreSQLTests(CleanStopTests):
    storage = "postgresql"


class CleanStopOnMySQLTests(CleanStopTests):
    storage = "mysql"
