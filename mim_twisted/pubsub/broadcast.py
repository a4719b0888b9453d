"""Notification fan-out (XEP-0060 §7.1.2, §12): from core events to <message/>s to subscribers.

The core hands over an event while the worker is still on the request; unless `sync` is set
(MongooseIM's behaviour), the fan-out is only scheduled then and runs after the request's reply,
outside the worker, so a large audience never holds up the node's next request. A big fan-out
is cut into slices handed to Twisted's cooperator, so other connections keep being served.

Each notification is serialised once: the bytes before and after the `to` attribute are kept
and only the escaped recipient JID is put between them for each subscriber. A session on another
cluster node is handed the notification itself (`notify`), so that its node gets it once for
all its sessions (cluster/sessions.py) and addresses the copies there.

Notifications that are kept for offline subscribers (`Fanout.store_offline`) are kept only for
accounts on the served domains: an owner may subscribe any JID, a remote one too, and a local
name that has no account is logged without a traceback.
"""

import operator
import secrets
from collections.abc import Awaitable, Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass

from twisted.internet import defer, task
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.words.protocols.jabber.jid import JID, InvalidFormat
from twisted.words.xish import domish

from mim_twisted.im.offline import OfflineDelivery
from mim_twisted.im.sessions import Session, SessionManager
from mim_twisted.pubsub import core
from mim_twisted.pubsub.forms import node_config_form, subscription_authorization_form
from mim_twisted.pubsub.protocol import subscription_element
from mim_twisted.storage.interfaces import AccountNotFound, PubSubSubscription
from mim_twisted.xmpp.jids import parse_jid
from mim_twisted.xmpp.serialise import escape_attribute

log = Logger()

NS_EVENT = "http://jabber.org/protocol/pubsub#event"
NS_SHIM = "http://jabber.org/protocol/shim"
SLICE = 200  # notifications written per cooperator step
LOOKUP_SLICE = 1000  # recipients looked up per cooperator step


class Notification:
    """A message serialised once, addressed per recipient.

    Made of the message element, or (`of_text`) of its text, written directly by whoever knows
    its shape (an item's publication, the commonest), with a function that makes the same
    message as an element only if it is asked for: kept offline, or copied for SHIM headers.
    """

    def __init__(self, message: domish.Element) -> None:
        marker = "mim-to-" + secrets.token_hex(8)
        message["to"] = marker
        head, tail = message.toXml(defaultUri="jabber:client").split(marker)
        self._element: domish.Element | None = message
        self._make: Callable[[], domish.Element] = lambda: message
        self._head = head.encode("utf-8")
        self._tail = tail.encode("utf-8")

    @classmethod
    def of_text(cls, head: str, tail: str, make: Callable[[], domish.Element]) -> "Notification":
        """The message ``head`` + the escaped recipient JID + ``tail``, which ``make()`` makes as
        an element."""
        notification = cls.__new__(cls)
        notification._element = None
        notification._make = make
        notification._head = head.encode("utf-8")
        notification._tail = tail.encode("utf-8")
        return notification

    @property
    def element(self) -> domish.Element:
        if self._element is None:
            self._element = self._make()
        return self._element

    def to(self, recipient: str) -> bytes:
        return self._head + escape_attribute(recipient).encode("utf-8") + self._tail

    def template(self, placeholder: str) -> str:
        """The serialised message with `placeholder` where the escaped recipient goes."""
        return self._head.decode("utf-8") + placeholder + self._tail.decode("utf-8")


def _show(session: Session) -> str:
    presence = session.presence
    show = next(presence.elements(presence.uri, "show"), None) if presence is not None else None
    return str(show).strip() if show is not None else "online"


@dataclass(frozen=True)
class Recipient:
    jid: str  # as subscribed: a bare JID reaches every available resource, a full JID one
    subids: tuple[str, ...] = ()  # set when the JID has several subscriptions (SHIM headers)
    show_values: frozenset[str] | None = None  # pubsub#show-values; None: any presence


@dataclass(frozen=True)
class Fanout:
    notification: Notification
    recipients: list[Recipient]
    store_offline: bool = False  # keep it for bare JIDs with no available resource
    # Whom it must not reach (XEP-0191 blocking, PEP): asked of each recipient as subscribed
    # and of each of its sessions.
    blocked: Callable[[JID], bool] | None = None
    # Sessions reached as they are, each addressed by its full JID: PEP's implicit recipients,
    # found and checked (access model, blocking) by whoever made the fan-out.
    sessions: tuple[Session, ...] = ()


class Broadcaster:
    """Delivers the events of the PubSub services of one server to local sessions.

    ``domains`` are the served domains, whose accounts may have notifications kept offline;
    None leaves the offline store to refuse what it does not hold (it is then asked about
    remote JIDs too).
    """

    def __init__(
        self,
        sessions: SessionManager,
        offline: OfflineDelivery,
        clock: IReactorTime,
        *,
        domains: Iterable[str] | None = None,
        sync: bool = False,
    ) -> None:
        self.sessions = sessions
        self.offline = offline
        self.clock = clock
        self.domains = None if domains is None else frozenset(domains)
        self.sync = sync
        self.cooperator = task.Cooperator(scheduler=lambda work: clock.callLater(0, work))
        # Fan-outs scheduled or being written, and notifications being kept offline: what a
        # stop waits for.
        self._in_flight = 0
        self._idle_waiters: list[defer.Deferred] = []

    def __call__(self, event: core.PubSubEvent) -> None:
        if self.sync:
            self._fan_out(event)
        else:
            self._begin()
            self.clock.callLater(0, self._fan_out_scheduled, event)

    def _fan_out_scheduled(self, event: core.PubSubEvent) -> None:
        try:
            self._fan_out(event)
        finally:
            self._end()

    def _fan_out(self, event: core.PubSubEvent) -> None:
        try:
            fanout = fanout_of(event)
        except Exception:
            log.failure("building the notification of {event!r}", event=event)
            return
        if fanout is not None:
            self.send(fanout)

    def send(self, fanout: Fanout) -> None:
        """Write a notification to its recipients: at once with `sync`, else in slices."""
        if self.sync:
            for _ in self._write(fanout):
                pass
        else:
            self._begin()
            writing = self.cooperator.cooperate(self._write(fanout)).whenDone()
            writing.addErrback(_not_written)
            writing.addBoth(lambda _: self._end())

    async def send_when_found(self, finding: Awaitable[Fanout | None]) -> None:
        """Send a notification whose recipients are still being found (PEP reads the owner's
        roster first): a stop waits for it as for any fan-out under way."""
        self._begin()
        try:
            fanout = await finding
            if fanout is not None:
                self.send(fanout)
        finally:
            self._end()

    def _begin(self) -> None:
        self._in_flight += 1

    def _end(self) -> None:
        self._in_flight -= 1
        if self._in_flight == 0:
            waiters, self._idle_waiters = self._idle_waiters, []
            for waiter in waiters:
                waiter.callback(None)

    def stop(self) -> defer.Deferred:
        """Finish the notifications under way (kept offline for who is gone meanwhile), then
        stop the cooperator; fires once done."""
        idle: defer.Deferred = defer.Deferred()
        if self._in_flight == 0:
            idle.callback(None)
        else:
            self._idle_waiters.append(idle)
        return idle.addCallback(lambda _: self.cooperator.stop())

    def _write(self, fanout: Fanout) -> Iterator[None]:
        """Each step looks up to LOOKUP_SLICE recipients up (what goes to another node's
        sessions is handed over at once, so their node gets it in one bus message), then the
        local copies are written, SLICE per step."""
        recipients = fanout.recipients
        for start in range(0, len(recipients), LOOKUP_SLICE):
            writes: list[tuple[Session, Notification, str]] = []
            for recipient in recipients[start : start + LOOKUP_SLICE]:
                self._deliver(fanout, recipient, writes)
            yield from self._write_copies(writes)
        writes = []
        for session in fanout.sessions:
            _hand(session, fanout.notification, session.full_jid, writes)
        yield from self._write_copies(writes)

    def _write_copies(self, writes: list[tuple[Session, Notification, str]]) -> Iterator[None]:
        """The local copies, SLICE per cooperator step."""
        if not writes:
            yield None
        for first in range(0, len(writes), SLICE):
            for session, notification, address in writes[first : first + SLICE]:
                if not session.closed:
                    session.send(notification.to(address))
            yield None

    def _deliver(
        self,
        fanout: Fanout,
        recipient: Recipient,
        writes: list[tuple[Session, Notification, str]],
    ) -> None:
        """Send to the recipient's sessions on other nodes, keep it offline if it has none
        anywhere, and add the copies for its sessions here to `writes`."""
        try:
            jid = parse_jid(recipient.jid)
        except (InvalidFormat, UnicodeError):
            return
        if fanout.blocked is not None and fanout.blocked(jid):
            return
        notification = fanout.notification
        if recipient.subids:
            notification = _with_subids(notification, recipient.subids)
        if jid.resource is not None:
            session = self.sessions.session(jid)
            sessions = [session] if session is not None else []
        else:
            # By the presence as received, like messages (MessageRouter): a session whose
            # initial presence is still being handled already takes notifications.
            sessions = [
                s
                for s in self.sessions.sessions_of(jid)
                if s.message_priority is not None and s.message_priority >= 0
            ]
        if recipient.show_values is not None:
            sessions = [s for s in sessions if _show(s) in recipient.show_values]
        for session in sessions:
            if fanout.blocked is None or not fanout.blocked(session.jid):
                _hand(session, notification, recipient.jid, writes)
        if not sessions and fanout.store_offline and self._has_offline_storage(jid):
            message = notification.element
            message["to"] = jid.full()
            self._begin()
            keeping = self.offline.keep(jid, message).addErrback(_not_kept, jid)
            keeping.addBoth(lambda _: self._end())

    def _has_offline_storage(self, jid: JID) -> bool:
        """Whether ``jid`` is a bare JID that may be a local account."""
        if jid.user is None or jid.resource is not None:
            return False
        return self.domains is None or jid.host in self.domains


def _hand(
    session: Session,
    notification: Notification,
    address: str,
    writes: list[tuple[Session, Notification, str]],
) -> None:
    """A session on another node takes the notification as it is (RemoteSession); a copy for
    a session here is added to `writes`."""
    notify = getattr(session, "notify", None)
    if notify is None:
        writes.append((session, notification, address))
    else:
        notify(notification, address)


def _not_written(failure: Failure) -> None:
    log.failure("writing PubSub notifications", failure)


def _not_kept(failure: Failure, jid: JID) -> None:
    if failure.check(AccountNotFound):
        # Subscribed by an owner, but no such account here: nothing to keep it for.
        log.info("no account {jid} to keep a PubSub notification for", jid=jid.full())
    else:
        log.failure("keeping a PubSub notification for {jid}", failure, jid=jid.full())


def fanout_of(event: core.PubSubEvent) -> Fanout | None:
    """What an event sends to whom; None when nobody is to be told."""
    if isinstance(event, core.SubscriptionPending):
        message = _message(event.service, "normal")
        message.addChild(
            subscription_authorization_form(event.node, event.subscription).toElement()
        )
        return Fanout(Notification(message), [Recipient(owner) for owner in event.owners])
    if isinstance(event, core.SubscriptionChanged):
        if not event.notify:
            return None
        message = _message(event.service, "normal")
        subscription_element(
            message.addElement((NS_EVENT, "event")), event.node, event.subscription
        )
        return Fanout(Notification(message), [Recipient(event.subscription.jid)])
    if not isinstance(event, core.NodeEvent) or not event.notify:
        return None
    config = event.config
    if isinstance(event, core.ItemPublished) and not config.get(
        "pubsub#deliver_notifications", True
    ):
        return None
    kind = config.get("pubsub#notification_type", "headline")
    message_id = secrets.token_hex(6)

    def message() -> domish.Element:
        made = _message(event.service, kind, message_id)
        made.addElement((NS_EVENT, "event")).addChild(_event_payload(event))
        return made

    if isinstance(event, core.ItemPublished):
        notification = _published_notification(event, kind, message_id, message)
    else:
        notification = Notification(message())
    return Fanout(
        notification,
        _subscribers(event),
        store_offline=kind == "normal" and not config.get("pubsub#presence_based_delivery", False),
    )


def _published_notification(
    event: core.ItemPublished, kind: str, message_id: str, message: Callable[[], domish.Element]
) -> Notification:
    """The notification of a publication, written as text: what ``message()`` serialises to."""
    item = ""
    if event.item_id is not None:
        attributes = f" id='{escape_attribute(event.item_id)}'"
        if event.config.get("pubsub#itemreply") == "publisher":
            attributes += f" publisher='{escape_attribute(event.publisher)}'"
        if event.payload and event.config.get("pubsub#deliver_payloads", True):
            item = f"<item{attributes}>{event.payload}</item>"
        else:
            item = f"<item{attributes}/>"
    head = (
        f"<message from='{escape_attribute(event.service)}' type='{escape_attribute(kind)}'"
        f" id='{message_id}' to='"
    )
    tail = (
        f"'><event xmlns='{NS_EVENT}'><items node='{escape_attribute(event.node)}'>{item}</items>"
        "</event></message>"
    )
    return Notification.of_text(head, tail, message)


class _RecipientLists:
    """The recipients of the subscriptions of a node, kept for as long as its subscriptions
    are the same objects: the node cache hands every publication its own copy of the list it
    holds, with the same subscription objects in it until one changes, so a node's thousand
    subscribers are sorted out once, not at each publication. An entry holds the subscriptions
    it was made from, whose identities therefore stay theirs."""

    def __init__(self, size: int) -> None:
        self.size = size
        self._lists: dict[tuple[int, int, bool], tuple[tuple, list[Recipient]]] = {}

    def get(self, subscriptions: Sequence[PubSubSubscription], deleted: bool) -> list[Recipient]:
        if not subscriptions:
            return []
        key = (len(subscriptions), id(subscriptions[0]), deleted)
        held = self._lists.get(key)
        if held is None or not all(map(operator.is_, held[0], subscriptions)):
            if held is None and len(self._lists) >= self.size:
                del self._lists[next(iter(self._lists))]
            held = self._lists[key] = (tuple(subscriptions), _recipients(subscriptions, deleted))
        return list(held[1])


_recipient_lists = _RecipientLists(256)


def _subscribers(event: core.NodeEvent) -> list[Recipient]:
    """One recipient per subscribed JID (a node deletion also tells pending subscribers)."""
    return _recipient_lists.get(event.subscriptions, isinstance(event, core.NodeDeleted))


def _recipients(subscriptions: Iterable[PubSubSubscription], deleted: bool) -> list[Recipient]:
    states = ("subscribed", "pending") if deleted else ("subscribed",)
    by_jid: dict[str, list[PubSubSubscription]] = {}
    for subscription in subscriptions:
        if subscription.state in states and subscription.options.get("pubsub#deliver", True):
            by_jid.setdefault(subscription.jid, []).append(subscription)
    return [
        Recipient(
            jid,
            tuple(s.subid for s in subscriptions) if len(subscriptions) > 1 else (),
            _show_values(subscriptions),
        )
        for jid, subscriptions in by_jid.items()
    ]


def _show_values(subscriptions: list[PubSubSubscription]) -> frozenset[str] | None:
    """The presence shows any of the subscriptions asked for (pubsub#show-values)."""
    values: set[str] = set()
    for subscription in subscriptions:
        wanted = subscription.options.get("pubsub#show-values")
        if not wanted:
            return None
        values.update(wanted)
    return frozenset(values)


def _message(service: str, kind: str, message_id: str | None = None) -> domish.Element:
    message = domish.Element((None, "message"))
    message["from"] = service
    message["type"] = kind
    message["id"] = message_id or secrets.token_hex(6)
    return message


def _with_subids(notification: Notification, subids: tuple[str, ...]) -> Notification:
    message = notification.element
    copy = domish.Element((None, "message"), attribs=dict(message.attributes))
    for child in message.elements():
        copy.addChild(child)
    headers = copy.addElement((NS_SHIM, "headers"))
    for subid in subids:
        headers.addElement("header", content=subid)["name"] = "SubId"
    return Notification(copy)


def _event_payload(event: core.NodeEvent) -> domish.Element:
    if isinstance(event, core.ItemPublished):
        items = domish.Element((NS_EVENT, "items"))
        items["node"] = event.node
        if event.item_id is not None:
            item = items.addElement("item")
            item["id"] = event.item_id
            if event.config.get("pubsub#itemreply") == "publisher":
                item["publisher"] = event.publisher
            if event.payload and event.config.get("pubsub#deliver_payloads", True):
                item.addRawXml(event.payload)
        return items
    if isinstance(event, core.ItemsRetracted):
        items = domish.Element((NS_EVENT, "items"))
        items["node"] = event.node
        for item_id in event.item_ids:
            items.addElement("retract")["id"] = item_id
        return items
    if isinstance(event, core.NodePurged):
        purge = domish.Element((NS_EVENT, "purge"))
        purge["node"] = event.node
        return purge
    if isinstance(event, core.NodeDeleted):
        delete = domish.Element((NS_EVENT, "delete"))
        delete["node"] = event.node
        if event.redirect:
            delete.addElement("redirect")["uri"] = event.redirect
        return delete
    configuration = domish.Element((NS_EVENT, "configuration"))
    configuration["node"] = event.node
    if event.config.get("pubsub#deliver_payloads", True):
        configuration.addChild(node_config_form(event.config, "result").toElement())
    return configuration
