"""Message routing between local users (RFC 6121 §8.5), with offline storage (XEP-0160).

To a full JID: that session (§8.5.3.1), or — when the resource is gone (§8.5.3.2.1) — as if to
the bare JID for chat, <service-unavailable/> for normal and groupchat, nothing for headline. To
a bare JID: chat and normal go to the available resources with the highest non-negative
priority, or are stored offline; headline goes to all non-negative resources or is dropped;
groupchat gets <service-unavailable/> (§8.5.2). So does any message to an account that does not
exist (§8.5.1). Errors are never answered, and go nowhere but to an exact full JID.
"""

from collections import Counter
from collections.abc import Callable

from twisted.internet import defer
from twisted.logger import Logger
from twisted.words.protocols.jabber.jid import JID
from twisted.words.xish import domish

from mim_twisted import hooks
from mim_twisted.im.offline import OfflineDelivery
from mim_twisted.im.sessions import Session, SessionManager
from mim_twisted.im.stanzas import reply_error
from mim_twisted.storage.interfaces import IAccountStore
from mim_twisted.xmpp.serialise import to_bytes

log = Logger()

# RFC 6121 §5.2.2: a message with no 'type', or one that is not understood, is "normal".
TYPES = frozenset(("normal", "chat", "headline", "groupchat", "error"))


class MessageRouter:
    def __init__(
        self,
        sessions: SessionManager,
        accounts: IAccountStore,
        offline: OfflineDelivery,
        hooks_table: hooks.Hooks,
    ) -> None:
        self.sessions = sessions
        self.accounts = accounts
        self.offline = offline
        self.hooks = hooks_table
        # Messages by outcome, for the metrics: "delivered" (per session), "offline", "bounced".
        self.outcomes: Counter[str] = Counter()
        # Called with (sender, message) for each message a local session sends, and with
        # (sessions, message) for each delivery to sessions of one account: carbons copy the
        # message to the account's other sessions. Called directly, unlike the hooks, which
        # are for extensions.
        self.sent_listeners: list[Callable[[Session, domish.Element], None]] = []
        self.delivery_listeners: list[Callable[[list[Session], domish.Element], None]] = []

    def route(
        self, sender: Session, message: domish.Element, recipient: JID
    ) -> defer.Deferred | None:
        """Route a message from a local session to a local JID.

        A message to an online user is delivered at once (None is returned: no Deferred or
        coroutine on the hot path); otherwise the database is asked, and the Deferred returned.
        """
        for listener in self.sent_listeners:
            listener(sender, message)
        if self.hooks.has_handlers(hooks.MESSAGE_SENT):
            self.hooks.run(hooks.MESSAGE_SENT, sender, message)
        kind = message.getAttribute("type", "normal")
        if kind not in TYPES:
            kind = "normal"
        full = recipient.resource is not None
        if full:
            session = self.sessions.session(recipient)
            if session is not None:
                self._deliver([session], message)
                return
        if kind == "error":
            return
        bare = recipient.userhostJID()
        sessions = self.sessions.sessions_of(bare)
        if not sessions:
            return defer.ensureDeferred(self._to_account(sender, message, bare, kind, full))
        return self._to_sessions(sender, message, bare, kind, full, sessions)

    async def _to_account(
        self, sender: Session, message: domish.Element, bare: JID, kind: str, full: bool
    ) -> None:
        """No session of the user is connected: does the account exist at all?"""
        if not await self.accounts.account_exists(bare.host, bare.user):
            self.outcomes["bounced"] += 1
            reply_error(sender, message, "service-unavailable")
            return
        # The user may have come online while the database answered.
        sessions = self.sessions.sessions_of(bare)
        keeping = self._to_sessions(sender, message, bare, kind, full, sessions)
        if keeping is not None:
            await keeping

    def _to_sessions(
        self,
        sender: Session,
        message: domish.Element,
        bare: JID,
        kind: str,
        full: bool,
        sessions: list[Session],
    ) -> defer.Deferred | None:
        if kind == "groupchat" or (full and kind == "normal"):
            self.outcomes["bounced"] += 1
            reply_error(sender, message, "service-unavailable")
            return None
        if kind == "headline":
            if not full:
                self._deliver(available(sessions), message)
            return None
        recipients = highest_priority(sessions)
        if recipients:
            self._deliver(recipients, message)
            return None
        keeping = self.offline.keep(bare, message)
        return keeping.addCallback(self._kept, sender, message)

    def redeliver(self, bare: JID, message: domish.Element) -> defer.Deferred | None:
        """A message that a session of `bare` ended without acknowledging (XEP-0198), sent on
        as if to the bare JID: to the available resources with the highest priority, through
        the same delivery as a live message (behind their held offline messages, with carbons),
        or else into offline storage: then the Deferred returned fires with whether it was
        stored."""
        recipients = highest_priority(self.sessions.sessions_of(bare))
        if recipients:
            self._deliver(recipients, message)
            return None
        return self.offline.keep(bare, message)

    def _kept(self, stored: bool, sender: Session, message: domish.Element) -> None:
        self.outcomes["offline" if stored else "bounced"] += 1
        if not stored:
            reply_error(sender, message, "resource-constraint", "Offline storage is full")

    def _deliver(self, sessions: list[Session], message: domish.Element) -> None:
        data = to_bytes(message)  # serialised once
        self.outcomes["delivered"] += len(sessions)
        for session in sessions:
            waiting = session.held_messages
            if waiting is None:
                session.send(data)
            else:
                waiting.append(message)  # behind the stored messages still on their way
        for listener in self.delivery_listeners:
            listener(sessions, message)
        if self.hooks.has_handlers(hooks.MESSAGE_DELIVERED):
            for session in sessions:
                self.hooks.run(hooks.MESSAGE_DELIVERED, session, message)


# Available from the moment the server received the presence (PresenceService.handle), with a
# non-negative priority: the sessions that messages to the bare JID may go to.


def available(sessions: list[Session]) -> list[Session]:
    return [s for s in sessions if s.message_priority is not None and s.message_priority >= 0]


def highest_priority(sessions: list[Session]) -> list[Session]:
    """The available sessions with the highest priority among them (RFC 6121 §8.5.2.1.1)."""
    top = 0
    chosen: list[Session] = []
    for session in sessions:
        priority = session.message_priority
        if priority is None or priority < top:
            continue
        if priority > top:
            top = priority
            chosen = [session]
        else:
            chosen.append(session)
    return chosen
