"""The pubsub.localhost component at the stanza level: back pressure (per queue and per session),
fan-out outside the worker, per-node ordering and the queue key, notifications serialised once,
SHIM SubIds, error rendering, malformed requests and forms, notifications kept offline."""

import dataclasses

from twisted.internet import defer
from twisted.internet.task import Clock
from twisted.logger import Logger
from twisted.trial import unittest
from twisted.words.protocols.jabber import xmlstream

from mim_twisted.im.offline import OfflineDelivery
from mim_twisted.im.sessions import SessionManager
from mim_twisted.pubsub import broadcast, core, protocol
from mim_twisted.pubsub.errors import PubSubError
from mim_twisted.pubsub.protocol import stanza_error
from mim_twisted.storage.interfaces import PubSubSubscription
from mim_twisted.storage.memory import MemoryDatabase
from mim_twisted.tap import build_im_core, build_pubsub
from mim_twisted.xmpp.namespaces import STANZAS
from tests.imsupport import ImCoreTestCase, error_condition, parse

SERVICE = "pubsub.localhost"
NS_PUBSUB = "http://jabber.org/protocol/pubsub"
NS_OWNER = NS_PUBSUB + "#owner"
NS_ERRORS = NS_PUBSUB + "#errors"


class GatedStore:
    """The memory store, with publications held until the test lets them through."""

    def __init__(self, store: object) -> None:
        self._store = store
        self.held: list[defer.Deferred] = []
        self.hold = False
        self.batches: list[list[str]] = []  # the item ids of each publish_items

    def __getattr__(self, name: str) -> object:
        return getattr(self._store, name)

    def publish_item(self, *args: object) -> defer.Deferred:
        return self._gated(self._store.publish_item, args)

    def publish_items(self, *args: object) -> defer.Deferred:
        self.batches.append([item.item_id for item in args[2]])
        return self._gated(self._store.publish_items, args)

    def _gated(self, write, args: tuple) -> defer.Deferred:
        if not self.hold:
            return write(*args)
        gate: defer.Deferred = defer.Deferred()
        self.held.append(gate)
        return gate.addCallback(lambda _: write(*args))


def error_type(stanza: object) -> str | None:
    """The 'type' of an error stanza's <error/> (jabber:client)."""
    [element] = stanza.elements("jabber:client", "error")
    return element.getAttribute("type")


def publish(node: str, item_id: str, text: str = "x") -> str:
    return (
        f"<iq type='set' id='p-{item_id}' to='{SERVICE}'><pubsub xmlns='{NS_PUBSUB}'>"
        f"<publish node='{node}'><item id='{item_id}'><entry xmlns='urn:example'>{text}</entry>"
        "</item></publish></pubsub></iq>"
    )


def create(node: str) -> str:
    return (
        f"<iq type='set' id='c-{node}' to='{SERVICE}'><pubsub xmlns='{NS_PUBSUB}'>"
        f"<create node='{node}'/></pubsub></iq>"
    )


def iq(kind: str, body: str, namespace: str = NS_PUBSUB, request_id: str = "q") -> str:
    return (
        f"<iq type='{kind}' id='{request_id}' to='{SERVICE}'>"
        f"<pubsub xmlns='{namespace}'>{body}</pubsub></iq>"
    )


def form(form_type: str, fields: str) -> str:
    return (
        "<x xmlns='jabber:x:data' type='submit'><field var='FORM_TYPE' type='hidden'>"
        f"<value>http://jabber.org/protocol/pubsub#{form_type}</value></field>{fields}</x>"
    )


def field(var: str, value: str) -> str:
    return f"<field var='{var}'><value>{value}</value></field>"


def twice(var: str) -> str:
    """A field given twice: wokkel cannot read the form."""
    return field(var, "1") + field(var, "0")


def pubsub_condition(stanza) -> str | None:
    error = next(child for child in stanza.elements() if child.name == "error")
    return next((c.name for c in error.elements() if c.uri == NS_ERRORS), None)


def subscribe(node: str, jid: str, request_id: str = "s") -> str:
    return (
        f"<iq type='set' id='{request_id}' to='{SERVICE}'><pubsub xmlns='{NS_PUBSUB}'>"
        f"<subscribe node='{node}' jid='{jid}'/></pubsub></iq>"
    )


class PubSubComponentTestCase(ImCoreTestCase):
    pubsub_settings: dict = {}

    def build(self) -> None:
        self.config = dataclasses.replace(
            self.config, pubsub=dataclasses.replace(self.config.pubsub, **self.pubsub_settings)
        )
        self.clock = Clock()
        self.store = GatedStore(self.database.pubsub)
        self.database.pubsub = self.store
        self.core = build_im_core(self.config, self.database, self.clock)
        self.pubsub = build_pubsub(self.config, self.database, self.core, self.clock)
        self.pubsub.pool.start()
        self.addCleanup(self.pubsub.pool.stop)
        self.connected = []
        self.owner = self.online("alice@localhost/desk")
        self.send(self.owner, create("news"))
        self.assertEqual(self.owner.take()[0]["type"], "result")

    def ask(self, xml: str):
        """Send as the owner; the one stanza the owner gets back."""
        self.send(self.owner, xml)
        [answer] = self.owner.take()
        return answer

    def notifications(self, session: object) -> list:
        return [s for s in session.take() if s.name == "message"]


class BackPressureTests(PubSubComponentTestCase):
    pubsub_settings = {"workers": 1, "max_queue_length": 1}

    def test_a_full_queue_answers_resource_constraint_at_once(self) -> None:
        self.store.hold = True
        self.send(self.owner, publish("news", "running"))  # taken by the worker, held
        self.send(self.owner, publish("news", "queued"))  # waits in the queue
        self.send(self.owner, publish("news", "refused"))
        [refused] = self.owner.take()
        self.assertEqual(refused["id"], "p-refused")
        self.assertEqual(error_condition(refused), "resource-constraint")
        self.assertEqual(error_type(refused), "wait")
        self.assertEqual(self.pubsub.pool.pending(), [1])
        # Once the worker moves on, the queue takes requests again.
        self.store.held.pop(0).callback(None)
        self.store.held.pop(0).callback(None)
        self.assertEqual([s["type"] for s in self.owner.take()], ["result", "result"])


class FanOutTests(PubSubComponentTestCase):
    def test_replies_come_before_the_fan_out_and_notifications_keep_order(self) -> None:
        bob = self.online("bob@localhost/phone")
        self.send(bob, subscribe("news", "bob@localhost"))
        bob.take()
        self.send(self.owner, publish("news", "one"))
        self.send(self.owner, publish("news", "two"))
        # Both requests were answered while no notification has gone out yet: the fan-out
        # runs after the worker, at the reactor's next turn.
        self.assertEqual([s["id"] for s in self.owner.take()], ["p-one", "p-two"])
        self.assertEqual(self.notifications(bob), [])
        self.clock.advance(0)
        notified = self.notifications(bob)
        self.assertEqual([n.event.items.item["id"] for n in notified], ["one", "two"])

    def test_a_slow_fan_out_does_not_hold_the_next_request(self) -> None:
        for n in range(450):  # more than one cooperator slice
            session = self.connect(f"bob@localhost/r{n}")
            session.presence = parse("<presence/>")
            session.message_priority = 0
        self.send(self.owner, subscribe("news", "alice@localhost", "own"))
        self.owner.take()
        self.send(self.connected[-1], subscribe("news", "bob@localhost"))
        self.send(self.owner, publish("news", "first"))
        self.clock.advance(0)  # the fan-out starts and writes its first slice
        self.send(self.owner, publish("news", "second"))
        self.assertIn("p-second", [s.getAttribute("id") for s in self.owner.take()])

    def test_one_serialisation_for_every_recipient(self) -> None:
        carol = self.online("carol@localhost/a")
        bob = self.online("bob@localhost/b")
        for session, jid in ((carol, "carol@localhost"), (bob, "bob@localhost/b")):
            self.send(session, subscribe("news", jid))
        self.send(self.owner, publish("news", "shared", "payload &lt;&amp;&gt;"))
        self.clock.advance(0)
        to_carol, to_bob = self.notifications(carol)[0], self.notifications(bob)[0]
        self.assertEqual(to_carol["to"], "carol@localhost")
        self.assertEqual(to_bob["to"], "bob@localhost/b")
        del to_carol["to"], to_bob["to"]
        self.assertEqual(to_carol.toXml(), to_bob.toXml())
        [entry] = to_bob.event.items.item.elements("urn:example", "entry")
        self.assertEqual(str(entry), "payload <&>")  # escaped once, on the wire only

    def test_several_subscriptions_get_shim_subids(self) -> None:
        bob = self.online("bob@localhost/b")
        self.send(bob, subscribe("news", "bob@localhost", "first"))
        options = (
            "<options><x xmlns='jabber:x:data' type='submit'>"
            "<field var='FORM_TYPE' type='hidden'>"
            "<value>http://jabber.org/protocol/pubsub#subscribe_options</value></field>"
            "<field var='pubsub#include_body'><value>1</value></field></x></options>"
        )
        self.send(
            bob,
            subscribe("news", "bob@localhost", "second").replace(
                "/></pubsub>", f"/>{options}</pubsub>"
            ),
        )
        subids = {s.pubsub.subscription["subid"] for s in bob.take() if s["type"] == "result"}
        self.assertEqual(len(subids), 2)
        self.send(self.owner, publish("news", "i"))
        self.clock.advance(0)
        [notification] = self.notifications(bob)
        headers = {str(h) for h in notification.headers.elements() if h["name"] == "SubId"}
        self.assertEqual(headers, subids)


class SyncBroadcastTests(PubSubComponentTestCase):
    pubsub_settings = {"sync_broadcast": True}

    def test_the_notification_goes_out_inside_the_request(self) -> None:
        self.send(self.owner, subscribe("news", "alice@localhost"))
        self.owner.take()
        self.send(self.owner, publish("news", "inline"))
        self.assertEqual([s.name for s in self.owner.take()], ["message", "iq"])


class GroupCommitTests(PubSubComponentTestCase):
    """The publications waiting in a node's queue are stored in one transaction, and answered
    and notified as one by one."""

    pubsub_settings = {"workers": 1, "sync_broadcast": True}

    def setUp(self) -> None:
        super().setUp()
        self.send(self.owner, subscribe("news", "alice@localhost"))
        self.owner.take()
        self.bob = self.online("bob@localhost/phone")
        self.store.hold = True
        self.send(self.owner, publish("news", "1"))  # taken by the worker, held
        self.send(self.owner, publish("news", "2"))
        two_items = publish("news", "two").replace("</publish>", "<item id='more'/></publish>")
        self.send(self.owner, two_items)
        self.send(self.bob, publish("news", "3"))  # not a publisher of the node
        self.send(self.owner, publish("news", "4"))
        self.assertEqual(self.owner.take(), [])

    def what(self, session) -> list[tuple[str, str]]:
        """What the session got: ("message", item id) or (iq id, type or error condition)."""
        got = []
        for stanza in session.take():
            if stanza.name == "message":
                [item] = next(next(stanza.elements()).elements()).elements()
                got.append(("message", item["id"]))
            elif stanza["type"] == "error":
                got.append((stanza["id"], error_condition(stanza)))
            else:
                got.append((stanza["id"], stanza["type"]))
        return got

    def test_stored_together_answered_and_notified_in_order(self) -> None:
        self.store.hold = False
        self.store.held.pop(0).callback(None)
        self.assertEqual(self.store.batches, [["1"], ["2", "4"]])
        self.assertEqual(
            self.what(self.owner),
            [
                ("message", "1"),
                ("p-1", "result"),
                ("message", "2"),
                ("p-2", "result"),
                ("p-two", "bad-request"),
                ("message", "4"),
                ("p-4", "result"),
            ],
        )
        self.assertEqual(self.what(self.bob), [("p-3", "forbidden")])
        items = self.successResultOf(self.database.pubsub.get_items(SERVICE, "news"))
        self.assertEqual([i.item_id for i in items], ["4", "2", "1"])

    def test_a_failed_transaction_fails_the_publications_it_held(self) -> None:
        self.store.held.pop(0).callback(None)
        self.store.held.pop(0).errback(RuntimeError("the database went away"))
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 2)
        self.assertEqual(
            self.what(self.owner),
            [
                ("message", "1"),
                ("p-1", "result"),
                ("p-2", "internal-server-error"),
                ("p-two", "bad-request"),
                ("p-4", "internal-server-error"),
            ],
        )
        self.assertEqual(self.what(self.bob), [("p-3", "forbidden")])
        # The next publication is stored on its own as before.
        self.store.hold = False
        self.send(self.owner, publish("news", "5"))
        self.assertEqual(self.what(self.owner), [("message", "5"), ("p-5", "result")])


class ErrorRenderingTests(PubSubComponentTestCase):
    def test_application_condition_and_feature(self) -> None:
        element = stanza_error(PubSubError("feature-not-implemented", "unsupported", feature="x"))
        # As a client reads it: serialised, then parsed.
        rendered = parse(element.getElement().toXml())
        self.assertEqual(rendered.getAttribute("type"), "cancel")
        self.assertEqual(
            [(child.uri, child.name, dict(child.attributes)) for child in rendered.elements()],
            [
                (STANZAS, "feature-not-implemented", {}),
                (NS_ERRORS, "unsupported", {"feature": "x"}),
            ],
        )

    def test_unknown_node(self) -> None:
        self.send(self.owner, publish("nowhere", "x"))
        [answer] = self.owner.take()
        self.assertEqual(error_condition(answer), "item-not-found")

    def test_addressed_to_a_user_of_the_service_domain(self) -> None:
        self.send(
            self.owner,
            "<iq type='get' id='u' to='someone@pubsub.localhost'>"
            "<query xmlns='jabber:iq:version'/></iq>",
        )
        [answer] = self.owner.take()
        self.assertEqual(error_condition(answer), "service-unavailable")


class RequestParsingTests(PubSubComponentTestCase):
    """Requests are read before they are queued: the queue key is the node they act on."""

    def setUp(self) -> None:
        super().setUp()
        self.keys: list[str] = []
        submit = self.pubsub.pool.submit

        def recording(service: str, node: str, job: object) -> defer.Deferred:
            self.keys.append(node)
            return submit(service, node, job)

        self.patch(self.pubsub.pool, "submit", recording)

    def test_queued_under_the_node_acted_on(self) -> None:
        self.assertEqual(self.ask(create("other"))["type"], "result")
        decoyed = publish("news", "1").replace("<publish", "<foo node='other'/><publish")
        self.assertEqual(self.ask(decoyed)["type"], "result")
        self.assertEqual(self.keys, ["other", "news"])

    def test_service_level_and_instant_node_requests(self) -> None:
        self.assertEqual(self.ask(iq("get", "<subscriptions/>"))["type"], "result")
        instant = self.ask(iq("set", "<create/>"))
        self.assertEqual(instant["type"], "result")
        self.assertEqual(self.keys, ["", ""])

    def test_disco_is_queued_under_the_node_asked_about(self) -> None:
        disco = "http://jabber.org/protocol/disco#"
        for xml in (
            f"<query xmlns='{disco}items' node='news'/>",
            f"<query xmlns='{disco}info'><x node='news'/></query>",
        ):
            answer = self.ask(f"<iq type='get' id='d' to='{SERVICE}'>{xml}</iq>")
            self.assertEqual(answer["type"], "result")
        self.assertEqual(self.keys, ["news", ""])

    def test_malformed_requests_are_answered_without_queueing(self) -> None:
        unknown = self.ask(iq("get", "<bogus node='news'/>"))
        self.assertEqual(error_condition(unknown), "feature-not-implemented")
        bad_jid = self.ask(iq("set", "<subscribe node='news' jid='a@b@c'/>"))
        self.assertEqual(
            (error_condition(bad_jid), pubsub_condition(bad_jid)), ("bad-request", "invalid-jid")
        )
        no_node = self.ask(iq("set", "<publish/>"))
        self.assertEqual(
            (error_condition(no_node), pubsub_condition(no_node)),
            ("bad-request", "nodeid-required"),
        )
        self.assertEqual(self.keys, [])

    def test_negative_max_items(self) -> None:
        answer = self.ask(iq("get", "<items node='news' max_items='-1'/>"))
        self.assertEqual(error_condition(answer), "bad-request")

    def test_iq_without_a_valid_type(self) -> None:
        untyped = iq("get", "<items node='news'/>").replace(" type='get'", "")
        for xml in (iq("bogus", "<items node='news'/>"), untyped):
            self.assertEqual(error_condition(self.ask(xml)), "bad-request", xml)
        for kind in ("result", "error"):
            self.send(self.owner, iq(kind, "<items node='news'/>"))
        self.assertEqual(self.owner.take(), [])
        self.assertEqual(self.keys, [])


class MalformedFormTests(PubSubComponentTestCase):
    """A data form wokkel cannot read is the client's mistake: bad-request, never a crash."""

    def assertBadRequest(self, answer, pubsub: str | None = None) -> None:
        self.assertEqual(
            (error_condition(answer), pubsub_condition(answer)), ("bad-request", pubsub)
        )

    def test_publish_options(self) -> None:
        options = form("publish-options", twice("pubsub#access_model"))
        body = (
            "<publish node='news'><item id='1'><entry xmlns='urn:example'/></item></publish>"
            f"<publish-options>{options}</publish-options>"
        )
        self.assertBadRequest(self.ask(iq("set", body)))

    def test_create_and_configure(self) -> None:
        config = form("node_config", twice("pubsub#deliver_payloads"))
        self.assertBadRequest(
            self.ask(iq("set", f"<create node='n'/><configure>{config}</configure>"))
        )
        self.assertBadRequest(
            self.ask(iq("set", f"<configure node='news'>{config}</configure>", NS_OWNER))
        )

    def test_subscribe_options(self) -> None:
        options = form("subscribe_options", twice("pubsub#deliver"))
        body = f"<subscribe node='news' jid='alice@localhost'/><options>{options}</options>"
        self.assertBadRequest(self.ask(iq("set", body)), "invalid-options")
        body = f"<options node='news' jid='alice@localhost'>{options}</options>"
        self.assertBadRequest(self.ask(iq("set", body)), "invalid-options")

    def test_approval_message(self) -> None:
        node = field("pubsub#node", "news") + field("pubsub#subscriber_jid", "bob@localhost")
        for fields in (node + twice("pubsub#allow"), node + field("pubsub#allow", "maybe")):
            approval = form("subscribe_authorization", fields)
            answer = self.ask(f"<message to='{SERVICE}' id='m'>{approval}</message>")
            self.assertEqual((answer.name, error_condition(answer)), ("message", "bad-request"))


class InFlightLimitTests(PubSubComponentTestCase):
    pubsub_settings = {"workers": 1}

    def test_one_session_cannot_fill_the_queue(self) -> None:
        component = self.core.router.components[SERVICE]
        component.max_in_flight = 2
        bob = self.online("bob@localhost/phone")
        self.store.hold = True
        for item_id in ("running", "queued", "refused"):
            self.send(self.owner, publish("news", item_id))
        [refused] = self.owner.take()
        self.assertEqual(
            (refused["id"], error_condition(refused)), ("p-refused", "resource-constraint")
        )
        self.assertEqual(error_type(refused), "wait")
        # Others are still served: the limit is the session's, not the queue's.
        self.send(bob, subscribe("news", "bob@localhost"))
        self.assertEqual(bob.take(), [])  # queued behind the owner's publications
        self.store.hold = False
        self.store.held.pop(0).callback(None)  # the rest is not held
        self.assertEqual([s["type"] for s in self.owner.take()], ["result", "result"])
        self.assertEqual([s["type"] for s in bob.take()], ["result"])
        self.assertEqual(component._in_flight, {})
        self.send(self.owner, publish("news", "again"))
        self.assertEqual([s["type"] for s in self.owner.take()], ["result"])


def published(*subscribers: str) -> core.ItemPublished:
    config = {"pubsub#notification_type": "normal", "pubsub#presence_based_delivery": False}
    return core.ItemPublished(
        service=SERVICE,
        node="news",
        config=config,
        subscriptions=tuple(PubSubSubscription(jid, f"sub-{jid}") for jid in subscribers),
        notify=True,
        item_id="1",
        payload="<entry xmlns='urn:example'/>",
        publisher="alice@localhost/desk",
    )


class PublishedResultTextTests(unittest.TestCase):
    """A publication's result <iq/> is written as text: what the element would serialise to."""

    def check(self, request: str, node: str, item_id: str | None) -> None:
        iq = parse(request)
        expected = xmlstream.toResponse(iq, "result")
        publish = expected.addElement((NS_PUBSUB, "pubsub")).addElement("publish")
        publish["node"] = node
        if item_id is not None:
            publish.addElement("item")["id"] = item_id
        text = protocol._published(iq, node, item_id)
        self.assertEqual(parse(text).toXml(), parse(expected.toXml()).toXml())

    def test_addressed_and_not(self) -> None:
        self.check("<iq type='set' id='p1' from='a@x/r' to='pubsub.x'/>", "news", "1")
        self.check("<iq type='set' id='p&amp;2' from='a@x/r&apos;s'/>", "n'<&>", "i'<&>")
        self.check("<iq type='set' id='p3' from='a@x/r'/>", "news", None)


class PublishedNotificationTextTests(unittest.TestCase):
    """A publication's notification is written as text: the same message as its element."""

    def check(self, event: core.ItemPublished) -> None:
        notification = broadcast.fanout_of(event).notification
        text = notification.to("bob@localhost/a'<b>").decode()
        element = notification.element
        element["to"] = "bob@localhost/a'<b>"
        self.assertEqual(parse(text).toXml(), parse(element.toXml()).toXml())
        self.assertEqual(parse(text)["to"], "bob@localhost/a'<b>")

    def test_item_with_payload(self) -> None:
        self.check(published("bob@localhost"))

    def test_item_without_payload_or_payloads_not_delivered(self) -> None:
        self.check(dataclasses.replace(published(), payload=""))
        no_payloads = {**published().config, "pubsub#deliver_payloads": False}
        self.check(dataclasses.replace(published(), config=no_payloads))

    def test_no_item_publisher_and_markup_in_names(self) -> None:
        self.check(dataclasses.replace(published(), item_id=None))
        reply = {**published().config, "pubsub#itemreply": "publisher"}
        self.check(
            dataclasses.replace(
                published(),
                config=reply,
                node="a&b'<c>",
                item_id='"1"&<2>',
                publisher="alice@localhost/d'<>&",
            )
        )


class OfflineNotificationTests(unittest.TestCase):
    """A `normal` notification is kept for offline subscribers that are local accounts."""

    def setUp(self) -> None:
        self.database = MemoryDatabase()
        self.successResultOf(self.database.accounts.create_account("localhost", "bob", {}))
        self.kept: list[str] = []
        offline = OfflineDelivery(self.database.offline, 100)
        keep = offline.keep

        def recording(jid, message) -> defer.Deferred:
            self.kept.append(jid.full())
            return keep(jid, message)

        offline.keep = recording
        self.events: list[dict] = []
        self.patch(broadcast, "log", Logger(observer=self.events.append))
        self.broadcaster = broadcast.Broadcaster(
            SessionManager(), offline, Clock(), domains={"localhost"}, sync=True
        )

    def test_kept_only_for_local_accounts(self) -> None:
        self.broadcaster(
            published(
                "bob@localhost",
                "nobody@localhost",
                "someone@remote.example",
                "localhost",
                "bob@localhost/phone",
            )
        )
        self.assertEqual(self.kept, ["bob@localhost", "nobody@localhost"])
        stored = self.successResultOf(self.database.offline.pop_all("localhost", "bob"))
        self.assertEqual(len(stored), 1)
        self.assertIn("urn:example", stored[0].stanza)
        # The unknown local name is logged once, without a traceback.
        [event] = self.events
        self.assertEqual(event["jid"], "nobody@localhost")
        self.assertNotIn("log_failure", event)

    def test_other_failures_are_logged_with_their_traceback(self) -> None:
        self.patch(
            self.database.offline,
            "store",
            lambda *args: defer.fail(RuntimeError("database down")),
        )
        self.broadcaster(published("bob@localhost"))
        [event] = self.events
        self.assertIn("log_failure", event)
        self.assertEqual(event["jid"], "bob@localhost")


class PurgeOfflineTests(PubSubComponentTestCase):
    def configure(self, node: str, **fields: str) -> None:
        values = "".join(
            f"<field var='pubsub#{name}'><value>{value}</value></field>"
            for name, value in fields.items()
        )
        self.send(
            self.owner,
            f"<iq type='set' id='cfg' to='{SERVICE}'>"
            "<pubsub xmlns='http://jabber.org/protocol/pubsub#owner'>"
            f"<configure node='{node}'><x xmlns='jabber:x:data' type='submit'>"
            "<field var='FORM_TYPE' type='hidden'>"
            "<value>http://jabber.org/protocol/pubsub#node_config</value></field>"
            f"{values}</x></configure></pubsub></iq>",
        )
        self.assertEqual(self.owner.take()[-1]["type"], "result")

    def item_ids(self, node: str) -> list[str]:
        items = self.successResultOf(self.database.pubsub.get_items(SERVICE, node))
        return sorted(item.item_id for item in items)

    def setUp(self) -> None:
        super().setUp()
        self.bob = self.online("bob@localhost/phone")
        self.send(self.owner, create("board"))
        self.owner.take()
        self.send(
            self.owner,
            "<iq type='set' id='aff' to='pubsub.localhost'>"
            "<pubsub xmlns='http://jabber.org/protocol/pubsub#owner'>"
            "<affiliations node='board'><affiliation jid='bob@localhost' affiliation='publisher'/>"
            "</affiliations></pubsub></iq>",
        )
        self.send(self.owner, publish("board", "from-alice"))
        self.send(self.bob, publish("board", "from-bob"))
        self.owner.take()
        self.bob.take()

    def test_items_go_when_their_publisher_goes_offline(self) -> None:
        self.configure("board", purge_offline="1", notify_retract="1")
        self.send(self.owner, subscribe("board", "alice@localhost/desk", "watch"))
        self.owner.take()
        self.send(self.bob, "<presence type='unavailable'/>")
        self.clock.advance(0)
        self.assertEqual(self.item_ids("board"), ["from-alice"])
        retracts = [
            r["id"]
            for n in self.notifications(self.owner)
            for r in n.event.items.elements()
            if r.name == "retract"
        ]
        self.assertEqual(retracts, ["from-bob"])

    def test_not_while_another_resource_is_available(self) -> None:
        self.configure("board", purge_offline="1")
        self.online("bob@localhost/laptop")
        self.send(self.bob, "<presence type='unavailable'/>")
        self.clock.advance(0)
        self.assertEqual(self.item_ids("board"), ["from-alice", "from-bob"])

    def test_nodes_without_the_option_keep_their_items(self) -> None:
        self.send(self.bob, "<presence type='unavailable'/>")
        self.clock.advance(0)
        self.assertEqual(self.item_ids("board"), ["from-alice", "from-bob"])

    def test_switching_the_option_off_again(self) -> None:
        self.configure("board", purge_offline="1")
        self.configure("board", purge_offline="0")
        self.send(self.bob, "<presence type='unavailable'/>")
        self.clock.advance(0)
        self.assertEqual(self.item_ids("board"), ["from-alice", "from-bob"])

    def test_known_from_the_stored_nodes_at_start(self) -> None:
        self.configure("board", purge_offline="1")
        self.pubsub.purge.nodes.clear()
        self.successResultOf(defer.ensureDeferred(self.pubsub.purge.load()))
        self.assertEqual(self.pubsub.purge.nodes, {(SERVICE, "board")})
