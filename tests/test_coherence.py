"""The caches of two nodes over one store, joined by a bus that delivers when told to: a block
list or a PubSub node changed on one node is what the other uses next (e2e with RabbitMQ and
PostgreSQL: tests/e2e/test_coherence.py)."""

from typing import Any

from twisted.internet.defer import Deferred
from twisted.trial.unittest import SynchronousTestCase
from twisted.words.protocols.jabber.jid import JID

from mim_twisted.cluster import coherence
from mim_twisted.im.blocking import BlockLists
from mim_twisted.pubsub.nodecache import NodeCache
from mim_twisted.pubsub.purge import OfflinePurge
from mim_twisted.storage.interfaces import PubSubSubscription
from mim_twisted.storage.memory import MemoryDatabase, MemoryPubSubStore
from tests.storage_contract import item

ALICE = JID("alice@localhost")
SERVICE = "pubsub.localhost"
OWNER = "owner@localhost"


class LoopbackBus:
    """The cluster bus's broadcast and on between the nodes of one test; `deliver` hands the
    broadcasts made so far to the other nodes, as the broker would."""

    def __init__(self, node: str, network: list["LoopbackBus"], sent: list) -> None:
        self.node = node
        self.network = network
        self.sent = sent
        self.handlers: dict[str, list] = {}
        network.append(self)

    def on(self, kind: str, handler: Any) -> None:
        self.handlers.setdefault(kind, []).append(handler)

    def broadcast(self, kind: str, payload: Any) -> None:
        self.sent.append((self.node, kind, payload))


def deliver(sent: list, network: list[LoopbackBus]) -> None:
    while sent:
        sender, kind, payload = sent.pop(0)
        for bus in network:
            if bus.node != sender:
                for handler in bus.handlers.get(kind, ()):
                    handler(sender, payload)


class HeldStore:
    """A block list store whose reads, while `hold` is set, answer only when released (with
    what the list was when they were made)."""

    def __init__(self, store: Any) -> None:
        self.store = store
        self.held: list[tuple[Deferred, Deferred]] = []
        self.hold = False

    def get_block_list(self, domain: str, username: str) -> Deferred:
        reading = self.store.get_block_list(domain, username)
        if not self.hold:
            return reading
        gate: Deferred = Deferred()
        self.held.append((gate, reading))
        return gate

    def release(self) -> None:
        held, self.held = self.held, []
        for gate, reading in held:
            reading.chainDeferred(gate)


class BlockListTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.database = MemoryDatabase()
        self.successResultOf(self.database.accounts.create_account("localhost", "alice", {}))
        self.network: list[LoopbackBus] = []
        self.sent: list = []
        self.store = HeldStore(self.database.block_lists)
        self.one = BlockLists(self.store)
        self.two = BlockLists(self.store)
        for name, lists in (("one", self.one), ("two", self.two)):
            coherence.share_block_lists(LoopbackBus(name, self.network, self.sent), lists)

    def block(self, lists: BlockLists, *jids: str) -> None:
        """As BlockingService does: the store, then the list held."""
        current = lists.cached(ALICE) or frozenset()
        added = self.successResultOf(self.database.block_lists.block("localhost", "alice", jids))
        lists.put(ALICE, current.union(added))

    def test_a_change_on_one_node_is_read_again_on_the_other(self) -> None:
        self.assertEqual(self.successResultOf(self.two.get(ALICE)), frozenset())
        self.block(self.one, "bob@localhost")
        self.assertEqual(self.sent, [("one", coherence.BLOCK_LIST_CHANGED, "alice@localhost")])
        self.store.hold = True
        deliver(self.sent, self.network)
        # Until the new list is read, the one held is used (not none at all).
        self.assertEqual(self.two.cached(ALICE), frozenset())
        self.store.release()
        self.assertEqual(self.two.cached(ALICE), frozenset({"bob@localhost"}))

    def test_a_list_not_held_is_not_read(self) -> None:
        self.block(self.one, "bob@localhost")
        self.store.hold = True
        deliver(self.sent, self.network)
        self.assertEqual(self.store.held, [])
        self.assertIsNone(self.two.cached(ALICE))

    def test_changes_on_both_nodes_at_once_end_the_same_everywhere(self) -> None:
        self.successResultOf(self.one.get(ALICE))
        self.successResultOf(self.two.get(ALICE))
        self.block(self.one, "bob@localhost")
        self.store.hold = True
        deliver(self.sent, self.network)  # node two starts reading ...
        self.block(self.two, "carol@localhost")  # ... and changes the list from the old one
        self.store.release()  # the read from before its change is not kept: read again
        self.assertEqual(len(self.store.held), 1)
        self.store.hold = False
        self.store.release()
        deliver(self.sent, self.network)
        both = frozenset({"bob@localhost", "carol@localhost"})
        self.assertEqual((self.one.cached(ALICE), self.two.cached(ALICE)), (both, both))

    def test_a_read_under_way_when_the_list_changes_elsewhere_is_not_kept(self) -> None:
        self.store.hold = True
        reading = self.two.get(ALICE)
        self.block(self.one, "bob@localhost")
        deliver(self.sent, self.network)
        self.store.release()
        self.successResultOf(reading)
        self.assertIsNone(self.two.cached(ALICE))  # read again at the next use
        self.store.hold = False
        self.assertEqual(self.successResultOf(self.two.get(ALICE)), {"bob@localhost"})


class PubSubNodeTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.store = MemoryPubSubStore()
        self.network: list[LoopbackBus] = []
        self.sent: list = []
        self.one, self.two = NodeCache(self.store), NodeCache(self.store)
        self.purge = OfflinePurge({}, None, None)
        for name, cache, purge in (
            ("one", self.one, OfflinePurge({}, None, None)),
            ("two", self.two, self.purge),
        ):
            coherence.share_pubsub_nodes(LoopbackBus(name, self.network, self.sent), cache, purge)
        self.successResultOf(self.one.create_node(SERVICE, "news", {}, OWNER))
        deliver(self.sent, self.network)

    def subscribers(self, cache: NodeCache) -> list[str]:
        return [s.jid for s in self.successResultOf(cache.get_subscriptions(SERVICE, "news"))]

    def test_a_subscription_made_on_one_node_is_seen_on_the_other(self) -> None:
        self.assertEqual(self.subscribers(self.two), [])  # held by node two now
        self.successResultOf(
            self.one.add_subscription(SERVICE, "news", PubSubSubscription("carol@localhost", "s"))
        )
        self.assertEqual(self.subscribers(self.two), [])  # not yet heard
        deliver(self.sent, self.network)
        self.assertEqual(self.subscribers(self.two), ["carol@localhost"])

    def test_a_configuration_and_an_affiliation(self) -> None:
        self.successResultOf(self.two.get_node(SERVICE, "news"))
        self.successResultOf(self.two.get_affiliations(SERVICE, "news"))
        config = {"pubsub#title": "News", "pubsub#purge_offline": True}
        self.successResultOf(self.one.set_node_config(SERVICE, "news", config))
        self.successResultOf(self.one.set_affiliation(SERVICE, "news", "dave@localhost", "member"))
        deliver(self.sent, self.network)
        node = self.successResultOf(self.two.get_node(SERVICE, "news"))
        self.assertEqual(node.config["pubsub#title"], "News")
        affiliations = self.successResultOf(self.two.get_affiliations(SERVICE, "news"))
        self.assertEqual(affiliations["dave@localhost"], "member")
        # Node two's purge knows of the node now, as if it had been configured there.
        self.assertEqual(self.purge.nodes, {(SERVICE, "news")})
        self.successResultOf(self.one.delete_node(SERVICE, "news"))
        deliver(self.sent, self.network)
        self.assertIsNone(self.successResultOf(self.two.get_node(SERVICE, "news")))
        self.assertEqual(self.purge.nodes, set())

    def test_publications_announce_nothing(self) -> None:
        self.successResultOf(self.one.publish_item(SERVICE, "news", item("1"), None))
        self.assertEqual(self.sent, [])
