"""Offline messages (XEP-0160): kept while a user has no available resource, with an XEP-0203
delay stamp, and delivered at the user's next initial presence with a non-negative priority."""

import datetime
from typing import Any

from twisted.internet import defer
from twisted.logger import Logger
from twisted.words.protocols.jabber.jid import JID
from twisted.words.xish import domish

from mim_twisted.storage.interfaces import IOfflineStore, OfflineMessage

log = Logger()

NS_DELAY = "urn:xmpp:delay"


def delay_stamp(moment: datetime.datetime) -> str:
    """XEP-0082 DateTime in UTC, as XEP-0203 wants it."""
    return moment.astimezone(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


class OfflineDelivery:
    """Stores messages for offline users and hands them over when they come online."""

    def __init__(self, store: IOfflineStore, max_messages: int) -> None:
        self.store = store
        self.max_messages = max_messages

    def keep(self, recipient: JID, message: domish.Element) -> defer.Deferred:
        """Store a message for the bare JID; fires with False when the user's store is full.

        The delay stamp goes on a copy: the message, which a bounce may still echo, is left as
        it is.
        """
        now = datetime.datetime.now(datetime.UTC)
        delay = domish.Element((NS_DELAY, "delay"))
        delay["from"] = recipient.host
        delay["stamp"] = delay_stamp(now)
        stamped = domish.Element(
            (message.uri, message.name),
            message.defaultUri,
            dict(message.attributes),
            dict(message.localPrefixes),
        )
        stamped.children = [*message.children, delay]
        record = OfflineMessage(
            sender=message.getAttribute("from", ""),
            stanza=stamped.toXml(defaultUri="jabber:client"),
            stored_at=now,
        )
        return self.store.store(recipient.host, recipient.user, record, self.max_messages)

    async def deliver(self, session: Any) -> None:
        """Send every stored message to the session (oldest first) and forget them.

        The messages leave the store before they are sent. Those that the session can no longer
        take, because it closed while the store was read or while they were being sent (a
        client too slow to read is cut off by `send`), go back into the store, in their order
        and ahead of any stored in the meantime.
        """
        jid = session.jid
        messages = await self.store.pop_all(jid.host, jid.user)
        for index, message in enumerate(messages):
            if not session.closed:
                session.send(message.stanza)
            if session.closed:
                await self._put_back(jid, messages[index:])
                return

    async def _put_back(self, jid: JID, messages: list[OfflineMessage]) -> None:
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
