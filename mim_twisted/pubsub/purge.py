"""``pubsub#purge_offline``: when a publisher's last available resource goes offline, what it
published on the nodes configured so is removed (and subscribers told, per notify_retract).

The nodes that ask for it are known from the services' own events (created, configured,
deleted) after one look at the stored nodes at start, so a logout costs nothing when no node
wants purging. The removals run in the node's worker queue, in order with its other requests.
"""

from functools import partial
from typing import Any

from twisted.logger import Logger
from twisted.words.xish import domish

from mim_twisted.im.sessions import Session, SessionManager
from mim_twisted.pubsub import core
from mim_twisted.pubsub.queues import QueueFull, WorkerPool

log = Logger()


class OfflinePurge:
    def __init__(
        self, services: dict[str, core.PubSubService], pool: WorkerPool, sessions: SessionManager
    ) -> None:
        self.services = services
        self.pool = pool
        self.sessions = sessions
        self.nodes: set[tuple[str, str]] = set()  # (service key, node) with purge_offline on

    async def load(self) -> None:
        for key, service in self.services.items():
            for node in await service.store.list_nodes(key):
                self._note(key, node.name, node.config)

    def observe(self, event: core.PubSubEvent) -> None:
        """Every service event passes here on its way to the broadcaster."""
        if isinstance(event, core.NodeDeleted):
            self.nodes.discard((event.service, event.node))
        elif isinstance(event, core.NodeCreated | core.NodeConfigured):
            self._note(event.service, event.node, event.config)

    def node_read(self, service: str, node: str, stored: Any) -> None:
        """A node as just read from the store (None: deleted), after another cluster node
        wrote it: its events were that node's."""
        if stored is None:
            self.nodes.discard((service, node))
        else:
            self._note(service, node, stored.config)

    def _note(self, service: str, node: str, config: Any) -> None:
        if config.get("pubsub#purge_offline"):
            self.nodes.add((service, node))
        else:
            self.nodes.discard((service, node))

    def user_unavailable(self, session: Session, presence: domish.Element | None) -> None:
        """The USER_UNAVAILABLE hook: purge once the user has no available resource left."""
        bare = session.jid.userhostJID()
        if any(s.presence is not None for s in self.sessions.sessions_of(bare)):
            return
        for service, node in sorted(self.nodes):
            purge = partial(self.services[service].purge_offline_publisher, node, bare.full())
            try:
                done = self.pool.submit(service, node, purge)
            except QueueFull:
                log.warn("{node} is too busy to purge the items of {jid}", node=node, jid=bare)
                continue
            done.addErrback(lambda f: log.failure("purging {jid}'s items", f, jid=bare))
