"""Resource binding (RFC 6120 §7) and the legacy session establishment (RFC 3921 §3, optional)."""

import secrets
from typing import TYPE_CHECKING

from twisted.words.protocols.jabber import error, xmlstream
from twisted.words.protocols.jabber.jid import InvalidFormat
from twisted.words.xish import domish

from mim_twisted.xmpp import namespaces
from mim_twisted.xmpp.jids import parse_jid, resourceprep_cached, with_resource

if TYPE_CHECKING:
    from mim_twisted.xmpp.c2s import C2SStream

MAX_RESOURCE_BYTES = 1023


def _request_child(iq: domish.Element, uri: str, name: str) -> domish.Element | None:
    if iq.getAttribute("type") != "set":
        return None
    for child in iq.elements():
        if child.uri == uri and child.name == name:
            return child
    return None


def is_bind_request(iq: domish.Element) -> bool:
    return _request_child(iq, namespaces.BIND, "bind") is not None


def is_session_request(iq: domish.Element) -> bool:
    return _request_child(iq, namespaces.SESSION, "session") is not None


def session_result(iq: domish.Element) -> domish.Element:
    """Session establishment is a no-op kept for old clients: answer with an empty result."""
    return xmlstream.toResponse(iq, "result")


def bind_resource(stream: "C2SStream", iq: domish.Element) -> None:
    """Bind the requested or a generated resource; the stream reports it to the session table."""
    request = _request_child(iq, namespaces.BIND, "bind")
    requested = next((str(c) for c in request.elements(namespaces.BIND, "resource")), "").strip()
    try:
        # A generated resource is lowercase hex: already in resourceprep form.
        resource = resourceprep_cached(requested) if requested else secrets.token_hex(8)
        if len(resource.encode("utf-8")) > MAX_RESOURCE_BYTES:
            raise InvalidFormat("resource too long")
        jid = with_resource(parse_jid(f"{stream.username}@{stream.domain}"), resource)
    except (UnicodeError, InvalidFormat, ValueError):
        stream.send(error.StanzaError("bad-request", text="Invalid resource").toResponse(iq))
        return
    stream.bound(jid)
    result = xmlstream.toResponse(iq, "result")
    result.addElement((namespaces.BIND, "bind")).addElement("jid", content=jid.full())
    stream.send(result)
