"""This server as a node of a cluster: its session table, the stanzas other nodes send it, and
the heartbeats by which nodes learn that one of them has died.

Every node broadcasts a heartbeat each `heartbeat_interval`. A node not heard for
`node_timeout` while this one's bus is up is taken for dead: its sessions leave the table here,
and the node whose delete removed its rows from `cluster_sessions` (one, whichever is first)
sends the unavailable presence of its available users to their contacts, as their own node
would have when their connections closed; the stanzas waiting in its queue are taken and
handled as for sessions that have gone. While this node's bus is down it judges no one; when
the bus is back, it reads the table again and announces its own sessions once more (the others
may have missed its announcements, or taken it for dead); if they took it for dead, its
available sessions' presence goes to their contacts again.
"""

from typing import Any

from twisted.application import service
from twisted.internet import defer, task
from twisted.logger import Logger
from twisted.words.protocols.jabber import error
from twisted.words.xish import domish

from mim_twisted import hooks
from mim_twisted.cluster.bus import ClusterBus
from mim_twisted.cluster.sessions import (
    ClusterSessions,
    Outbox,
    RemoteSession,
    SessionTable,
    deliveries,
    unpack_stanzas,
    wanted,
)
from mim_twisted.config import ClusterConfig
from mim_twisted.im.stream_management import parse_stanza
from mim_twisted.xmpp.jids import parse_jid
from mim_twisted.xmpp.stanza_errors import error_response

log = Logger()


class ClusterNode(service.Service):
    """A child of the server between the bus and the IM core: `sessions` is the IM core's
    session table once started."""

    name = "cluster-node"

    def __init__(
        self, settings: ClusterConfig, bus: ClusterBus, storage: Any, reactor: Any
    ) -> None:
        self.settings = settings
        self.node = settings.node
        self.bus = bus
        self.storage = storage  # a StorageService, open when this starts
        self.reactor = reactor
        self.sessions: ClusterSessions | None = None
        self.table: SessionTable | None = None
        self.core: Any = None  # the ImCore, once built on `sessions`
        self._last_heard: dict[str, float] = {}
        self._heartbeat: task.LoopingCall | None = None
        self._judging = False  # the bus is up: silence means something
        self._lost_at: float | None = None  # when the bus went down
        self._left_over: list = []  # the sessions of a previous run under this name

    # -- start and stop ----------------------------------------------------------------------

    def startService(self) -> defer.Deferred:
        super().startService()
        return defer.ensureDeferred(self._start())

    async def _start(self) -> None:
        self.table = SessionTable(self.storage.database, self.reactor)
        outbox = Outbox(self.bus, self.reactor, self._undeliverable)
        self.sessions = ClusterSessions(self.node, self.bus, outbox, self.table)
        self.bus.on("heartbeat", self._heard)
        self.bus.on("stopped", self._stopped)
        self.bus.on("stanzas", self._stanzas)
        self.bus.on("started", self._restarted)
        # Rows a previous run under the same name left (it was killed): its sessions are
        # over, and their users unavailable once the IM core is there to say so.
        self._left_over = await self.table.remove_node(self.node)
        self.bus.broadcast("started", None)
        await self._reload()
        if not self.running:
            return  # stopped while starting
        self.bus.connected_listeners.append(self._bus_up)
        self.bus.lost_listeners.append(self._bus_down)
        self._judging = self.bus.connected
        self._heartbeat = task.LoopingCall(self._beat)
        self._heartbeat.clock = self.reactor
        self._heartbeat.start(self.settings.heartbeat_interval, now=True)
        log.info("Cluster: node {node} started", node=self.node)

    def attach(self, core: Any) -> None:
        """The IM core built on `sessions`: its changes of presence and caps are announced."""
        self.core = core
        core.presence.caps_listeners.append(lambda session, presence: self._announce(session))
        core.caps.on_caps_learned.append(self._announce)
        core.hooks.add(hooks.USER_UNAVAILABLE, lambda session, presence: self._announce(session))
        left_over, self._left_over = self._left_over, []
        self._sessions_ended(self.node, left_over)

    def stopService(self) -> defer.Deferred:
        super().stopService()
        return defer.ensureDeferred(self._stop())

    async def _stop(self) -> None:
        if self._heartbeat is not None and self._heartbeat.running:
            self._heartbeat.stop()
        for listeners, listener in (
            (self.bus.connected_listeners, self._bus_up),
            (self.bus.lost_listeners, self._bus_down),
        ):
            if listener in listeners:
                listeners.remove(listener)
        self.bus.broadcast("stopped", None)
        if self.table is not None:
            # After the closing sessions' own writes, before the database closes.
            await self.table.writing.idle()
            await self.table.remove_node(self.node)

    # -- the table -------------------------------------------------------------------------

    def _announce(self, session: Any) -> None:
        if self.sessions is not None and not isinstance(session, RemoteSession):
            self.sessions.announce(session)

    async def _reload(self) -> dict[str, str]:
        """The other nodes' sessions read again; the node of each full JID in the table."""
        rows = await self.table.load()
        self.sessions.replace_all(rows)
        now = self.reactor.seconds()
        for node in self.sessions.nodes():
            self._last_heard.setdefault(node, now)
        return {record[0]: node for node, record in rows}

    def _bus_up(self) -> None:
        if not self.running:
            return
        now = self.reactor.seconds()
        for node in self._last_heard:
            self._last_heard[node] = now
        self._judging = True
        # Away long enough for the others to have taken this node for dead (its last
        # heartbeat may have gone up to an interval before the connection).
        away = self._lost_at is not None and (
            now - self._lost_at >= self.settings.node_timeout - self.settings.heartbeat_interval
        )
        self._lost_at = None
        reloading = defer.ensureDeferred(self._back(away))
        reloading.addErrback(lambda failure: log.failure("Cluster: reading the table", failure))
        # Database work that a stop waits for before the database closes.
        self.table.writing.track(reloading)

    async def _back(self, away: bool) -> None:
        holders = await self._reload()
        ended = []
        if away:
            for session in list(self.sessions.live_sessions()):
                holder = holders.get(session.jid.full())
                if holder is None and session.presence is not None:
                    # Its row deleted by the others, taking this node for dead: its
                    # contacts were told it had ended.
                    ended.append(session)
                elif holder not in (None, self.node):
                    # Bound again on another node meanwhile: this one is the older.
                    session.replaced()
        self.sessions.announce_all()
        if ended and self.core is not None:
            log.info(
                "Cluster: node {node} was taken for dead; the presence of its {count}"
                " available sessions is sent again",
                node=self.node,
                count=len(ended),
            )
            for session in ended:
                self.core.presence.rebroadcast(session)

    def _bus_down(self) -> None:
        self._judging = False
        self._lost_at = self.reactor.seconds()

    # -- heartbeats ------------------------------------------------------------------------

    def _beat(self) -> None:
        if not self.bus.connected:
            return
        self.bus.broadcast("heartbeat", None)
        if not self._judging:
            return
        now = self.reactor.seconds()
        for node in self.sessions.nodes():
            self._last_heard.setdefault(node, now)
        for node, heard in list(self._last_heard.items()):
            if now - heard > self.settings.node_timeout:
                del self._last_heard[node]
                dying = defer.ensureDeferred(self._node_died(node, now - heard))
                dying.addErrback(lambda f, node=node: log.failure("Cluster: node {n}", f, n=node))
                self.table.writing.track(dying)

    def _heard(self, node: str, payload: Any) -> None:
        self._last_heard[node] = self.reactor.seconds()

    def _restarted(self, node: str, payload: Any) -> None:
        # A node started again under a name seen before: the sessions of its previous run are
        # over (it ends them itself, see _start).
        self._last_heard[node] = self.reactor.seconds()
        self.sessions.forget_node(node)

    def _stopped(self, node: str, payload: Any) -> None:
        # Its sessions ended and said so as it stopped.
        self._last_heard.pop(node, None)
        self.sessions.forget_node(node)

    async def _node_died(self, node: str, silence: float) -> None:
        self.sessions.forget_node(node)
        records = await self.table.remove_node(node)
        log.warn(
            "Cluster: node {node} not heard for {silence:.1f} s, taken for dead;"
            " {count} of its sessions ended here",
            node=node,
            silence=silence,
            count=len(records),
        )
        self._sessions_ended(node, records)
        # What other nodes sent its sessions and it never read: undeliverable to them, as to
        # sessions that have gone (each node takes what it finds; a message is taken once).
        undelivered = 0
        for kind, payload in await self.bus.drain(node):
            if kind == "stanzas":
                for _, xml in unpack_stanzas(payload):
                    undelivered += 1
                    self._not_here(parse_stanza(xml))
        if undelivered:
            log.info(
                "Cluster: {count} stanzas waiting for dead node {node} handled here",
                count=undelivered,
                node=node,
            )

    def _sessions_ended(self, node: str, records: list) -> None:
        """Sessions of a node gone without closing them: unavailable to their contacts."""
        if self.core is None:
            return
        for record in records:
            session = RemoteSession(parse_jid(record[0]), node, self.sessions.outbox)
            session.update(record)
            session.closed = True
            self.core.presence.session_ended(session)

    # -- stanzas from other nodes ----------------------------------------------------------

    def _stanzas(self, node: str, payload: Any) -> None:
        local = self.sessions.local
        for jid, address, stanza in deliveries(payload):
            session = local.session(parse_jid(jid))
            if session is None:
                self._not_here(parse_stanza(stanza.text(address)))
                continue
            if stanza.filtered and not wanted(session, parse_stanza(stanza.text(address))):
                continue
            if session.held_messages is not None and stanza.message:
                session.held_messages.append(parse_stanza(stanza.text(address)))
            else:
                session.send(stanza.data(address))

    def _not_here(self, stanza: domish.Element) -> None:
        """The session it was sent to has gone meanwhile: as if the stanza had come now to
        the address it bears (RFC 6121 §8.5.2.1.1, §8.5.3.2.1, §8.5.3.2.2)."""
        if self.core is None:
            return
        kind = stanza.getAttribute("type", "normal")
        if stanza.name == "iq":
            if kind in ("get", "set"):
                self._bounce(stanza)
            return
        if stanza.name != "message":
            return  # presence: of no use to anyone else
        target = parse_jid(stanza["to"])
        # A chat message, or a normal one sent to the bare JID: to another resource, or
        # stored offline.
        if kind == "chat" or (kind == "normal" and not target.resource):
            keeping = self.core.router.messages.redeliver(target.userhostJID(), stanza)
            if keeping is not None:
                self.core.router.routing.track(keeping)
        elif kind in ("normal", "groupchat"):
            self._bounce(stanza)

    def _undeliverable(self, stanzas: list[tuple[str, str]]) -> None:
        """The bus buffer had no room (the broker has been away long): RFC 6121's answers as
        if the sessions were not there — messages stored offline, requests refused."""
        for jid, xml in stanzas:
            stanza = parse_stanza(xml)
            kind = stanza.getAttribute("type", "normal")
            if stanza.name == "message" and kind in ("chat", "normal") and self.core is not None:
                target = parse_jid(jid).userhostJID()
                keeping = self.core.router.messages.offline.keep(target, stanza)
                keeping.addErrback(
                    lambda failure: log.failure("Cluster: storing a message offline", failure)
                )
                self.core.router.routing.track(keeping)
            elif stanza.name in ("message", "iq") and kind not in ("error", "result"):
                self._bounce(stanza)

    def _bounce(self, stanza: domish.Element) -> None:
        """<service-unavailable/> to the sender, wherever it is."""
        sender = stanza.getAttribute("from")
        if not sender:
            return
        session = self.sessions.session(parse_jid(sender))
        if session is not None:
            session.send(error_response(error.StanzaError("service-unavailable"), stanza))
