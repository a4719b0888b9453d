"""The PubSub service (XEP-0060) without XML: nodes, configuration, affiliations, subscriptions,
access and publish models.

One ``PubSubService`` serves one service key: the ``pubsub.<domain>`` host, or one account's
bare JID for PEP (XEP-0163). It reaches its data only through an ``IPubSubStore``, tells the
world what happened by handing events to an injected broadcaster (which decides who receives
what), and learns about rosters only through an injected ``relation`` callback. Refusals are
raised as ``PubSubError``s (``mim_twisted.pubsub.errors``) for the protocol layer to render.

As in Prosody's util/pubsub.lua, every operation starts with one check against a capability table
per affiliation (XEP-0060 §4.1); entities without affiliation then pass the node's access model.
The requests for one node are serialised by the worker pool (``pubsub/queues.py``), so a check
followed by a write does not race with another request on the node.

JIDs are strings already normalised by the protocol layer; ``actor`` is the requester's full JID.
"""

import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, replace
from types import MappingProxyType
from typing import Any, NamedTuple

from mim_twisted.pubsub.config import (
    SUBSCRIPTION_DEFAULTS,
    NodeDefaults,
    ServiceLimits,
    bounded,
    check_preconditions,
    validate_config,
    validate_subscription_options,
)
from mim_twisted.pubsub.errors import (
    Conflict,
    Forbidden,
    ItemNotFoundError,
    NodeNotFoundError,
    PartlyFailed,
    PubSubError,
    Unsupported,
)
from mim_twisted.storage.interfaces import (
    NodeExists,
    PubSubItem,
    PubSubNode,
    PubSubSubscription,
)

# What each affiliation may do (XEP-0060 §4.1). Entities with "none" are further held to the
# node's access model, and the publish model can let them (and members) publish.
CAPABILITIES: Mapping[str, frozenset[str]] = MappingProxyType(
    {
        "owner": frozenset(
            {
                "subscribe",
                "get_items",
                "publish",
                "retract_any",
                "purge",
                "delete",
                "configure",
                "manage_affiliations",
                "manage_subscriptions",
            }
        ),
        # §4.1 allows publishers to delete any item of the node; MongooseIM and ejabberd do.
        "publisher": frozenset({"subscribe", "get_items", "publish", "retract_any"}),
        "publish-only": frozenset({"publish", "retract_own"}),
        "member": frozenset({"subscribe", "get_items"}),
        "none": frozenset({"subscribe", "get_items"}),
        "outcast": frozenset(),
    }
)


def may(affiliation: str, capability: str) -> bool:
    """Whether the affiliation grants the capability (see CAPABILITIES)."""
    return capability in CAPABILITIES[affiliation]


def bare_jid(jid: str) -> str:
    # A localpart or domainpart never contains "/", so the first one starts the resource.
    return jid.partition("/")[0]


@dataclass(frozen=True)
class Relation:
    """What a node owner's roster says about a requester, for the presence and roster models."""

    presence_subscribed: bool = False  # the requester receives the owner's presence (from/both)
    groups: frozenset[str] = frozenset()  # the owner's roster groups the requester is in


RelationCallback = Callable[[str, str], Awaitable[Relation]]


class SubscriptionChange(NamedTuple):
    """One entry of an owner's subscription modification (XEP-0060 §8.8.2): ``state`` is
    "subscribed" or "none"; without ``subid`` it applies to the JID's only subscription."""

    jid: str
    state: str
    subid: str | None = None


@dataclass(frozen=True)
class NodeCreated:
    service: str
    node: str
    config: Mapping[str, Any]
    owner: str  # bare JID


@dataclass(frozen=True, kw_only=True)
class NodeEvent:
    """Something subscribers may be notified of. It carries the node's configuration and
    subscriptions as they were when it happened (a deleted node's are gone from the store by
    the time it is broadcast), and ``notify``: whether the configuration asks for notifying."""

    service: str
    node: str
    config: Mapping[str, Any]
    subscriptions: tuple[PubSubSubscription, ...]
    notify: bool


@dataclass(frozen=True, kw_only=True)
class ItemPublished(NodeEvent):
    """A publication. ``payload`` is the item's child element as XML text, "" for none; the
    broadcaster leaves it out when ``config["pubsub#deliver_payloads"]`` is false.
    ``item_id`` is None for a transient notification-only node published to without item."""

    item_id: str | None
    payload: str
    publisher: str  # full JID


@dataclass(frozen=True, kw_only=True)
class ItemsRetracted(NodeEvent):
    """Items removed: by a retract request, or the oldest ones pushed out by a publication
    (this event then follows its ItemPublished, and is only computed with notify_retract)."""

    item_ids: tuple[str, ...]


@dataclass(frozen=True, kw_only=True)
class NodePurged(NodeEvent):
    pass


@dataclass(frozen=True, kw_only=True)
class NodeDeleted(NodeEvent):
    """``subscriptions`` include pending ones, to be notified too (XEP-0060 §8.4.2)."""

    redirect: str | None


@dataclass(frozen=True, kw_only=True)
class NodeConfigured(NodeEvent):
    """``config`` is the new configuration."""


@dataclass(frozen=True)
class SubscriptionChanged:
    """A subscription was created, approved, removed or denied (``subscription.state`` "none").
    ``notify``: the subscriber did not ask for it (an owner did), so it should be told
    (XEP-0060 §12.6); otherwise the IQ result told it."""

    service: str
    node: str
    subscription: PubSubSubscription
    notify: bool


@dataclass(frozen=True)
class SubscriptionPending:
    """A subscription to an authorize node awaits approval: ask the owners (XEP-0060 §8.6)."""

    service: str
    node: str
    subscription: PubSubSubscription
    owners: tuple[str, ...]


@dataclass(frozen=True)
class AffiliationChanged:
    """An owner changed an affiliation ("none": removed); XEP-0060 §8.9.4 lets us tell them."""

    service: str
    node: str
    jid: str  # bare JID
    affiliation: str


PubSubEvent = (
    NodeCreated | NodeEvent | SubscriptionChanged | SubscriptionPending | AffiliationChanged
)
Broadcaster = Callable[[PubSubEvent], object]


@dataclass(frozen=True)
class Publication:
    """One publish request: the arguments of ``PubSubService.publish``."""

    actor: str
    node: str | None
    item_id: str | None = None
    payload: str | None = None
    publish_options: Mapping[str, Any] | None = None
    has_item: bool = True


@dataclass
class _NodeState:
    """A node as one request sees it: its configuration and affiliations."""

    node: PubSubNode
    affiliations: dict[str, str]

    @property
    def name(self) -> str:
        return self.node.name

    @property
    def config(self) -> Mapping[str, Any]:
        return self.node.config

    def affiliation(self, jid: str) -> str:
        return self.affiliations.get(bare_jid(jid), "none")

    @property
    def owners(self) -> tuple[str, ...]:
        return tuple(jid for jid, aff in self.affiliations.items() if aff == "owner")


# The configuration fields that decide who may subscribe.
_ACCESS_FIELDS = ("pubsub#access_model", "pubsub#roster_groups_allowed")


def _new_id() -> str:
    # Random, so ids reveal nothing and need no coordination between processes.
    return uuid.uuid4().hex


def _check_publication(config: Mapping[str, Any], has_item: bool, payload: str | None) -> None:
    """XEP-0060 §7.1.3.6: what a publication must hold depends on the node's event type (§4.3),
    and its size on the node's max_payload_size (§7.1.3.4)."""
    persistent, payloads = config["pubsub#persist_items"], config["pubsub#deliver_payloads"]
    if not has_item:
        if persistent:
            raise PubSubError("bad-request", "item-required")
        if payloads:
            raise PubSubError("bad-request", "payload-required")
    elif not persistent and not payloads:
        raise PubSubError("bad-request", "item-forbidden")
    elif payloads and not payload:
        raise PubSubError("bad-request", "payload-required")
    if payload and len(payload.encode()) > config["pubsub#max_payload_size"]:
        raise PubSubError("not-acceptable", "payload-too-big")


def _require_node(node: str | None) -> str:
    if not node:
        raise PubSubError("bad-request", "nodeid-required")
    return node


def _require_jid(jid: str | None) -> str:
    if not jid:
        raise PubSubError("bad-request", "jid-required")
    return jid


class PubSubService:
    """The XEP-0060 rules for one service key, over an IPubSubStore.

    ``defaults`` are the configuration of new nodes (``config.GENERIC_NODE_DEFAULTS`` or
    ``config.PEP_NODE_DEFAULTS``), lowered to ``limits``. With ``is_pep`` only the account
    (``service_key``) creates nodes, and its publishing to a missing node creates it.
    ``relation(owner, requester)`` answers for the presence and roster access models; without it
    they admit nobody but affiliates.
    """

    def __init__(
        self,
        store: Any,
        *,
        service_key: str,
        defaults: NodeDefaults,
        limits: ServiceLimits,
        broadcaster: Broadcaster,
        relation: RelationCallback | None = None,
        is_pep: bool = False,
    ) -> None:
        self.store = store
        self.service_key = service_key
        self.limits = limits
        self.defaults = bounded(defaults, limits)
        self.is_pep = is_pep
        self._broadcast = broadcaster
        self._relation = relation

    # -- reading state

    async def _state(self, node: str | None) -> _NodeState:
        name = _require_node(node)
        stored = await self.store.get_node(self.service_key, name)
        if stored is None:
            raise NodeNotFoundError(name)
        return await self._state_of(stored)

    async def _state_of(self, stored: PubSubNode) -> _NodeState:
        # Defaults first: a node stored before a field existed gets the field's default.
        config = {**self.defaults, **stored.config}
        affiliations = await self.store.get_affiliations(self.service_key, stored.name)
        return _NodeState(replace(stored, config=config), affiliations)

    async def _subscriptions_of(self, node: str, jid: str) -> list[PubSubSubscription]:
        """The subscriptions on ``node`` of ``jid`` exactly (a bare JID's own, not its
        resources')."""
        found = await self.store.subscriptions_of(self.service_key, jid)
        return [sub for name, sub in found if name == node and sub.jid == jid]

    async def _is_subscribed(self, node: str, jid: str) -> bool:
        """Whether the bare JID or one of its full JIDs has an approved subscription."""
        found = await self.store.subscriptions_of(self.service_key, bare_jid(jid))
        return any(name == node and sub.state == "subscribed" for name, sub in found)

    async def _node_subscriptions(self, node: str) -> tuple[PubSubSubscription, ...]:
        return tuple(await self.store.get_subscriptions(self.service_key, node))

    async def _node_event(
        self,
        kind: type[NodeEvent],
        node: str,
        config: Mapping[str, Any],
        notify: bool,
        subscriptions: tuple[PubSubSubscription, ...] | None = None,
        **details: Any,
    ) -> None:
        if subscriptions is None:
            subscriptions = await self._node_subscriptions(node)
        self._broadcast(
            kind(
                service=self.service_key,
                node=node,
                config=config,
                subscriptions=subscriptions,
                notify=notify,
                **details,
            )
        )

    # -- access

    async def _authorized(self, actor: str, node: str | None, capability: str) -> _NodeState:
        """The node, once the actor's affiliation is found to grant the capability."""
        state = await self._state(node)
        self._require(state, actor, capability)
        return state

    def _require(self, state: _NodeState, actor: str, capability: str) -> str:
        affiliation = state.affiliation(actor)
        if not may(affiliation, capability):
            raise Forbidden(f"{affiliation} may not {capability}")
        return affiliation

    async def _check_access_model(self, state: _NodeState, requester: str) -> None:
        """Hold an entity without affiliation to the node's access model (XEP-0060 §4.5).

        "authorize" is left to the callers: subscribing makes a pending subscription, reading
        items needs an approved one.
        """
        model = state.config["pubsub#access_model"]
        if model == "whitelist":
            raise PubSubError("not-allowed", "closed-node")
        if model == "presence":
            if not await self._any_owner(state, requester, lambda r: r.presence_subscribed):
                raise PubSubError("not-authorized", "presence-subscription-required")
        elif model == "roster":
            allowed = set(state.config["pubsub#roster_groups_allowed"])
            if not await self._any_owner(state, requester, lambda r: bool(r.groups & allowed)):
                raise PubSubError("not-authorized", "not-in-roster-group")

    async def _any_owner(
        self, state: _NodeState, requester: str, admits: Callable[[Relation], bool]
    ) -> bool:
        if self._relation is None:
            return False
        for owner in state.owners:
            if admits(await self._relation(owner, bare_jid(requester))):
                return True
        return False

    async def _check_retrieve(self, state: _NodeState, actor: str) -> None:
        """XEP-0060 §6.5.9: may ``actor`` read the node's items?"""
        if self._require(state, actor, "get_items") != "none":
            return
        await self._check_access_model(state, actor)
        if state.config["pubsub#access_model"] == "authorize" and not await self._is_subscribed(
            state.name, actor
        ):
            raise PubSubError("not-authorized", "not-subscribed")

    async def _may_publish(self, state: _NodeState, actor: str) -> bool:
        affiliation = state.affiliation(actor)
        if may(affiliation, "publish"):
            return True
        if affiliation == "outcast":
            return False
        model = state.config["pubsub#publish_model"]
        return model == "open" or (
            model == "subscribers" and await self._is_subscribed(state.name, actor)
        )

    # -- nodes

    async def get_node(self, node: str) -> PubSubNode:
        """The node with its full configuration, for disco#info (XEP-0060 §5.4)."""
        return (await self._state(node)).node

    async def list_nodes(self, actor: str) -> list[PubSubNode]:
        """The nodes whose items ``actor`` may retrieve, sorted by name (disco#items, and the
        nodes whose last item PEP sends to a contact coming online)."""
        visible = []
        for stored in await self.store.list_nodes(self.service_key):
            state = await self._state_of(stored)
            try:
                await self._check_retrieve(state, actor)
            except PubSubError:
                continue
            visible.append(state.node)
        return visible

    async def create(
        self, actor: str, node: str | None, config: Mapping[str, Any] | None = None
    ) -> str:
        """Create a node owned by the actor's bare JID; its name (generated for an instant
        node, ``node`` None or ""). Fails ``forbidden`` (PEP: not the account), ``not-acceptable``
        (bad config), ``conflict`` (exists)."""
        owner = bare_jid(actor)
        if self.is_pep and owner != self.service_key:
            raise Forbidden("only the account creates its PEP nodes")
        name = node or _new_id()
        await self._create(owner, name, validate_config(config or {}, self.defaults, self.limits))
        return name

    async def _create(self, owner: str, name: str, config: dict[str, Any]) -> None:
        try:
            await self.store.create_node(self.service_key, name, config, owner)
        except NodeExists:
            raise Conflict(name) from None
        self._broadcast(NodeCreated(self.service_key, name, config, owner))

    def default_configuration(self) -> dict[str, Any]:
        """The configuration a new node gets (XEP-0060 §8.3); anyone may ask."""
        return dict(self.defaults)

    async def get_configuration(self, actor: str, node: str | None) -> dict[str, Any]:
        state = await self._authorized(actor, node, "configure")
        return dict(state.config)

    async def configure(
        self, actor: str, node: str | None, changes: Mapping[str, Any]
    ) -> dict[str, Any]:
        """Apply a submitted configuration form; the new configuration. Subscriptions that a
        stricter access model no longer admits are cancelled (before the configuration is
        notified), as after a change of affiliation."""
        state = await self._authorized(actor, node, "configure")
        config = validate_config(changes, state.config, self.limits)
        await self.store.set_node_config(self.service_key, state.name, config)
        if any(config.get(field) != state.config.get(field) for field in _ACCESS_FIELDS):
            configured = _NodeState(replace(state.node, config=config), state.affiliations)
            subscribers = {bare_jid(sub.jid) for sub in await self._node_subscriptions(state.name)}
            for jid in sorted(subscribers):
                await self._drop_disallowed_subscriptions(configured, jid)
        await self._node_event(NodeConfigured, state.name, config, config["pubsub#notify_config"])
        return config

    async def delete(self, actor: str, node: str | None, redirect: str | None = None) -> None:
        """Delete the node (owner); ``redirect`` is the URI of a replacement (§8.4.1)."""
        state = await self._authorized(actor, node, "delete")
        subscriptions = await self._node_subscriptions(state.name)
        await self.store.delete_node(self.service_key, state.name)
        await self._node_event(
            NodeDeleted,
            state.name,
            state.config,
            state.config["pubsub#notify_delete"],
            subscriptions,
            redirect=redirect,
        )

    async def purge(self, actor: str, node: str | None) -> None:
        """Remove all items (owner); a node not persisting items has none (§8.5.3.3)."""
        state = await self._authorized(actor, node, "purge")
        if not state.config["pubsub#persist_items"]:
            raise Unsupported("persistent-items")
        await self.store.purge_items(self.service_key, state.name)
        # §8.5.2: one purge notification where retractions would be notified.
        await self._node_event(
            NodePurged, state.name, state.config, state.config["pubsub#notify_retract"]
        )

    # -- items

    async def publish(
        self,
        actor: str,
        node: str | None,
        item_id: str | None = None,
        payload: str | None = None,
        publish_options: Mapping[str, Any] | None = None,
        *,
        has_item: bool = True,
    ) -> str | None:
        """Publish an item (XEP-0060 §7.1); its id, generated when not given.

        ``payload`` is the item's child element as XML text; ``has_item`` False for a
        ``<publish/>`` without ``<item/>``. ``publish_options`` are preconditions on the node's
        configuration (§7.1.5); on PEP the account's publishing to a missing node creates it,
        configured by them. None is returned for a transient notification-only node, which
        takes no item.
        """
        name = _require_node(node)
        stored = await self.store.get_node(self.service_key, name)
        if stored is None:
            if not (self.is_pep and bare_jid(actor) == self.service_key):
                raise NodeNotFoundError(name)
            config = validate_config(publish_options or {}, self.defaults, self.limits)
        else:
            state = await self._state_of(stored)
            if not await self._may_publish(state, actor):
                raise Forbidden("the publish model does not allow this publisher")
            if publish_options:
                check_preconditions(publish_options, state.config, self.limits)
            config = dict(state.config)
        _check_publication(config, has_item, payload)
        if stored is None:
            # Only now, so that a refused publication leaves no node behind.
            await self._create(bare_jid(actor), name, config)
        if has_item and not item_id:
            item_id = _new_id()
        pushed_out: list[str] = []
        if config["pubsub#persist_items"]:
            item = PubSubItem(item_id, payload or "", actor)
            max_items = config["pubsub#max_items"]
            if config["pubsub#notify_retract"]:
                # Which items the store will trim costs a read, paid only when it is notified.
                before = await self.store.get_items(self.service_key, name)
                order = [item_id] + [old.item_id for old in before if old.item_id != item_id]
                pushed_out = order[max_items:]
            await self.store.publish_item(self.service_key, name, item, max_items)
        subscriptions = await self._node_subscriptions(name)
        await self._node_event(
            ItemPublished,
            name,
            config,
            config["pubsub#deliver_notifications"],
            subscriptions,
            item_id=item_id,
            payload=payload or "",
            publisher=actor,
        )
        if pushed_out:
            await self._node_event(
                ItemsRetracted, name, config, True, subscriptions, item_ids=tuple(pushed_out)
            )
        return item_id

    async def publish_many(
        self, publications: Sequence[Publication]
    ) -> AsyncIterator[str | None | Exception]:
        """Several publications to one node, with the outcome of ``publish`` one after the other
        for each: its item id, or the exception that call would raise, yielded in order, each
        once its notifications are broadcast. Their items are stored in one transaction (group
        commit); its failure is the outcome of every publication that passed its checks.

        A publication cannot change what the next one is checked against (configuration and
        affiliations), so all are checked first. One that creates its node, or that must read
        which items it pushes out (notify_retract), sees what the one before it did: these run
        one at a time.
        """
        name = publications[0].node
        stored = await self.store.get_node(self.service_key, name) if name else None
        state = None if stored is None else await self._state_of(stored)
        if state is None or (
            state.config["pubsub#persist_items"] and state.config["pubsub#notify_retract"]
        ):
            for publication in publications:
                try:
                    outcome = await self.publish(
                        publication.actor,
                        publication.node,
                        publication.item_id,
                        publication.payload,
                        publication.publish_options,
                        has_item=publication.has_item,
                    )
                except Exception as refused:
                    outcome = refused
                yield outcome
            return
        config = dict(state.config)
        outcomes: list[str | None | Exception] = []
        items: list[PubSubItem] = []
        for publication in publications:
            try:
                if not await self._may_publish(state, publication.actor):
                    raise Forbidden("the publish model does not allow this publisher")
                if publication.publish_options:
                    check_preconditions(publication.publish_options, state.config, self.limits)
                _check_publication(config, publication.has_item, publication.payload)
            except Exception as refused:
                outcomes.append(refused)
                continue
            item_id = publication.item_id
            if publication.has_item and not item_id:
                item_id = _new_id()
            outcomes.append(item_id)
            if config["pubsub#persist_items"]:
                items.append(PubSubItem(item_id, publication.payload or "", publication.actor))
        if items:
            try:
                await self.store.publish_items(
                    self.service_key, state.name, items, config["pubsub#max_items"]
                )
            except Exception as failed:
                for outcome in outcomes:
                    yield outcome if isinstance(outcome, Exception) else failed
                return
        subscriptions = await self._node_subscriptions(state.name)
        for publication, outcome in zip(publications, outcomes, strict=True):
            if not isinstance(outcome, Exception):
                await self._node_event(
                    ItemPublished,
                    state.name,
                    config,
                    config["pubsub#deliver_notifications"],
                    subscriptions,
                    item_id=outcome,
                    payload=publication.payload or "",
                    publisher=publication.actor,
                )
            yield outcome

    async def retract(
        self, actor: str, node: str | None, item_id: str | None, notify: bool = False
    ) -> None:
        """Delete an item (XEP-0060 §7.2): owners and publishers any item, others who may
        publish their own. Subscribers are notified if ``notify`` or the node's notify_retract.
        """
        name = _require_node(node)
        if not item_id:
            raise PubSubError("bad-request", "item-required")
        state = await self._state(name)
        if not state.config["pubsub#persist_items"]:
            raise Unsupported("persistent-items")
        affiliation = state.affiliation(actor)
        any_item = may(affiliation, "retract_any")
        if not (
            any_item or may(affiliation, "retract_own") or await self._may_publish(state, actor)
        ):
            raise Forbidden()
        found = await self.store.get_items(self.service_key, name, item_ids=[item_id])
        if not found:
            raise ItemNotFoundError(item_id)
        if not any_item and bare_jid(found[0].publisher) != bare_jid(actor):
            raise Forbidden("the item was published by another entity")
        await self.store.retract_item(self.service_key, name, item_id)
        notify = notify or state.config["pubsub#notify_retract"]
        await self._node_event(ItemsRetracted, name, state.config, notify, item_ids=(item_id,))

    async def purge_offline_publisher(self, node: str, publisher: str) -> None:
        """Remove what ``publisher`` (a bare JID) published on the node, if the node asks for it
        (``pubsub#purge_offline``): the server calls this when the publisher goes offline."""
        try:
            state = await self._state(node)
        except NodeNotFoundError:
            return
        if not state.config["pubsub#purge_offline"]:
            return
        items = await self.store.get_items(self.service_key, node)
        gone = tuple(item.item_id for item in items if bare_jid(item.publisher) == publisher)
        for item_id in gone:
            await self.store.retract_item(self.service_key, node, item_id)
        if gone:
            await self._node_event(
                ItemsRetracted,
                node,
                state.config,
                state.config["pubsub#notify_retract"],
                item_ids=gone,
            )

    async def items(
        self,
        actor: str,
        node: str | None,
        max_items: int | None = None,
        item_ids: Iterable[str] | None = None,
    ) -> list[PubSubItem]:
        """The node's items newest first (XEP-0060 §6.5), at most ``max_items`` and the node's
        max_items, only ``item_ids`` when given (missing ones are left out, §6.5.9.12).

        ``max_items`` is a positive integer (the schema's xs:positiveInteger): the stores would
        take a negative one as no limit (SQLite) or refuse the query (PostgreSQL)."""
        if max_items is not None and max_items < 1:
            raise PubSubError("bad-request", text="max_items must be a positive integer")
        state = await self._state(node)
        await self._check_retrieve(state, actor)
        if not state.config["pubsub#persist_items"]:
            raise Unsupported("persistent-items")
        limit = state.config["pubsub#max_items"]
        if max_items is not None:
            limit = min(limit, max_items)
        return await self.store.get_items(
            self.service_key,
            state.name,
            max_items=limit,
            item_ids=None if item_ids is None else list(item_ids),
        )

    async def last_item(self, node: str) -> PubSubItem | None:
        """The newest item, for send_last_published_item; None when there is none (or no node).
        The caller has checked access (``list_nodes``, or just subscribed)."""
        found = await self.store.get_items(self.service_key, node, max_items=1)
        return found[0] if found else None

    async def last_published(self, actor: str, node: str) -> PubSubItem | None:
        """The newest item of a node that sends it on presence (send_last_published_item
        on_sub_and_presence) if ``actor`` may read it; None otherwise, or without node or item."""
        stored = await self.store.get_node(self.service_key, node)
        if stored is None:
            return None
        state = await self._state_of(stored)
        if state.config["pubsub#send_last_published_item"] != "on_sub_and_presence":
            return None
        try:
            await self._check_retrieve(state, actor)
        except PubSubError:
            return None
        return await self.last_item(node)

    # -- subscriptions

    async def subscribe(
        self,
        actor: str,
        node: str | None,
        jid: str | None,
        options: Mapping[str, Any] | None = None,
    ) -> PubSubSubscription:
        """Subscribe ``jid`` (the actor's bare JID or one of its full JIDs) (XEP-0060 §6.1).

        Subscribing again without options, or with the options of an existing subscription,
        gives that subscription back; with other options it makes another one (multi-subscribe,
        §6.1.6). On an authorize node an entity without affiliation gets a pending subscription
        and the owners are asked.
        """
        name = _require_node(node)
        jid = _require_jid(jid)
        state = await self._state(name)
        if bare_jid(jid) != bare_jid(actor):
            raise PubSubError("bad-request", "invalid-jid")
        if not state.config["pubsub#subscribe"]:
            raise Unsupported("subscribe", "the node does not allow subscriptions")
        affiliation = self._require(state, actor, "subscribe")
        wanted = validate_subscription_options(options or {}, {})
        existing = await self._subscriptions_of(name, jid)
        if any(sub.state == "pending" for sub in existing):
            raise PubSubError("not-authorized", "pending-subscription")
        for sub in existing:
            if options is None or sub.options == wanted:
                return sub
        pending = False
        if affiliation == "none":
            await self._check_access_model(state, actor)
            pending = state.config["pubsub#access_model"] == "authorize"
        subscription = PubSubSubscription(
            jid, _new_id(), "pending" if pending else "subscribed", wanted
        )
        await self.store.add_subscription(self.service_key, name, subscription)
        if pending:
            self._broadcast(SubscriptionPending(self.service_key, name, subscription, state.owners))
        else:
            self._broadcast(SubscriptionChanged(self.service_key, name, subscription, notify=False))
        return subscription

    async def _own_subscription(
        self, actor: str, node: str | None, jid: str | None, subid: str | None
    ) -> tuple[str, PubSubSubscription]:
        """The node and the subscription of ``jid`` an unsubscribe or options request is about
        (§6.2.3, §6.3.4)."""
        name = _require_node(node)
        jid = _require_jid(jid)
        await self._state(name)
        if bare_jid(jid) != bare_jid(actor):
            raise Forbidden("the subscription is another entity's")
        existing = await self._subscriptions_of(name, jid)
        if not existing:
            raise PubSubError("unexpected-request", "not-subscribed")
        if subid is None:
            if len(existing) > 1:
                raise PubSubError("bad-request", "subid-required")
            return name, existing[0]
        for sub in existing:
            if sub.subid == subid:
                return name, sub
        raise PubSubError("not-acceptable", "invalid-subid")

    async def unsubscribe(
        self, actor: str, node: str | None, jid: str | None, subid: str | None = None
    ) -> None:
        """Cancel a subscription of the actor's (XEP-0060 §6.2), pending ones too."""
        name, sub = await self._own_subscription(actor, node, jid, subid)
        await self._remove_subscription(name, sub, notify=False)

    async def _remove_subscription(self, node: str, sub: PubSubSubscription, notify: bool) -> None:
        await self.store.remove_subscription(self.service_key, node, sub.jid, sub.subid)
        self._broadcast(
            SubscriptionChanged(self.service_key, node, replace(sub, state="none"), notify)
        )

    async def get_subscription_options(
        self, actor: str, node: str | None, jid: str | None, subid: str | None = None
    ) -> dict[str, Any]:
        """The subscription's options, the defaults filled in (XEP-0060 §6.3)."""
        _, sub = await self._own_subscription(actor, node, jid, subid)
        return {**SUBSCRIPTION_DEFAULTS, **sub.options}

    async def set_subscription_options(
        self,
        actor: str,
        node: str | None,
        jid: str | None,
        options: Mapping[str, Any],
        subid: str | None = None,
    ) -> None:
        """Apply a submitted subscribe_options form (fields left out keep their value)."""
        name, sub = await self._own_subscription(actor, node, jid, subid)
        changed = validate_subscription_options(options, sub.options)
        await self.store.update_subscription(self.service_key, name, replace(sub, options=changed))

    async def subscriptions_of(
        self, actor: str, node: str | None = None
    ) -> list[tuple[str, PubSubSubscription]]:
        """(node, subscription) of the actor's bare JID and its full JIDs (XEP-0060 §5.6),
        on ``node`` only when given."""
        found = await self.store.subscriptions_of(self.service_key, bare_jid(actor))
        return [(name, sub) for name, sub in found if node is None or name == node]

    async def affiliations_of(self, actor: str) -> dict[str, str]:
        """{node: affiliation} of the actor's bare JID (XEP-0060 §5.7)."""
        return await self.store.affiliations_of(self.service_key, bare_jid(actor))

    async def recheck_access(self, jid: str) -> None:
        """Cancel the subscriptions of ``jid`` (a bare JID: all of its own and its resources')
        that the access models no longer admit, e.g. after the owner cancelled its presence
        subscription (XEP-0060 §12.6); the subscribers are notified."""
        found = await self.store.subscriptions_of(self.service_key, jid)
        for name in dict.fromkeys(name for name, _ in found):
            await self._drop_disallowed_subscriptions(await self._state(name), jid)

    async def _may_stay_subscribed(self, state: _NodeState, jid: str) -> bool:
        affiliation = state.affiliation(jid)
        if not may(affiliation, "subscribe"):
            return False
        if affiliation != "none" or state.config["pubsub#access_model"] == "authorize":
            return True  # approved subscriptions stay approved
        try:
            await self._check_access_model(state, jid)
        except PubSubError:
            return False
        return True

    # -- owner: subscriptions

    async def get_subscriptions(self, actor: str, node: str | None) -> list[PubSubSubscription]:
        """All subscriptions of the node, pending ones too (owner, XEP-0060 §8.8.1)."""
        state = await self._authorized(actor, node, "manage_subscriptions")
        return list(await self._node_subscriptions(state.name))

    async def set_subscriptions(
        self, actor: str, node: str | None, changes: Iterable[SubscriptionChange]
    ) -> None:
        """Add, approve or remove subscriptions (owner, XEP-0060 §8.8.2). Entries that cannot
        be applied (unknown state or subid, several subscriptions and no subid, an outcast) are
        raised together as PartlyFailed after the others are applied."""
        state = await self._authorized(actor, node, "manage_subscriptions")
        failed: list[PubSubSubscription] = []
        for change in changes:
            existing = await self._subscriptions_of(state.name, change.jid)
            matching = [s for s in existing if change.subid in (None, s.subid)]
            if not self._valid_change(state, change, existing, matching):
                failed.append(
                    matching[0]
                    if matching
                    else PubSubSubscription(change.jid, change.subid or "", "none")
                )
            elif change.state == "none":
                for sub in matching:
                    await self._remove_subscription(state.name, sub, notify=True)
            elif matching:
                await self._approve(state.name, matching[0])
            else:
                sub = PubSubSubscription(change.jid, _new_id())
                await self.store.add_subscription(self.service_key, state.name, sub)
                self._broadcast(SubscriptionChanged(self.service_key, state.name, sub, notify=True))
        if failed:
            raise PartlyFailed(failed)

    @staticmethod
    def _valid_change(
        state: _NodeState,
        change: SubscriptionChange,
        existing: list[PubSubSubscription],
        matching: list[PubSubSubscription],
    ) -> bool:
        if change.state == "none":
            return change.subid is None or bool(matching)
        if change.state != "subscribed" or state.affiliation(change.jid) == "outcast":
            return False
        if change.subid is not None:
            return bool(matching)
        return len(existing) <= 1

    async def _approve(self, node: str, sub: PubSubSubscription) -> None:
        approved = replace(sub, state="subscribed")
        await self.store.update_subscription(self.service_key, node, approved)
        self._broadcast(SubscriptionChanged(self.service_key, node, approved, notify=True))

    async def list_pending(self, actor: str, node: str | None) -> list[PubSubSubscription]:
        """The subscriptions awaiting approval (owner, XEP-0060 §8.7)."""
        subs = await self.get_subscriptions(actor, node)
        return [sub for sub in subs if sub.state == "pending"]

    async def pending_nodes(self, actor: str) -> list[str]:
        """The nodes the actor owns that have pending subscriptions (§8.7, get-pending)."""
        owned = await self.affiliations_of(actor)
        names = []
        for name, affiliation in owned.items():
            subs = await self._node_subscriptions(name) if affiliation == "owner" else ()
            if any(sub.state == "pending" for sub in subs):
                names.append(name)
        return names

    async def authorize_subscription(
        self, actor: str, node: str | None, jid: str, allow: bool, subid: str | None = None
    ) -> None:
        """An owner's answer to a pending subscription (XEP-0060 §8.6): approve it, or remove
        it. Without ``subid``, all pending subscriptions of ``jid``."""
        state = await self._authorized(actor, node, "manage_subscriptions")
        pending = [
            sub
            for sub in await self._subscriptions_of(state.name, jid)
            if sub.state == "pending" and subid in (None, sub.subid)
        ]
        if not pending:
            raise PubSubError("unexpected-request", "not-subscribed", text="nothing pending")
        for sub in pending:
            if allow:
                await self._approve(state.name, sub)
            else:
                await self._remove_subscription(state.name, sub, notify=True)

    # -- owner: affiliations

    async def get_affiliations(self, actor: str, node: str | None) -> dict[str, str]:
        """{bare JID: affiliation} of the node (owner, XEP-0060 §8.9.1)."""
        state = await self._authorized(actor, node, "manage_affiliations")
        return dict(state.affiliations)

    async def set_affiliations(
        self, actor: str, node: str | None, changes: Mapping[str, str]
    ) -> None:
        """Set affiliations, {JID: affiliation} ("none" removes one) (owner, XEP-0060 §8.9.2).

        The node keeps an owner: changes that would leave it none fail, as do unknown
        affiliations (PartlyFailed, after the others are applied). Subscriptions the new
        affiliation no longer allows (outcast; whitelist without membership) are cancelled.
        """
        state = await self._authorized(actor, node, "manage_affiliations")
        failed: list[tuple[str, str]] = []
        reasons: list[str] = []
        accepted: dict[str, str] = {}
        for jid, affiliation in changes.items():
            jid = bare_jid(jid)
            if affiliation not in CAPABILITIES:
                failed.append((jid, state.affiliation(jid)))
                reasons.append(f"no affiliation {affiliation!r}")
            elif affiliation != state.affiliation(jid):
                accepted[jid] = affiliation
        if "owner" not in {**state.affiliations, **accepted}.values():
            for jid in [jid for jid in accepted if state.affiliation(jid) == "owner"]:
                failed.append((jid, "owner"))
                del accepted[jid]
            reasons.append("a node keeps at least one owner")
        for jid, affiliation in accepted.items():
            await self.store.set_affiliation(self.service_key, state.name, jid, affiliation)
            if affiliation == "none":
                del state.affiliations[jid]
            else:
                state.affiliations[jid] = affiliation
            self._broadcast(AffiliationChanged(self.service_key, state.name, jid, affiliation))
            await self._drop_disallowed_subscriptions(state, jid)
        if failed:
            raise PartlyFailed(failed, text="; ".join(reasons))

    async def _drop_disallowed_subscriptions(self, state: _NodeState, jid: str) -> None:
        """Cancel the subscriptions of the bare ``jid`` (and its resources) on the node if its
        affiliation and the access model no longer admit it."""
        found = await self.store.subscriptions_of(self.service_key, jid)
        subs = [sub for name, sub in found if name == state.name]
        if subs and not await self._may_stay_subscribed(state, jid):
            for sub in subs:
                await self._remove_subscription(state.name, sub, notify=True)
