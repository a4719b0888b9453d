"""Message routing between local users (RFC 6121 §8.5), with offline storage (XEP-0160).

To a full JID: that session, or — when the resource is gone — as if to the bare JID for
normal/chat/headline. To a bare JID: chat and normal go to the available resources with the
highest non-negative priority, or are stored offline; headline goes to all non-negative
resources or is dropped; groupchat and unknown accounts get <service-unavailable/>.
"""

from typing import Any

from twisted.logger import Logger
from twisted.words.protocols.jabber.jid import JID
from twisted.words.xish import domish

from mim_twisted import hooks
from mim_twisted.im.offline import OfflineDelivery
from mim_twisted.im.sessions import SessionManager
from mim_twisted.im.stanzas import reply_error
from mim_twisted.storage.interfaces import IAccountStore

log = Logger()

STORED_TYPES = frozenset(("normal", "chat"))


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

    async def route(self, sender: Any, message: domish.Element, recipient: JID) -> None:
        """Route a message from a local session to a local JID."""
        if self.hooks.has_handlers(hooks.MESSAGE_SENT):
            self.hooks.run(hooks.MESSAGE_SENT, sender, message)
        kind = message.getAttribute("type", "normal")
        if recipient.resource is not None:
            session = self.sessions.session(recipient)
            if session is not None:
                self._deliver([session], message)
                return
            if kind in ("groupchat", "error"):
                if kind == "groupchat":
                    reply_error(sender, message, "service-unavailable")
                return
        await self._to_bare(sender, message, recipient.userhostJID(), kind)

    async def _to_bare(self, sender: Any, message: domish.Element, bare: JID, kind: str) -> None:
        available = [
            s for s in self.sessions.sessions_of(bare) if s.presence is not None and s.priority >= 0
        ]
        if kind == "headline":
            self._deliver(available, message)
            return
        if kind == "error":
            return
        if kind == "groupchat":
            reply_error(sender, message, "service-unavailable")
            return
        if available:
            top = max(s.priority for s in available)
            self._deliver([s for s in available if s.priority == top], message)
            return
        if not await self.accounts.account_exists(bare.host, bare.user):
            reply_error(sender, message, "service-unavailable")
        elif kind in STORED_TYPES and not await self.offline.keep(bare, message):
            reply_error(sender, message, "resource-constraint", "Offline storage is full")

    def _deliver(self, sessions: list, message: domish.Element) -> None:
        data = message.toXml(defaultUri="jabber:client").encode("utf-8")  # serialised once
        for session in sessions:
            session.send(data)
        if self.hooks.has_handlers(hooks.MESSAGE_DELIVERED):
            for session in sessions:
                self.hooks.run(hooks.MESSAGE_DELIVERED, session, message)
