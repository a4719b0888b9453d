"""The sessions of bound resources and their table: which full JIDs are connected here.

A `Session` is the IM core's side of one bound resource: its full JID, the presence state the
core keeps for it, and the connection it talks through (`ClientConnection`, the stream layer's
narrow view of a client stream). The stream opens it through `Router.open_session` on binding
and hands it every stanza; the session passes them on to the router.

The router reaches sessions only through the table's small interface ("the session for this full
JID", "the sessions of this bare JID"), so that a shared implementation can later replace the
local one when several nodes serve the same domains.
"""

from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING

from twisted.logger import Logger
from twisted.words.protocols.jabber.jid import JID
from twisted.words.xish import domish

from mim_twisted.im.client_state import NS_CSI, ClientState
from mim_twisted.im.stream_management import failed
from mim_twisted.xmpp import bind
from mim_twisted.xmpp.connection import ClientConnection
from mim_twisted.xmpp.namespaces import SM
from mim_twisted.xmpp.serialise import to_xml

if TYPE_CHECKING:
    from mim_twisted.im.router import Router
    from mim_twisted.im.stream_management import StanzaLedger

log = Logger()


class Session:
    """One bound resource of a local account (the stream layer's `BoundSession`).

    With stream management (XEP-0198) it may outlive its connection: `connection` is None while
    it is detached, waiting for its client to resume it on another one.
    """

    def __init__(self, connection: ClientConnection, jid: JID, router: "Router") -> None:
        self.connection: ClientConnection | None = connection
        self._secure = connection.secure
        self.jid = jid  # never reassigned: a new binding is a new session
        self.full_jid = jid.full()  # what its PubSub notifications are addressed to, each
        self.ended = False  # over for good: unbound and unavailable
        self._router = router
        self.presence: domish.Element | None = None  # the last available broadcast presence
        self.priority = 0
        self.message_priority: int | None = None  # as received: what messages are routed by
        self.directed_to: set[str] = set()  # JIDs sent directed available presence
        self.roster_requested = False  # it gets roster pushes once it has asked for the roster
        # XEP-0115 (CapsService): the (hash, ver) its presence announces, and the features that
        # stand for once learned.
        self.caps: tuple[str, str] | None = None
        self.caps_features: frozenset[str] | None = None
        # While its stored messages are on their way (OfflineDelivery.hold), the live messages
        # routed to it wait here, behind them; `holds` counts the releases still to come.
        self.held_messages: list[domish.Element] | None = None
        self.holds = 0
        self.carbons = False  # XEP-0280: it gets copies of its account's chats (carbons.py)
        self.block_list_requested = False  # XEP-0191: it gets block list pushes once it has asked
        # XEP-0198 (StreamManagement): the counts once the client has enabled it, and the id it
        # resumes with if it asked for resumption.
        self.ledger: StanzaLedger | None = None
        self.resumption_id: str | None = None
        self.ack_requested = False  # an <r/> is out, not yet answered
        # XEP-0352 (client_state.py): created when the client first says it is inactive.
        self.client_state: ClientState | None = None

    @property
    def closed(self) -> bool:
        """Closing or gone: whatever would be sent to it now would be lost. A detached session
        is not closed: what is sent to it waits for its client to resume."""
        if self.connection is None:
            return self.ended
        return self.connection.closed

    @property
    def secure(self) -> bool:
        return self._secure

    def send(self, stanza: domish.Element | bytes | str) -> None:
        state = self.client_state
        if state is not None and state.inactive:
            held = state.hold(stanza)
            if held is None:
                return  # not worth sending to an inactive client
            if held:
                if state.overflowing():
                    self._write_all(state.release())
                return
        self._write(stanza)

    def _write_all(self, stanzas: list[domish.Element | bytes | str]) -> None:
        for stanza in stanzas:
            self._write(stanza)

    def _write(self, stanza: domish.Element | bytes | str) -> None:
        counted = self.ledger is not None and not self.closed
        if counted and not isinstance(stanza, bytes):
            # Kept serialised: serialised once, and the ledger's budget is in bytes.
            if isinstance(stanza, domish.Element):
                stanza = to_xml(stanza)
            stanza = stanza.encode("utf-8")
        if self.connection is not None:
            self.connection.send(stanza)
        if counted:
            # After the stanza: an ack request it triggers must follow it.
            self._router.stream_management.stanza_sent(self, stanza)

    def send_nonza(self, element: domish.Element) -> None:
        """Stream management's own elements: not stanzas, so neither counted nor kept."""
        if self.connection is not None:
            self.connection.send(element)

    def stream_error(
        self, condition: str, text: str | None = None, app_condition: domish.Element | None = None
    ) -> None:
        """End the session with a stream error (RFC 6120 §4.9) that closes its connection;
        a detached session, which has none, ends at once."""
        if self.connection is None:
            self.end()
        else:
            self.connection.stream_error(condition, text, app_condition)

    def replaced(self) -> None:
        """Another connection bound the same full JID: close this one with <conflict/>."""
        self.stream_error("conflict", "Replaced by a new connection")

    def attach(self, connection: ClientConnection) -> None:
        """Stream management resumed the session on `connection`."""
        self.connection = connection
        self._secure = connection.secure
        self.ack_requested = False

    def end(self) -> None:
        """Over for good: unbound, then unavailable to everyone."""
        if not self.ended:
            self._router.close_session(self)

    # -- what the stream calls (BoundSession) ------------------------------------------------

    def stanza_received(self, stanza: domish.Element) -> None:
        if self.ledger is not None:
            self.ledger.stanza_handled()
        if stanza.name == "iq" and bind.is_session_request(stanza):
            # RFC 3921's session establishment: a no-op kept for older clients.
            self.send(bind.session_result(stanza))
            return
        self._router.route_from_client(self, stanza)

    def nonza_received(self, element: domish.Element) -> None:
        if element.uri == SM:
            management = self._router.stream_management
            if management is None:
                self.send_nonza(failed("feature-not-implemented"))
            else:
                management.element_received(self, element)
        elif (
            element.uri == NS_CSI
            and element.name in ("active", "inactive")
            and self._router.client_state_indication
        ):
            self.set_client_state(active=element.name == "active")
        else:
            self.stream_error("unsupported-stanza-type", f"Unexpected <{element.name}/>")

    def set_client_state(self, *, active: bool) -> None:
        """XEP-0352: <active/> sends what was held back while inactive."""
        state = self.client_state
        if state is None:
            if active:
                return
            state = self.client_state = ClientState()
        state.inactive = not active
        if active:
            self._write_all(state.release())

    def connection_lost(self, connection: ClientConnection, *, abrupt: bool = False) -> None:
        if connection is not self.connection:
            return  # one it was resumed away from
        if abrupt and self.ledger is not None and self.ledger.resumable:
            self.connection = None
            self._router.stream_management.detach(self)
        else:
            self.end()


class SessionManager:
    """The local session table: bare JID -> {resource: session}.

    `on_sessions_changed` listeners are called with a bare JID (as text) whenever what its
    sessions offer others may have changed: a session bound or unbound, or one of them becoming
    available or unavailable or announcing other caps (`sessions_changed`, called by presence and
    caps handling as they set `message_priority` and `caps_features`). PEP keeps its implicit
    recipients between publications by them.
    """

    def __init__(self) -> None:
        self._by_bare: dict[JID, dict[str, Session]] = {}
        self.on_sessions_changed: list[Callable[[str], object]] = []

    @property
    def local(self) -> "SessionManager":
        """The sessions of this process (a cluster node's table holds others' too)."""
        return self

    def bind(self, session: Session) -> None:
        """Register a session under its full JID; an existing session there is replaced."""
        jid = session.jid
        resources = self._by_bare.setdefault(jid.userhostJID(), {})
        previous = resources.get(jid.resource)
        resources[jid.resource] = session
        self.sessions_changed(jid.userhost())
        if previous is not None and previous is not session:
            previous.replaced()

    def unbind(self, session: Session) -> None:
        """Forget a session, unless another one has already replaced it."""
        bare = session.jid.userhostJID()
        resources = self._by_bare.get(bare)
        if resources is None or resources.get(session.jid.resource) is not session:
            return
        del resources[session.jid.resource]
        if not resources:
            del self._by_bare[bare]
        self.sessions_changed(bare.userhost())

    def sessions_changed(self, bare_jid: str) -> None:
        """A session of the bare JID was bound or unbound, became available or unavailable,
        or its caps features changed."""
        for listener in list(self.on_sessions_changed):
            try:
                listener(bare_jid)
            except Exception:
                # A listener's bug must not break binding or presence handling.
                log.failure("sessions changed listener for {jid}", jid=bare_jid)

    # A session that is closing (its stream error sent, the connection not yet gone) is no
    # longer found: whatever would be sent to it now would be lost.

    def session(self, full_jid: JID) -> Session | None:
        session = self._by_bare.get(full_jid.userhostJID(), {}).get(full_jid.resource)
        return None if session is None or session.closed else session

    def sessions_of(self, bare_jid: JID) -> list[Session]:
        resources = self._by_bare.get(bare_jid.userhostJID(), {})
        return [session for session in resources.values() if not session.closed]

    def bound_sessions_of(self, bare_jid: JID) -> list[Session]:
        """The sessions of the bare JID, closing ones too: a session stops closing without
        being unbound or bound (its connection lost, it waits detached for its client to
        resume it), so what is kept between `on_sessions_changed` calls is read from these and
        filtered at use."""
        return list(self._by_bare.get(bare_jid.userhostJID(), {}).values())

    def has_remote_sessions(self, jid: JID) -> bool:
        """Whether the account of `jid` has sessions on other nodes: never, in the table of
        one process."""
        return False

    def live_sessions(self) -> Iterator[Session]:
        """Every session that is not closing."""
        for resources in self._by_bare.values():
            for session in resources.values():
                if not session.closed:
                    yield session

    def __len__(self) -> int:
        return sum(len(resources) for resources in self._by_bare.values())
