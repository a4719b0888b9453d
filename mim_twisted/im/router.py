"""Routing of stanzas from bound sessions: to the server's IQ handlers or to other sessions.

The router is what the client streams open their sessions with (`SessionOpener`): a stream that
has bound a resource gets a `Session`, which passes each stanza to `route_from_client`.

IQ requests are answered by handlers looked up by the (namespace, name) of their payload, in one
of two tables (RFC 6120 §10.3): `server_iq` for requests to a served domain, `account_iq` for
requests to a local account's bare JID — including requests with no 'to', which the server
answers on behalf of the sender's own account. A handler is called as
`handler(session, iq, target)` with the target JID, and returns the result <iq/>, None for an
empty result, or a Deferred of either; it raises StanzaError for an error reply. A request no
handler claims is answered with <service-unavailable/>, so nothing is silently dropped.

Every stanza passes the `gates` first (blocking, XEP-0191), which may refuse it.
A gate that must ask the database holds the stanza, and the session's later stanzas wait behind
it, so that a session's stanzas are routed in the order they came (RFC 6120 §10.1).

Responses that clients send to the server's own requests (e.g. the disco#info query of entity
caps) complete the Deferred returned by `query`. Services on a domain of their own (PubSub at
`pubsub.<domain>`) receive every stanza addressed to that domain through `components`.
"""

import secrets
from collections import deque
from collections.abc import Callable

from twisted.internet import defer
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.words.protocols.jabber import error, xmlstream
from twisted.words.protocols.jabber.jid import JID, InvalidFormat
from twisted.words.xish import domish

from mim_twisted import hooks
from mim_twisted.im.messages import MessageRouter
from mim_twisted.im.offline import NS_DELAY
from mim_twisted.im.presence import PresenceService
from mim_twisted.im.sessions import Session, SessionManager
from mim_twisted.im.stanzas import reply_error
from mim_twisted.im.stream_management import StreamManagement, failed
from mim_twisted.inflight import InFlight
from mim_twisted.storage.interfaces import log_request_failure
from mim_twisted.xmpp.connection import ClientConnection
from mim_twisted.xmpp.jids import parse_jid
from mim_twisted.xmpp.stanza_errors import error_response

log = Logger()

# Stanzas of one session that may wait behind one held at a gate; beyond: policy-violation.
MAX_HELD_STANZAS = 1000

IqHandler = Callable[[Session, domish.Element, JID], "domish.Element | defer.Deferred | None"]
# `gate(session, stanza, recipient)`: True when it has refused the stanza (and answered it),
# False to let it be routed, or a Deferred of either when it must ask the database first.
Gate = Callable[[Session, domish.Element, JID], "bool | defer.Deferred[bool]"]


class IqTimeout(Exception):
    """The client did not answer the server's IQ request in time."""


class Router:
    """Routes the stanzas of local sessions."""

    def __init__(
        self,
        domains: frozenset[str],
        sessions: SessionManager,
        clock: IReactorTime,
        presence: PresenceService,
        messages: MessageRouter,
        hooks_table: hooks.Hooks,
    ) -> None:
        self.domains = domains
        self.sessions = sessions
        self.clock = clock
        self.presence = presence
        self.messages = messages
        self.hooks = hooks_table
        self.server_iq: dict[tuple[str, str], IqHandler] = {}
        self.account_iq: dict[tuple[str, str], IqHandler] = {}
        # Services on their own domain (pubsub.<domain>): every stanza addressed to that domain
        # goes to `handler(session, stanza, recipient)`.
        self.components: dict[str, Callable[[Session, domish.Element, JID], None]] = {}
        # XEP-0198, when enabled: acknowledgements, detached sessions and their resumption.
        self.stream_management: StreamManagement | None = None
        self.client_state_indication = False  # XEP-0352: sessions take <active/>, <inactive/>
        self._queries: dict[str, tuple[str, defer.Deferred]] = {}
        # Messages still being routed (to the database: offline storage, account lookups),
        # which a stop lets finish before the database closes.
        self.routing = InFlight()
        # What every stanza passes before it is routed (blocking, XEP-0191).
        # A stanza waiting for a gate's Deferred is routed when it fires: the stanzas waiting
        # for the same answer keep their order.
        self.gates: list[Gate] = []
        # Per session whose stanza waits at a gate: its stanzas received since, in order.
        self._held: dict[Session, deque[domish.Element]] = {}
        self.max_held = MAX_HELD_STANZAS

    # -- sessions ---------------------------------------------------------------------------

    def open_session(self, connection: ClientConnection, jid: JID) -> Session:
        """A client stream bound `jid`: its session, in the table (replacing one on that JID)."""
        session = Session(connection, jid, self)
        self.sessions.bind(session)
        return session

    def resume_session(
        self, connection: ClientConnection, user: JID, request: domish.Element
    ) -> Session | None:
        """<resume/> (XEP-0198) on a stream authenticated as `user`: the session it resumes,
        or None when there is none (the stream was told why)."""
        if self.stream_management is None:
            connection.send(failed("feature-not-implemented"))
            return None
        return self.stream_management.resume(connection, user, request)

    def close_session(self, session: Session) -> None:
        """The session is over: out of the table, then unavailable to everyone; what it did not
        acknowledge (XEP-0198) is undelivered."""
        session.ended = True
        self.sessions.unbind(session)
        self.session_ended(session)
        if self.stream_management is not None:
            self.stream_management.session_ended(session)

    # -- IQ -------------------------------------------------------------------------------

    def route_from_client(self, session: Session, stanza: domish.Element) -> None:
        held = self._held.get(session)
        if held is not None:
            # An earlier stanza waits at a gate: this one waits behind it (RFC 6120 §10.1).
            if len(held) >= self.max_held:
                session.stream_error("policy-violation", "Too many stanzas waiting")
                return
            held.append(stanza)
            return
        waiting = self._route(session, stanza)
        if waiting is not None:
            self._hold_behind(session, waiting, deque())

    def _drop_forged_delays(self, message: domish.Element) -> None:
        """A client may not date a message in this server's name (XEP-0203): the offline store
        keeps a stamp of its own and trusts one it finds from a served domain."""
        forged = [
            child
            for child in message.children
            if isinstance(child, domish.Element)
            and child.uri == NS_DELAY
            and child.name == "delay"
            and child.getAttribute("from") in self.domains
        ]
        for delay in forged:
            message.children.remove(delay)

    def _route(self, session: Session, stanza: domish.Element) -> defer.Deferred | None:
        """Route a stanza; a Deferred when it waits at a gate, fired once it has passed."""
        if stanza.name == "message":
            self._drop_forged_delays(stanza)
        to = stanza.getAttribute("to")
        try:
            recipient = parse_jid(to) if to else session.jid.userhostJID()
        except (InvalidFormat, UnicodeError):
            reply_error(session, stanza, "jid-malformed")
            return None
        if self.gates:
            return self._pass_gates(session, stanza, recipient, 0)
        self._dispatch(session, stanza, recipient)
        return None

    def _hold_behind(
        self, session: Session, waiting: defer.Deferred, held: deque[domish.Element]
    ) -> None:
        """Hold the session's next stanzas in `held` until `waiting` fires."""
        self._held[session] = held
        waiting.addBoth(self._release_held, session)
        self.routing.track(waiting)  # what it waits for is the database

    def _release_held(self, result: object, session: Session) -> None:
        held = self._held.pop(session)
        while held:
            waiting = self._route(session, held.popleft())
            if waiting is not None:
                self._hold_behind(session, waiting, held)
                return

    def _pass_gates(
        self, session: Session, stanza: domish.Element, recipient: JID, first: int
    ) -> defer.Deferred | None:
        for index in range(first, len(self.gates)):
            verdict = self.gates[index](session, stanza, recipient)
            if isinstance(verdict, defer.Deferred):
                verdict.addCallback(self._gate_answered, session, stanza, recipient, index + 1)
                return verdict.addErrback(self._routing_failed, session, stanza)
            if verdict:
                return None
        self._dispatch(session, stanza, recipient)
        return None

    def _gate_answered(
        self,
        refused: bool,
        session: Session,
        stanza: domish.Element,
        recipient: JID,
        following: int,
    ) -> defer.Deferred | None:
        if refused:
            return None
        # A Deferred returned here holds up the first one until the next gates are passed.
        return self._pass_gates(session, stanza, recipient, following)

    def _dispatch(self, session: Session, stanza: domish.Element, recipient: JID) -> None:
        component = self.components.get(recipient.host)
        if component is not None:
            component(session, stanza, recipient)
        elif stanza.name == "presence":
            self.presence.handle(session, stanza)
        elif stanza.name == "iq" and recipient.resource is None:
            self._handle_iq(session, stanza, recipient)
        elif recipient.host not in self.domains:
            reply_error(session, stanza, "remote-server-not-found")
        elif stanza.name == "message":
            routing = self.messages.route(session, stanza, recipient)
            if routing is not None:
                routing.addErrback(self._routing_failed, session, stanza)
                self.routing.track(routing)
        else:
            target = self.sessions.session(recipient)
            if target is not None:
                target.send(stanza)
            else:
                reply_error(session, stanza, "service-unavailable")

    @staticmethod
    def _routing_failed(failure: Failure, session: Session, stanza: domish.Element) -> None:
        log_request_failure(log, failure, "routing a stanza from {jid}", jid=session.jid.full())
        reply_error(session, stanza, "internal-server-error")

    def _handle_iq(self, session: Session, iq: domish.Element, target: JID) -> None:
        kind = iq.getAttribute("type")
        if kind in ("result", "error"):
            self._answer_query(session, iq, target)
            return
        if kind not in ("get", "set") or not iq.getAttribute("id"):
            reply_error(session, iq, "bad-request", "An IQ request has an id and a type")
            return
        payloads = list(iq.elements())
        if len(payloads) != 1:
            reply_error(session, iq, "bad-request", "An IQ request has exactly one payload")
            return
        if target.user is None and target.host in self.domains:
            table = self.server_iq
        elif target.user is not None and target.host in self.domains:
            table = self.account_iq
        else:
            reply_error(session, iq, "remote-server-not-found")
            return
        handler = table.get((payloads[0].uri, payloads[0].name))
        if handler is None:
            reply_error(session, iq, "service-unavailable")
            return
        result = defer.maybeDeferred(handler, session, iq, target)
        result.addCallbacks(
            self._send_iq_result,
            self._send_iq_error,
            callbackArgs=(session, iq),
            errbackArgs=(session, iq),
        )

    @staticmethod
    def _send_iq_result(
        result: domish.Element | str | None, session: Session, iq: domish.Element
    ) -> None:
        session.send(result if result is not None else xmlstream.toResponse(iq, "result"))

    @staticmethod
    def _send_iq_error(failure: Failure, session: Session, iq: domish.Element) -> None:
        if failure.check(error.StanzaError):
            session.send(error_response(failure.value, iq))
            return
        log_request_failure(log, failure, "handling IQ from {jid}", jid=iq.getAttribute("from"))
        reply_error(session, iq, "internal-server-error")

    # -- the server's own requests to clients -----------------------------------------------

    def query(self, session: Session, iq: domish.Element, timeout: float = 30.0) -> defer.Deferred:
        """Send an IQ get/set from the server to a session; fires with the result <iq/>.

        Fails with StanzaError (built from an error reply) or IqTimeout.
        """
        query_id = "mim-" + secrets.token_hex(6)
        iq["id"] = query_id
        iq["to"] = session.jid.full()
        iq["from"] = session.jid.host
        pending: defer.Deferred = defer.Deferred(lambda _: self._queries.pop(query_id, None))
        self._queries[query_id] = (iq["to"], pending)
        timer = self.clock.callLater(timeout, self._query_timed_out, query_id)
        pending.addBoth(lambda result: (timer.active() and timer.cancel(), result)[1])
        session.send(iq)
        return pending

    def _answer_query(self, session: Session, iq: domish.Element, target: JID) -> None:
        asked, pending = self._queries.get(iq.getAttribute("id", ""), (None, None))
        # Only the session that was asked can answer, and only to the server itself.
        if asked != iq["from"] or target.user is not None or target.host != session.jid.host:
            return
        del self._queries[iq["id"]]
        if iq["type"] == "result":
            pending.callback(iq)
        else:
            pending.errback(error.exceptionFromStanza(iq))

    def _query_timed_out(self, query_id: str) -> None:
        _, pending = self._queries.pop(query_id, (None, None))
        if pending is not None:
            pending.errback(IqTimeout(query_id))

    def session_ended(self, session: Session) -> None:
        self.presence.session_ended(session)
        self.hooks.run(hooks.SESSION_ENDED, session)
