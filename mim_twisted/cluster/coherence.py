"""The caches of one node kept right while other nodes change what they hold.

A node keeps in memory what its hot paths read: the block lists of the accounts with sessions
on it (`im/blocking.py`) and, for PubSub and PEP, each node's configuration, affiliations and
subscriber list (`pubsub/nodecache.py`), with the set of nodes that purge a publisher's items
when it goes offline (`pubsub/purge.py`). Every change is stored in the shared database first;
the node that made it then broadcasts which block list or PubSub node changed on the bus's
fanout exchange, and each other node reads it again: a block list at once, the one held staying
in use until then (presence treats a missing list as empty); a PubSub node is dropped and read
at its next use, after which the purge set is updated. Publications, the frequent writes, change
none of this and announce nothing.

Invalidation rather than one owning node per PubSub node: ownership would need every request
for a node forwarded to the node that owns it and the answer routed back, and a new owner
chosen (with its cache cold) whenever a node joins or leaves; with invalidation each node serves
its own users' requests on what the database holds, and what the database decides (a unique
subscription, an item replaced, a deleted node's rows) stays true whichever node wrote it.
What a node has not heard yet it may use for as long as a broadcast takes to reach it (about a
millisecond here, longer while the broker is away and the bus holds messages): a check made in
that window against the old list or configuration is the same race as two requests arriving
at once on one server, not a lasting difference between nodes.

Nothing else needs this: the caps cache is keyed by verification hash, which names one feature
set wherever it is learnt (a node learns a `ver` on its own, at the cost of one query), and
rosters are read from the database, not kept.
"""

from typing import Any

from twisted.logger import Logger

from mim_twisted.im.blocking import BlockLists
from mim_twisted.pubsub.nodecache import NodeCache
from mim_twisted.pubsub.purge import OfflinePurge
from mim_twisted.xmpp.jids import parse_jid

log = Logger()

# The bus message kinds: a bare JID; [service, node].
BLOCK_LIST_CHANGED = "block-list-changed"
PUBSUB_NODE_CHANGED = "pubsub-node-changed"


def share_block_lists(bus: Any, lists: BlockLists) -> None:
    """Announce the block lists changed here; read again those changed elsewhere."""
    lists.changed_listeners.append(
        lambda account: bus.broadcast(BLOCK_LIST_CHANGED, account.userhost())
    )

    def changed(node: str, account: Any) -> None:
        lists.refresh(parse_jid(account))

    bus.on(BLOCK_LIST_CHANGED, changed)


def share_pubsub_nodes(bus: Any, cache: NodeCache, purge: OfflinePurge) -> None:
    """Announce the PubSub nodes written here; forget those written elsewhere."""
    cache.changed_listeners.append(
        lambda service, name: bus.broadcast(PUBSUB_NODE_CHANGED, [service, name])
    )

    def changed(node: str, payload: Any) -> None:
        service, name = payload
        cache.drop(service, name)
        reading = cache.get_node(service, name)
        reading.addCallback(lambda stored: purge.node_read(service, name, stored))
        reading.addErrback(
            lambda failure: log.failure(
                "Reading PubSub node {node} of {service}, changed on another node",
                failure,
                node=name,
                service=service,
            )
        )

    bus.on(PUBSUB_NODE_CHANGED, changed)
