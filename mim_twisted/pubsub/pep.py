"""PEP (XEP-0163): one PubSub service per account, on the core, storage and worker pool of
`pubsub.<domain>`.

Each account's bare JID is a service key (`PubSubService` with the PEP defaults and `is_pep`),
and its requests go through the same worker pool under (bare JID, node), so one node's requests
stay in order. The IQs with the pubsub namespaces addressed to an account's bare JID (or to no
one: the sender's own account) reach it through the router's account IQ table.

Who is notified of a node event: the explicit subscribers, as on any node, and, without
subscribing (XEP-0163 §4), every available resource of the owner and of its contacts with a
`from`/`both` presence subscription whose entity caps ask for `<node>+notify`, each held to the
node's access model (`PepService._implicit_sessions`), kept between an owner's publications
while nothing they were found from changes (`RecipientCache`). The last item goes to such a
resource once per availability: when its available presence arrives with known caps, when its
caps become known later, and when a contact's presence subscription is approved, with an
XEP-0203 delay.

Blocking (XEP-0191) holds both ways, as for messages: neither notifications nor last items go
to a contact the owner has blocked, or to one that has blocked the owner, subscribed or not.
"""

from collections import Counter, OrderedDict
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, replace
from typing import Any

from twisted.internet import defer
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.words.protocols.jabber.jid import JID, InvalidFormat
from twisted.words.xish import domish
from wokkel.disco import DiscoItem
from wokkel.pubsub import NS_PUBSUB, NS_PUBSUB_OWNER

from mim_twisted import hooks
from mim_twisted.im.blocking import BlockingService, blocks
from mim_twisted.im.caps import CapsService
from mim_twisted.im.disco import DiscoService
from mim_twisted.im.locks import KeyedLock
from mim_twisted.im.router import Router
from mim_twisted.im.sessions import Session, SessionManager
from mim_twisted.inflight import InFlight
from mim_twisted.pubsub import core
from mim_twisted.pubsub.broadcast import Broadcaster, Fanout, Recipient, fanout_of
from mim_twisted.pubsub.config import PEP_NODE_DEFAULTS, ServiceLimits
from mim_twisted.pubsub.protocol import PubSubComponent
from mim_twisted.pubsub.queues import QueueFull, WorkerPool
from mim_twisted.storage.interfaces import IRosterStore, PubSubItem, RosterItem
from mim_twisted.xmpp.jids import parse_jid

log = Logger()

NS_EVENT = "http://jabber.org/protocol/pubsub#event"
NS_DELAY = "urn:xmpp:delay"
NOTIFY_SUFFIX = "+notify"

# Advertised on every account's disco#info besides the pubsub/pep identity (XEP-0163 §6).
PEP_FEATURES = (
    "access-open",
    "access-presence",
    "access-roster",
    "access-whitelist",
    "auto-create",
    "auto-subscribe",
    "config-node",
    "create-nodes",
    "delete-items",
    "delete-nodes",
    "filtered-notifications",
    "item-ids",
    "last-published",
    "multi-subscribe",
    "persistent-items",
    "presence-notifications",
    "publish",
    "publish-options",
    "purge-nodes",
    "retract-items",
    "retrieve-affiliations",
    "retrieve-items",
    "retrieve-subscriptions",
    "subscribe",
)

# Account services kept made; each is small and holds no state of its own.
MAX_SERVICES = 100_000

# (owner, node)s whose implicit recipients are kept between publications.
MAX_RECIPIENT_ENTRIES = 5_000

# The affiliations that pass a whitelist node (XEP-0060 §4.5).
_WHITELISTED = frozenset({"owner", "publisher", "member"})
# The access models under which the node's affiliations decide who is notified implicitly.
_BY_AFFILIATION = frozenset({"whitelist", "authorize", "roster"})


class _NotInMemory:
    """What the fan-out needs is not all in memory: it waits for reads."""


_NOT_IN_MEMORY = _NotInMemory()


def _blocked_either_way(owner: JID, lists: Mapping[str, frozenset[str]], jid: JID) -> bool:
    """Whether the owner's items must not reach ``jid``: blocked by the owner's list or the
    owner blocked by theirs (``lists``: {bare JID: block list}). The owner's own resources
    never are."""
    if jid.userhost() == owner.userhost():
        return False
    empty: frozenset[str] = frozenset()
    return blocks(lists.get(owner.userhost(), empty), jid) or blocks(
        lists.get(jid.userhost(), empty), owner
    )


def notify_nodes(features: Iterable[str]) -> frozenset[str]:
    """The nodes whose notifications a client's caps ask for (`<node>+notify`)."""
    return frozenset(
        feature[: -len(NOTIFY_SUFFIX)] for feature in features if feature.endswith(NOTIFY_SUFFIX)
    )


def admits_contact(
    config: Mapping[str, Any], contact: RosterItem | None, affiliation: str = "none"
) -> bool:
    """Whether the node's access model lets a contact (the owner's roster item for it, None for
    none) receive notifications it has not subscribed to. Owners always do; outcasts never."""
    if affiliation == "owner":
        return True
    if affiliation == "outcast":
        return False
    model = config["pubsub#access_model"]
    if model == "open":
        return True
    if model == "whitelist":
        return affiliation in _WHITELISTED
    if model == "authorize" or contact is None:
        return affiliation != "none"
    if model == "presence":
        return contact.subscription in ("from", "both")
    if model == "roster":
        allowed = set(config["pubsub#roster_groups_allowed"])
        return bool(allowed & set(contact.groups)) or affiliation != "none"
    return False


def contact_rules(config: Mapping[str, Any]) -> tuple[str, tuple[str, ...]]:
    """The node's configuration that `admits_contact` reads."""
    return config["pubsub#access_model"], tuple(config.get("pubsub#roster_groups_allowed", ()))


@dataclass(frozen=True)
class Recipients:
    """The implicit recipients of one owner's node, and what they were found from."""

    roster: tuple[RosterItem, ...]  # the owner's roster items as held: the same while unchanged
    rules: tuple[str, tuple[str, ...]]  # contact_rules of the node's configuration
    # (the JID as the roster has it, a session of its account): available, asking for the node.
    sessions: tuple[tuple[str, Session], ...]
    accounts: tuple[str, ...]  # the bare JIDs whose sessions were looked at


class RecipientCache:
    """`Recipients` by (owner, node), the least recently used dropped beyond `size`.

    An entry is used while the owner's roster and the node's rules are the ones it was found
    from (`get`), and dropped when a session of one of its accounts is bound, unbound, becomes
    available or unavailable or announces other caps (`sessions_changed`, a listener of the
    session table), so that it always holds what would be found again.
    """

    def __init__(self, size: int = MAX_RECIPIENT_ENTRIES) -> None:
        self.size = size
        self._entries: OrderedDict[tuple[str, str], Recipients] = OrderedDict()
        # Bare JID -> the entries found from its sessions.
        self._dependents: dict[str, set[tuple[str, str]]] = {}

    def __len__(self) -> int:
        return len(self._entries)

    def get(
        self, key: tuple[str, str], roster: tuple[RosterItem, ...], rules: tuple
    ) -> Recipients | None:
        entry = self._entries.get(key)
        if entry is None:
            return None
        if entry.roster is not roster or entry.rules != rules:
            self._drop(key)
            return None
        self._entries.move_to_end(key)
        return entry

    def put(self, key: tuple[str, str], entry: Recipients) -> None:
        self._drop(key)
        self._entries[key] = entry
        for account in entry.accounts:
            self._dependents.setdefault(account, set()).add(key)
        if len(self._entries) > self.size:
            self._drop(next(iter(self._entries)))

    def sessions_changed(self, bare_jid: str) -> None:
        for key in self._dependents.pop(bare_jid, ()):
            self._drop(key)

    def _drop(self, key: tuple[str, str]) -> None:
        entry = self._entries.pop(key, None)
        if entry is None:
            return
        for account in entry.accounts:
            keys = self._dependents.get(account)
            if keys is not None:
                keys.discard(key)
                if not keys:
                    del self._dependents[account]


def last_item_message(owner: str, node: str, item: PubSubItem, to: str) -> domish.Element:
    """The notification of an item published earlier, with its XEP-0203 delay."""
    message = domish.Element((None, "message"))
    message["from"] = owner
    message["to"] = to
    message["type"] = "headline"
    items = message.addElement((NS_EVENT, "event")).addElement("items")
    items["node"] = node
    element = items.addElement("item")
    element["id"] = item.item_id
    if item.payload:
        element.addRawXml(item.payload)
    delay = message.addElement((NS_DELAY, "delay"))
    delay["from"] = owner
    if item.modified_at is not None:
        delay["stamp"] = item.modified_at.strftime("%Y-%m-%dT%H:%M:%S.%fZ")
    return message


class PepService:
    """The PEP services of a server's accounts, made when first used."""

    def __init__(
        self,
        *,
        domains: frozenset[str],
        store: Any,
        rosters: IRosterStore,
        sessions: SessionManager,
        caps: CapsService,
        pool: WorkerPool,
        broadcaster: Broadcaster,
        limits: ServiceLimits,
        relation: core.RelationCallback,
        blocking: BlockingService | None = None,
        held_rosters: Callable[[str, str], tuple[RosterItem, ...] | None] | None = None,
    ) -> None:
        self.domains = domains
        self.store = store
        self.rosters = rosters
        self.sessions = sessions
        self.caps = caps
        self.pool = pool
        self.broadcaster = broadcaster
        self.limits = limits
        self.relation = relation
        self.blocking = blocking
        # (domain, username) -> the roster items if in memory, else None (RosterCache's): an
        # event whose owner's roster is held is fanned out at once.
        self.held_rosters = held_rosters
        # The implicit recipients of the events fanned out from memory.
        self.recipients = RecipientCache()
        sessions.on_sessions_changed.append(self.recipients.sessions_changed)
        # Account -> its request handler, the least recently used dropped beyond
        # MAX_SERVICES: any JID on a served domain can be asked, an account or not.
        self._components: OrderedDict[str, PubSubComponent] = OrderedDict()
        self._in_flight: dict[Session, int] = {}
        self.results: Counter[str] = Counter()
        # Notifications of one owner's nodes leave in the order of its events, although each
        # waits for a roster read.
        self._order = KeyedLock()
        # Session -> the (owner, node)s whose last item it got in its current availability.
        self._last_sent: dict[Session, set[tuple[str, str]]] = {}
        # The router's work under way, which a stopping server waits for before the database
        # closes: last items and subscription rechecks read the store (set by `install`).
        self.in_flight = InFlight()

    def install(self, router: Router, disco: DiscoService, hook_table: hooks.Hooks) -> None:
        self.in_flight = router.routing
        router.account_iq[NS_PUBSUB, "pubsub"] = self.handle_iq
        router.account_iq[NS_PUBSUB_OWNER, "pubsub"] = self.handle_iq
        disco.add_account_identity("pubsub", "pep")
        disco.add_account_feature(NS_PUBSUB)
        for feature in PEP_FEATURES:
            disco.add_account_feature(f"{NS_PUBSUB}#{feature}")
        disco.add_account_items(self.disco_items)
        self.caps.on_caps_learned.append(self.caps_learned)
        hook_table.add(hooks.USER_AVAILABLE, self.user_available)
        hook_table.add(hooks.USER_UNAVAILABLE, self.user_unavailable)
        hook_table.add(hooks.SESSION_ENDED, self._forget)
        hook_table.add(hooks.PRESENCE_SUBSCRIPTION_CHANGED, self.presence_subscription_changed)

    # -- one service per account ---------------------------------------------------------------

    def component(self, owner: str) -> PubSubComponent:
        """The request handler of the account ``owner`` (a bare JID)."""
        component = self._components.get(owner)
        if component is not None:
            self._components.move_to_end(owner)
        else:
            service = core.PubSubService(
                self.store,
                service_key=owner,
                defaults=PEP_NODE_DEFAULTS,
                limits=self.limits,
                broadcaster=self._event,
                relation=self.relation,
                is_pep=True,
            )
            component = PubSubComponent(
                owner, service, self.pool, in_flight=self._in_flight, results=self.results
            )
            self._components[owner] = component
            if len(self._components) > MAX_SERVICES:
                # Holds no state of its own (nodes live in the store): made again when needed.
                self._components.popitem(last=False)
        return component

    def service(self, owner: str) -> core.PubSubService:
        return self.component(owner).service

    def handle_iq(self, session: Session, iq: domish.Element, target: JID) -> defer.Deferred:
        """A pubsub or pubsub#owner request to the account ``target`` (the router's table)."""
        return self.component(target.userhost()).answer(session, iq)

    async def disco_items(self, requester: JID, account: JID) -> list[DiscoItem]:
        """The account's nodes the requester may read, for its disco#items (XEP-0163 §7)."""
        nodes = await self.service(account.userhost()).list_nodes(requester.full())
        return [DiscoItem(account, node.name) for node in nodes]

    # -- notifications -------------------------------------------------------------------------

    def _event(self, event: core.PubSubEvent) -> None:
        if not isinstance(event, core.NodeEvent):
            self.broadcaster(event)
            return
        if not self._order.locked(event.service):
            # No earlier event of the owner's waits for a read: with what it needs in memory
            # (the owner's roster, the block lists) the fan-out is made at once.
            try:
                fanout = self._fanout_in_memory(event)
            except Exception:
                log.failure("notifying the event of {owner}", owner=event.service)
                return
            if fanout is not _NOT_IN_MEMORY:
                if fanout is not None:
                    self.broadcaster.send(fanout)
                return
        sending = self.broadcaster.send_when_found(self._fanout(event))
        defer.ensureDeferred(sending).addErrback(
            _log_failure, "notifying the event of {owner}", event.service
        )

    def _fanout_in_memory(self, event: core.NodeEvent) -> "Fanout | None | _NotInMemory":
        """The event's notification with every recipient, from what is in memory only;
        _NOT_IN_MEMORY when something must be read first."""
        if self.held_rosters is None or event.config["pubsub#access_model"] in _BY_AFFILIATION:
            return _NOT_IN_MEMORY
        owner = parse_jid(event.service)
        contacts = self.held_rosters(owner.host, owner.user)
        if contacts is None:
            return _NOT_IN_MEMORY
        fanout = fanout_of(event)
        if fanout is None:
            return None
        sessions = self._held_implicit_sessions(event, fanout.recipients, contacts)
        lists: dict[str, frozenset[str]] = {}
        if self.blocking is not None:
            for account in self._block_lists_needed(owner, fanout, sessions):
                held = self.blocking.lists.cached(account)
                if held is None:
                    return _NOT_IN_MEMORY
                lists[account.userhost()] = held
        return self._completed(event.service, fanout, sessions, lists)

    async def _fanout(self, event: core.NodeEvent) -> Fanout | None:
        """The event's notification with every recipient, explicit and implicit, once the
        owner's roster and the block lists in play are read."""
        async with self._order.hold(event.service):
            fanout = fanout_of(event)
            if fanout is None:
                return None
            owner = parse_jid(event.service)
            _, contacts = await self.rosters.get_roster(owner.host, owner.user)
            affiliations: dict[str, str] = {}
            if event.config["pubsub#access_model"] in _BY_AFFILIATION:
                affiliations = await self.store.get_affiliations(event.service, event.node)
            sessions = self._implicit_sessions(event, fanout.recipients, contacts, affiliations)
            lists: dict[str, frozenset[str]] = {}
            if self.blocking is not None:
                for account in self._block_lists_needed(owner, fanout, sessions):
                    lists[account.userhost()] = await self.blocking.block_list(account)
            return self._completed(event.service, fanout, sessions, lists)

    def _implicit_sessions(
        self,
        event: core.NodeEvent,
        explicit: list[Recipient],
        contacts: Iterable[RosterItem],
        affiliations: Mapping[str, str],
    ) -> list[Session]:
        """The owner's and the contacts' available sessions whose caps ask for the node, that
        the access model admits and that no explicit subscription reaches already."""
        admitted = self._admitted(event, contacts, affiliations)
        return _reachable(self._notified(event.node, admitted), explicit)

    def _held_implicit_sessions(
        self, event: core.NodeEvent, explicit: list[Recipient], contacts: tuple[RosterItem, ...]
    ) -> list[Session]:
        """`_implicit_sessions` under an access model that no affiliation decides, with the
        owner's roster as held: found again only when something it was found from changed."""
        key = (event.service, event.node)
        rules = contact_rules(event.config)
        entry = self.recipients.get(key, contacts, rules)
        if entry is None:
            admitted = self._admitted(event, contacts, {})
            entry = Recipients(
                contacts,
                rules,
                tuple(self._notified(event.node, admitted)),
                tuple(account.userhost() for _, account in admitted),
            )
            self.recipients.put(key, entry)
        return _reachable(entry.sessions, explicit)

    def _admitted(
        self,
        event: core.NodeEvent,
        contacts: Iterable[RosterItem],
        affiliations: Mapping[str, str],
    ) -> list[tuple[str, JID]]:
        """The owner and its contacts with a `from`/`both` subscription that the access model
        admits, on the served domains: (the JID as the roster has it, its account)."""
        candidates: list[tuple[str, RosterItem | None]] = [(event.service, None)]
        candidates += [(c.jid, c) for c in contacts if c.subscription in ("from", "both")]
        admitted = []
        for jid, contact in candidates:
            affiliation = "owner" if jid == event.service else affiliations.get(jid, "none")
            if not admits_contact(event.config, contact, affiliation):
                continue
            try:
                account = parse_jid(jid)
            except (InvalidFormat, UnicodeError):
                continue
            if account.host in self.domains:
                admitted.append((jid, account))
        return admitted

    def _notified(self, node: str, admitted: list[tuple[str, JID]]) -> list[tuple[str, Session]]:
        """The admitted accounts' available sessions whose caps ask for the node, closing ones
        too (see `SessionManager.bound_sessions_of`), each with the JID it was admitted as."""
        return [
            (jid, session)
            for jid, account in admitted
            for session in self.sessions.bound_sessions_of(account)
            if session.message_priority is not None and self.caps.wants_notify(session, node)
        ]

    def _block_lists_needed(
        self, owner: JID, fanout: Fanout, sessions: Iterable[Session]
    ) -> list[JID]:
        """The accounts whose block lists decide whom the owner's notification may reach: the
        owner's, the implicit recipients', and those of the local explicit recipients it may
        reach (with sessions here, or any when kept offline)."""
        accounts = {owner.userhost(): owner}
        for recipient in fanout.recipients:
            try:
                account = parse_jid(recipient.jid).userhostJID()
            except (InvalidFormat, UnicodeError):
                continue
            if account.user is None or account.host not in self.domains:
                continue
            if fanout.store_offline or self.sessions.sessions_of(account):
                accounts.setdefault(account.userhost(), account)
        for session in sessions:
            account = session.jid.userhostJID()
            accounts.setdefault(account.userhost(), account)
        return list(accounts.values())

    def _completed(
        self,
        owner: str,
        fanout: Fanout,
        sessions: list[Session],
        lists: Mapping[str, frozenset[str]],
    ) -> Fanout:
        """The fan-out with its implicit sessions, without whom a block list in ``lists``
        ({bare JID: list}, the owner's among them) keeps from it, either way."""
        if not any(lists.values()):
            return replace(fanout, sessions=tuple(sessions))
        owner_jid = parse_jid(owner)

        def blocked(jid: JID) -> bool:
            return _blocked_either_way(owner_jid, lists, jid)

        kept = tuple(session for session in sessions if not blocked(session.jid))
        return replace(fanout, sessions=kept, blocked=blocked)

    async def _blocked(self, owner: str, recipient: JID) -> bool:
        """Whether the owner's items must not reach ``recipient`` (a session's full JID)."""
        if self.blocking is None or recipient.userhost() == owner:
            return False
        owner_jid = parse_jid(owner)
        lists = {
            owner: await self.blocking.block_list(owner_jid),
            recipient.userhost(): await self.blocking.block_list(recipient.userhostJID()),
        }
        return _blocked_either_way(owner_jid, lists, recipient)

    # -- the last items --------------------------------------------------------------------------

    def caps_learned(self, session: Session) -> None:
        """The session's caps became known (or it announced other caps)."""
        if session.message_priority is not None:
            self._spawn_last_items(session, None)

    def user_available(self, session: Session) -> None:
        """Initial presence handled: caps known from an earlier presence count too."""
        if self.caps.features_of(session):
            self._spawn_last_items(session, None)

    def user_unavailable(self, session: Session, presence: Any) -> None:
        self._last_sent.pop(session, None)

    def _forget(self, session: Session) -> None:
        self._last_sent.pop(session, None)

    def presence_subscription_changed(self, owner: JID, item: RosterItem) -> None:
        """A new contact gets the owner's last items; one that no longer sees the owner's
        presence loses its subscriptions to nodes that required it."""
        if item.subscription in ("from", "both"):
            contact = parse_jid(item.jid)
            if contact.host in self.domains:
                for session in self.sessions.sessions_of(contact):
                    if session.message_priority is not None:
                        self._spawn_last_items(session, owner.userhost())
            return
        rechecking = defer.ensureDeferred(self._recheck(owner.userhost(), item.jid))
        rechecking.addErrback(
            _log_failure, "rechecking PEP subscriptions for {owner}", owner.full()
        )
        self.in_flight.track(rechecking)

    async def _recheck(self, owner: str, contact: str) -> None:
        """Recheck the contact's subscriptions in a queue, if it has any: most contacts have
        none, and a subscription exchange must not fill the queues with work that finds none."""
        if not await self.store.subscriptions_of(owner, contact):
            return
        service = self.service(owner)
        try:
            await self.pool.submit(owner, "", lambda: service.recheck_access(contact))
        except QueueFull:
            log.warn("PEP of {owner} too busy to recheck {jid}", owner=owner, jid=contact)

    def _spawn_last_items(self, session: Session, only_owner: str | None) -> None:
        sending = defer.ensureDeferred(self._send_last_items(session, only_owner))
        sending.addErrback(_log_failure, "sending last PEP items to {owner}", session.jid.full())
        self.in_flight.track(sending)

    async def _send_last_items(self, session: Session, only_owner: str | None) -> None:
        """Send the session the last item of each node it asks for, of its own account and of
        the contacts whose presence it sees (or of ``only_owner``), not sent already."""
        wanted = notify_nodes(self.caps.features_of(session) or ())
        if not wanted:
            return
        user = session.jid.userhostJID()
        if only_owner is None:
            _, contacts = await self.rosters.get_roster(user.host, user.user)
            owners = [user.full()] + sorted(
                c.jid for c in contacts if c.subscription in ("to", "both")
            )
        else:
            owners = [only_owner]
        if self.sessions.session(session.jid) is not session or session.message_priority is None:
            # Ended or unavailable meanwhile: an entry made now would never be removed.
            return
        sent = self._last_sent.setdefault(session, set())
        for owner in owners:
            service = self.service(owner)
            blocked: bool | None = None  # read once per owner, at its first item
            for node in sorted(wanted):
                if (owner, node) in sent:
                    continue
                # Marked before the reads, so that a second trigger meanwhile skips it.
                sent.add((owner, node))
                item = await service.last_published(session.jid.full(), node)
                if item is not None and blocked is None:
                    blocked = await self._blocked(owner, session.jid)
                if blocked:
                    item = None  # as if not allowed
                if item is None or session.closed:
                    sent.discard((owner, node))  # nothing yet, or not allowed: not sent
                else:
                    session.send(last_item_message(owner, node, item, session.jid.full()))


def _reachable(found: Iterable[tuple[str, Session]], explicit: list[Recipient]) -> list[Session]:
    """The sessions found (`PepService._notified`) that are not closing and that no explicit
    subscription reaches already, by their JID as admitted or their full JID."""
    reached = {recipient.jid for recipient in explicit}
    if not reached:
        return [session for _, session in found if not session.closed]
    return [
        session
        for jid, session in found
        if not session.closed and jid not in reached and session.full_jid not in reached
    ]


def _log_failure(failure: Failure, what: str, owner: str) -> None:
    log.failure(what, failure, owner=owner)
