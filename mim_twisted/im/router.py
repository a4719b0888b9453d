"""Routing of stanzas from bound sessions: to the server's own IQ handlers or to other sessions.

IQ handlers are looked up by the (namespace, name) of the request's payload. A handler returns
the result element, a Deferred firing with it, or raises a StanzaError; an IQ get/set nobody
handles is answered with <service-unavailable/>, so nothing is silently dropped.
"""

from collections.abc import Callable
from typing import Any

from twisted.internet import defer
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.words.protocols.jabber import error
from twisted.words.protocols.jabber.jid import JID, InvalidFormat, internJID
from twisted.words.xish import domish

from mim_twisted.im.sessions import SessionManager

log = Logger()

IqHandler = Callable[[Any, domish.Element], "domish.Element | defer.Deferred | None"]


def iq_payload(iq: domish.Element) -> domish.Element | None:
    return next(iq.elements(), None)


def reply_error(
    session: Any, stanza: domish.Element, condition: str, text: str | None = None
) -> None:
    """Answer a stanza with an error unless it is an error or IQ result (RFC 6120 §8.3.1)."""
    if stanza.getAttribute("type") in ("error", "result"):
        return
    session.send(error.StanzaError(condition, text=text).toResponse(stanza))


class Router:
    """Routes the stanzas of local sessions."""

    def __init__(self, domains: frozenset[str], sessions: SessionManager) -> None:
        self.domains = domains
        self.sessions = sessions
        self.iq_handlers: dict[tuple[str, str], IqHandler] = {}

    def add_iq_handler(self, namespace: str, name: str, handler: IqHandler) -> None:
        self.iq_handlers[(namespace, name)] = handler

    def route_from_client(self, session: Any, stanza: domish.Element) -> None:
        to = stanza.getAttribute("to")
        try:
            recipient = internJID(to) if to else None
        except (InvalidFormat, UnicodeError):
            reply_error(session, stanza, "jid-malformed")
            return
        if stanza.name == "iq" and (
            recipient is None
            or (recipient.user is None and recipient.resource is None)
            or recipient == session.jid.userhostJID()
        ):
            self._handle_iq(session, stanza)
        elif recipient is None:
            return
        elif recipient.host not in self.domains:
            reply_error(session, stanza, "remote-server-not-found")
        else:
            self._deliver_local(session, recipient, stanza)

    def _deliver_local(self, sender: Any, recipient: JID, stanza: domish.Element) -> None:
        target = self.sessions.session(recipient) if recipient.resource else None
        if target is not None:
            target.send(stanza)
        elif stanza.name != "presence":
            reply_error(sender, stanza, "service-unavailable")

    def _handle_iq(self, session: Any, iq: domish.Element) -> None:
        kind = iq.getAttribute("type")
        if kind not in ("get", "set"):
            if kind not in ("result", "error"):
                reply_error(session, iq, "bad-request", "Unknown IQ type")
            return
        payload = iq_payload(iq)
        if payload is None or not iq.getAttribute("id"):
            reply_error(session, iq, "bad-request", "An IQ request has an id and one payload")
            return
        handler = self.iq_handlers.get((payload.uri, payload.name))
        if handler is None:
            reply_error(session, iq, "service-unavailable")
            return
        result = defer.maybeDeferred(handler, session, iq)
        result.addCallbacks(
            self._send_iq_result, self._send_iq_error, (session, iq), None, (session, iq)
        )

    @staticmethod
    def _send_iq_result(result: domish.Element | None, session: Any, iq: domish.Element) -> None:
        if result is None:
            result = domish.Element((None, "iq"))
            result["type"] = "result"
            result["id"] = iq["id"]
        result["to"] = iq["from"]
        if iq.hasAttribute("to"):
            result["from"] = iq["to"]
        session.send(result)

    @staticmethod
    def _send_iq_error(failure: Failure, session: Any, iq: domish.Element) -> None:
        if failure.check(error.StanzaError):
            session.send(failure.value.toResponse(iq))
            return
        log.failure("handling IQ from {jid}", failure, jid=iq["from"])
        reply_error(session, iq, "internal-server-error")

    def session_ended(self, session: Any) -> None:
        """Issue-3 territory (unavailable presence); nothing to do yet."""
