"""The node cache in front of the PubSub store: the store contract still holds through it, a
node's subscriber list (and configuration and affiliations) is read from the store once,
changes written through it keep it right, a read overtaken by a change is not kept, and a
publication then reads nothing of the node."""

from twisted.internet.defer import Deferred, succeed
from twisted.trial.unittest import SynchronousTestCase, TestCase

from mim_twisted.pubsub import core
from mim_twisted.pubsub.config import GENERIC_NODE_DEFAULTS, ServiceLimits
from mim_twisted.pubsub.nodecache import NodeCache
from mim_twisted.storage.interfaces import IDatabase, PubSubSubscription
from mim_twisted.storage.memory import MemoryDatabase, MemoryPubSubStore
from tests.storage_contract import PubSubStoreContract, item

SERVICE = "pubsub.example.org"
OWNER = "owner@example.org"


class CachedStoreContractTests(PubSubStoreContract, TestCase):
    def open_empty_database(self) -> Deferred[IDatabase]:
        database = MemoryDatabase()
        database.pubsub = NodeCache(database.pubsub)
        return succeed(database)


class CountingStore(MemoryPubSubStore):
    """The memory store, counting subscription reads; ``hold`` keeps them waiting."""

    def __init__(self) -> None:
        super().__init__()
        self.reads = 0
        self.node_reads = 0  # of the node and its affiliations
        self.hold = False
        self.held: list[tuple[Deferred, Deferred]] = []

    def get_node(self, service: str, name: str) -> Deferred:
        self.node_reads += 1
        return super().get_node(service, name)

    def get_affiliations(self, service: str, name: str) -> Deferred:
        self.node_reads += 1
        return super().get_affiliations(service, name)

    def get_subscriptions(self, service: str, name: str) -> Deferred:
        self.reads += 1
        reading = super().get_subscriptions(service, name)
        if not self.hold:
            return reading
        gate: Deferred = Deferred()
        self.held.append((gate, reading))
        return gate


def subscription(jid: str, subid: str = "s") -> PubSubSubscription:
    return PubSubSubscription(jid, subid)


class NodeCacheTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.store = CountingStore()
        self.cache = NodeCache(self.store, max_nodes=2)
        self.successResultOf(self.cache.create_node(SERVICE, "news", {}, OWNER))

    def subscriptions(self, node: str = "news") -> list[str]:
        return [s.jid for s in self.successResultOf(self.cache.get_subscriptions(SERVICE, node))]

    def test_a_created_node_needs_no_read(self) -> None:
        self.assertEqual(self.subscriptions(), [])
        self.assertEqual(self.store.reads, 0)

    def test_writes_keep_the_list_in_the_stores_order(self) -> None:
        for jid in ("a@x", "b@x", "c@x"):
            self.successResultOf(self.cache.add_subscription(SERVICE, "news", subscription(jid)))
        pending = PubSubSubscription("a@x", "s", "pending")
        self.successResultOf(self.cache.add_subscription(SERVICE, "news", pending))
        self.successResultOf(self.cache.remove_subscription(SERVICE, "news", "b@x", "s"))
        approved = PubSubSubscription("a@x", "s", "subscribed", {"pubsub#deliver": False})
        self.successResultOf(self.cache.update_subscription(SERVICE, "news", approved))
        cached = self.successResultOf(self.cache.get_subscriptions(SERVICE, "news"))
        stored = self.successResultOf(self.store.get_subscriptions(SERVICE, "news"))
        self.assertEqual(cached, stored)
        self.assertEqual([s.jid for s in cached], ["a@x", "c@x"])

    def test_read_once_after_a_restart(self) -> None:
        self.successResultOf(self.cache.add_subscription(SERVICE, "news", subscription("a@x")))
        restarted = NodeCache(self.store)
        for _ in range(3):
            found = self.successResultOf(restarted.get_subscriptions(SERVICE, "news"))
            self.assertEqual([s.jid for s in found], ["a@x"])
        self.assertEqual(self.store.reads, 1)
        self.assertEqual((restarted.statistics.hits, restarted.statistics.misses), (2, 1))

    def test_a_read_overtaken_by_a_change_is_not_kept(self) -> None:
        restarted = NodeCache(self.store)
        self.store.hold = True
        reading = restarted.get_subscriptions(SERVICE, "news")
        self.successResultOf(restarted.add_subscription(SERVICE, "news", subscription("a@x")))
        gate, stale = self.store.held.pop()
        stale.chainDeferred(gate)  # the read answers with the list from before the change
        self.assertEqual(self.successResultOf(reading), [])
        self.store.hold = False
        found = self.successResultOf(restarted.get_subscriptions(SERVICE, "news"))
        self.assertEqual([s.jid for s in found], ["a@x"])

    def test_a_read_begun_during_a_write_and_answered_after_it_is_not_kept(self) -> None:
        # E.g. the owner takes a member off a whitelist while a contact's login (outside the
        # node's queue) reads the affiliations from before the change.
        self.successResultOf(self.cache.set_affiliation(SERVICE, "news", "eve@x", "member"))
        restarted = NodeCache(self.store)
        before = self.successResultOf(self.store.get_affiliations(SERVICE, "news"))
        writing: Deferred = Deferred()
        self.store.set_affiliation = lambda *args: writing
        removing = restarted.set_affiliation(SERVICE, "news", "eve@x", "none")
        stale: Deferred = Deferred()
        self.store.get_affiliations = lambda *args: stale
        reading = restarted.get_affiliations(SERVICE, "news")
        del self.store.set_affiliation, self.store.get_affiliations
        self.successResultOf(
            MemoryPubSubStore.set_affiliation(self.store, SERVICE, "news", "eve@x", "none")
        )
        writing.callback(None)
        self.successResultOf(removing)
        stale.callback(before)  # answered after the write, with what was there before it
        self.assertEqual(self.successResultOf(reading), {OWNER: "owner", "eve@x": "member"})
        found = self.successResultOf(restarted.get_affiliations(SERVICE, "news"))
        self.assertEqual(found, {OWNER: "owner"})

    def test_deleted_node_is_forgotten_and_the_least_used_lists_go(self) -> None:
        self.successResultOf(self.cache.delete_node(SERVICE, "news"))
        self.assertEqual(self.subscriptions(), [])  # read from the store: nothing there
        self.assertEqual(self.store.reads, 1)
        for node in ("a", "b", "c"):
            self.successResultOf(self.cache.create_node(SERVICE, node, {}, OWNER))
        self.subscriptions("a")  # "a" was dropped for "c" (two lists at most)
        self.assertEqual(self.store.reads, 2)

    def test_configuration_and_affiliations_written_through_it(self) -> None:
        self.successResultOf(self.cache.get_node(SERVICE, "news"))
        self.successResultOf(self.cache.set_node_config(SERVICE, "news", {"x": ["a"]}))
        self.successResultOf(self.cache.set_affiliation(SERVICE, "news", "m@x", "member"))
        self.successResultOf(self.cache.set_affiliation(SERVICE, "news", OWNER, "none"))
        node = self.successResultOf(self.cache.get_node(SERVICE, "news"))
        node.config["x"].append("b")  # what is handed out is a copy
        node = self.successResultOf(self.cache.get_node(SERVICE, "news"))
        self.assertEqual(node.config, {"x": ["a"]})
        affiliations = self.successResultOf(self.cache.get_affiliations(SERVICE, "news"))
        self.assertEqual(affiliations, {"m@x": "member"})
        self.assertEqual(
            affiliations, self.successResultOf(self.store.get_affiliations(SERVICE, "news"))
        )

    def test_a_node_deleted_behind_it_is_dropped_at_the_first_failed_write(self) -> None:
        self.successResultOf(self.cache.get_node(SERVICE, "news"))
        self.successResultOf(self.store.delete_node(SERVICE, "news"))  # e.g. with its account
        self.failureResultOf(self.cache.publish_item(SERVICE, "news", item(1), 1))
        self.assertIsNone(self.successResultOf(self.cache.get_node(SERVICE, "news")))

    def test_a_failed_write_drops_the_list(self) -> None:
        self.subscriptions()
        failure = self.cache.add_subscription(SERVICE, "nonode", subscription("a@x"))
        self.failureResultOf(failure)
        self.assertEqual(self.subscriptions(), [])
        self.assertEqual(self.store.reads, 0)


class PublishReadsNothingTests(TestCase):
    """The publish path over the cache: no read of the node per publication."""

    async def test_publications_read_nothing_of_the_node(self) -> None:
        store = CountingStore()
        cache = NodeCache(store)
        events: list = []
        service = core.PubSubService(
            cache,
            service_key=SERVICE,
            defaults=GENERIC_NODE_DEFAULTS,
            limits=ServiceLimits(),
            broadcaster=events.append,
        )
        await service.create(OWNER, "news")
        for n in range(50):
            await service.subscribe(f"u{n}@x/r", "news", f"u{n}@x")
        await service.publish(OWNER, "news", "first", "<p xmlns='urn:p'/>")
        node_reads = store.node_reads  # the node's creation time, once
        for n in range(10):
            await service.publish(OWNER, "news", f"i{n}", "<p xmlns='urn:p'/>")
        self.assertEqual((store.reads, store.node_reads), (0, node_reads))
        published = [e for e in events if isinstance(e, core.ItemPublished)]
        self.assertEqual([len(e.subscriptions) for e in published], [50] * 11)
