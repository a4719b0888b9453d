"""The pubsub.localhost component at the stanza level: back pressure, fan-out outside the worker,
per-node ordering, notifications serialised once, SHIM SubIds, error rendering."""

import dataclasses

from twisted.internet import defer
from twisted.internet.task import Clock

from mim_twisted.pubsub.errors import PubSubError
from mim_twisted.pubsub.protocol import stanza_error
from mim_twisted.tap import build_im_core, build_pubsub
from tests.imsupport import ImCoreTestCase, error_condition, parse

SERVICE = "pubsub.localhost"
NS_PUBSUB = "http://jabber.org/protocol/pubsub"


class GatedStore:
    """The memory store, with publications held until the test lets them through."""

    def __init__(self, store: object) -> None:
        self._store = store
        self.held: list[defer.Deferred] = []
        self.hold = False

    def __getattr__(self, name: str) -> object:
        return getattr(self._store, name)

    def publish_item(self, *args: object) -> defer.Deferred:
        if not self.hold:
            return self._store.publish_item(*args)
        gate: defer.Deferred = defer.Deferred()
        self.held.append(gate)
        return gate.addCallback(lambda _: self._store.publish_item(*args))


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
        self.assertIn(b"type='wait'", refused.toXml().encode())
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
        self.assertIn("payload &lt;&amp;&gt;", to_bob.toXml())

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


class ErrorRenderingTests(PubSubComponentTestCase):
    def test_application_condition_and_feature(self) -> None:
        element = stanza_error(PubSubError("feature-not-implemented", "unsupported", feature="x"))
        xml = element.getElement().toXml()
        self.assertIn("feature-not-implemented", xml)
        self.assertIn(
            "<unsupported xmlns='http://jabber.org/protocol/pubsub#errors' feature='x'/>", xml
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
