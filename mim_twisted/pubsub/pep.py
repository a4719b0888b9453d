"""PEP (XEP-0163): one PubSub service per account, on the core, storage and worker pool of
`pubsub.<domain>`.

Each account's bare JID is a service key (`PubSubService` with the PEP defaults and `is_pep`),
and its requests go through the same worker pool under (bare JID, node), so one node's requests
stay in order. The IQs with the pubsub namespaces addressed to an account's bare JID (or to no
one: the sender's own account) reach it through the router's account IQ table.

Who is notified of a node event (`PepService._notify`): the explicit subscribers, as on any
node, and, without subscribing (XEP-0163 §4), every available resource of the owner and of its
contacts with a `from`/`both` presence subscription whose entity caps ask for `<node>+notify`,
each held to the node's access model. The last item goes to such a resource once per
availability: when its available presence arrives with known caps, when its caps become known
later, and when a contact's presence subscription is approved, with an XEP-0203 delay.

Blocking (XEP-0191) holds both ways, as for messages: neither notifications nor last items go
to a contact the owner has blocked, or to one that has blocked the owner, subscribed or not.
"""

from collections import Counter, OrderedDict
from collections.abc import Callable, Iterable, Mapping
from dataclasses import replace
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

# The affiliations that pass a whitelist node (XEP-0060 §4.5).
_WHITELISTED = frozenset({"owner", "publisher", "member"})


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
        if isinstance(event, core.NodeEvent):
            sending = self.broadcaster.send_when_found(self._fanout(event))
            defer.ensureDeferred(sending).addErrback(
                _log_failure, "notifying the event of {owner}", event.service
            )
        else:
            self.broadcaster(event)

    async def _fanout(self, event: core.NodeEvent) -> Fanout | None:
        """The event's notification with every recipient, explicit and implicit."""
        async with self._order.hold(event.service):
            fanout = fanout_of(event)
            if fanout is None:
                return None
            implicit = await self._implicit_recipients(event, fanout.recipients)
            recipients = fanout.recipients + implicit
            blocked = await self._blocked_check(
                event.service, [r.jid for r in recipients], fanout.store_offline
            )
            return replace(fanout, recipients=recipients, blocked=blocked)

    async def _blocked_check(
        self, owner: str, recipients: Iterable[str], store_offline: bool
    ) -> Callable[[JID], bool] | None:
        """Whom the owner's notification must not reach, blocked one way or the other; None
        when no list in play blocks anything. The lists read are the owner's and those of the
        local recipients it may reach: with sessions here, or any when kept offline."""
        if self.blocking is None:
            return None
        owner_jid = parse_jid(owner)
        owner_list = await self.blocking.block_list(owner_jid)
        lists: dict[str, frozenset[str]] = {}
        for recipient in recipients:
            try:
                account = parse_jid(recipient).userhostJID()
            except (InvalidFormat, UnicodeError):
                continue
            key = account.userhost()
            if account.user is None or account.host not in self.domains or key in lists:
                continue
            if store_offline or self.sessions.sessions_of(account):
                lists[key] = await self.blocking.block_list(account)
        if not owner_list and not any(lists.values()):
            return None

        def blocked(jid: JID) -> bool:
            if jid.userhost() == owner:
                return False  # the owner's own resources: never blocked
            theirs = lists.get(jid.userhost(), frozenset())
            return blocks(owner_list, jid) or blocks(theirs, owner_jid)

        return blocked

    async def _blocked(self, owner: str, recipient: JID) -> bool:
        """Whether the owner's items must not reach ``recipient`` (a session's full JID)."""
        if self.blocking is None or recipient.userhost() == owner:
            return False
        check = await self._blocked_check(owner, [recipient.full()], False)
        return check is not None and check(recipient)

    async def _implicit_recipients(
        self, event: core.NodeEvent, explicit: list[Recipient]
    ) -> list[Recipient]:
        """The owner's and the contacts' available resources whose caps ask for the node, that
        the access model admits and that no explicit subscription reaches already."""
        owner = parse_jid(event.service)
        _, contacts = await self.rosters.get_roster(owner.host, owner.user)
        affiliations: dict[str, str] = {}
        if event.config["pubsub#access_model"] in ("whitelist", "authorize", "roster"):
            affiliations = await self.store.get_affiliations(event.service, event.node)
        reached = {recipient.jid for recipient in explicit}
        candidates: list[tuple[str, RosterItem | None]] = [(event.service, None)]
        candidates += [(c.jid, c) for c in contacts if c.subscription in ("from", "both")]
        recipients = []
        for jid, contact in candidates:
            affiliation = "owner" if jid == event.service else affiliations.get(jid, "none")
            if jid in reached or not admits_contact(event.config, contact, affiliation):
                continue
            for session in self._wanting(jid, event.node):
                if session.jid.full() not in reached:
                    recipients.append(Recipient(session.jid.full()))
        return recipients

    def _wanting(self, bare: str, node: str) -> list[Session]:
        """The available sessions of a local bare JID whose caps ask for the node."""
        try:
            jid = parse_jid(bare)
        except Exception:
            return []
        if jid.host not in self.domains:
            return []
        return [
            session
            for session in self.sessions.sessions_of(jid)
            if session.message_priority is not None and self.caps.wants_notify(session, node)
        ]

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


def _log_failure(failure: Failure, what: str, owner: str) -> None:
    log.failure(what, failure, owner=owner)
