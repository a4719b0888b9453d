"""Offline messages (XEP-0160): kept while a user has no available resource, with an XEP-0203
delay stamp, and delivered at the user's next initial presence with a non-negative priority.

One user's store is written and emptied one operation at a time, in the order asked, so that a
message kept just before the user comes online is in the store when it is emptied. From the
moment the server receives such a presence (`hold`) until the stored messages have been sent
(`release`), the live messages routed to that session wait on it (`Session.held_messages`): the
older, stored ones go first.

A server that is the only one writing its store (one process, no cluster: every message is
kept through `keep`, every return through `_put_back`) remembers the users it knows to have
none stored (`remember_empty`): most logins find the store empty, and then ask it nothing.
"""

import datetime

from twisted.internet import defer
from twisted.logger import Logger
from twisted.words.protocols.jabber.jid import JID
from twisted.words.xish import domish

from mim_twisted.bounded import put_newest
from mim_twisted.im.locks import KeyedLock
from mim_twisted.im.sessions import Session
from mim_twisted.storage.interfaces import IOfflineStore, OfflineMessage
from mim_twisted.xmpp.serialise import to_bytes

log = Logger()

NS_DELAY = "urn:xmpp:delay"
# A held message that its session, closed meanwhile, will never get is kept unless of these types
# (RFC 6121 §8.5.2: they are never stored offline).
NEVER_KEPT = frozenset(("headline", "groupchat", "error"))
# Users known to have no stored messages, at most (the least recently emptied go first).
MAX_KNOWN_EMPTY = 100_000


def delay_stamp(moment: datetime.datetime) -> str:
    """XEP-0082 DateTime in UTC, as XEP-0203 wants it."""
    return moment.astimezone(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def _stamped_by(message: domish.Element, domain: str) -> bool:
    return any(
        delay.getAttribute("from") == domain for delay in message.elements(NS_DELAY, "delay")
    )


def _taken(session: Session) -> int:
    """1 if the stanza whose sending closed `session` is in its stream management ledger (it
    was sent while the session was open), else 0: it was lost with the connection."""
    return 1 if session.ledger is not None else 0


class OfflineDelivery:
    """Stores messages for offline users and hands them over when they come online."""

    def __init__(
        self, store: IOfflineStore, max_messages: int, *, remember_empty: bool = False
    ) -> None:
        self.store = store
        self.max_messages = max_messages
        self.locks = KeyedLock()  # by bare JID: one store operation at a time per user
        # Bare JIDs whose stored messages are known to be none (see the module docstring);
        # None when another writer may store some. Changed under the user's lock only.
        self._empty: dict[str, None] | None = {} if remember_empty else None

    def keep(self, recipient: JID, message: domish.Element) -> defer.Deferred:
        """Store a message for the bare JID; fires with False when the user's store is full.

        The delay stamp goes on a copy: the message, which a bounce may still echo, is left as
        it is.
        """
        record = self._record(recipient, message)
        return defer.ensureDeferred(self._store(recipient, [record], self.max_messages))

    @staticmethod
    def _record(recipient: JID, message: domish.Element) -> OfflineMessage:
        now = datetime.datetime.now(datetime.UTC)
        stamped = domish.Element(
            (message.uri, message.name),
            message.defaultUri,
            dict(message.attributes),
            dict(message.localPrefixes),
        )
        stamped.children = list(message.children)
        if not _stamped_by(message, recipient.host):
            # A message stored again (sent from the store, never acknowledged) keeps its
            # first stamp: the time it was first stored.
            delay = stamped.addElement((NS_DELAY, "delay"))
            delay["from"] = recipient.host
            delay["stamp"] = delay_stamp(now)
        return OfflineMessage(
            sender=message.getAttribute("from", ""),
            stanza=stamped.toXml(defaultUri="jabber:client"),
            stored_at=now,
        )

    async def _store(self, recipient: JID, records: list[OfflineMessage], limit: int) -> bool:
        async with self.locks.hold(recipient.userhost()):
            self._may_have_some(recipient.userhost())
            stored = True
            for record in records:
                stored = await self.store.store(recipient.host, recipient.user, record, limit)
            return stored

    def hold(self, session: Session) -> None:
        """The session's stored messages are due: live messages for it wait until `release`."""
        if session.held_messages is None:
            session.held_messages = []
        session.holds += 1

    async def release(self, session: Session) -> None:
        """One `hold` is over; after the last, the waiting messages go to the session.

        If it has closed meanwhile, they are kept, as if it had never been available.
        """
        session.holds -= 1
        if session.holds:
            return
        waiting, session.held_messages = session.held_messages, None
        for index, message in enumerate(waiting):
            if session.closed:
                await self._keep_undelivered(session.jid, waiting[index:])
                return
            session.send(to_bytes(message))
            if session.closed:
                await self._keep_undelivered(session.jid, waiting[index + _taken(session) :])
                return

    async def _keep_undelivered(self, jid: JID, messages: list[domish.Element]) -> None:
        kept = [
            self._record(jid, message)
            for message in messages
            if message.getAttribute("type") not in NEVER_KEPT
        ]
        log.info(
            "{jid} went away before {count} live messages were sent",
            jid=jid.full(),
            count=len(kept),
        )
        # Over the limit if need be: these were accepted already.
        await self._store(jid.userhostJID(), kept, len(kept) + self.max_messages)

    async def deliver(self, session: Session) -> None:
        """Send every stored message to the session (oldest first) and forget them.

        The messages leave the store before they are sent. Those that the session can no longer
        take, because it closed while the store was read or while they were being sent (a
        client too slow to read is cut off by `send`), go back into the store, in their order
        and ahead of any stored in the meantime; not the one whose sending closed it, if the
        session's stream management ledger took it (it deals with it, as with every stanza the
        client has not acknowledged).
        """
        jid = session.jid
        user = jid.userhost()
        async with self.locks.hold(user):
            if self._empty is not None and user in self._empty:
                return
            messages = await self.store.pop_all(jid.host, jid.user)
            for index, message in enumerate(messages):
                if session.closed:
                    await self._put_back(jid, messages[index:])
                    return
                session.send(message.stanza)
                if session.closed:
                    await self._put_back(jid, messages[index + _taken(session) :])
                    return
            self._has_none(user)

    def _has_none(self, user: str) -> None:
        if self._empty is not None:
            put_newest(self._empty, user, None, MAX_KNOWN_EMPTY)

    def _may_have_some(self, user: str) -> None:
        if self._empty is not None:
            self._empty.pop(user, None)

    async def _put_back(self, jid: JID, messages: list[OfflineMessage]) -> None:
        """Under the user's lock: nothing is stored in between."""
        self._may_have_some(jid.userhost())
        newer = await self.store.pop_all(jid.host, jid.user)
        log.info(
            "{jid} went away during offline delivery: {count} messages kept",
            jid=jid.full(),
            count=len(messages),
        )
        restored = [*messages, *newer]
        for message in restored:
            # Over the limit if need be: these were accepted already.
            await self.store.store(jid.host, jid.user, message, len(restored) + self.max_messages)
