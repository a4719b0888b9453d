"""XEP-0191 Blocking Command: each account's block list, and routing that honours it both ways.

A user reads the list (<blocklist/>), adds JIDs (<block/>) and removes some or all of them
(<unblock/>); each change is stored, then pushed to every resource of the user that has read
the list (§3.3-§3.5). A newly blocked contact is sent unavailable presence from the user's
available resources, and an unblocked one its presence again, when the contact is subscribed
to the user's presence: a JID the user shares no subscription with is sent nothing.

An item blocks a JID as a XEP-0016 item would (`blocks`): a full JID only that resource, a bare
JID the account and all its resources, a domain (or domain/resource) everything from there.
Every stanza a local session sends passes `gate` before it is routed:
- to a JID on the sender's own list: refused with <not-acceptable/> and
  <blocked xmlns='urn:xmpp:blocking:errors'/> (§3.7);
- to a local account whose list holds the sender: not delivered (§3.6); a message or an IQ
  get/set is answered with <service-unavailable/>, as if the account did not exist, and
  anything else is dropped without a word.
Broadcast presence does not pass the gate; the presence layer asks `presence_blocked` for each
contact instead.

The lists of the accounts with sessions here are kept in memory (`BlockLists`), read when first
needed: by a session's first stanza to another JID (one to itself or to the server is never
refused), or by its broadcast presence once it shares a subscription with a contact (presence
judges by the lists in memory); so that routing asks the database only for accounts with no
session here, and a login that needs no list reads none. In a cluster each change is announced
to the other nodes, which read the list again (mim_twisted.cluster.coherence).
"""

import secrets
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING

from twisted.internet import defer
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.words.protocols.jabber import error, xmlstream
from twisted.words.protocols.jabber.jid import JID, InvalidFormat
from twisted.words.xish import domish

from mim_twisted import hooks
from mim_twisted.im.locks import KeyedLock
from mim_twisted.im.sessions import Session, SessionManager
from mim_twisted.storage.interfaces import IBlockListStore, IRosterStore
from mim_twisted.xmpp.jids import parse_jid
from mim_twisted.xmpp.stanza_errors import error_response

if TYPE_CHECKING:
    from mim_twisted.im.disco import DiscoService
    from mim_twisted.im.presence import PresenceService
    from mim_twisted.im.router import Router

log = Logger()

NS_BLOCKING = "urn:xmpp:blocking"
NS_BLOCKING_ERRORS = "urn:xmpp:blocking:errors"

MAX_BLOCKED_JIDS = 1000  # per account: a list beyond it is refused with resource-constraint
_NONE_BLOCKED: frozenset[str] = frozenset()


def blocks(block_list: frozenset[str], jid: JID) -> bool:
    """Whether a list blocks `jid`: its full JID, bare JID, domain/resource or domain."""
    if not block_list:
        return False
    candidates = {jid.full(), jid.userhost(), jid.host}
    if jid.resource is not None:
        candidates.add(f"{jid.host}/{jid.resource}")
    return not block_list.isdisjoint(candidates)


class BlockLists:
    """The block lists of the accounts in use, read from the store once and kept up to date.

    `get` answers at once for a list in memory and otherwise with a Deferred; the callers that
    wait for one account's list are answered in the order they asked. A list read is kept only
    while `in_use(account)` says so (the account has sessions here) and is forgotten when they
    end: an account removed and made again while the server runs starts with the stored list.

    `changed_listeners` hear of each list stored here (`put`); `refresh` is how a list stored
    elsewhere (another cluster node) replaces the one held.
    """

    def __init__(
        self,
        store: IBlockListStore,
        in_use: Callable[[JID], bool] = lambda account: True,
    ) -> None:
        self.store = store
        self.in_use = in_use
        # As many as the accounts with sessions here, each list at most MAX_BLOCKED_JIDS long.
        self._lists: dict[str, frozenset[str]] = {}
        self._waiting: dict[str, list[defer.Deferred]] = {}
        # Bumped by each `put` and `refresh`, so that a read that started before it does not
        # undo it.
        self._versions: dict[str, int] = {}
        # The version each account's latest refresh began at.
        self._refreshes: dict[str, int] = {}
        self.changed_listeners: list[Callable[[JID], None]] = []

    def cached(self, account: JID) -> frozenset[str] | None:
        return self._lists.get(account.userhost())

    def get(self, account: JID) -> "frozenset[str] | defer.Deferred[frozenset[str]]":
        key = account.userhost()
        block_list = self._lists.get(key)
        if block_list is not None:
            return block_list
        waiter: defer.Deferred = defer.Deferred()
        waiting = self._waiting.get(key)
        if waiting is not None:
            waiting.append(waiter)
            return waiter
        self._waiting[key] = [waiter]
        # The waiter is in the list first: a store may answer at once.
        reading = self.store.get_block_list(account.host, account.user)
        reading.addBoth(self._read, account, self._versions.get(key, 0))
        return waiter

    def _read(self, result: list[str] | Failure, account: JID, version: int) -> None:
        key = account.userhost()
        waiting = self._waiting.pop(key)
        if isinstance(result, Failure):
            for waiter in waiting:
                waiter.errback(result)
            return
        block_list = frozenset(result)
        if self._versions.get(key, 0) == version:
            if self.in_use(account):
                self._keep(key, block_list)
        else:
            block_list = self._lists.get(key, block_list)
        for waiter in waiting:
            waiter.callback(block_list)

    def put(self, account: JID, block_list: frozenset[str]) -> None:
        """The list as just stored."""
        key = account.userhost()
        self._versions[key] = self._versions.get(key, 0) + 1
        self._keep(key, block_list)
        for listener in self.changed_listeners:
            listener(account)

    def refresh(self, account: JID) -> None:
        """The account's list was changed elsewhere: read it again if it is held here. The
        list held stays in use until the new one is read (a list missing from memory would
        count as empty for presence); a read under way is not kept, and neither is one that a
        change made here overtakes, since that change was made from the old list: the list is
        read once more instead."""
        key = account.userhost()
        if key not in self._lists and key not in self._waiting:
            return
        version = self._versions[key] = self._versions.get(key, 0) + 1
        if key not in self._lists:
            return  # the read under way is not kept; the next `get` reads it again
        self._refreshes[key] = version
        reading = self.store.get_block_list(account.host, account.user)
        reading.addCallbacks(
            self._refreshed,
            self._refresh_failed,
            callbackArgs=(account, version),
            errbackArgs=(account, version),
        )

    def _refreshed(self, result: list[str], account: JID, version: int) -> None:
        key = account.userhost()
        if self._refreshes.get(key) != version or key not in self._lists:
            return  # a later refresh will answer, or the list is no longer held
        del self._refreshes[key]
        if self._versions.get(key) == version:
            self._keep(key, frozenset(result))
        else:
            self.refresh(account)  # changed here meanwhile, from the list held before

    def _refresh_failed(self, failure: Failure, account: JID, version: int) -> None:
        key = account.userhost()
        if self._refreshes.get(key) == version:
            del self._refreshes[key]
        log.failure(
            "Reading the block list of {account}, changed on another node", failure, account=key
        )

    def forget(self, account: JID) -> None:
        """The account's sessions have ended: its list is read again when next needed."""
        key = account.userhost()
        self._lists.pop(key, None)
        self._refreshes.pop(key, None)
        if key in self._waiting:
            self._versions[key] = self._versions.get(key, 0) + 1  # the read under way is stale
        else:
            self._versions.pop(key, None)

    def _keep(self, key: str, block_list: frozenset[str]) -> None:
        self._lists[key] = block_list


class BlockingService:
    def __init__(
        self,
        domains: frozenset[str],
        store: IBlockListStore,
        rosters: IRosterStore,
        sessions: SessionManager,
        presence: "PresenceService",
    ) -> None:
        self.domains = domains
        self.store = store
        self.rosters = rosters
        self.sessions = sessions
        self.presence = presence
        self.lists = BlockLists(store, in_use=lambda account: bool(sessions.sessions_of(account)))
        self.locks = KeyedLock()  # one change of an account's list at a time
        self.max_blocked = MAX_BLOCKED_JIDS  # read at start, so that a test may lower it

    def install(self, router: "Router", disco: "DiscoService", hooks_table: hooks.Hooks) -> None:
        for name in ("blocklist", "block", "unblock"):
            router.account_iq[NS_BLOCKING, name] = self.handle_iq
        router.gates.append(self.gate)
        self.presence.presence_blocked = self.presence_blocked
        self.presence.read_block_list = self.lists.get
        hooks_table.add(hooks.SESSION_ENDED, self.session_ended)
        disco.add_server_feature(NS_BLOCKING)

    def session_ended(self, session: Session) -> None:
        owner = session.jid.userhostJID()
        if not self.sessions.sessions_of(owner):
            self.lists.forget(owner)

    # -- routing ------------------------------------------------------------------------------

    def _local_account(self, jid: JID) -> bool:
        return jid.user is not None and jid.host in self.domains

    def gate(
        self, session: Session, stanza: domish.Element, recipient: JID
    ) -> "bool | defer.Deferred[bool]":
        """True when the stanza is refused (and answered as it should be), else False."""
        owner = session.jid.userhostJID()
        account = recipient.userhostJID()
        if account == owner or (recipient.user is None and recipient.host in self.domains):
            # To itself or to the server: never refused, and no list is needed. (Its broadcast
            # presence has the presence layer read the list when a contact may see it.)
            return False
        own = self.lists.get(owner)
        theirs = self.lists.get(account) if self._local_account(recipient) else _NONE_BLOCKED
        if not own and not theirs:
            return False  # two empty lists, the usual case: nothing to judge
        if isinstance(own, defer.Deferred) or isinstance(theirs, defer.Deferred):
            waiting = defer.gatherResults(
                [b if isinstance(b, defer.Deferred) else defer.succeed(b) for b in (own, theirs)],
                consumeErrors=True,
            )
            waiting.addCallback(lambda known: self._judge(session, stanza, recipient, *known))
            return waiting
        return self._judge(session, stanza, recipient, own, theirs)

    def _judge(
        self,
        session: Session,
        stanza: domish.Element,
        recipient: JID,
        own: frozenset[str],
        theirs: frozenset[str],
    ) -> bool:
        kind = stanza.getAttribute("type")
        answerable = kind not in ("error", "result")
        if blocks(own, recipient):
            if answerable:
                refusal = error.StanzaError(
                    "not-acceptable",
                    text="You have blocked this contact",
                    appCondition=domish.Element((NS_BLOCKING_ERRORS, "blocked")),
                )
                session.send(error_response(refusal, stanza))
            return True
        if blocks(theirs, session.jid):
            if answerable and stanza.name in ("message", "iq"):
                session.send(error_response(error.StanzaError("service-unavailable"), stanza))
            return True
        return False

    def presence_blocked(self, user: JID, contact: JID) -> bool:
        """Whether broadcast presence between a user's session and a contact is blocked, by
        either of them. Lists not in memory count as empty: the list of every available account
        that shares a subscription with anyone is in memory (the presence layer read it before
        its broadcast, `PresenceService.read_block_list`), and so is that of every account whose
        session sent a stanza to someone else (the gate read it)."""
        own = self.lists.cached(user) or frozenset()
        theirs = self.lists.cached(contact) or frozenset()
        return blocks(own, contact) or blocks(theirs, user)

    async def block_list(self, account: JID) -> frozenset[str]:
        """The account's list, from memory or else from the store: for what is sent on an
        account's behalf without passing the gate (PEP notifications and last items)."""
        return await _known(self.lists.get(account))

    # -- the IQ handler -----------------------------------------------------------------------

    async def handle_iq(
        self, session: Session, iq: domish.Element, target: JID
    ) -> domish.Element | None:
        owner = session.jid.userhostJID()
        if target != owner:
            raise error.StanzaError("forbidden", text="Only its owner may use a block list")
        request = next(iq.elements())
        kind = iq.getAttribute("type")
        if request.name == "blocklist":
            if kind != "get":
                raise error.StanzaError("bad-request", text="The block list is read with 'get'")
            block_list = await _known(self.lists.get(owner))
            session.block_list_requested = True
            result = xmlstream.toResponse(iq, "result")
            reply = result.addElement((NS_BLOCKING, "blocklist"))
            for jid in sorted(block_list):
                reply.addElement("item")["jid"] = jid
            return result
        if kind != "set":
            raise error.StanzaError("bad-request", text="The block list is changed with 'set'")
        jids = _item_jids(request)
        if request.name == "block":
            if not jids:
                raise error.StanzaError("bad-request", text="Nothing to block")
            await self._block(owner, jids)
        else:
            await self._unblock(owner, jids)
        self._push(owner, request.name, jids)
        return None

    async def _block(self, owner: JID, jids: list[str]) -> None:
        async with self.locks.hold(owner.userhost()):
            current = await _known(self.lists.get(owner))
            if len(current.union(jids)) > self.max_blocked:
                raise error.StanzaError(
                    "resource-constraint", text=f"At most {self.max_blocked} blocked JIDs"
                )
            added = await self.store.block(owner.host, owner.user, jids)
            self.lists.put(owner, current.union(added))
        for contact in await self._subscribers_covered(owner, added):
            # §3.3: the contact no longer sees the user's presence.
            self.presence.announce(owner, contact, "unavailable")

    async def _unblock(self, owner: JID, jids: list[str]) -> None:
        async with self.locks.hold(owner.userhost()):
            current = await _known(self.lists.get(owner))
            if jids:
                removed = await self.store.unblock(owner.host, owner.user, jids)
            else:
                removed = await self.store.unblock_all(owner.host, owner.user)
            remaining = current.difference(removed)
            self.lists.put(owner, remaining)
        for contact in await self._subscribers_covered(owner, removed):
            if not blocks(remaining, contact):  # e.g. its domain is still blocked
                self.presence.announce(owner, contact, "available")

    async def _subscribers_covered(self, owner: JID, entries: Iterable[str]) -> list[JID]:
        """The contacts subscribed to the owner's presence ('from' or 'both') that the list
        entries name: only those are sent the owner's presence or its end, never a JID the owner
        shares no subscription with. A full JID entry names that resource of the contact, a
        domain entry every subscribed contact there."""
        if not entries:
            return []
        _, roster = await self.rosters.get_roster(owner.host, owner.user)
        subscribers = [
            parse_jid(item.jid) for item in roster if item.subscription in ("from", "both")
        ]
        covered: dict[str, JID] = {}
        for entry in map(parse_jid, entries):
            for contact in subscribers:
                if contact.host != entry.host or entry.user not in (None, contact.user):
                    continue
                target = JID(tuple=(contact.user, contact.host, entry.resource))
                covered.setdefault(target.full(), target)
        return list(covered.values())

    def _push(self, owner: JID, name: str, jids: Iterable[str]) -> None:
        """§3.3, §3.4: the change, to every resource that has read the list."""
        for session in self.sessions.sessions_of(owner):
            if not session.block_list_requested:
                continue
            push = domish.Element((None, "iq"))
            push["type"] = "set"
            push["id"] = "push-" + secrets.token_hex(6)
            push["to"] = session.jid.full()
            change = push.addElement((NS_BLOCKING, name))
            for jid in jids:
                change.addElement("item")["jid"] = jid
            session.send(push)


def _item_jids(request: domish.Element) -> list[str]:
    """The normalised JIDs of a <block/> or <unblock/>; jid-malformed for a bad one."""
    jids = []
    for item in request.elements(NS_BLOCKING, "item"):
        try:
            jids.append(parse_jid(item.getAttribute("jid", "")).full())
        except (InvalidFormat, UnicodeError):
            raise error.StanzaError("jid-malformed") from None
    return list(dict.fromkeys(jids))


async def _known(block_list: "frozenset[str] | defer.Deferred[frozenset[str]]") -> frozenset[str]:
    if isinstance(block_list, defer.Deferred):
        return await block_list
    return block_list
