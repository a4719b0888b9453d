"""XEP-0060 on the wire: the `pubsub.<domain>` component translating stanzas to core calls.

wokkel's PubSubRequest parses each request as it arrives (a malformed one is answered at once);
then it goes through the worker pool under its (service, node) key, and its result or
PubSubError becomes the IQ reply. Disco queries on the service are answered here too (XEP-0060
§5), queued under the node they ask about, and owners' answers to subscription approval forms
(XEP-0060 §8.6, sent as messages) are applied, queued under the form's node.

Requests about no node (the service's own lists, default configuration, and instant node
creation, whose node does not exist before the request creates it) share the service-level
queue, key "". One session has at most `max_in_flight` requests queued or running: beyond that
it is answered <wait/><resource-constraint/>, as for a full queue, so one client cannot fill the
queues everybody shares.
"""

from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable
from functools import partial
from typing import Any

from twisted.internet.defer import Deferred, fail
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.words.protocols.jabber import error, xmlstream
from twisted.words.protocols.jabber.jid import JID, InvalidFormat
from twisted.words.xish import domish
from wokkel import data_form, disco
from wokkel.pubsub import NS_PUBSUB, NS_PUBSUB_ERRORS, NS_PUBSUB_OWNER, PubSubRequest

from mim_twisted.im.sessions import Session
from mim_twisted.im.stanzas import reply_error
from mim_twisted.pubsub import forms
from mim_twisted.pubsub.core import Publication, PubSubService, SubscriptionChange
from mim_twisted.pubsub.errors import PubSubError
from mim_twisted.pubsub.queues import Grouped, QueueFull, WorkerPool
from mim_twisted.storage.interfaces import PubSubItem, PubSubSubscription, log_request_failure
from mim_twisted.xmpp.serialise import escape_attribute
from mim_twisted.xmpp.stanza_errors import error_response

log = Logger()

# Requests of one session queued or running at once (see the module docstring).
MAX_IN_FLIGHT = 50

# The verbs whose form is a subscribe_options one (XEP-0060 §6.3.5: invalid-options).
_OPTIONS_VERBS = frozenset({"subscribe", "optionsSet"})

# What the service implements, advertised in its disco#info (XEP-0060 §10).
FEATURES = (
    "access-authorize",
    "access-open",
    "access-presence",
    "access-roster",
    "access-whitelist",
    "config-node",
    "create-and-configure",
    "create-nodes",
    "delete-items",
    "delete-nodes",
    "get-pending",
    "instant-nodes",
    "item-ids",
    "manage-subscriptions",
    "member-affiliation",
    "meta-data",
    "modify-affiliations",
    "multi-subscribe",
    "outcast-affiliation",
    "persistent-items",
    "publish",
    "publish-only-affiliation",
    "publish-options",
    "publisher-affiliation",
    "purge-nodes",
    "retract-items",
    "retrieve-affiliations",
    "retrieve-default",
    "retrieve-items",
    "retrieve-subscriptions",
    "subscribe",
    "subscription-options",
)


def stanza_error(e: PubSubError) -> error.StanzaError:
    """The one place a core refusal becomes an XMPP error."""
    app_condition = None
    if e.pubsub_condition is not None:
        app_condition = domish.Element((NS_PUBSUB_ERRORS, e.pubsub_condition))
        if e.feature is not None:
            app_condition["feature"] = e.feature
    return error.StanzaError(e.condition, e.type, e.text, appCondition=app_condition)


def parse_request(iq: domish.Element) -> PubSubRequest:
    """wokkel's reading of a PubSub <iq/>; what it refuses, as the error to answer with."""
    request = PubSubRequest()
    try:
        request.parseElement(iq)
    except NotImplementedError:  # no verb wokkel knows, or several
        raise error.StanzaError("feature-not-implemented") from None
    except data_form.Error as e:  # e.g. a field given twice; wokkel has read the verb by then
        condition = "invalid-options" if request.verb in _OPTIONS_VERBS else None
        raise PubSubError("bad-request", condition, text=f"Malformed data form: {e}") from None
    except (InvalidFormat, UnicodeError):
        raise PubSubError("bad-request", "invalid-jid") from None
    return request


def _publication(request: PubSubRequest, iq: domish.Element) -> Publication:
    items = request.items or []
    if len(items) > 1:
        raise PubSubError("bad-request", "invalid-payload", text="One item per publish")
    item = items[0] if items else None
    payload = None
    if item is not None:
        children = list(item.elements())
        if len(children) > 1:
            raise PubSubError("bad-request", "invalid-payload", text="One payload per item")
        payload = children[0].toXml() if children else None
    pubsub = next(iq.elements(NS_PUBSUB, "pubsub"))
    options = forms.submitted_values(
        forms.find_form(next(pubsub.elements(NS_PUBSUB, "publish-options"), None)),
        forms.NS_PUBLISH_OPTIONS,
    )
    return Publication(
        iq["from"],
        request.nodeIdentifier,
        item.getAttribute("id") if item is not None else None,
        payload,
        options,
        has_item=item is not None,
    )


def _published(iq: domish.Element, node: str, item_id: str | None) -> str:
    """The result <iq/> of a publication (XEP-0060 §7.1.2) as text, written directly rather than
    built and serialised: publications are the commonest request by far."""
    addressing = "".join(
        f" {name}='{escape_attribute(value)}'"
        for name, value in (
            ("to", iq.getAttribute("from")),
            ("from", iq.getAttribute("to")),
            ("id", iq.getAttribute("id")),
        )
        if value
    )
    item = "" if item_id is None else f"<item id='{escape_attribute(item_id)}'/>"
    return (
        f"<iq{addressing} type='result'><pubsub xmlns='{NS_PUBSUB}'>"
        f"<publish node='{escape_attribute(node)}'>{item}</publish></pubsub></iq>"
    )


def _pubsub(namespace: str = NS_PUBSUB) -> domish.Element:
    return domish.Element((namespace, "pubsub"))


def _item_element(parent: domish.Element, item: PubSubItem) -> None:
    element = parent.addElement("item")
    element["id"] = item.item_id
    if item.payload:
        element.addRawXml(item.payload)


def subscription_element(
    parent: domish.Element, node: str | None, subscription: PubSubSubscription
) -> domish.Element:
    """A <subscription/> child, as in results, owner lists and event notifications."""
    element = parent.addElement("subscription")
    if node is not None:
        element["node"] = node
    element["jid"] = subscription.jid
    element["subscription"] = subscription.state
    if subscription.state != "none":
        element["subid"] = subscription.subid
    return element


def _result_iq(payload: domish.Element | str | None, iq: domish.Element) -> domish.Element | str:
    """The result <iq/> with ``payload``; a text is the whole result already (`_published`)."""
    if isinstance(payload, str):
        return payload
    result = xmlstream.toResponse(iq, "result")
    if payload is not None:
        result.addChild(payload)
    return result


def _as_stanza_error(failure: Failure, iq: domish.Element) -> Failure:
    """A core refusal as the StanzaError it is answered with; anything else stays as it is."""
    if failure.check(PubSubError):
        return Failure(stanza_error(failure.value))
    return failure


class PubSubComponent:
    """The stanza handler of one PubSub host, registered in the router's `components`."""

    def __init__(
        self,
        host: str,
        service: PubSubService,
        pool: WorkerPool,
        *,
        max_in_flight: int = MAX_IN_FLIGHT,
        in_flight: dict[Session, int] | None = None,
        results: Counter[str] | None = None,
    ) -> None:
        self.host = host
        self.service = service
        self.pool = pool
        self.max_in_flight = max_in_flight
        # Session -> its requests queued or running, for those that have any. The PEP services
        # of all accounts share one, so a client's limit holds across the accounts it asks.
        self._in_flight: dict[Session, int] = {} if in_flight is None else in_flight
        # Requests by result, for the metrics: "ok", "error", "refused" (resource-constraint).
        self.results: Counter[str] = Counter() if results is None else results
        self._verbs: dict[str, Callable[[str, PubSubRequest, domish.Element], Awaitable]] = {
            "subscribe": self._subscribe,
            "unsubscribe": self._unsubscribe,
            "optionsGet": self._options_get,
            "optionsSet": self._options_set,
            "subscriptions": self._own_subscriptions,
            "affiliations": self._own_affiliations,
            "create": self._create,
            "default": self._default,
            "configureGet": self._configure_get,
            "configureSet": self._configure_set,
            "items": self._items,
            "retract": self._retract,
            "purge": self._purge,
            "delete": self._delete,
            "affiliationsGet": self._affiliations_get,
            "affiliationsSet": self._affiliations_set,
            "subscriptionsGet": self._subscriptions_get,
            "subscriptionsSet": self._subscriptions_set,
        }

    def __call__(self, session: Session, stanza: domish.Element, recipient: JID) -> None:
        if recipient.user is not None or recipient.resource is not None:
            reply_error(session, stanza, "service-unavailable")
        elif stanza.name == "iq":
            if stanza.getAttribute("type") in ("get", "set"):
                self._request(session, stanza)
            else:  # an IQ without a valid type is answered, unless it is a result or an error
                reply_error(session, stanza, "bad-request")
        elif stanza.name == "message":
            self._message(session, stanza)

    # -- requests ---------------------------------------------------------------------------

    def _request(self, session: Session, iq: domish.Element) -> None:
        self.answer(session, iq).addCallbacks(
            session.send, self._send_error, errbackArgs=(session, iq)
        )

    def answer(self, session: Session, iq: domish.Element) -> Deferred:
        """Queue a get or set <iq/> for the service; fires with the result <iq/> (a
        publication's as its text), or fails with the StanzaError to answer with (PEP hands these
        to the router's account IQ table)."""
        payload = next(iq.elements(), None)
        if payload is None or not iq.getAttribute("id"):
            return fail(error.StanzaError("bad-request"))
        if (payload.uri, payload.name) in (
            (disco.NS_DISCO_INFO, "query"),
            (disco.NS_DISCO_ITEMS, "query"),
        ):
            node = payload.getAttribute("node") or ""
            work = partial(self._disco, iq)
        elif (payload.uri, payload.name) in ((NS_PUBSUB, "pubsub"), (NS_PUBSUB_OWNER, "pubsub")):
            try:
                request = parse_request(iq)
            except Exception:
                return fail().addErrback(_as_stanza_error, iq)
            node = request.nodeIdentifier or ""
            if request.verb == "publish":
                # Stored with the node's other publications waiting in its queue (group commit).
                work = Grouped((self.host, node), (request, iq), self._publish_group)
            else:
                work = partial(self._pubsub, request, iq)
        else:
            return fail(error.StanzaError("service-unavailable"))
        try:
            done = self._submit(session, node, work)
        except QueueFull:
            self.results["refused"] += 1
            return fail(
                error.StanzaError("resource-constraint", text="Too many requests, try again later")
            )
        done.addCallback(_result_iq, iq)
        return done.addErrback(_as_stanza_error, iq)

    def _submit(
        self, session: Session, node: str, job: Callable[[], Awaitable] | Grouped
    ) -> Deferred:
        """Queue ``job`` under ``node`` for ``session``; QueueFull if the session has
        `max_in_flight` requests queued or running already, the node's queue is full or the
        server is stopping."""
        if self.pool.refusing_requests:
            raise QueueFull(f"{self.host} is stopping")
        in_flight = self._in_flight.get(session, 0)
        if in_flight >= self.max_in_flight:
            raise QueueFull(f"{session.jid.full()} has {in_flight} PubSub requests in flight")
        done = self.pool.submit(self.host, node, job)
        self._in_flight[session] = in_flight + 1
        done.addBoth(self._finished, session)
        return done

    def _finished(self, result: object, session: Session) -> object:
        self.results["error" if isinstance(result, Failure) else "ok"] += 1
        left = self._in_flight.pop(session) - 1
        if left:
            self._in_flight[session] = left
        return result

    @staticmethod
    def _send_error(failure: Failure, session: Session, iq: domish.Element) -> None:
        if failure.check(error.StanzaError):
            session.send(error_response(failure.value, iq))
        else:
            log_request_failure(
                log, failure, "PubSub request from {jid}", jid=iq.getAttribute("from")
            )
            reply_error(session, iq, "internal-server-error")

    async def _pubsub(self, request: PubSubRequest, iq: domish.Element) -> domish.Element | None:
        handler = self._verbs.get(request.verb)
        if handler is None:
            raise error.StanzaError("feature-not-implemented")
        return await handler(iq["from"], request, iq)

    # -- subscriber and publisher use cases (XEP-0060 §6, §7) ---------------------------------

    async def _publish_group(
        self, requests: list[tuple[PubSubRequest, domish.Element]]
    ) -> AsyncIterator[str | Exception]:
        """Publish requests to one node, answered each in turn as one by one would be; those
        that parse go to the service together."""
        publications: list[Publication] = []
        malformed: dict[int, Exception] = {}
        for index, (request, iq) in enumerate(requests):
            try:
                publications.append(_publication(request, iq))
            except Exception as refused:
                malformed[index] = refused
        outcomes = self.service.publish_many(publications) if publications else None
        for index, (request, iq) in enumerate(requests):
            if index in malformed:
                yield malformed[index]
                continue
            outcome = await anext(outcomes)
            if isinstance(outcome, Exception):
                yield outcome
            else:
                yield _published(iq, request.nodeIdentifier, outcome)

    async def _subscribe(self, actor: str, request: PubSubRequest, iq: domish.Element) -> Any:
        options = request.options.getValues() if request.options is not None else None
        subscription = await self.service.subscribe(
            actor, request.nodeIdentifier, request.subscriber.full(), options
        )
        result = _pubsub()
        subscription_element(result, request.nodeIdentifier, subscription)
        return result

    async def _unsubscribe(self, actor: str, request: PubSubRequest, iq: domish.Element) -> None:
        await self.service.unsubscribe(
            actor,
            request.nodeIdentifier,
            request.subscriber.full(),
            request.subscriptionIdentifier,
        )

    async def _options_get(self, actor: str, request: PubSubRequest, iq: domish.Element) -> Any:
        jid = request.subscriber.full()
        options = await self.service.get_subscription_options(
            actor, request.nodeIdentifier, jid, request.subscriptionIdentifier
        )
        result = _pubsub()
        element = result.addElement("options")
        element["node"] = request.nodeIdentifier
        element["jid"] = jid
        if request.subscriptionIdentifier:
            element["subid"] = request.subscriptionIdentifier
        element.addChild(forms.subscription_options_form(options).toElement())
        return result

    async def _options_set(self, actor: str, request: PubSubRequest, iq: domish.Element) -> None:
        await self.service.set_subscription_options(
            actor,
            request.nodeIdentifier,
            request.subscriber.full(),
            request.options.getValues(),
            request.subscriptionIdentifier,
        )

    async def _own_subscriptions(self, actor: str, request: Any, iq: domish.Element) -> Any:
        query = next(next(iq.elements()).elements(NS_PUBSUB, "subscriptions"))
        node = query.getAttribute("node") or None
        result = _pubsub()
        listing = result.addElement("subscriptions")
        for node_name, subscription in await self.service.subscriptions_of(actor, node):
            subscription_element(listing, node_name, subscription)
        return result

    async def _own_affiliations(self, actor: str, request: Any, iq: domish.Element) -> Any:
        result = _pubsub()
        listing = result.addElement("affiliations")
        for node, affiliation in sorted((await self.service.affiliations_of(actor)).items()):
            element = listing.addElement("affiliation")
            element["node"] = node
            element["affiliation"] = affiliation
        return result

    async def _items(self, actor: str, request: PubSubRequest, iq: domish.Element) -> Any:
        items = await self.service.items(
            actor,
            request.nodeIdentifier,
            request.maxItems,
            sorted(request.itemIdentifiers) if request.itemIdentifiers else None,
        )
        result = _pubsub()
        listing = result.addElement("items")
        listing["node"] = request.nodeIdentifier
        for item in reversed(items):  # the store gives newest first; XEP-0060 lists oldest first
            _item_element(listing, item)
        return result

    async def _retract(self, actor: str, request: PubSubRequest, iq: domish.Element) -> None:
        retract = next(next(iq.elements()).elements(NS_PUBSUB, "retract"))
        notify = retract.getAttribute("notify", "false") in ("1", "true")
        identifiers = sorted(request.itemIdentifiers or ())
        if len(identifiers) != 1:
            raise PubSubError("bad-request", "item-required", text="Retract one item")
        await self.service.retract(actor, request.nodeIdentifier, identifiers[0], notify)

    # -- owner use cases (XEP-0060 §8) --------------------------------------------------------

    async def _create(self, actor: str, request: PubSubRequest, iq: domish.Element) -> Any:
        config = request.options.getValues() if request.options is not None else None
        node = await self.service.create(actor, request.nodeIdentifier, config)
        result = _pubsub()
        result.addElement("create")["node"] = node
        return result

    async def _default(self, actor: str, request: PubSubRequest, iq: domish.Element) -> Any:
        result = _pubsub(NS_PUBSUB_OWNER)
        default = result.addElement("default")
        default.addChild(forms.node_config_form(self.service.default_configuration()).toElement())
        return result

    async def _configure_get(self, actor: str, request: PubSubRequest, iq: domish.Element) -> Any:
        config = await self.service.get_configuration(actor, request.nodeIdentifier)
        result = _pubsub(NS_PUBSUB_OWNER)
        configure = result.addElement("configure")
        configure["node"] = request.nodeIdentifier
        configure.addChild(forms.node_config_form(config).toElement())
        return result

    async def _configure_set(self, actor: str, request: PubSubRequest, iq: domish.Element) -> None:
        if request.options is None:  # a cancelled form changes nothing
            return
        await self.service.configure(actor, request.nodeIdentifier, request.options.getValues())

    async def _purge(self, actor: str, request: PubSubRequest, iq: domish.Element) -> None:
        await self.service.purge(actor, request.nodeIdentifier)

    async def _delete(self, actor: str, request: PubSubRequest, iq: domish.Element) -> None:
        delete = next(next(iq.elements()).elements(NS_PUBSUB_OWNER, "delete"))
        redirect = next(delete.elements(NS_PUBSUB_OWNER, "redirect"), None)
        uri = redirect.getAttribute("uri") if redirect is not None else None
        await self.service.delete(actor, request.nodeIdentifier, uri)

    async def _affiliations_get(
        self, actor: str, request: PubSubRequest, iq: domish.Element
    ) -> Any:
        affiliations = await self.service.get_affiliations(actor, request.nodeIdentifier)
        result = _pubsub(NS_PUBSUB_OWNER)
        listing = result.addElement("affiliations")
        listing["node"] = request.nodeIdentifier
        for jid, affiliation in sorted(affiliations.items()):
            element = listing.addElement("affiliation")
            element["jid"] = jid
            element["affiliation"] = affiliation
        return result

    async def _affiliations_set(
        self, actor: str, request: PubSubRequest, iq: domish.Element
    ) -> None:
        changes = {jid.userhost(): affiliation for jid, affiliation in request.affiliations.items()}
        await self.service.set_affiliations(actor, request.nodeIdentifier, changes)

    async def _subscriptions_get(
        self, actor: str, request: PubSubRequest, iq: domish.Element
    ) -> Any:
        subscriptions = await self.service.get_subscriptions(actor, request.nodeIdentifier)
        result = _pubsub(NS_PUBSUB_OWNER)
        listing = result.addElement("subscriptions")
        listing["node"] = request.nodeIdentifier
        for subscription in subscriptions:
            subscription_element(listing, None, subscription)
        return result

    async def _subscriptions_set(self, actor: str, request: Any, iq: domish.Element) -> None:
        query = next(next(iq.elements()).elements(NS_PUBSUB_OWNER, "subscriptions"))
        node = query.getAttribute("node")
        changes = []
        for element in query.elements(NS_PUBSUB_OWNER, "subscription"):
            if not element.getAttribute("jid") or not element.getAttribute("subscription"):
                raise PubSubError("bad-request", text="Each subscription needs jid and state")
            changes.append(
                SubscriptionChange(
                    element["jid"], element["subscription"], element.getAttribute("subid")
                )
            )
        await self.service.set_subscriptions(actor, node, changes)

    # -- service discovery (XEP-0060 §5) ------------------------------------------------------

    async def _disco(self, iq: domish.Element) -> domish.Element:
        query = next(iq.elements())
        if iq["type"] != "get":
            raise error.StanzaError("not-allowed")
        node = query.getAttribute("node") or None
        if query.uri == disco.NS_DISCO_INFO:
            info = await self._disco_info(iq["from"], node)
            response = info.toElement()
        else:
            items = disco.DiscoItems()
            for item in await self._disco_items(iq["from"], node):
                items.append(item)
            response = items.toElement()
        if node is not None:
            response["node"] = node
        return response

    async def _disco_info(self, actor: str, node: str | None) -> disco.DiscoInfo:
        info = disco.DiscoInfo()
        if node is None:
            info.append(disco.DiscoIdentity("pubsub", "service", "Publish-Subscribe"))
            for feature in (disco.NS_DISCO_INFO, disco.NS_DISCO_ITEMS, NS_PUBSUB):
                info.append(disco.DiscoFeature(feature))
            for feature in FEATURES:
                info.append(disco.DiscoFeature(f"{NS_PUBSUB}#{feature}"))
            return info
        stored = await self.service.get_node(node)
        owners = [
            jid
            for jid, affiliation in (
                await self.service.store.get_affiliations(self.host, node)
            ).items()
            if affiliation == "owner"
        ]
        info.append(disco.DiscoIdentity("pubsub", "leaf"))
        info.append(disco.DiscoFeature(disco.NS_DISCO_INFO))
        info.append(disco.DiscoFeature(NS_PUBSUB))
        info.append(forms.meta_data_form(stored, sorted(owners)))
        return info

    async def _disco_items(self, actor: str, node: str | None) -> list:
        if node is None:
            return [
                disco.DiscoItem(JID(self.host), n.name, n.config.get("pubsub#title") or None)
                for n in await self.service.list_nodes(actor)
            ]
        items = await self.service.items(actor, node)
        return [disco.DiscoItem(JID(self.host), name=item.item_id) for item in items]

    # -- subscription approval forms (XEP-0060 §8.6) -------------------------------------------

    def _message(self, session: Session, message: domish.Element) -> None:
        try:
            values = forms.submitted_values(
                forms.find_form(message), forms.NS_SUBSCRIBE_AUTHORIZATION
            )
        except error.StanzaError as e:
            reply_error(session, message, e.condition, e.text)
            return
        if values is None or "pubsub#node" not in values:
            reply_error(session, message, "bad-request", "Not a subscription approval form")
            return
        allow = str(values.get("pubsub#allow", "false")).lower()
        if allow not in ("0", "1", "false", "true"):
            reply_error(session, message, "bad-request", "pubsub#allow is not a boolean")
            return
        node = str(values["pubsub#node"])
        try:
            done = self._submit(
                session,
                node,
                lambda: self.service.authorize_subscription(
                    message["from"],
                    node,
                    str(values.get("pubsub#subscriber_jid", "")),
                    allow in ("1", "true"),
                    values.get("pubsub#subid"),
                ),
            )
        except QueueFull:
            reply_error(session, message, "resource-constraint")
            return
        done.addErrback(self._approval_failed, session, message)

    @staticmethod
    def _approval_failed(failure: Failure, session: Session, message: domish.Element) -> None:
        if failure.check(PubSubError):
            session.send(error_response(stanza_error(failure.value), message))
        else:
            log_request_failure(
                log,
                failure,
                "subscription approval from {jid}",
                jid=message.getAttribute("from"),
            )
