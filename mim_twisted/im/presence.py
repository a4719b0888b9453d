"""Presence (RFC 6121 §4) and presence subscriptions (§3) for local users.

Broadcast presence goes to the contacts whose subscription lets them see it (from/both) and to
the user's own available resources; directed presence goes where it is addressed and is
remembered, so that going offline reaches it too. Probes stay inside the server: when a session
becomes available it is sent the current presence of every local contact it may see.

Subscription stanzas run through the pure state machine in `subscription.py` on each side:
outbound for the sender's roster, inbound for the recipient's. Each session's presence stanzas
are handled one at a time, in order, because handling one may wait for the database.
"""

import dataclasses
import re
from typing import Any

from twisted.internet import defer
from twisted.logger import Logger
from twisted.words.protocols.jabber.jid import JID, InvalidFormat, internJID
from twisted.words.xish import domish

from mim_twisted import hooks
from mim_twisted.im import subscription
from mim_twisted.im.offline import OfflineDelivery
from mim_twisted.im.roster import RosterService
from mim_twisted.im.sessions import SessionManager
from mim_twisted.im.stanzas import reply_error
from mim_twisted.storage.interfaces import IAccountStore, IRosterStore, RosterItem

log = Logger()

SUBSCRIPTION_TYPES = frozenset(("subscribe", "subscribed", "unsubscribe", "unsubscribed"))
BROADCAST_TYPES = (None, "unavailable")
PRIORITY = re.compile(r"[+-]?[0-9]+")  # an xs:byte lexically; Python's int() also takes "1_0"


def parse_priority(presence: domish.Element) -> int | None:
    """The <priority/> value, 0 when absent, None when not an integer in -128..127."""
    element = next(presence.elements(presence.uri, "priority"), None)
    if element is None:
        return 0
    text = str(element).strip()
    if not PRIORITY.fullmatch(text):
        return None
    value = int(text)
    return value if -128 <= value <= 127 else None


class PresenceService:
    """Presence and subscriptions between the sessions of this server."""

    def __init__(
        self,
        domains: frozenset[str],
        sessions: SessionManager,
        accounts: IAccountStore,
        rosters: IRosterStore,
        roster: RosterService,
        offline: OfflineDelivery,
        hooks_table: hooks.Hooks,
    ) -> None:
        self.domains = domains
        self.sessions = sessions
        self.accounts = accounts
        self.rosters = rosters
        self.roster = roster
        self.offline = offline
        self.hooks = hooks_table
        self.caps_listeners: list = []  # callables(session, presence) seeing each broadcast
        self._queues: dict[Any, defer.Deferred] = {}

    # -- entry points ------------------------------------------------------------------------

    def handle(self, session: Any, presence: domish.Element) -> None:
        """A presence stanza from a bound session ('from' already stamped)."""
        self._serialise(session, self._handle, session, presence)

    def session_ended(self, session: Any) -> None:
        """The connection is gone and the session unbound: it goes unavailable for everyone.

        Queued after the session's presence work, which, finding the session gone, is skipped.
        """
        self._serialise(session, self._ended, session)

    def idle(self) -> defer.Deferred:
        """Fires when the presence work under way now has finished."""
        return defer.DeferredList(list(self._queues.values()))

    def available_sessions(self, bare: JID) -> list:
        return [s for s in self.sessions.sessions_of(bare) if s.presence is not None]

    def _serialise(self, session: Any, function: Any, *args: Any) -> None:
        """Run function(*args) after the session's earlier presence work has finished."""
        previous = self._queues.get(session)
        finished: defer.Deferred = defer.Deferred()
        self._queues[session] = finished

        def run(_: object) -> None:
            work = defer.ensureDeferred(function(*args))
            work.addErrback(self._log_failure, session)
            work.addBoth(lambda _: finished.callback(None))

        def forget(_: object) -> None:
            if self._queues.get(session) is finished:
                del self._queues[session]

        finished.addCallback(forget)
        if previous is None:
            run(None)
        else:
            previous.addCallback(run)

    @staticmethod
    def _log_failure(failure: Any, session: Any) -> None:
        log.failure("presence handling for {jid}", failure, jid=session.jid.full())

    def _gone(self, session: Any) -> bool:
        """The session was unbound or replaced: what it sent is no longer to be acted on."""
        return self.sessions.session(session.jid) is not session

    async def _handle(self, session: Any, presence: domish.Element) -> None:
        if self._gone(session):
            return  # it ended while this stanza waited for its turn
        kind = presence.getAttribute("type")
        to = presence.getAttribute("to")
        if to is None:
            if kind is None:
                await self._available(session, presence)
            elif kind == "unavailable":
                await self._unavailable(session, presence)
            elif kind not in ("error", "probe"):
                reply_error(session, presence, "bad-request", "No such broadcast presence")
            return
        try:
            target = internJID(to)
        except (InvalidFormat, UnicodeError):
            reply_error(session, presence, "jid-malformed")
            return
        if kind in SUBSCRIPTION_TYPES:
            await self._outbound_subscription(session, presence, kind, target.userhostJID())
        elif kind in BROADCAST_TYPES or kind == "error":
            self._directed(session, presence, kind, target)
        # Probes from clients are not needed: the server answers probes itself.

    # -- broadcast presence ------------------------------------------------------------------

    async def _available(self, session: Any, presence: domish.Element) -> None:
        priority = parse_priority(presence)
        if priority is None:
            reply_error(session, presence, "bad-request", "Priority must be -128..127")
            return
        owner = session.jid.userhostJID()
        _, items = await self.rosters.get_roster(owner.host, owner.user)
        if self._gone(session):
            return  # it ended while the roster was read: nothing was announced
        initial = session.presence is None
        was_negative = session.priority < 0
        session.presence = presence
        session.priority = priority
        self._broadcast(session, presence, items)
        for listener in self.caps_listeners:
            listener(session, presence)
        if initial:
            self._send_contacts_presence(session, items)
            for item in items:
                if item.pending_in and item.pending_in_stanza:
                    session.send(item.pending_in_stanza)
        # XEP-0160: offline messages go to the first non-negative available presence.
        if priority >= 0 and (initial or was_negative):
            await self.offline.deliver(session)
        if initial:
            await self.hooks.run(hooks.USER_AVAILABLE, session)

    async def _ended(self, session: Any) -> None:
        if session.presence is not None or session.directed_to:
            await self._unavailable(session, None)

    async def _unavailable(self, session: Any, presence: domish.Element | None) -> None:
        """Broadcast unavailable presence: the client's, or (None) one for a lost connection."""
        was_available = session.presence is not None
        session.presence = None
        sent = presence
        if sent is None:
            sent = domish.Element((None, "presence"))
            sent["type"] = "unavailable"
            sent["from"] = session.jid.full()
        if was_available:
            # Contacts and other resources never told of this one's availability hear no end.
            owner = session.jid.userhostJID()
            _, items = await self.rosters.get_roster(owner.host, owner.user)
            self._broadcast(session, sent, items)
        for jid in sorted(session.directed_to):
            self._deliver(sent, internJID(jid))
        session.directed_to.clear()
        if was_available:
            await self.hooks.run(hooks.USER_UNAVAILABLE, session, presence)

    def _broadcast(self, session: Any, presence: domish.Element, items: list[RosterItem]) -> None:
        """To contacts with a from/both subscription and to all the user's own resources."""
        for item in items:
            if item.subscription in ("from", "both"):
                self._deliver(presence, internJID(item.jid))
        self._deliver(presence, session.jid.userhostJID())

    def _send_contacts_presence(self, session: Any, items: list[RosterItem]) -> None:
        """The internal answer to the probes a new session would send (RFC 6121 §4.3)."""
        for item in items:
            if item.subscription not in ("to", "both"):
                continue
            for contact_session in self.available_sessions(internJID(item.jid)):
                presence = contact_session.presence
                presence["to"] = session.jid.full()
                session.send(presence.toXml(defaultUri="jabber:client"))

    def _deliver(self, presence: domish.Element, to: JID) -> None:
        """Deliver to a full JID's session, or to every available session of a bare JID."""
        if to.host not in self.domains:
            return
        presence["to"] = to.full()
        if to.resource is not None:
            recipients = [s for s in [self.sessions.session(to)] if s is not None]
        else:
            recipients = self.available_sessions(to)
        if recipients:
            data = presence.toXml(defaultUri="jabber:client")
            for recipient in recipients:
                recipient.send(data)

    def _directed(self, session: Any, presence: domish.Element, kind: str | None, to: JID) -> None:
        if to.host not in self.domains:
            reply_error(session, presence, "remote-server-not-found")
            return
        if kind is None:
            session.directed_to.add(to.full())
        elif kind == "unavailable":
            session.directed_to.discard(to.full())
        self._deliver(presence, to)

    # -- subscriptions -----------------------------------------------------------------------

    async def _outbound_subscription(
        self, session: Any, presence: domish.Element, kind: str, contact: JID
    ) -> None:
        user = session.jid.userhostJID()
        if contact == user:
            return
        item = await self.roster.get_item(user, contact) or RosterItem(jid=contact.full())
        outcome = subscription.outbound(subscription.state_of(item), kind)
        if outcome.changed:
            await self._store(user, subscription.apply(item, outcome.state))
        if outcome.send_presence == "unavailable":
            # §3.2.2: the contact sees the presence end while still subscribed to it.
            self._send_presence_of(user, contact, "unavailable")
        if outcome.route:
            if contact.host not in self.domains:
                reply_error(session, presence, "remote-server-not-found")
                return
            # Subscription stanzas travel between bare JIDs (RFC 6121 §3.1.2).
            presence["from"] = user.full()
            presence["to"] = contact.full()
            await self._inbound_subscription(contact, user, kind, presence)
        if outcome.send_presence == "available":
            # §3.1.5: the approval first, then the presence it lets the contact see.
            self._send_presence_of(user, contact, "available")

    async def _inbound_subscription(
        self, owner: JID, sender: JID, kind: str, presence: domish.Element
    ) -> None:
        if not await self.accounts.account_exists(owner.host, owner.user):
            if kind == "subscribe":
                await self._auto_reply(owner, sender, "unsubscribed")
            return
        item = await self.roster.get_item(owner, sender) or RosterItem(
            jid=sender.full(), in_roster=False
        )
        outcome = subscription.inbound(subscription.state_of(item), kind)
        if outcome.changed:
            updated = subscription.apply(item, outcome.state)
            if kind == "subscribe" and outcome.state.pending_in:
                # Kept so that it can be delivered again at the next initial presence.
                updated = dataclasses.replace(
                    updated, pending_in_stanza=presence.toXml(defaultUri="jabber:client")
                )
            await self._store(owner, updated)
        if outcome.send_presence is not None:
            self._send_presence_of(owner, sender, outcome.send_presence)
        if outcome.route:
            self._deliver(presence, owner)
        if outcome.auto_reply is not None:
            await self._auto_reply(owner, sender, outcome.auto_reply)

    async def _auto_reply(self, owner: JID, sender: JID, kind: str) -> None:
        """The server answers on the owner's behalf, as if the owner had sent `kind`."""
        reply = domish.Element((None, "presence"))
        reply["type"] = kind
        reply["from"] = owner.full()
        reply["to"] = sender.full()
        await self._inbound_subscription(sender, owner, kind, reply)
        if kind == "subscribed":
            self._send_presence_of(owner, sender, "available")  # after it, as in §3.1.5

    async def _store(self, owner: JID, item: RosterItem) -> None:
        if not item.in_roster and subscription.state_of(item) == subscription.State():
            # A hidden item that no longer holds any state is not kept.
            await self.rosters.remove_item(owner.host, owner.user, item.jid)
            return
        version = await self.roster.put_item(owner, item)
        self.roster.push(owner, item, version)
        await self.hooks.run(hooks.PRESENCE_SUBSCRIPTION_CHANGED, owner, item)

    async def roster_item_removed(self, owner: JID, item: RosterItem) -> None:
        """The owner removed a contact: cancel the subscriptions both ways (RFC 6121 §2.5.2)."""
        contact = internJID(item.jid)
        for kind in subscription.cancellations(subscription.state_of(item)):
            if kind == "unsubscribed":
                self._send_presence_of(owner, contact, "unavailable")
            if contact.host in self.domains:
                cancellation = domish.Element((None, "presence"))
                cancellation["type"] = kind
                cancellation["from"] = owner.full()
                cancellation["to"] = contact.full()
                await self._inbound_subscription(contact, owner, kind, cancellation)

    def _send_presence_of(self, owner: JID, contact: JID, kind: str) -> None:
        """Send the owner's current presence ("available") or its end ("unavailable")."""
        for session in self.available_sessions(owner):
            if kind == "available":
                self._deliver(session.presence, contact)
            else:
                unavailable = domish.Element((None, "presence"))
                unavailable["type"] = "unavailable"
                unavailable["from"] = session.jid.full()
                self._deliver(unavailable, contact)
