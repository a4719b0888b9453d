"""The subscriber lists of PubSub and PEP nodes, kept in memory in front of the store.

Every publication notifies the node's subscribers; reading them from the database each time
costs a query whose time grows with the audience (12 ms at 1000 subscribers). `SubscriberCache`
is an IPubSubStore that passes everything to the real store but answers `get_subscriptions`
from memory once a node's list has been read, and changes that list itself when a subscription
is written through it, after the store has accepted the write. It starts empty, so after a
restart each node's list is read once more from the database.

The core changes subscriptions only through this store, inside the node's worker queue (see
`pubsub/queues.py`), so the list and the database agree. A read still on its way when the node
changes is not kept: the next one asks the database again. At most `max_nodes` lists are kept,
the least recently used dropped first. Subscriptions are copied on their way in; the lists
handed out share their options with the cache, and are read, never changed (as the core does).

Another process writing the same database (mimctl, a second server node) is not seen: this is a
cache of one process, like the caps cache, and PubSub subscriptions are changed only by the
server that serves the node's requests.
"""

import copy
import itertools
from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass, replace
from typing import Any

from twisted.internet.defer import Deferred, succeed
from zope.interface import implementer

from mim_twisted.storage.interfaces import IPubSubStore, PubSubSubscription

MAX_NODES = 100_000

_Key = tuple[str, str]


@dataclass
class CacheStatistics:
    hits: int = 0
    misses: int = 0


@implementer(IPubSubStore)
class SubscriberCache:
    """An IPubSubStore with the nodes' subscriber lists in memory (see the module docstring)."""

    def __init__(self, store: Any, max_nodes: int = MAX_NODES) -> None:
        self.store = store
        self.max_nodes = max_nodes
        self.statistics = CacheStatistics()
        self._lists: OrderedDict[_Key, tuple[PubSubSubscription, ...]] = OrderedDict()
        # Reads under way: key -> the token of the latest; a change to the node withdraws it.
        self._reading: dict[_Key, int] = {}
        self._tokens = itertools.count()

    def __getattr__(self, name: str) -> Any:
        # Everything but the subscriptions goes straight to the store.
        return getattr(self.store, name)

    # -- reads ---------------------------------------------------------------------------------

    def get_subscriptions(self, service: str, name: str) -> Deferred[list[PubSubSubscription]]:
        key = (service, name)
        cached = self._lists.get(key)
        if cached is not None:
            self._lists.move_to_end(key)
            self.statistics.hits += 1
            return succeed(list(cached))
        self.statistics.misses += 1
        token = self._reading[key] = next(self._tokens)
        reading = self.store.get_subscriptions(service, name)
        return reading.addCallback(self._read, key, token)

    def _read(
        self, subscriptions: list[PubSubSubscription], key: _Key, token: int
    ) -> list[PubSubSubscription]:
        if self._reading.get(key) == token:
            del self._reading[key]
            self._keep(key, tuple(subscriptions))
        return subscriptions

    def _keep(self, key: _Key, subscriptions: tuple[PubSubSubscription, ...]) -> None:
        self._lists[key] = subscriptions
        self._lists.move_to_end(key)
        while len(self._lists) > self.max_nodes:
            self._lists.popitem(last=False)

    # -- writes: the store first, then the list ------------------------------------------------

    def _changed(self, key: _Key) -> None:
        """The node changes: a read under way may hold the old list."""
        self._reading.pop(key, None)

    def create_node(
        self, service: str, name: str, config: Mapping[str, Any], owner: str
    ) -> Deferred[None]:
        key = (service, name)
        self._changed(key)

        def created(result: None) -> None:
            self._keep(key, ())  # a new node has no subscribers
            return result

        return self.store.create_node(service, name, config, owner).addCallback(created)

    def delete_node(self, service: str, name: str) -> Deferred[None]:
        key = (service, name)
        self._changed(key)
        self._lists.pop(key, None)
        return self.store.delete_node(service, name).addBoth(self._forget, key)

    def _forget(self, result: Any, key: _Key) -> Any:
        self._lists.pop(key, None)
        return result

    def add_subscription(
        self, service: str, name: str, subscription: PubSubSubscription
    ) -> Deferred[None]:
        subscription = _copy(subscription)
        return self._write(
            (service, name),
            self.store.add_subscription(service, name, subscription),
            lambda subs: _added(subs, subscription),
        )

    def update_subscription(
        self, service: str, name: str, subscription: PubSubSubscription
    ) -> Deferred[bool]:
        subscription = _copy(subscription)
        return self._write(
            (service, name),
            self.store.update_subscription(service, name, subscription),
            lambda subs: tuple(subscription if _same(s, subscription) else s for s in subs),
        )

    def remove_subscription(self, service: str, name: str, jid: str, subid: str) -> Deferred[bool]:
        return self._write(
            (service, name),
            self.store.remove_subscription(service, name, jid, subid),
            lambda subs: tuple(s for s in subs if (s.jid, s.subid) != (jid, subid)),
        )

    def _write(self, key: _Key, writing: Deferred, change: Any) -> Deferred:
        self._changed(key)

        def written(result: Any) -> Any:
            cached = self._lists.get(key)
            if cached is not None:
                self._lists[key] = change(cached)
            return result

        def failed(failure: Any) -> Any:
            # Whether the write happened is unknown: read the list again next time.
            self._lists.pop(key, None)
            return failure

        return writing.addCallbacks(written, failed)


def _copy(subscription: PubSubSubscription) -> PubSubSubscription:
    # The caller may go on changing its options; what the store keeps must not change.
    return replace(subscription, options=copy.deepcopy(subscription.options))


def _same(a: PubSubSubscription, b: PubSubSubscription) -> bool:
    return (a.jid, a.subid) == (b.jid, b.subid)


def _added(
    subscriptions: tuple[PubSubSubscription, ...], added: PubSubSubscription
) -> tuple[PubSubSubscription, ...]:
    """As the store adds: one with the same jid and subid is replaced in its place."""
    if any(_same(s, added) for s in subscriptions):
        return tuple(added if _same(s, added) else s for s in subscriptions)
    return (*subscriptions, added)
