"""Small helpers for answering stanzas, shared by the IM core's modules."""

from twisted.words.protocols.jabber import error, xmlstream
from twisted.words.xish import domish

from mim_twisted.im.sessions import Session
from mim_twisted.xmpp.stanza_errors import error_response


def reply_error(
    session: Session, stanza: domish.Element, condition: str, text: str | None = None
) -> None:
    """Answer a stanza with an error unless it is an error or IQ result (RFC 6120 §8.3.1)."""
    if stanza.getAttribute("type") in ("error", "result"):
        return
    session.send(error_response(error.StanzaError(condition, text=text), stanza))


def error_without_request(
    request: domish.Element, condition: str, text: str | None = None
) -> domish.Element:
    """An error reply that does not copy the request back (optional, RFC 6120 §8.3.1), for a
    request refused for its size, whose copy would only double it."""
    response = xmlstream.toResponse(request, "error")
    response.addChild(error.StanzaError(condition, text=text).getElement())
    return response
