"""The in-memory subscriber lists in front of the PubSub store: the store contract still holds
through it, a node's list is read from the store once, changes written through it keep it
right, and a read overtaken by a change is not kept."""

from twisted.internet.defer import Deferred, succeed
from twisted.trial.unittest import SynchronousTestCase, TestCase

from mim_twisted.pubsub import core
from mim_twisted.pubsub.config import GENERIC_NODE_DEFAULTS, ServiceLimits
from mim_twisted.pubsub.subscribers import SubscriberCache
from mim_twisted.storage.interfaces import IDatabase, PubSubSubscription
from mim_twisted.storage.memory import MemoryDatabase, MemoryPubSubStore
from tests.storage_contract import PubSubStoreContract

SERVICE = "pubsub.example.org"
OWNER = "owner@example.org"


class CachedStoreContractTests(PubSubStoreContract, TestCase):
    def open_empty_database(self) -> Deferred[IDatabase]:
        database = MemoryDatabase()
        database.pubsub = SubscriberCache(database.pubsub)
        return succeed(database)


class CountingStore(MemoryPubSubStore):
    """The memory store, counting subscription reads; ``hold`` keeps them waiting."""

    def __init__(self) -> None:
        super().__init__()
        self.reads = 0
        self.hold = False
        self.held: list[tuple[Deferred, Deferred]] = []

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


class SubscriberCacheTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.store = CountingStore()
        self.cache = SubscriberCache(self.store, max_nodes=2)
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
        restarted = SubscriberCache(self.store)
        for _ in range(3):
            found = self.successResultOf(restarted.get_subscriptions(SERVICE, "news"))
            self.assertEqual([s.jid for s in found], ["a@x"])
        self.assertEqual(self.store.reads, 1)
        self.assertEqual((restarted.statistics.hits, restarted.statistics.misses), (2, 1))

    def test_a_read_overtaken_by_a_change_is_not_kept(self) -> None:
        restarted = SubscriberCache(self.store)
        self.store.hold = True
        reading = restarted.get_subscriptions(SERVICE, "news")
        self.successResultOf(restarted.add_subscription(SERVICE, "news", subscription("a@x")))
        gate, stale = self.store.held.pop()
        stale.chainDeferred(gate)  # the read answers with the list from before the change
        self.assertEqual(self.successResultOf(reading), [])
        self.store.hold = False
        found = self.successResultOf(restarted.get_subscriptions(SERVICE, "news"))
        self.assertEqual([s.jid for s in found], ["a@x"])

    def test_deleted_node_is_forgotten_and_the_least_used_lists_go(self) -> None:
        self.successResultOf(self.cache.delete_node(SERVICE, "news"))
        self.assertEqual(self.subscriptions(), [])  # read from the store: nothing there
        self.assertEqual(self.store.reads, 1)
        for node in ("a", "b", "c"):
            self.successResultOf(self.cache.create_node(SERVICE, node, {}, OWNER))
        self.subscriptions("a")  # "a" was dropped for "c" (two lists at most)
        self.assertEqual(self.store.reads, 2)

    def test_a_failed_write_drops_the_list(self) -> None:
        self.subscriptions()
        failure = self.cache.add_subscription(SERVICE, "nonode", subscription("a@x"))
        self.failureResultOf(failure)
        self.assertEqual(self.subscriptions(), [])
        self.assertEqual(self.store.reads, 0)


class PublishReadsNoSubscriptionsTests(TestCase):
    """The publish path over the cache: no subscription read per publication."""

    async def test_publications_after_the_first_read_nothing(self) -> None:
        store = CountingStore()
        cache = SubscriberCache(store)
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
        for n in range(10):
            await service.publish(OWNER, "news", f"i{n}", "<p xmlns='urn:p'/>")
        self.assertEqual(store.reads, 0)
        published = [e for e in events if isinstance(e, core.ItemPublished)]
        self.assertEqual([len(e.subscriptions) for e in published], [50] * 10)
