"""XEP-0280 Message Carbons: a user's other clients get copies of the chats of each of them.

A session turns carbons on and off with <enable/> and <disable/> (§4, §5). Then, for each
eligible message (`eligible`, §6) that another resource of its account sends, it gets a <sent/>
copy, and for each eligible message delivered to another resource of its account and not to it,
a <received/> copy: the original in a XEP-0297 <forwarded/>, in a message from the account's bare
JID (§7). A resource that was sent the message itself gets no copy, so a message to a bare JID
that reached every resource is copied nowhere.
"""

from collections.abc import Iterable
from typing import TYPE_CHECKING

from twisted.words.protocols.jabber import error
from twisted.words.protocols.jabber.jid import JID
from twisted.words.xish import domish

from mim_twisted import hooks
from mim_twisted.im.sessions import Session, SessionManager

if TYPE_CHECKING:
    from mim_twisted.im.disco import DiscoService
    from mim_twisted.im.messages import MessageRouter
    from mim_twisted.im.router import Router

NS_CARBONS = "urn:xmpp:carbons:2"
NS_FORWARD = "urn:xmpp:forward:0"
NS_HINTS = "urn:xmpp:hints"  # XEP-0334 <no-copy/>
NS_CHAT_STATES = "http://jabber.org/protocol/chatstates"  # XEP-0085
NS_RECEIPTS = "urn:xmpp:receipts"  # XEP-0184


def eligible(message: domish.Element) -> bool:
    """Whether a message is copied (§6): chat, normal with a body, or a chat state or receipt,
    unless it says <private/> or <no-copy/> or is itself a carbon (a loop, or a forgery)."""
    children = [(child.uri, child.name) for child in message.elements()]
    if (NS_CARBONS, "private") in children or (NS_HINTS, "no-copy") in children:
        return False
    if any(uri == NS_CARBONS for uri, _ in children):
        return False
    to = message.getAttribute("to")
    if to is None or _bare(message.getAttribute("from")) == _bare(to):
        return False  # to the account itself (no 'to' is its bare JID): each resource is a party
    kind = message.getAttribute("type", "normal")
    if kind == "chat":
        return True
    if kind != "normal":
        return False  # groupchat has its own copies (MUC), headline and error are not chats
    return any(name == "body" or uri in (NS_CHAT_STATES, NS_RECEIPTS) for uri, name in children)


def _bare(jid: str | None) -> str | None:
    return None if jid is None else jid.split("/", 1)[0].lower()


def carbon_copy(message: domish.Element, direction: str, to: JID) -> domish.Element:
    """The copy of `message` for the full JID `to`: <sent/> or <received/>, from the bare JID."""
    copy = domish.Element((None, "message"))
    copy["from"] = to.userhost()
    copy["to"] = to.full()
    copy["type"] = message.getAttribute("type", "normal")
    forwarded = copy.addElement((NS_CARBONS, direction)).addElement((NS_FORWARD, "forwarded"))
    # Serialised, not adopted: the original is still being routed, and keeps its parent.
    # A client's stanzas are parsed in jabber:client, which toXml() then declares.
    forwarded.addRawXml(message.toXml())
    return copy


class Carbons:
    """The copies of the messages of carbon-enabled sessions."""

    def __init__(self, sessions: SessionManager) -> None:
        self.sessions = sessions
        # The local sessions that have carbons on, by account (its bare JID as text). An
        # account with none, and no session on another node (whose node decides for it), gets
        # no copies: that is known without walking its sessions, for each message sent and
        # delivered.
        self._enabled: dict[str, set[Session]] = {}

    def install(
        self,
        router: "Router",
        messages: "MessageRouter",
        disco: "DiscoService",
        hooks_table: hooks.Hooks,
    ) -> None:
        for name in ("enable", "disable"):
            # Clients send them with no 'to' (to their own account); some to the server.
            router.account_iq[NS_CARBONS, name] = self.handle_iq
            router.server_iq[NS_CARBONS, name] = self.handle_iq
        messages.sent_listeners.append(self.sent)
        messages.delivery_listeners.append(self.delivered)
        hooks_table.add(hooks.SESSION_ENDED, self.session_ended)
        disco.add_server_feature(NS_CARBONS)

    def handle_iq(self, session: Session, iq: domish.Element, target: JID) -> None:
        if target.user is not None and target.userhost() != session.jid.userhost():
            raise error.StanzaError("forbidden", text="Carbons are enabled for oneself")
        if iq.getAttribute("type") != "set":
            raise error.StanzaError("bad-request", text="Carbons are switched with type 'set'")
        payload = next(iq.elements())
        session.carbons = payload.name == "enable"
        if session.carbons:
            self._enabled.setdefault(session.jid.userhost(), set()).add(session)
        else:
            self.session_ended(session)

    def session_ended(self, session: Session) -> None:
        account = session.jid.userhost()
        enabled = self._enabled.get(account)
        if enabled is not None:
            enabled.discard(session)
            if not enabled:
                del self._enabled[account]

    def sent(self, sender: Session, message: domish.Element) -> None:
        """A local session sent a message: its account's other interested resources see it."""
        others = [s for s in self._interested(sender.jid) if s is not sender]
        if others and eligible(message):
            self._send_copies(message, "sent", others)

    def delivered(self, recipients: list[Session], message: domish.Element) -> None:
        """A message was delivered to `recipients`, resources of one account."""
        if not recipients:
            return
        others = [s for s in self._interested(recipients[0].jid) if s not in recipients]
        if others and eligible(message):
            self._send_copies(message, "received", others)

    def _interested(self, jid: JID) -> list[Session]:
        if jid.userhost() not in self._enabled and not self.sessions.has_remote_sessions(jid):
            return []
        return [s for s in self.sessions.sessions_of(jid.userhostJID()) if s.carbons]

    @staticmethod
    def _send_copies(message: domish.Element, direction: str, sessions: Iterable[Session]) -> None:
        for session in sessions:
            copy = carbon_copy(message, direction, session.jid)
            waiting = session.held_messages
            if waiting is None:
                session.send(copy)
            else:
                waiting.append(copy)  # behind the stored messages still on their way
