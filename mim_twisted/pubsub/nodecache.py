"""What a publication reads of a PubSub or PEP node, kept in memory in front of the store.

Every publication needs the node (its configuration), its affiliations and its subscribers;
reading them from the database each time costs three queries, the last one growing with the
audience (12 ms at 1000 subscribers), and the worker queue of the node waits for each. `NodeCache`
is an IPubSubStore that passes everything to the real store but answers `get_node`,
`get_affiliations` and `get_subscriptions` from memory once they have been read, and changes
what it holds itself when the node, an affiliation or a subscription is written through it,
after the store has accepted the write. It starts empty, so after a restart each node is read
once more from the database.

The core changes nodes only through this store, inside the node's worker queue (see
`pubsub/queues.py`), so memory and database agree. Reads are not all in that queue (PEP reads a
node's affiliations and last item when a contact comes online), so a read that overlaps a write
to its node, begun before the write or while it is under way, is not kept: it may carry what was
there before, and the next read asks the database again. A write that fails, a publication
included, drops what is held of the node, since whether it happened is unknown. At most
`max_nodes` nodes are kept, the least recently used dropped first. Values are copied on their
way in; node configurations on their way out too; subscription lists handed out share their
options with the cache, and are read, never changed (as the core does).

Another process writing the same database is seen only if it says so: `changed_listeners`
hear of each write of a node's configuration, affiliations or subscriptions made here (stored,
or failed), and `drop` forgets a node that another cluster node wrote (see
mim_twisted.cluster.coherence), so that its next use reads it again. An account deleted with its
PEP nodes (by mimctl) leaves them here until a write to them fails, which drops them.
"""

import copy
import itertools
from collections import OrderedDict
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from typing import Any

from twisted.internet.defer import Deferred, succeed
from zope.interface import implementer

from mim_twisted.storage.interfaces import IPubSubStore, PubSubNode, PubSubSubscription

MAX_NODES = 100_000

_Key = tuple[str, str]
_MISSING = object()


@dataclass
class CacheStatistics:
    hits: int = 0
    misses: int = 0


@dataclass
class _Held:
    """What is known of one node; _MISSING for what has not been read (None: no such node)."""

    node: Any = _MISSING
    affiliations: Any = _MISSING
    subscriptions: Any = _MISSING
    reading: dict[str, int] = field(default_factory=dict)  # part -> token of the latest read


@implementer(IPubSubStore)
class NodeCache:
    """An IPubSubStore with nodes, affiliations and subscriber lists in memory (see the module
    docstring)."""

    def __init__(self, store: Any, max_nodes: int = MAX_NODES) -> None:
        self.store = store
        self.max_nodes = max_nodes
        self.statistics = CacheStatistics()
        self._held: OrderedDict[_Key, _Held] = OrderedDict()
        self._tokens = itertools.count()
        # Writes not yet answered by the store, per node: kept apart from _held, since a node
        # may be dropped from it (and read again) while one is under way.
        self._writing: dict[_Key, int] = {}
        # `listener(service, name)` after each write of what is held of a node, done or failed.
        self.changed_listeners: list[Callable[[str, str], None]] = []

    def __getattr__(self, name: str) -> Any:
        # Everything else (items, listings, the JID-side lookups) goes straight to the store.
        return getattr(self.store, name)

    # -- reads ---------------------------------------------------------------------------------

    def _entry(self, key: _Key) -> _Held:
        held = self._held.get(key)
        if held is None:
            held = self._held[key] = _Held()
            while len(self._held) > self.max_nodes:
                self._held.popitem(last=False)
        else:
            self._held.move_to_end(key)
        return held

    def _read(
        self, key: _Key, part: str, load: Callable[[], Deferred], copy_out: Callable[[Any], Any]
    ) -> Deferred:
        held = self._entry(key)
        value = getattr(held, part)
        if value is not _MISSING:
            self.statistics.hits += 1
            return succeed(copy_out(value))
        self.statistics.misses += 1
        if key in self._writing:
            return load()  # what it reads may be from before the write: not kept
        token = held.reading[part] = next(self._tokens)

        def loaded(result: Any) -> Any:
            # Kept only if nothing changed the node meanwhile and it is still held.
            if held.reading.get(part) == token and self._held.get(key) is held:
                del held.reading[part]
                setattr(held, part, _copy_in(part, result))
            return result

        return load().addCallback(loaded)

    def get_node(self, service: str, name: str) -> Deferred[PubSubNode | None]:
        return self._read(
            (service, name), "node", lambda: self.store.get_node(service, name), _copy_node
        )

    def get_affiliations(self, service: str, name: str) -> Deferred[dict[str, str]]:
        return self._read(
            (service, name),
            "affiliations",
            lambda: self.store.get_affiliations(service, name),
            dict,
        )

    def get_subscriptions(self, service: str, name: str) -> Deferred[list[PubSubSubscription]]:
        return self._read(
            (service, name),
            "subscriptions",
            lambda: self.store.get_subscriptions(service, name),
            list,
        )

    # -- writes: the store first, then what is held ----------------------------------------------

    def _write(
        self, key: _Key, writing: Deferred, change: Callable[[_Held], None] | None = None
    ) -> Deferred:
        held = self._held.get(key)
        if held is not None:
            held.reading.clear()  # a read under way may hold what this changes
        self._writing[key] = self._writing.get(key, 0) + 1

        def done() -> None:
            remaining = self._writing.pop(key) - 1
            if remaining:
                self._writing[key] = remaining

        def written(result: Any) -> Any:
            done()
            current = self._held.get(key)
            if current is not None and change is not None:
                change(current)
            if change is not None:
                self._changed(key)
            return result

        def failed(failure: Any) -> Any:
            done()
            self._held.pop(key, None)
            if change is not None:
                self._changed(key)  # it may have been stored all the same
            return failure

        return writing.addCallbacks(written, failed)

    def _changed(self, key: _Key) -> None:
        for listener in self.changed_listeners:
            listener(*key)

    def drop(self, service: str, name: str) -> None:
        """Forget what is held of a node (written elsewhere); a read under way is not kept."""
        self._held.pop((service, name), None)

    def create_node(
        self, service: str, name: str, config: Mapping[str, Any], owner: str
    ) -> Deferred[None]:
        key = (service, name)

        def created(held: _Held) -> None:
            held.node = _MISSING  # read once, for its creation time
            held.affiliations = {owner: "owner"}
            held.subscriptions = ()

        self._entry(key)
        return self._write(key, self.store.create_node(service, name, config, owner), created)

    def set_node_config(self, service: str, name: str, config: Mapping[str, Any]) -> Deferred[None]:
        kept = copy.deepcopy(dict(config))

        def configured(held: _Held) -> None:
            if isinstance(held.node, PubSubNode):
                held.node = replace(held.node, config=kept)

        writing = self.store.set_node_config(service, name, config)
        return self._write((service, name), writing, configured)

    def delete_node(self, service: str, name: str) -> Deferred[None]:
        key = (service, name)
        self._held.pop(key, None)
        return self._write(key, self.store.delete_node(service, name), lambda _: self._forget(key))

    def _forget(self, key: _Key) -> None:
        self._held.pop(key, None)

    def set_affiliation(
        self, service: str, name: str, jid: str, affiliation: str
    ) -> Deferred[None]:
        def changed(held: _Held) -> None:
            if isinstance(held.affiliations, dict):
                if affiliation == "none":
                    held.affiliations.pop(jid, None)
                else:
                    held.affiliations[jid] = affiliation

        writing = self.store.set_affiliation(service, name, jid, affiliation)
        return self._write((service, name), writing, changed)

    def add_subscription(
        self, service: str, name: str, subscription: PubSubSubscription
    ) -> Deferred[None]:
        subscription = _copy_subscription(subscription)
        writing = self.store.add_subscription(service, name, subscription)
        return self._write(
            (service, name), writing, _subscriptions(lambda subs: _added(subs, subscription))
        )

    def update_subscription(
        self, service: str, name: str, subscription: PubSubSubscription
    ) -> Deferred[bool]:
        subscription = _copy_subscription(subscription)
        writing = self.store.update_subscription(service, name, subscription)
        return self._write(
            (service, name),
            writing,
            _subscriptions(
                lambda subs: tuple(subscription if _same(s, subscription) else s for s in subs)
            ),
        )

    def remove_subscription(self, service: str, name: str, jid: str, subid: str) -> Deferred[bool]:
        writing = self.store.remove_subscription(service, name, jid, subid)
        return self._write(
            (service, name),
            writing,
            _subscriptions(lambda subs: tuple(s for s in subs if (s.jid, s.subid) != (jid, subid))),
        )

    def publish_item(self, service: str, name: str, item: Any, max_items: int | None) -> Deferred:
        # Only its failure matters here: the node may be gone (see the module docstring).
        return self._write((service, name), self.store.publish_item(service, name, item, max_items))

    def publish_items(self, service: str, name: str, items: Any, max_items: int | None) -> Deferred:
        return self._write(
            (service, name), self.store.publish_items(service, name, items, max_items)
        )


def _subscriptions(change: Callable[[tuple], tuple]) -> Callable[[_Held], None]:
    def apply(held: _Held) -> None:
        if held.subscriptions is not _MISSING:
            held.subscriptions = change(held.subscriptions)

    return apply


def _copy_in(part: str, value: Any) -> Any:
    if part == "node":
        return _copy_node(value)
    if part == "affiliations":
        return dict(value)
    return tuple(value)


def _copy_node(node: PubSubNode | None) -> PubSubNode | None:
    # The caller may change the configuration it is given; what is held must not change. Its
    # values are strings, numbers, booleans and lists of strings: copying the lists is enough,
    # at a third of the cost of a deep copy on every publication.
    if node is None:
        return None
    config = {
        key: value.copy() if isinstance(value, list | dict) else value
        for key, value in node.config.items()
    }
    return replace(node, config=config)


def _copy_subscription(subscription: PubSubSubscription) -> PubSubSubscription:
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
