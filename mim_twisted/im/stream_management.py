"""XEP-0198 Stream Management: acknowledged stanzas and sessions that survive a lost connection.

`StanzaLedger` is the pure bookkeeping of one session: the stanzas handled from the client, and
the stanzas sent to it that it has not acknowledged yet, all counted modulo 2^32 as the XEP
says. `StreamManagement` is the service: it answers <enable/>, <r/> and <a/>, asks the client
for acknowledgements, keeps a resumable session whose connection broke abruptly ("detached")
for `resume_timeout` seconds, resumes it on a new stream, and, when a session ends for good,
treats the stanzas it never acknowledged as undelivered (RFC 6121 §8.5): messages go to
another resource or offline storage, IQ requests get an error back, presence is dropped.

A detached session stays in the session table and keeps its presence: its contacts see no
change, and what is routed to it waits in the ledger until it resumes or times out. Only when
it times out does it end (unavailable presence, the SESSION_ENDED hook).
"""

import secrets
from collections import deque
from dataclasses import dataclass
from typing import TYPE_CHECKING

from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.logger import Logger
from twisted.words.protocols.jabber import error
from twisted.words.protocols.jabber.jid import JID, InvalidFormat
from twisted.words.xish import domish

from mim_twisted.inflight import InFlight
from mim_twisted.xmpp.connection import ClientConnection
from mim_twisted.xmpp.namespaces import SM, STANZAS
from mim_twisted.xmpp.serialise import to_xml
from mim_twisted.xmpp.stanza_errors import error_response

if TYPE_CHECKING:
    from mim_twisted.im.messages import MessageRouter
    from mim_twisted.im.sessions import Session, SessionManager

log = Logger()

SEQUENCE_MODULUS = 2**32
# The server asks for an acknowledgement once this many stanzas are unacknowledged, or this
# many seconds after it sent one that is: enough to keep the ledger short without an <r/> per
# stanza.
ACK_REQUEST_AFTER = 5
ACK_REQUEST_DELAY = 1.0
# A session over its limits (StreamManagementSettings) is asked for an acknowledgement and
# ended only if it is still over them this many seconds later: a burst sent in one go, such
# as the presence and offline messages at login, reaches the limits before the client could
# have acknowledged any of it. A detached session, which no one can ask, ends at once.
OVERFLOW_GRACE = 30.0

Stanza = domish.Element | bytes | str


@dataclass(frozen=True)
class StreamManagementSettings:
    resume_timeout: float = 300.0  # seconds a detached session waits for its client
    max_unacked: int = 1000  # stanzas a session may hold unacknowledged
    max_unacked_bytes: int = 4194304  # and their size, serialised


class HandledCountTooHigh(Exception):
    """The client acknowledged more stanzas than it was sent."""

    def __init__(self, h: int, sent: int) -> None:
        super().__init__(f"h={h} but only {sent} stanzas were sent")
        self.h = h
        self.sent = sent


class StanzaLedger:
    """What one session counts: stanzas handled from the client, stanzas it has not acked."""

    def __init__(self, resumable: bool) -> None:
        self.resumable = resumable
        self.handled = 0  # stanzas from the client, modulo 2^32 (our h)
        self.sent = 0  # stanzas to the client, modulo 2^32
        self.unacked: deque[Stanza] = deque()
        self.unacked_bytes = 0  # their size, serialised: what they hold in memory

    def stanza_handled(self) -> None:
        self.handled = (self.handled + 1) % SEQUENCE_MODULUS

    def stanza_sent(self, stanza: Stanza) -> None:
        self.sent = (self.sent + 1) % SEQUENCE_MODULUS
        self.unacked.append(stanza)
        self.unacked_bytes += stanza_size(stanza)

    def acknowledge(self, h: int) -> None:
        """The client has handled `h` stanzas in all: forget those up to there."""
        acked = (self.sent - len(self.unacked)) % SEQUENCE_MODULUS
        newly = (h - acked) % SEQUENCE_MODULUS
        if newly > len(self.unacked):
            raise HandledCountTooHigh(h, self.sent)
        for _ in range(newly):
            self.unacked_bytes -= stanza_size(self.unacked.popleft())

    def take_unacked(self) -> list[Stanza]:
        unacked = list(self.unacked)
        self.unacked.clear()
        self.unacked_bytes = 0
        return unacked


def stanza_size(stanza: Stanza) -> int:
    """Bytes or characters; a session serialises what it keeps, so an element is rare here."""
    if isinstance(stanza, domish.Element):
        return len(to_xml(stanza))
    return len(stanza)


def sm_element(name: str, **attributes: str) -> domish.Element:
    element = domish.Element((SM, name))
    for key, value in attributes.items():
        element[key] = value
    return element


def stream_feature() -> domish.Element:
    """<sm/> among the stream features after authentication."""
    return sm_element("sm")


def failed(condition: str, **attributes: str) -> domish.Element:
    element = sm_element("failed", **attributes)
    element.addElement((STANZAS, condition))
    return element


def sequence_number(value: str | None) -> int | None:
    """An 'h' attribute: an unsigned 32-bit integer, None when it is not one."""
    if value is None or not value.isdigit():
        return None
    number = int(value)
    return number if number < SEQUENCE_MODULUS else None


def parse_stanza(data: bytes | str) -> domish.Element:
    """A stanza as serialised for a client, parsed back in the jabber:client namespace."""
    if isinstance(data, str):
        data = data.encode("utf-8")
    parsed: list[domish.Element] = []
    stream = domish.elementStream()
    stream.DocumentStartEvent = lambda root: None
    stream.ElementEvent = parsed.append
    stream.DocumentEndEvent = lambda: None
    stream.parse(b"<stream xmlns='jabber:client'>" + data + b"</stream>")
    return parsed[0]


class StreamManagement:
    """The XEP-0198 service of the IM core."""

    def __init__(
        self,
        settings: StreamManagementSettings,
        sessions: "SessionManager",
        messages: "MessageRouter",
        clock: IReactorTime,
        in_flight: InFlight,
    ) -> None:
        self.settings = settings
        self.sessions = sessions
        self.messages = messages
        self.clock = clock
        self._resumable: dict[str, Session] = {}  # by stream management id
        self._timers: dict[Session, IDelayedCall] = {}  # resumption deadlines, ack requests
        self._overflow_deadlines: dict[Session, IDelayedCall] = {}  # sessions over the limits
        self.in_flight = in_flight  # undelivered messages being stored: a stop waits for them
        # Counted for the metrics.
        self.resumptions = 0
        self.timeouts = 0
        self.failed_resumptions = 0

    # -- elements from a bound session's stream ----------------------------------------------

    def element_received(self, session: "Session", element: domish.Element) -> None:
        """<enable/>, <r/> or <a/> on the session's current connection."""
        ledger = session.ledger
        if element.name == "enable":
            self._enable(session, element)
        elif element.name == "r" and ledger is not None:
            session.send_nonza(sm_element("a", h=str(ledger.handled)))
        elif element.name == "a" and ledger is not None:
            self._acknowledged(session, element)
        elif element.name in ("r", "a", "resume"):
            # Acks before <enable/>; <resume/> on a stream that has bound a resource.
            session.send_nonza(failed("unexpected-request"))
        else:
            session.stream_error("unsupported-stanza-type", f"Unexpected <{element.name}/>")

    def _enable(self, session: "Session", element: domish.Element) -> None:
        if session.ledger is not None:
            session.send_nonza(failed("unexpected-request"))
            return
        resumable = element.getAttribute("resume") in ("true", "1")
        session.ledger = StanzaLedger(resumable)
        enabled = sm_element("enabled")
        if resumable:
            session.resumption_id = secrets.token_urlsafe(18)
            self._resumable[session.resumption_id] = session
            enabled["id"] = session.resumption_id
            enabled["resume"] = "true"
            enabled["max"] = str(int(self.settings.resume_timeout))
        session.send_nonza(enabled)

    def _acknowledged(self, session: "Session", element: domish.Element) -> None:
        h = sequence_number(element.getAttribute("h"))
        if h is None:
            session.stream_error("invalid-xml", "<a/> needs an unsigned 32-bit 'h'")
            return
        try:
            session.ledger.acknowledge(h)
        except HandledCountTooHigh as e:
            # XEP-0198 §4: undefined-condition with <handled-count-too-high/>.
            too_high = sm_element(
                "handled-count-too-high", h=str(e.h), **{"send-count": str(e.sent)}
            )
            session.stream_error("undefined-condition", str(e), too_high)
            return
        session.ack_requested = False
        if not self._over_limits(session.ledger):
            self._cancel_overflow_deadline(session)
        if session.ledger.unacked:
            self._schedule_ack_request(session)

    # -- stanzas to the session ----------------------------------------------------------

    def stanza_sent(self, session: "Session", stanza: Stanza) -> None:
        """A stanza went to the session (or, detached, waits for it): it is now unacknowledged."""
        ledger = session.ledger
        ledger.stanza_sent(stanza)
        if self._over_limits(ledger) and session not in self._overflow_deadlines:
            # Ended from the reactor, never inside a send: whoever sends a batch (offline
            # delivery) sends it all to a session that is still there, its ledger in order.
            grace = 0.0 if session.connection is None else OVERFLOW_GRACE
            self._overflow_deadlines[session] = self.clock.callLater(
                grace, self._overflow_deadline_passed, session
            )
        if session.connection is None or session.ack_requested:
            return
        if len(ledger.unacked) >= ACK_REQUEST_AFTER:
            self._request_ack(session)
        else:
            self._schedule_ack_request(session)

    def _over_limits(self, ledger: StanzaLedger) -> bool:
        return (
            len(ledger.unacked) > self.settings.max_unacked
            or ledger.unacked_bytes > self.settings.max_unacked_bytes
        )

    def _overflow_deadline_passed(self, session: "Session") -> None:
        del self._overflow_deadlines[session]
        if session.ledger is None or not self._over_limits(session.ledger):
            return
        log.info(
            "{jid}: more than {limit} stanzas or {size} bytes unacknowledged, ending the session",
            jid=session.jid.full(),
            limit=self.settings.max_unacked,
            size=self.settings.max_unacked_bytes,
        )
        # XEP-0198 leaves the policy to the server; a full queue is a resource we ran out of.
        session.stream_error("resource-constraint", "Too many unacknowledged stanzas")

    def _cancel_overflow_deadline(self, session: "Session") -> None:
        deadline = self._overflow_deadlines.pop(session, None)
        if deadline is not None and deadline.active():
            deadline.cancel()

    def _schedule_ack_request(self, session: "Session") -> None:
        if session not in self._timers:
            self._timers[session] = self.clock.callLater(
                ACK_REQUEST_DELAY, self._request_ack, session
            )

    def _request_ack(self, session: "Session") -> None:
        self._cancel_timer(session)
        if session.connection is None or session.ledger is None or not session.ledger.unacked:
            return
        session.ack_requested = True
        session.send_nonza(sm_element("r"))

    def _cancel_timer(self, session: "Session") -> None:
        timer = self._timers.pop(session, None)
        if timer is not None and timer.active():
            timer.cancel()

    # -- detaching and resuming ------------------------------------------------------------

    def detach(self, session: "Session") -> None:
        """The session's connection broke: keep it for `resume_timeout` seconds."""
        self._cancel_timer(session)
        session.ack_requested = False
        self._timers[session] = self.clock.callLater(
            self.settings.resume_timeout, self._timed_out, session
        )
        log.info(
            "{jid} detached, resumable for {timeout:g} s with {count} unacknowledged stanzas",
            jid=session.jid.full(),
            timeout=self.settings.resume_timeout,
            count=len(session.ledger.unacked),
        )

    def _timed_out(self, session: "Session") -> None:
        del self._timers[session]
        self.timeouts += 1
        log.info("{jid} was not resumed in time", jid=session.jid.full())
        session.end()

    def resume(
        self, connection: ClientConnection, user: JID, element: domish.Element
    ) -> "Session | None":
        """<resume/> on a new stream authenticated as `user`: the session, re-attached and
        sent what it did not acknowledge, or None when there is none to resume (<failed/>
        sent)."""
        session = self._resumable.get(element.getAttribute("previd", ""))
        h = sequence_number(element.getAttribute("h"))
        if session is None or session.closed or session.jid.userhostJID() != user:
            self.failed_resumptions += 1
            connection.send(failed("item-not-found"))
            return None
        if h is None:
            connection.send(failed("bad-request"))
            return None
        try:
            session.ledger.acknowledge(h)
        except HandledCountTooHigh as e:
            self.failed_resumptions += 1
            log.info("{jid}: resumption refused: {e}", jid=session.jid.full(), e=e)
            connection.send(failed("undefined-condition", h=str(session.ledger.handled)))
            return None
        self._cancel_timer(session)
        self.resumptions += 1
        previous = session.connection
        session.attach(connection)
        if previous is not None:
            # The client noticed a broken connection before we did: that stream is dead.
            previous.stream_error("conflict", "The session was resumed on another connection")
        connection.send(
            sm_element("resumed", previd=session.resumption_id, h=str(session.ledger.handled))
        )
        for stanza in session.ledger.unacked:
            connection.send(stanza)
        if session.ledger.unacked:
            self._request_ack(session)
        # A new stream starts active (XEP-0352): what an inactive client was spared follows.
        session.set_client_state(active=True)
        log.info(
            "{jid} resumed, {count} stanzas sent again",
            jid=session.jid.full(),
            count=len(session.ledger.unacked),
        )
        return session

    # -- the end of a session ----------------------------------------------------------------

    def stop(self) -> None:
        """The server stops (after its connections are closed): detached sessions end now.
        Storing what they, or the sessions whose connections closed, leave undelivered is
        tracked in `in_flight`, which the stop waits for before the database closes."""
        for session in [s for s in self._resumable.values() if s.connection is None]:
            session.end()

    def session_ended(self, session: "Session") -> None:
        """The session is over (unbound, unavailable): what it did not acknowledge was not
        delivered."""
        self._cancel_timer(session)
        self._cancel_overflow_deadline(session)
        if session.resumption_id is not None:
            self._resumable.pop(session.resumption_id, None)
        if session.ledger is None:
            return
        unacked = session.ledger.take_unacked()
        if unacked:
            log.info(
                "{jid} ended with {count} unacknowledged stanzas",
                jid=session.jid.full(),
                count=len(unacked),
            )
        for stanza in unacked:
            self._undelivered(session.jid, stanza)

    def _undelivered(self, jid: JID, stanza: Stanza) -> None:
        """RFC 6121 §8.5.3.2 / RFC 6120 §10.5.3.2: as if the resource had never been there."""
        if not isinstance(stanza, domish.Element):
            stanza = parse_stanza(stanza)
        kind = stanza.getAttribute("type")
        if stanza.name == "message":
            if kind in (None, "normal", "chat"):
                self._redeliver(jid.userhostJID(), stanza)
            elif kind == "groupchat":
                self._bounce(stanza, "service-unavailable")
            # headline and error: never stored, never answered (RFC 6121 §8.5.2, §8.5.3.2.1).
        elif stanza.name == "iq" and kind in ("get", "set"):
            self._bounce(stanza, "service-unavailable")
        # Presence is state, sent again at the next login; results and errors answer nothing.

    def _redeliver(self, bare: JID, message: domish.Element) -> None:
        keeping = self.messages.redeliver(bare, message)
        if keeping is None:
            return
        keeping.addCallback(self._kept, message)
        keeping.addErrback(lambda failure: log.failure("keeping an undelivered message", failure))
        self.in_flight.track(keeping)

    def _kept(self, stored: bool, message: domish.Element) -> None:
        if not stored:
            self._bounce(message, "resource-constraint")

    def _bounce(self, stanza: domish.Element, condition: str) -> None:
        """An error back to the sender, if it is a local session (errors go only there)."""
        try:
            sender = JID(stanza.getAttribute("from", ""))
        except InvalidFormat:
            return
        target = self.sessions.session(sender) if sender.resource else None
        if target is not None:
            target.send(error_response(error.StanzaError(condition), stanza))
