"""XEP-0199 XMPP ping: the server answers pings sent to it, and to the sender's own account."""

from typing import TYPE_CHECKING

from twisted.words.protocols.jabber import error
from twisted.words.protocols.jabber.jid import JID
from twisted.words.xish import domish

from mim_twisted.im.sessions import Session

if TYPE_CHECKING:
    from mim_twisted.im.disco import DiscoService
    from mim_twisted.im.router import Router

NS_PING = "urn:xmpp:ping"


def install(router: "Router", disco: "DiscoService") -> None:
    router.server_iq[NS_PING, "ping"] = server_ping
    router.account_iq[NS_PING, "ping"] = account_ping
    disco.add_server_feature(NS_PING)


def server_ping(session: Session, iq: domish.Element, target: JID) -> None:
    """An empty result (§4.2); the router sends it."""
    if iq.getAttribute("type") != "get":
        raise error.StanzaError("not-allowed", text="A ping has type 'get'")


def account_ping(session: Session, iq: domish.Element, target: JID) -> None:
    """A ping with no 'to' (or to one's own bare JID) is a ping of one's own server (§4.2).

    Another account's bare JID is not answered for: whether it exists is none of the sender's
    business, and a client ping goes to a full JID (§4.3), which the router delivers.
    """
    if target.userhost() != session.jid.userhost():
        raise error.StanzaError("service-unavailable")
    server_ping(session, iq, target)
