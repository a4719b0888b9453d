"""The cluster's session table: the sessions of this node, and those of the others as seen here.

`ClusterSessions` has the local table's interface (`SessionManager`: bind, unbind, session,
sessions_of), so the router, presence, messages, carbons and PubSub reach a session on another
node exactly as a local one: through a `RemoteSession`, whose `send` puts the stanza in the
`Outbox` for its node. The outbox sends what one reactor turn gathered for a node as one bus
message, a payload sent to several of its sessions (a presence broadcast, a message to several
resources, a PubSub notification whose copies differ only in their 'to') carried once. A PubSub
notification comes to a remote session as it is (`RemoteSession.notify`: serialised once, with
the place of its 'to'), so the owner of the node adds a JID and an address per recipient on
another node, and that node addresses the copies of its own sessions.

Each bound session is a row of `cluster_sessions` in PostgreSQL (its node, priority while
available, last broadcast presence and caps features), written by its node on bind, presence,
caps and close, and announced on the fanout exchange ("session", "unbound"); every node keeps
the others' sessions in memory from those announcements, loaded from the table when it starts
and again when its bus comes back (what was announced meanwhile was missed). The row, keyed by
the full JID, decides between two nodes binding one full JID at once: a bind claims it, and
the node whose claim finds another node's row replaces that node's session (RFC 6120 §7.7.2.2);
a presence or caps change writes only a row its node still holds.

A session's interest in pushes (roster, block list, carbons) is known only to its node: a remote
session takes everything, and its node drops what the session did not ask for (`wanted`).
"""

import json
from collections import defaultdict
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any

from twisted.internet import defer
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.words.protocols.jabber.jid import JID
from twisted.words.xish import domish

from mim_twisted.cluster.bus import ClusterBus
from mim_twisted.im.blocking import NS_BLOCKING
from mim_twisted.im.carbons import NS_CARBONS
from mim_twisted.im.roster import NS_ROSTER
from mim_twisted.im.sessions import Session, SessionManager
from mim_twisted.im.stream_management import parse_stanza
from mim_twisted.inflight import InFlight
from mim_twisted.xmpp.jids import parse_jid, prepared_jid
from mim_twisted.xmpp.serialise import escape_attribute, to_xml

if TYPE_CHECKING:
    from mim_twisted.pubsub.broadcast import Notification

log = Logger()

# Where a payload carried once for several recipients had its recipient's address (the value
# of its 'to' attribute, escaped): a character that XML cannot contain.
RECIPIENT = "\x00"

# (full JID, priority or None while unavailable, presence XML or None, caps features or None)
Record = list[Any]


class Outbox:
    """Stanzas for sessions on other nodes, one bus message per node and reactor turn."""

    def __init__(
        self,
        bus: ClusterBus,
        reactor: Any,
        undeliverable: Callable[[list[tuple[str, str]]], None],
    ) -> None:
        self.bus = bus
        self.reactor = reactor
        # Called with the (full JID, stanza XML) the buffer had no room for.
        self.undeliverable = undeliverable
        self._pending: dict[str, list[tuple[str, str]]] = {}

    def deliver(self, node: str, jid: str, stanza: domish.Element | bytes | str) -> None:
        if isinstance(stanza, domish.Element):
            stanza = to_xml(stanza)
        elif isinstance(stanza, bytes):
            stanza = stanza.decode("utf-8")
        self._add(node, (jid, stanza))

    def notify(self, node: str, jid: str, notification: "Notification", address: str) -> None:
        """A PubSub notification addressed to `address` (as subscribed), for the session `jid`."""
        self._add(node, (jid, notification, address))

    def _add(self, node: str, entry: tuple) -> None:
        if not self._pending:
            self.reactor.callLater(0, self._flush)
        self._pending.setdefault(node, []).append(entry)

    def _flush(self) -> None:
        pending, self._pending = self._pending, {}
        for node, entries in pending.items():
            # Each distinct payload once, deliveries referring to it by index, with the
            # recipient's address left out of it: [full JID, index], and the address third
            # when it is not the full JID. A notification is one payload however many of the
            # node's sessions it goes to; so is a stanza whose copies differ only in their 'to'.
            payloads: dict[str | Notification, int] = {}
            texts = []
            deliveries = []
            for entry in entries:
                if len(entry) == 3:
                    jid, notification, address = entry
                    index = payloads.get(notification)
                    if index is None:
                        index = payloads[notification] = len(texts)
                        texts.append(notification.template(RECIPIENT))
                    deliveries.append([jid, index] if address == jid else [jid, index, address])
                    continue
                jid, xml = entry
                addressed = _to_attribute(jid)
                if addressed in xml:
                    xml = xml.replace(addressed, _to_attribute(RECIPIENT), 1)
                index = payloads.get(xml)
                if index is None:
                    index = payloads[xml] = len(texts)
                    texts.append(xml)
                deliveries.append([jid, index])
            self.bus.send(
                node,
                "stanzas",
                [texts, deliveries],
                lambda entries=entries: self.undeliverable([_rendered(e) for e in entries]),
            )


def _rendered(entry: tuple) -> tuple[str, str]:
    """(full JID, stanza XML) of an outbox entry."""
    if len(entry) == 3:
        jid, notification, address = entry
        return jid, notification.to(address).decode("utf-8")
    return entry


def _to_attribute(jid: str) -> str:
    return f"to='{escape_attribute(jid)}'"


class Payload:
    """One payload of a "stanzas" message, as its deliveries need it: serialised for a
    recipient's address once the address is known, and what is known of it beforehand."""

    def __init__(self, text: str) -> None:
        self.addressed = RECIPIENT in text
        head, _, tail = text.partition(RECIPIENT)
        self._head, self._tail = head, tail
        self._head_bytes, self._tail_bytes = head.encode("utf-8"), tail.encode("utf-8")
        self.message = text.startswith("<message")
        # A push that its session may not have asked for (see `wanted`).
        self.filtered = NS_ROSTER in text or NS_BLOCKING in text or NS_CARBONS in text

    def text(self, address: str) -> str:
        if not self.addressed:
            return self._head
        return self._head + escape_attribute(address) + self._tail

    def data(self, address: str) -> bytes:
        if not self.addressed:
            return self._head_bytes
        return self._head_bytes + escape_attribute(address).encode() + self._tail_bytes


def deliveries(payload: Any) -> Iterator[tuple[str, str, Payload]]:
    """The (full JID, address, payload) of each delivery of a "stanzas" message."""
    texts, entries = payload
    payloads = [Payload(text) for text in texts]
    for entry in entries:
        jid = entry[0]
        yield jid, entry[2] if len(entry) > 2 else jid, payloads[entry[1]]


def unpack_stanzas(payload: Any) -> list[tuple[str, str]]:
    """The (full JID, stanza XML) of a "stanzas" message."""
    return [(jid, stanza.text(address)) for jid, address, stanza in deliveries(payload)]


class RemoteSession:
    """A session bound on another node, as this node sees it (the `Session` attributes that
    routing reads)."""

    connection = None
    ended = False
    held_messages = None
    client_state = None
    ledger = None
    caps = None
    # Its node drops the pushes it did not ask for (see `wanted`).
    roster_requested = True
    block_list_requested = True
    carbons = True

    def __init__(self, jid: JID, node: str, outbox: Outbox) -> None:
        self.jid = jid
        self.full_jid = jid.full()  # what its stanzas are sent to, for each one
        self.node = node
        self.outbox = outbox
        self.priority = 0
        self.message_priority: int | None = None
        self.presence: domish.Element | None = None
        self.caps_features: frozenset[str] | None = None
        self.directed_to: set[str] = set()
        self.closed = False

    def update(self, record: Record) -> None:
        _, priority, presence, features = record
        self.message_priority = priority
        self.priority = priority if priority is not None else 0
        self.presence = parse_stanza(presence) if presence is not None else None
        self.caps_features = frozenset(features) if features is not None else None

    def send(self, stanza: domish.Element | bytes | str) -> None:
        self.outbox.deliver(self.node, self.full_jid, stanza)

    def notify(self, notification: "Notification", address: str) -> None:
        """A PubSub notification to `address` (the JID subscribed), for this session."""
        self.outbox.notify(self.node, self.full_jid, notification, address)

    def replaced(self) -> None:
        self.outbox.bus.send(self.node, "replace", self.jid.full())

    def stream_error(self, condition: str, text: str | None = None, app: Any = None) -> None:
        """Ended by its node with this stream error (an application condition is not
        carried)."""
        self.outbox.bus.send(self.node, "end", [self.jid.full(), condition, text])

    def __repr__(self) -> str:
        return f"<RemoteSession {self.jid.full()} on {self.node}>"


def record_of(session: Session) -> Record:
    presence = session.presence
    features = session.caps_features
    return [
        session.jid.full(),
        session.message_priority if presence is not None else None,
        presence.toXml(defaultUri="jabber:client") if presence is not None else None,
        sorted(features) if features is not None else None,
    ]


def wanted(session: Session, stanza: domish.Element) -> bool:
    """Whether a stanza routed here from another node is one the local session asked for."""
    if stanza.name == "iq" and stanza.getAttribute("type") == "set":
        for child in stanza.elements():
            if child.uri == NS_ROSTER:
                return session.roster_requested
            if child.uri == NS_BLOCKING:
                return session.block_list_requested
    elif stanza.name == "message":
        for child in stanza.elements(NS_CARBONS):
            if child.name in ("sent", "received"):
                return session.carbons
    return True


class ClusterSessions:
    """The session table of a cluster node: `SessionManager`'s interface over the local
    sessions and the remote ones."""

    def __init__(self, node: str, bus: ClusterBus, outbox: Outbox, store: Any) -> None:
        self.node = node
        self.bus = bus
        self.outbox = outbox
        self.store = store  # SessionTable
        self.local = SessionManager()  # this node's sessions
        # Told of the remote sessions' changes too, as the local table tells of its own.
        self.on_sessions_changed = self.local.on_sessions_changed
        self._remote: dict[JID, dict[str, RemoteSession]] = {}
        self._by_node: dict[str, set[JID]] = defaultdict(set)  # full JIDs per node
        # This node's sessions whose change is announced at the end of the turn, in order.
        self._announcing: dict[Session, None] = {}
        bus.on("session", self._announced)
        bus.on("unbound", self._unbound)
        bus.on("replace", self._replace)
        bus.on("end", self._end)

    # -- SessionManager ------------------------------------------------------------------

    def bind(self, session: Session) -> None:
        jid = session.jid
        remote = self._remote_session(jid)
        if remote is not None:
            # The same full JID on another node: the older session is replaced (RFC 6120
            # §7.7.2.2), as on one node.
            remote.replaced()
            self._forget(remote.node, jid)
        self.local.bind(session)
        record = record_of(session)
        self.bus.broadcast("session", record)
        # The table decides between binds of one full JID on two nodes at once, which
        # neither has heard of yet: the later claim replaces the holder it finds.
        claiming = self.store.claim(record, self.node)
        claiming.addCallback(self._claimed, session, remote.node if remote is not None else None)
        claiming.addErrback(
            lambda failure: log.failure("Cluster: claiming {jid}", failure, jid=jid)
        )
        self.store.writing.track(claiming)

    def _claimed(self, holder: str | None, session: Session, replaced: str | None) -> None:
        jid = session.jid.full()
        if not self._holds(session):
            # Ended while its row was written: the row goes, unless a newer session has it.
            if self.local.session(session.jid) is None:
                self.store.remove(jid, self.node)
            return
        if holder in (None, self.node, replaced):
            return
        # Said again, after the older session's own announcements.
        self.bus.broadcast("session", record_of(session))
        self.bus.send(holder, "replace", jid)

    def unbind(self, session: Session) -> None:
        if not self._holds(session):
            return  # replaced: its row and announcement are the new session's
        self.local.unbind(session)
        jid = session.jid.full()
        self.store.remove(jid, self.node)
        self.bus.broadcast("unbound", jid)

    def session(self, full_jid: JID) -> Session | RemoteSession | None:
        session = self.local.session(full_jid)
        if session is not None:
            return session
        return self._remote_session(full_jid)

    def sessions_of(self, bare_jid: JID) -> list[Session | RemoteSession]:
        bare = bare_jid.userhostJID()
        return self._with_remote(bare, self.local.sessions_of(bare))

    def bound_sessions_of(self, bare_jid: JID) -> list[Session | RemoteSession]:
        bare = bare_jid.userhostJID()
        return self._with_remote(bare, self.local.bound_sessions_of(bare))

    def _with_remote(self, bare: JID, local: list[Any]) -> list[Session | RemoteSession]:
        """The local sessions of ``bare`` (a new list) followed by its other nodes' ones."""
        remote = self._remote.get(bare)
        if remote:
            local.extend(remote.values())
        return local

    def sessions_changed(self, bare_jid: str) -> None:
        self.local.sessions_changed(bare_jid)

    def has_remote_sessions(self, jid: JID) -> bool:
        return jid.userhostJID() in self._remote

    def live_sessions(self) -> Iterator[Session]:
        """This node's sessions."""
        return self.local.live_sessions()

    def __len__(self) -> int:
        return len(self.local)

    # -- this node's sessions ----------------------------------------------------------------

    def _holds(self, session: Session) -> bool:
        # A closing session is not found by `session()`, yet is still in the table.
        resources = self.local._by_bare.get(session.jid.userhostJID(), {})
        return resources.get(session.jid.resource) is session

    def announce(self, session: Session) -> None:
        """The session's presence or caps changed: its row is written and announced once the
        reactor turn is over, once however many changes the turn made (an available presence
        whose caps are known already changes both at once)."""
        if not self._announcing:
            self.outbox.reactor.callLater(0, self._announce_changed)
        self._announcing[session] = None

    def _announce_changed(self) -> None:
        changed, self._announcing = self._announcing, {}
        for session in changed:
            if session.ended or not self._holds(session):
                continue  # gone meanwhile: its unbinding said so
            record = record_of(session)
            self.store.save(record, self.node)
            self.bus.broadcast("session", record)

    def announce_all(self) -> None:
        for session in list(self.local.live_sessions()):
            self.announce(session)

    # -- the other nodes' sessions -------------------------------------------------------------

    def _remote_session(self, jid: JID) -> RemoteSession | None:
        return self._remote.get(jid.userhostJID(), {}).get(jid.resource)

    def remember(self, node: str, record: Record) -> RemoteSession:
        # Each announcement of a new session (a new full JID): stringprep again would cost
        # more than the rest of it.
        jid = prepared_jid(record[0])
        resources = self._remote.setdefault(jid.userhostJID(), {})
        session = resources.get(jid.resource)
        new = session is None or session.node != node
        if new:
            if session is not None:
                self._by_node[session.node].discard(jid)
            session = resources[jid.resource] = RemoteSession(jid, node, self.outbox)
            self._by_node[node].add(jid)
        available, features = session.message_priority is not None, session.caps_features
        session.update(record)
        # Most announcements of a known session change neither (a new status or priority).
        if (
            new
            or (session.message_priority is not None) != available
            or session.caps_features != features
        ):
            self.sessions_changed(jid.userhost())
        return session

    def _forget(self, node: str, jid: JID) -> RemoteSession | None:
        resources = self._remote.get(jid.userhostJID())
        session = resources.get(jid.resource) if resources else None
        if session is None or session.node != node:
            return None
        del resources[jid.resource]
        if not resources:
            del self._remote[jid.userhostJID()]
        self._by_node[node].discard(jid)
        session.closed = True
        self.sessions_changed(jid.userhost())
        return session

    def forget_node(self, node: str) -> list[RemoteSession]:
        """Every session of `node`, out of the table here."""
        gone = [self._forget(node, jid) for jid in list(self._by_node.pop(node, ()))]
        return [session for session in gone if session is not None]

    def nodes(self) -> set[str]:
        return {node for node, jids in self._by_node.items() if jids}

    def replace_all(self, rows: list[tuple[str, Record]]) -> None:
        """The other nodes' sessions as the table has them now."""
        for node in list(self._by_node):
            self.forget_node(node)
        for node, record in rows:
            if node != self.node:
                self.remember(node, record)

    def _announced(self, node: str, record: Record) -> None:
        self.remember(node, record)

    def _unbound(self, node: str, jid: str) -> None:
        self._forget(node, prepared_jid(jid))

    def _replace(self, node: str, jid: str) -> None:
        session = self.local.session(parse_jid(jid))
        if session is not None:
            session.replaced()

    def _end(self, node: str, payload: list) -> None:
        jid, condition, text = payload
        session = self.local.session(parse_jid(jid))
        if session is not None:
            session.stream_error(condition, text)


_CLAIM_FREE_ROW = (
    "INSERT INTO cluster_sessions (jid, node, priority, presence, features)"
    " VALUES (%s, %s, %s, %s, %s) ON CONFLICT (jid) DO NOTHING RETURNING node"
)
_ROW_VALUES = "(%s, %s, %s, %s, %s)"


def _claim_free_rows(count: int) -> str:
    return (
        "INSERT INTO cluster_sessions (jid, node, priority, presence, features) VALUES "
        + ", ".join([_ROW_VALUES] * count)
        + " ON CONFLICT (jid) DO NOTHING RETURNING jid"
    )


def _save_rows(count: int) -> str:
    # A row another node holds is left alone: the session here is the older one, replaced.
    return (
        "INSERT INTO cluster_sessions (jid, node, priority, presence, features) VALUES "
        + ", ".join([_ROW_VALUES] * count)
        + " ON CONFLICT (jid) DO UPDATE SET priority = EXCLUDED.priority,"
        " presence = EXCLUDED.presence, features = EXCLUDED.features"
        " WHERE cluster_sessions.node = EXCLUDED.node"
    )


def _row(record: Record, node: str) -> tuple:
    """The values of a session's row: jid, node, priority, presence, features (JSON)."""
    jid, priority, presence, features = record
    return (jid, node, priority, presence, json.dumps(features) if features else None)


def _record(jid: str, priority: Any, presence: Any, features: str | None) -> Record:
    """A session's record from its row's columns (node left out)."""
    return [jid, priority, presence, json.loads(features) if features else None]


class SessionTable:
    """`cluster_sessions` in the PostgreSQL database. Writes are sent and not waited for: a
    failure is logged, and the announcement on the bus still keeps the other nodes current.

    With a reactor, the writes of one reactor turn go together at its end, one statement for
    its claims, one for its saves, one for its removals: a burst of logins binds, announces and
    ends many sessions in a turn. Without one (tests), each write goes at once. Statements may
    reach the database in another order than they were made, as they did when each had its
    own: a claim, a save and a removal of one row each hold up on their own (see `claim`,
    `ClusterSessions._claimed`).
    """

    def __init__(self, database: Any, reactor: Any = None) -> None:
        self.database = database
        self.reactor = reactor
        self.writing = InFlight()  # what a stop waits for before the database closes
        self._claims: list[tuple[tuple, defer.Deferred]] = []
        self._saves: dict[str, tuple] = {}  # by full JID: the last change of the turn
        self._removals: dict[str, list[str]] = {}  # node -> full JIDs
        self._flushed: defer.Deferred | None = None  # fires once the turn's writes are done

    def _write(self, statement: str, parameters: tuple) -> defer.Deferred:
        async def body(session: Any) -> None:
            await session.execute(statement, parameters)

        # One statement, committed as it ends: one round trip.
        writing = self.database.run(body, alone=True)
        writing.addErrback(
            lambda failure: log.failure("Cluster: writing the session table", failure)
        )
        self.writing.track(writing)

    def _pending(self) -> None:
        """Something waits to be written: at the end of the turn, or now without a reactor."""
        if self.reactor is None:
            self._flush()
        elif self._flushed is None:
            self._flushed = self.writing.track(defer.Deferred())
            self.reactor.callLater(0, self._flush)

    def _flush(self) -> None:
        claims, self._claims = self._claims, []
        saves, self._saves = self._saves, {}
        removals, self._removals = self._removals, {}
        flushed, self._flushed = self._flushed, None
        if claims:
            self._claim_rows(claims)
        if saves:
            rows = list(saves.values())
            self._write(_save_rows(len(rows)), sum(rows, ()))
        for node, jids in removals.items():
            self._write(
                "DELETE FROM cluster_sessions WHERE node = %s AND jid = ANY(%s)", (node, jids)
            )
        if flushed is not None:
            flushed.callback(None)  # what it stood for is tracked now: the writes, the claims

    def claim(self, record: Record, node: str) -> defer.Deferred:
        """The row of a session just bound on `node`, whoever held its full JID: a Deferred
        firing with the node that held it (None if none did); the caller tracks it in
        `writing`."""
        claiming: defer.Deferred = defer.Deferred()
        self._claims.append((_row(record, node), claiming))
        self._pending()
        return claiming

    def _claim_rows(self, claims: list[tuple[tuple, defer.Deferred]]) -> None:
        rows = [values for values, _ in claims]

        async def insert(session: Any) -> list[tuple]:
            return await session.execute(_claim_free_rows(len(rows)), sum(rows, ()))

        # Most full JIDs are held by no one: the insert alone, one round trip; the transaction
        # of `_take_over` only for a row another node holds (or a full JID claimed twice).
        def inserted(result: list[tuple]) -> None:
            free = {jid for (jid,) in result}
            for values, claiming in claims:
                if values[0] in free:
                    free.discard(values[0])
                    claiming.callback(None)
                else:
                    self._take_over(values).chainDeferred(claiming)

        def failed(failure: Failure) -> None:
            for _, claiming in claims:
                claiming.errback(failure)

        self.database.run(insert, alone=True).addCallbacks(inserted, failed)

    def _take_over(self, values: tuple) -> defer.Deferred:
        """The row of `values`' full JID, held by another node (or deleted meanwhile): the node
        that held it."""
        jid = values[0]

        async def body(session: Any) -> str | None:
            while True:
                if await session.execute(_CLAIM_FREE_ROW, values):
                    return None
                # Held: by whom, locked until this transaction ends; none if it was deleted
                # meanwhile, and then inserted again.
                holder = await session.execute(
                    "SELECT node FROM cluster_sessions WHERE jid = %s FOR UPDATE", (jid,)
                )
                if holder:
                    await session.execute(
                        "UPDATE cluster_sessions SET node = %s, priority = %s, presence = %s,"
                        " features = %s WHERE jid = %s",
                        values[1:] + (jid,),
                    )
                    return holder[0][0]

        return self.database.run(body)

    def save(self, record: Record, node: str) -> None:
        """A change of the session's presence or caps, unless another node holds its full
        JID (then the session here is the older one, being replaced)."""
        self._saves[record[0]] = _row(record, node)
        self._pending()

    def remove(self, jid: str, node: str) -> None:
        self._removals.setdefault(node, []).append(jid)
        self._pending()

    async def load(self) -> list[tuple[str, Record]]:
        async def body(session: Any) -> list[tuple]:
            return await session.execute(
                "SELECT node, jid, priority, presence, features FROM cluster_sessions"
            )

        rows = await self.database.run(body)
        return [(node, _record(*row)) for node, *row in rows]

    async def remove_node(self, node: str) -> list[Record]:
        """Delete the rows of `node`; the ones this call deleted (none if another node's did)."""

        async def body(session: Any) -> list[tuple]:
            return await session.execute(
                "DELETE FROM cluster_sessions WHERE node = %s"
                " RETURNING jid, priority, presence, features",
                (node,),
            )

        rows = await self.database.run(body)
        return [_record(*row) for row in rows]
