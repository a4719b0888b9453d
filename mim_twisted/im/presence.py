"""Presence (RFC 6121 §4) and presence subscriptions (§3) for local users.

Broadcast presence goes to the contacts whose subscription lets them see it (from/both) and to
the user's own available resources; directed presence goes where it is addressed and is
remembered, so that going offline reaches it too. Probes stay inside the server: when a session
becomes available it is sent the current presence of every local contact it may see.

Subscription stanzas run through the pure state machine in `subscription.py` on each side:
outbound for the sender's roster, inbound for the recipient's. Each side reads, changes and
writes its owner's roster item under that owner's lock (`locks.KeyedLock`, shared with the roster
protocol), and lets it go before the other side takes its own.

Each session's presence stanzas are handled one at a time, in order, because handling one may
wait for the database: they wait in a queue of the session's, which one loop drains. At most
`MAX_QUEUED_PRESENCES` stanzas may wait behind the one being handled; a client that sends more
has its stream closed with <policy-violation/>.

Directed available presence is remembered (RFC 6121 §4.6.3), so that going offline reaches it
too, for at most `MAX_DIRECTED_PRESENCES` full or bare JIDs per session. Beyond that, directed
available presence to a JID not remembered yet is refused with <resource-constraint/>: forgetting
an older one instead would leave that contact believing the user online for ever.
"""

import dataclasses
import re
from collections import deque
from collections.abc import Callable, Coroutine
from typing import Any

from twisted.internet import defer
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.words.protocols.jabber.jid import JID, InvalidFormat
from twisted.words.xish import domish

from mim_twisted import hooks
from mim_twisted.im import subscription
from mim_twisted.im.locks import KeyedLock
from mim_twisted.im.offline import OfflineDelivery
from mim_twisted.im.roster import RosterService
from mim_twisted.im.sessions import Session, SessionManager
from mim_twisted.im.stanzas import reply_error
from mim_twisted.storage.interfaces import (
    IAccountStore,
    IRosterStore,
    RosterItem,
    log_request_failure,
)
from mim_twisted.xmpp.jids import parse_jid
from mim_twisted.xmpp.serialise import to_xml

log = Logger()

SUBSCRIPTION_TYPES = frozenset(("subscribe", "subscribed", "unsubscribe", "unsubscribed"))
BROADCAST_TYPES = (None, "unavailable")
PRIORITY = re.compile(r"[+-]?[0-9]+")  # an xs:byte lexically; Python's int() also takes "1_0"

MAX_QUEUED_PRESENCES = 100  # stanzas of one session waiting for their turn
MAX_DIRECTED_PRESENCES = 1000  # JIDs one session's directed presence is remembered for

Work = Callable[..., Coroutine[Any, Any, None]]


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
        *,
        locks: KeyedLock | None = None,
        clock: IReactorTime | None = None,
    ) -> None:
        self.domains = domains
        self.sessions = sessions
        self.accounts = accounts
        self.rosters = rosters
        self.roster = roster
        self.offline = offline
        self.hooks = hooks_table
        # The roster protocol's locks: one owner's roster item changes under the owner's key.
        self.locks = KeyedLock() if locks is None else locks
        if clock is None:
            from twisted.internet import reactor as clock
        self.clock = clock
        self.max_queued = MAX_QUEUED_PRESENCES
        self.max_directed = MAX_DIRECTED_PRESENCES
        self.caps_listeners: list = []  # callables(session, presence) seeing each broadcast
        # (a user's full JID, a contact's JID): whether broadcast presence between them is
        # blocked by either (XEP-0191, blocking.py); nothing is, without blocking.
        self.presence_blocked: Callable[[JID, JID], bool] = lambda user, contact: False
        # Reads an account's block list into memory for `presence_blocked` (the list, or a
        # Deferred of it); None without blocking.
        self.read_block_list: Callable[[JID], object] | None = None
        # Per session with work under way: what waits behind the item being handled.
        self._queues: dict[Session, deque[tuple[Work, tuple]]] = {}
        self._idle_waiters: list[defer.Deferred] = []

    # -- entry points ------------------------------------------------------------------------

    def handle(self, session: Session, presence: domish.Element) -> None:
        """A presence stanza from a bound session ('from' already stamped)."""
        queue = self._queues.get(session)
        if queue is not None and len(queue) >= self.max_queued:
            log.info(
                "{jid}: more than {limit} presence stanzas waiting, closing the stream",
                jid=session.jid.full(),
                limit=self.max_queued,
            )
            session.stream_error("policy-violation", "Too many presence stanzas at once")
            return
        offline_due = self._note_availability(session, presence)
        self._enqueue(session, self._handle, session, presence, offline_due)

    def _note_availability(self, session: Session, presence: domish.Element) -> bool:
        """Messages are routed by the broadcast presence the server has received, not by the one
        it has finished handling (a roster read, the broadcast, the stored messages): a message
        sent right after initial presence goes to the session, not to offline storage.

        True when the session now takes messages and did not before: its stored messages are
        due, and the live ones wait behind them until the presence has been handled.
        """
        if presence.getAttribute("to") is not None:
            return False
        kind = presence.getAttribute("type")
        if kind == "unavailable":
            if session.message_priority is not None:
                session.message_priority = None
                self.sessions.sessions_changed(session.jid.userhost())
            return False
        priority = parse_priority(presence) if kind is None else None
        if priority is None:
            return False
        previous, session.message_priority = session.message_priority, priority
        if previous is None:
            self.sessions.sessions_changed(session.jid.userhost())
        offline_due = priority >= 0 and (previous is None or previous < 0)
        if offline_due:
            self.offline.hold(session)
        return offline_due

    def session_ended(self, session: Session) -> None:
        """The connection is gone and the session unbound: it goes unavailable for everyone.

        Queued after the session's presence work, which, finding the session gone, is skipped.
        Never refused, however long the queue: it is what tells the contacts.
        """
        self._enqueue(session, self._ended, session)

    def rebroadcast(self, session: Session) -> None:
        """The session's broadcast presence again to its contacts and resources, and theirs to
        it, as for an initial presence: they were told it had ended while it had not (its
        cluster node was taken for dead, and is back)."""
        self._enqueue(session, self._rebroadcast, session)

    def idle(self, timeout: float | None = None) -> defer.Deferred:
        """Fires (with None) once no presence work is queued or under way, failed work included.

        With a timeout, it fires after that many seconds on the clock (twice that at the latest,
        if storing held messages takes as long): the work still waiting then is dropped and
        logged, the live messages held for a dropped available presence are let go (`_abandon`),
        and the work under way is left to end alone.
        """
        if not self._queues:
            return defer.succeed(None)
        waiter: defer.Deferred = defer.Deferred(self._idle_waiters.remove)
        self._idle_waiters.append(waiter)
        if timeout is not None:
            waiter.addTimeout(timeout, self.clock, onTimeoutCancel=self._abandon)
        return waiter

    def available_sessions(self, bare: JID) -> list[Session]:
        return [s for s in self.sessions.sessions_of(bare) if s.presence is not None]

    def _enqueue(self, session: Session, work: Work, *args: object) -> None:
        """Run work(*args) after the session's earlier presence work has finished."""
        queue = self._queues.get(session)
        if queue is not None:
            queue.append((work, args))
            return
        queue = self._queues[session] = deque([(work, args)])
        defer.ensureDeferred(self._drain(session, queue))

    async def _drain(self, session: Session, queue: deque[tuple[Work, tuple]]) -> None:
        """Handle the session's queue, in order, until it is empty.

        One loop, not a chain of callbacks: however many items finish at once, the stack stays
        flat, and a failing item is logged and does not stop the ones behind it.
        """
        try:
            while queue:
                work, args = queue.popleft()
                try:
                    await work(*args)
                except Exception:
                    log_request_failure(
                        log, Failure(), "presence handling for {jid}", jid=session.jid.full()
                    )
        finally:
            del self._queues[session]
            if not self._queues:
                waiters = list(self._idle_waiters)
                self._idle_waiters.clear()
                for waiter in waiters:
                    waiter.callback(None)

    def _abandon(self, result: object, timeout: float) -> defer.Deferred:
        """idle() timed out: drop what still waits, and say what that was.

        A dropped available presence still lets go of the live messages held for it (sent, or
        kept offline for a session that has closed): they were accepted, and the returned
        Deferred, which idle() waits for, fires once they are stored.
        """
        dropped = {session.jid.full(): len(queue) for session, queue in self._queues.items()}
        releases = []
        for queue in self._queues.values():
            for work, args in queue:
                if work == self._handle and args[2]:  # (session, presence, offline_due)
                    releases.append(self._release_held(args[0]))
            queue.clear()
        log.warn(
            "Presence work unfinished after {timeout}s: {busy} sessions still busy; dropped"
            " {count} waiting items ({dropped})",
            timeout=timeout,
            busy=len(dropped),
            count=sum(dropped.values()),
            dropped=", ".join(f"{jid}: {count}" for jid, count in sorted(dropped.items())),
        )
        released = defer.DeferredList(releases)
        # Bounded too: the database may be what is stuck.
        released.addTimeout(timeout, self.clock, onTimeoutCancel=lambda result, timeout: None)
        return released.addCallback(lambda _: None)

    def _release_held(self, session: Session) -> defer.Deferred:
        releasing = defer.ensureDeferred(self.offline.release(session))
        releasing.addErrback(
            lambda failure: log_request_failure(
                log, failure, "keeping the held messages of {jid}", jid=session.jid.full()
            )
        )
        return releasing

    def _gone(self, session: Session) -> bool:
        """The session was unbound or replaced: what it sent is no longer to be acted on."""
        return self.sessions.session(session.jid) is not session

    async def _handle(self, session: Session, presence: domish.Element, offline_due: bool) -> None:
        if self._gone(session):
            if offline_due:
                await self.offline.release(session)
            return  # it ended while this stanza waited for its turn
        kind = presence.getAttribute("type")
        to = presence.getAttribute("to")
        if to is None:
            if kind is None:
                await self._available(session, presence, offline_due)
            elif kind == "unavailable":
                await self._unavailable(session, presence)
            elif kind not in ("error", "probe"):
                reply_error(session, presence, "bad-request", "No such broadcast presence")
            return
        try:
            target = parse_jid(to)
        except (InvalidFormat, UnicodeError):
            reply_error(session, presence, "jid-malformed")
            return
        if kind in SUBSCRIPTION_TYPES:
            await self._outbound_subscription(session, presence, kind, target.userhostJID())
        elif kind in BROADCAST_TYPES or kind == "error":
            self._directed(session, presence, kind, target)
        # Probes from clients are not needed: the server answers probes itself.

    # -- broadcast presence ------------------------------------------------------------------

    async def _available(
        self, session: Session, presence: domish.Element, offline_due: bool
    ) -> None:
        """`offline_due`: held since the stanza was received (`_note_availability`)."""
        priority = parse_priority(presence)
        if priority is None:
            reply_error(session, presence, "bad-request", "Priority must be -128..127")
            return
        try:
            owner = session.jid.userhostJID()
            _, items = await self.rosters.get_roster(owner.host, owner.user)
            await self._read_block_list(owner, items)
            if self._gone(session):
                return  # it ended while the roster was read: nothing was announced
            initial = session.presence is None
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
            if offline_due:
                await self.offline.deliver(session)
        finally:
            if offline_due:
                await self.offline.release(session)
        if initial:
            await self.hooks.run(hooks.USER_AVAILABLE, session)

    async def _rebroadcast(self, session: Session) -> None:
        if self._gone(session) or session.presence is None:
            return
        owner = session.jid.userhostJID()
        _, items = await self.rosters.get_roster(owner.host, owner.user)
        await self._read_block_list(owner, items)
        presence = session.presence
        if self._gone(session) or presence is None:
            return  # it ended, or went unavailable, while the roster was read
        self._broadcast(session, presence, items)
        self._send_contacts_presence(session, items)
        await self.hooks.run(hooks.USER_AVAILABLE, session)

    async def _ended(self, session: Session) -> None:
        if session.presence is not None or session.directed_to:
            await self._unavailable(session, None)

    async def _unavailable(self, session: Session, presence: domish.Element | None) -> None:
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
            await self._read_block_list(owner, items)
            self._broadcast(session, sent, items)
        for jid in sorted(session.directed_to):
            self._deliver(sent, parse_jid(jid))
        session.directed_to.clear()
        if was_available:
            await self.hooks.run(hooks.USER_UNAVAILABLE, session, presence)

    async def _read_block_list(self, owner: JID, items: list[RosterItem]) -> None:
        """`presence_blocked` judges by the lists in memory: the owner's is read before its
        presence goes to, or comes from, a contact it shares a subscription with. (A login
        with no such contact reads none.)"""
        if self.read_block_list is None:
            return
        if any(item.subscription != "none" for item in items):
            block_list = self.read_block_list(owner)
            if isinstance(block_list, defer.Deferred):
                await block_list

    def _broadcast(
        self, session: Session, presence: domish.Element, items: list[RosterItem]
    ) -> None:
        """To contacts with a from/both subscription and to all the user's own resources."""
        for item in items:
            if item.subscription in ("from", "both"):
                contact = parse_jid(item.jid)
                if not self.presence_blocked(session.jid, contact):
                    self._deliver(presence, contact)
        self._deliver(presence, session.jid.userhostJID())

    def _send_contacts_presence(self, session: Session, items: list[RosterItem]) -> None:
        """The internal answer to the probes a new session would send (RFC 6121 §4.3)."""
        for item in items:
            if item.subscription not in ("to", "both"):
                continue
            for contact_session in self.available_sessions(parse_jid(item.jid)):
                if self.presence_blocked(session.jid, contact_session.jid):
                    continue
                presence = contact_session.presence
                presence["to"] = session.jid.full()
                session.send(to_xml(presence))

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
            data = to_xml(presence)
            for recipient in recipients:
                recipient.send(data)

    def _directed(
        self, session: Session, presence: domish.Element, kind: str | None, to: JID
    ) -> None:
        if to.host not in self.domains:
            reply_error(session, presence, "remote-server-not-found")
            return
        if kind is None:
            jid = to.full()
            if jid not in session.directed_to and len(session.directed_to) >= self.max_directed:
                reply_error(
                    session,
                    presence,
                    "resource-constraint",
                    f"Directed presence is remembered for {self.max_directed} addresses at most",
                )
                return
            session.directed_to.add(jid)
        elif kind == "unavailable":
            session.directed_to.discard(to.full())
        self._deliver(presence, to)

    # -- subscriptions -----------------------------------------------------------------------

    async def _outbound_subscription(
        self, session: Session, presence: domish.Element, kind: str, contact: JID
    ) -> None:
        user = session.jid.userhostJID()
        if contact == user:
            return

        def decide(item: RosterItem) -> tuple[subscription.Outcome, RosterItem]:
            outcome = subscription.outbound(subscription.state_of(item), kind)
            return outcome, subscription.apply(item, outcome.state)

        async with self.locks.hold(user.userhost()):
            absent = RosterItem(jid=contact.full())
            outcome, changed = await self._change(user, contact, absent, decide)
        # The user's key is free again before the contact's is taken, in _inbound_subscription.
        await self._announce(user, changed)
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

        def decide(item: RosterItem) -> tuple[subscription.Outcome, RosterItem]:
            outcome = subscription.inbound(subscription.state_of(item), kind)
            updated = subscription.apply(item, outcome.state)
            if kind == "subscribe" and outcome.state.pending_in:
                # Kept so that it can be delivered again at the next initial presence.
                updated = dataclasses.replace(
                    updated, pending_in_stanza=presence.toXml(defaultUri="jabber:client")
                )
            return outcome, updated

        async with self.locks.hold(owner.userhost()):
            absent = RosterItem(jid=sender.full(), in_roster=False)
            outcome, changed = await self._change(owner, sender, absent, decide)
        await self._announce(owner, changed)
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

    async def _change(
        self,
        owner: JID,
        contact: JID,
        absent: RosterItem,
        decide: Callable[[RosterItem], tuple[subscription.Outcome, RosterItem]],
    ) -> tuple[subscription.Outcome, RosterItem | None]:
        """Under the owner's key: decide on the owner's item for the contact (`absent` when
        there is none), write what changed in place of what was read and push it; the outcome
        and the item if one was written and kept. Read and decided again when the store no
        longer holds what was read (another node of a cluster changed it meanwhile)."""
        while True:
            stored = await self.roster.get_item(owner, contact)
            outcome, item = decide(stored or absent)
            if not outcome.changed:
                return outcome, None
            # A hidden item that no longer holds any state is not kept.
            hidden_and_empty = (
                not item.in_roster and subscription.state_of(item) == subscription.State()
            )
            version = await self.roster.replace_item(
                owner, item.jid, stored, None if hidden_and_empty else item
            )
            if version is None:
                continue
            if hidden_and_empty:
                return outcome, None
            self.roster.push(owner, item, version)
            return outcome, item

    async def _announce(self, owner: JID, item: RosterItem | None) -> None:
        """Run the hooks for a stored change, once the owner's key is free again: a handler may
        change the roster itself, and one that takes its time holds up no one."""
        if item is not None:
            await self.hooks.run(hooks.PRESENCE_SUBSCRIPTION_CHANGED, owner, item)

    async def roster_item_removed(self, owner: JID, item: RosterItem) -> None:
        """The owner removed a contact: cancel the subscriptions both ways (RFC 6121 §2.5.2)."""
        contact = parse_jid(item.jid)
        for kind in subscription.cancellations(subscription.state_of(item)):
            if kind == "unsubscribed":
                self._send_presence_of(owner, contact, "unavailable")
            if contact.host in self.domains:
                cancellation = domish.Element((None, "presence"))
                cancellation["type"] = kind
                cancellation["from"] = owner.full()
                cancellation["to"] = contact.full()
                await self._inbound_subscription(contact, owner, kind, cancellation)

    def announce(self, owner: JID, contact: JID, kind: str) -> None:
        """Send the owner's presence ("available") or its end ("unavailable") to a contact, as
        blocking does when the contact is blocked or unblocked."""
        self._send_presence_of(owner, contact, kind)

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
