"""PEP (XEP-0163) at the stanza level on the IM core: routing to the account's service,
auto-create with the PEP defaults, publish-options, disco, +notify filtering, the last item on
presence, on caps learned later and on a new contact, and the pure rules behind them."""

import dataclasses
from unittest import mock

from twisted.internet import defer
from twisted.internet.task import Clock
from twisted.trial import unittest

from mim_twisted.im import caps
from mim_twisted.pubsub import pep
from mim_twisted.pubsub.config import PEP_NODE_DEFAULTS
from mim_twisted.pubsub.pep import admits_contact, notify_nodes
from mim_twisted.storage.interfaces import PubSubSubscription, RosterItem
from mim_twisted.tap import build_im_core, build_pubsub
from tests.imsupport import ImCoreTestCase, error_condition, presence_xml

NS_PUBSUB = "http://jabber.org/protocol/pubsub"
NS_EVENT = NS_PUBSUB + "#event"
NS_ERRORS = NS_PUBSUB + "#errors"
NS_DISCO_INFO = "http://jabber.org/protocol/disco#info"
NS_DISCO_ITEMS = "http://jabber.org/protocol/disco#items"
NS_DELAY = "urn:xmpp:delay"
DEVICES = "urn:xmpp:omemo:2:devices"
NODE = "urn:xmpp:caps-test"


def publish(node: str, item_id: str, text: str = "x", to: str = "", options: str = "") -> str:
    address = f" to='{to}'" if to else ""
    return (
        f"<iq type='set' id='p-{item_id}'{address}><pubsub xmlns='{NS_PUBSUB}'>"
        f"<publish node='{node}'><item id='{item_id}'><entry xmlns='urn:example'>{text}</entry>"
        f"</item></publish>{options}</pubsub></iq>"
    )


def publish_options(**fields: str) -> str:
    values = "".join(
        f"<field var='pubsub#{var}'><value>{value}</value></field>" for var, value in fields.items()
    )
    return (
        "<publish-options><x xmlns='jabber:x:data' type='submit'>"
        "<field var='FORM_TYPE' type='hidden'>"
        "<value>http://jabber.org/protocol/pubsub#publish-options</value></field>"
        f"{values}</x></publish-options>"
    )


def items_request(owner: str, node: str) -> str:
    return (
        f"<iq type='get' id='items' to='{owner}'><pubsub xmlns='{NS_PUBSUB}'>"
        f"<items node='{node}'/></pubsub></iq>"
    )


def event_items(stanza) -> tuple[str, str, list[str]]:
    """(from, node, item ids) of a PubSub event notification."""
    event = next(stanza.elements(NS_EVENT, "event"))
    items = next(event.elements(NS_EVENT, "items"))
    ids = [item["id"] for item in items.elements(NS_EVENT, "item")]
    return stanza["from"], items["node"], ids


class PureRuleTests(unittest.TestCase):
    def test_notify_nodes(self) -> None:
        features = ["urn:a+notify", "urn:b", "urn:xmpp:omemo:2:devices+notify", "+notify"]
        self.assertEqual(notify_nodes(features), {"urn:a", DEVICES, ""})

    def test_access_models_for_implicit_recipients(self) -> None:
        presence = dict(PEP_NODE_DEFAULTS)
        contact = RosterItem("bob@localhost", subscription="from", groups=["friends"])
        only_to = RosterItem("bob@localhost", subscription="to", groups=["friends"])
        self.assertTrue(admits_contact(presence, contact))
        self.assertFalse(admits_contact(presence, only_to))
        self.assertFalse(admits_contact(presence, None))
        self.assertTrue(admits_contact(presence, None, "owner"))
        self.assertFalse(admits_contact(presence, contact, "outcast"))
        open_model = {**presence, "pubsub#access_model": "open"}
        self.assertTrue(admits_contact(open_model, only_to))
        whitelist = {**presence, "pubsub#access_model": "whitelist"}
        self.assertFalse(admits_contact(whitelist, contact))
        self.assertTrue(admits_contact(whitelist, contact, "member"))
        roster = {
            **presence,
            "pubsub#access_model": "roster",
            "pubsub#roster_groups_allowed": ["friends"],
        }
        self.assertTrue(admits_contact(roster, contact))
        self.assertFalse(admits_contact(roster, dataclasses.replace(contact, groups=[])))


class PepTestCase(ImCoreTestCase):
    users = ("alice", "bob", "carol", "dave")

    def build(self) -> None:
        self.clock = Clock()
        self.config = dataclasses.replace(
            self.config, pubsub=dataclasses.replace(self.config.pubsub, sync_broadcast=True)
        )
        self.core = build_im_core(self.config, self.database, self.clock)
        self.pubsub = build_pubsub(self.config, self.database, self.core, self.clock)
        self.pubsub.pool.start()
        self.addCleanup(self.pubsub.pool.stop)
        self.connected = []

    def with_caps(self, jid: str, *features: str, priority: int | None = None):
        """A session that sent initial presence with caps for ``features``, and answered the
        server's disco#info query about them; what it was sent until then is forgotten."""
        session = self.connect(jid)
        self.announce_caps(session, *features, priority=priority)
        return session

    def announce_caps(self, session, *features: str, priority: int | None = None) -> None:
        """The session sends an available presence with caps for ``features``, and answers the
        server's disco#info query about them if it is asked."""
        identity = caps.Identity("client", "pc", "", "test")
        ver = caps.caps_hash("sha-1", [identity], features)
        presence = presence_xml(priority=priority).replace(
            "</presence>",
            f"<c xmlns='{caps.NS_CAPS}' hash='sha-1' node='urn:test' ver='{ver}'/></presence>",
        )
        self.send(session, presence)
        asked = (
            s
            for s in session.sent
            if s.name == "iq"
            and s["type"] == "get"
            and next(s.elements(NS_DISCO_INFO, "query"))["node"] == f"urn:test#{ver}"
        )
        query = next(asked, None)
        if query is not None:
            body = "<identity category='client' type='pc' name='test'/>" + "".join(
                f"<feature var='{feature}'/>" for feature in features
            )
            self.send(
                session,
                f"<iq type='result' id='{query['id']}' to='localhost'>"
                f"<query xmlns='{NS_DISCO_INFO}' node='urn:test#{ver}'>{body}</query></iq>",
            )

    def ask(self, session, xml: str):
        """Send; the one IQ answer the session gets back (notifications are left)."""
        self.send(session, xml)
        answers = [s for s in session.sent if s.name == "iq" and s.getAttribute("type") != "get"]
        self.assertEqual(len(answers), 1, [s.toXml() for s in session.sent])
        session.sent.remove(answers[0])
        return answers[0]

    def notifications(self, session) -> list:
        return [s for s in session.take() if s.name == "message"]


class RoutingTests(PepTestCase):
    def test_publish_without_to_auto_creates_with_the_pep_defaults(self) -> None:
        alice = self.online("alice@localhost/desk")
        answer = self.ask(alice, publish(NODE, "one"))
        self.assertEqual(answer["type"], "result")
        node = self.successResultOf(self.database.pubsub.get_node("alice@localhost", NODE))
        config = {**PEP_NODE_DEFAULTS, **node.config}
        self.assertEqual(config["pubsub#max_items"], 1)
        self.assertEqual(config["pubsub#access_model"], "presence")
        self.assertEqual(config["pubsub#send_last_published_item"], "on_sub_and_presence")
        # max_items 1: the next item replaces it.
        self.ask(alice, publish(NODE, "two", to="alice@localhost"))
        items = self.successResultOf(self.database.pubsub.get_items("alice@localhost", NODE))
        self.assertEqual([item.item_id for item in items], ["two"])

    def test_only_the_owner_publishes(self) -> None:
        alice = self.online("alice@localhost/desk")
        bob = self.online("bob@localhost/phone")
        self.assertEqual(
            error_condition(self.ask(bob, publish(NODE, "x", to="alice@localhost"))),
            "item-not-found",
        )
        self.ask(alice, publish(NODE, "one"))
        self.assertEqual(
            error_condition(self.ask(bob, publish(NODE, "x", to="alice@localhost"))), "forbidden"
        )

    def test_publish_options(self) -> None:
        alice = self.online("alice@localhost/desk")
        self.ask(alice, publish(DEVICES, "b", options=publish_options(access_model="open")))
        node = self.successResultOf(self.database.pubsub.get_node("alice@localhost", DEVICES))
        self.assertEqual(node.config["pubsub#access_model"], "open")
        # Met: published; not met: conflict + precondition-not-met, nothing published.
        met = publish(DEVICES, "c", options=publish_options(access_model="open"))
        self.assertEqual(self.ask(alice, met)["type"], "result")
        mismatch = publish(DEVICES, "d", options=publish_options(access_model="whitelist"))
        refused = self.ask(alice, mismatch)
        self.assertEqual(error_condition(refused), "conflict")
        error = next(refused.elements("jabber:client", "error"))
        self.assertEqual(
            [c.name for c in error.elements() if c.uri == NS_ERRORS], ["precondition-not-met"]
        )
        items = self.successResultOf(self.database.pubsub.get_items("alice@localhost", DEVICES))
        self.assertEqual([item.item_id for item in items], ["c"])

    def test_a_stranger_reads_an_open_node_but_not_a_presence_node(self) -> None:
        alice = self.online("alice@localhost/desk")
        dave = self.online("dave@localhost/x")
        self.ask(alice, publish("bundle", "1", options=publish_options(access_model="open")))
        self.ask(alice, publish("private", "1"))
        readable = self.ask(dave, items_request("alice@localhost", "bundle"))
        self.assertEqual(readable["type"], "result")
        refused = self.ask(dave, items_request("alice@localhost", "private"))
        self.assertEqual(error_condition(refused), "not-authorized")

    def test_malformed_requests_get_errors(self) -> None:
        alice = self.online("alice@localhost/desk")
        for body in (
            "<publish/>",  # no node
            "<publish node='n'><item><a xmlns='urn:a'/><b xmlns='urn:b'/></item></publish>",
            "<unknown-verb/>",
        ):
            answer = self.ask(
                alice, f"<iq type='set' id='bad'><pubsub xmlns='{NS_PUBSUB}'>{body}</pubsub></iq>"
            )
            self.assertEqual(answer["type"], "error", body)
        self.assertFalse(alice.closed)

    def test_disco_items_lists_the_nodes_the_requester_may_read(self) -> None:
        self.subscribe("bob", "alice")  # bob sees alice's presence
        alice = self.online("alice@localhost/desk")
        bob = self.online("bob@localhost/phone")
        self.ask(alice, publish("urn:presence-node", "1"))
        self.ask(
            alice,
            publish("urn:closed-node", "1", options=publish_options(access_model="whitelist")),
        )
        query = f"<iq type='get' id='i' to='alice@localhost'><query xmlns='{NS_DISCO_ITEMS}'/></iq>"

        def nodes(session) -> list[str]:
            answer = next(self.ask(session, query).elements(NS_DISCO_ITEMS, "query"))
            return [item["node"] for item in answer.elements(NS_DISCO_ITEMS, "item")]

        self.assertEqual(nodes(alice), ["urn:closed-node", "urn:presence-node"])
        self.assertEqual(nodes(bob), ["urn:presence-node"])

    def test_account_services_are_bounded_and_made_again(self) -> None:
        self.patch(pep, "MAX_SERVICES", 2)
        alice = self.online("alice@localhost/desk")
        self.ask(alice, publish(NODE, "one"))
        for owner in ("bob@localhost", "carol@localhost", "nobody@localhost"):
            self.ask(alice, items_request(owner, NODE))  # item-not-found, service made
        self.assertEqual(len(self.pubsub.pep._components), 2)
        answer = self.ask(alice, items_request("alice@localhost", NODE))
        self.assertEqual(answer["type"], "result")

    def test_disco_info_shows_pep(self) -> None:
        alice = self.online("alice@localhost/desk")
        answer = self.ask(
            alice,
            f"<iq type='get' id='d' to='alice@localhost'><query xmlns='{NS_DISCO_INFO}'/></iq>",
        )
        query = next(answer.elements(NS_DISCO_INFO, "query"))
        identities = {(i["category"], i["type"]) for i in query.elements(NS_DISCO_INFO, "identity")}
        self.assertIn(("pubsub", "pep"), identities)
        features = {f["var"] for f in query.elements(NS_DISCO_INFO, "feature")}
        for feature in (
            "publish",
            "auto-create",
            "publish-options",
            "last-published",
            "presence-notifications",
            "filtered-notifications",
        ):
            self.assertIn(f"{NS_PUBSUB}#{feature}", features)


class NotificationTests(PepTestCase):
    def setUp(self) -> None:
        super().setUp()
        self.subscribe("bob", "alice")  # bob sees alice's presence
        self.subscribe("carol", "alice")

    def test_contacts_with_notify_and_own_resources_only(self) -> None:
        alice = self.online("alice@localhost/desk")
        alice_phone = self.with_caps("alice@localhost/phone", NODE + "+notify")
        bob = self.with_caps("bob@localhost/phone", NODE + "+notify")
        carol = self.with_caps("carol@localhost/pc", "urn:other+notify")  # no +notify for NODE
        dave = self.with_caps("dave@localhost/pc", NODE + "+notify")  # a stranger
        self.forget()
        self.ask(alice, publish(NODE, "one"))
        self.clock.advance(0)
        self.assertEqual(
            [event_items(n) for n in self.notifications(bob)],
            [("alice@localhost", NODE, ["one"])],
        )
        self.assertEqual(len(self.notifications(alice_phone)), 1)
        self.assertEqual(self.notifications(carol), [])
        self.assertEqual(self.notifications(dave), [])
        self.assertEqual(self.notifications(alice), [])  # no caps: nothing

    def test_retract_with_notify_reaches_the_same_recipients(self) -> None:
        alice = self.online("alice@localhost/desk")
        bob = self.with_caps("bob@localhost/phone", NODE + "+notify")
        dave = self.with_caps("dave@localhost/pc", NODE + "+notify")
        self.ask(alice, publish(NODE, "one"))
        self.forget()
        self.ask(
            alice,
            f"<iq type='set' id='r'><pubsub xmlns='{NS_PUBSUB}'><retract node='{NODE}' "
            "notify='true'><item id='one'/></retract></pubsub></iq>",
        )
        [retracted] = self.notifications(bob)
        items = next(next(retracted.elements(NS_EVENT, "event")).elements(NS_EVENT, "items"))
        self.assertEqual([r["id"] for r in items.elements(NS_EVENT, "retract")], ["one"])
        self.assertEqual(self.notifications(dave), [])

    def test_last_item_on_login_once(self) -> None:
        alice = self.online("alice@localhost/desk")
        self.ask(alice, publish(NODE, "one"))
        bob = self.with_caps("bob@localhost/phone", NODE + "+notify")
        [last] = self.notifications(bob)
        self.assertEqual(event_items(last), ("alice@localhost", NODE, ["one"]))
        self.assertIsNotNone(next(last.elements(NS_DELAY, "delay"), None))
        # Another presence with the same caps sends nothing again.
        self.send(bob, presence_xml())
        self.assertEqual(self.notifications(bob), [])
        # A contact without +notify gets nothing; a stranger neither.
        carol = self.with_caps("carol@localhost/pc", "urn:other+notify")
        dave = self.with_caps("dave@localhost/pc", NODE + "+notify")
        self.assertEqual(self.notifications(carol), [])
        self.assertEqual(self.notifications(dave), [])

    def test_last_item_when_caps_are_learned_later(self) -> None:
        alice = self.online("alice@localhost/desk")
        self.ask(alice, publish(NODE, "one"))
        bob = self.connect("bob@localhost/phone")
        identity = caps.Identity("client", "pc", "", "test")
        ver = caps.caps_hash("sha-1", [identity], [NODE + "+notify"])
        self.send(
            bob,
            f"<presence><c xmlns='{caps.NS_CAPS}' hash='sha-1' node='urn:test' ver='{ver}'/>"
            "</presence>",
        )
        [query] = [s for s in bob.take() if s.name == "iq"]
        self.assertEqual(bob.take(), [])
        self.send(
            bob,
            f"<iq type='result' id='{query['id']}' to='localhost'>"
            f"<query xmlns='{NS_DISCO_INFO}' node='urn:test#{ver}'>"
            f"<identity category='client' type='pc' name='test'/>"
            f"<feature var='{NODE}+notify'/></query></iq>",
        )
        [last] = self.notifications(bob)
        self.assertEqual(event_items(last), ("alice@localhost", NODE, ["one"]))

    def test_last_item_to_a_new_contact(self) -> None:
        alice = self.online("alice@localhost/desk")
        self.ask(alice, publish(NODE, "one"))
        dave = self.with_caps("dave@localhost/pc", NODE + "+notify")
        self.send(dave, "<presence type='subscribe' to='alice@localhost'/>")
        self.assertEqual(self.notifications(dave), [])
        self.send(alice, "<presence type='subscribed' to='dave@localhost'/>")
        self.clock.advance(0)
        lasts = [n for n in self.notifications(dave) if n.getAttribute("type") == "headline"]
        self.assertEqual([event_items(n) for n in lasts], [("alice@localhost", NODE, ["one"])])

    def test_unsubscribed_presence_removes_pep_subscriptions(self) -> None:
        alice = self.online("alice@localhost/desk")
        bob = self.online("bob@localhost/phone")
        self.ask(alice, publish(NODE, "one"))
        answer = self.ask(
            bob,
            f"<iq type='set' id='s' to='alice@localhost'><pubsub xmlns='{NS_PUBSUB}'>"
            f"<subscribe node='{NODE}' jid='bob@localhost'/></pubsub></iq>",
        )
        self.assertEqual(answer["type"], "result")
        self.send(alice, "<presence type='unsubscribed' to='bob@localhost'/>")
        self.clock.advance(0)
        subscriptions = self.successResultOf(
            self.database.pubsub.get_subscriptions("alice@localhost", NODE)
        )
        self.assertEqual(subscriptions, [])

    def test_notification_to_a_session_whose_presence_is_not_yet_handled(self) -> None:
        """Explicit subscribers are reached by the presence as received (message_priority)."""
        bob = self.connect("bob@localhost/phone")
        bob.message_priority = 0  # received, not handled
        self.successResultOf(
            self.database.pubsub.create_node("pubsub.localhost", "news", {}, "alice@localhost")
        )
        alice = self.online("alice@localhost/desk")
        self.successResultOf(
            self.database.pubsub.add_subscription(
                "pubsub.localhost",
                "news",
                PubSubSubscription("bob@localhost", "s1"),
            )
        )
        self.ask(alice, publish("news", "one", to="pubsub.localhost"))
        self.clock.advance(0)
        self.assertEqual(len(self.notifications(bob)), 1)


def block(jid: str) -> str:
    return (
        f"<iq type='set' id='b'><block xmlns='urn:xmpp:blocking'><item jid='{jid}'/></block></iq>"
    )


def subscribe_request(owner: str, node: str, jid: str) -> str:
    return (
        f"<iq type='set' id='s' to='{owner}'><pubsub xmlns='{NS_PUBSUB}'>"
        f"<subscribe node='{node}' jid='{jid}'/></pubsub></iq>"
    )


class BlockingTests(PepTestCase):
    """XEP-0191 holds for PEP both ways: a contact the owner blocked, or one that blocked the
    owner, gets neither notifications (implicit or explicitly subscribed) nor last items."""

    def setUp(self) -> None:
        super().setUp()
        self.subscribe("bob", "alice")  # bob sees alice's presence ('from' on alice's roster)
        self.subscribe("carol", "alice")

    def test_a_contact_the_owner_blocked_gets_nothing(self) -> None:
        alice = self.online("alice@localhost/desk")
        bob = self.with_caps("bob@localhost/phone", NODE + "+notify")
        bob_desk = self.online("bob@localhost/desk")  # explicitly subscribed, no caps
        carol = self.with_caps("carol@localhost/pc", NODE + "+notify")
        self.ask(alice, publish(NODE, "one"))
        answer = self.ask(bob_desk, subscribe_request("alice@localhost", NODE, "bob@localhost"))
        self.assertEqual(answer["type"], "result")
        self.assertEqual(self.ask(alice, block("bob@localhost"))["type"], "result")
        self.forget()
        self.ask(alice, publish(NODE, "two"))
        self.clock.advance(0)
        self.assertEqual(self.notifications(bob), [])
        self.assertEqual(self.notifications(bob_desk), [])
        self.assertEqual(
            [event_items(n) for n in self.notifications(carol)],
            [("alice@localhost", NODE, ["two"])],
        )
        # Nor its last item when it comes online, the owner offline (its list read from the
        # store).
        self.disconnect(alice)
        laptop = self.with_caps("bob@localhost/laptop", NODE + "+notify")
        self.assertEqual(self.notifications(laptop), [])

    def test_a_contact_that_blocked_the_owner_gets_nothing(self) -> None:
        alice = self.online("alice@localhost/desk")
        self.ask(alice, publish(NODE, "one"))
        bob = self.with_caps("bob@localhost/phone", NODE + "+notify")
        answer = self.ask(bob, subscribe_request("alice@localhost", NODE, "bob@localhost"))
        self.assertEqual(answer["type"], "result")
        self.assertEqual(self.ask(bob, block("alice@localhost"))["type"], "result")
        self.forget()
        self.ask(alice, publish(NODE, "two"))
        self.clock.advance(0)
        self.assertEqual(self.notifications(bob), [])
        laptop = self.with_caps("bob@localhost/laptop", NODE + "+notify")
        self.assertEqual(self.notifications(laptop), [])

    def test_blocking_one_resource_spares_the_others(self) -> None:
        alice = self.online("alice@localhost/desk")
        phone = self.with_caps("bob@localhost/phone", NODE + "+notify")
        laptop = self.with_caps("bob@localhost/laptop", NODE + "+notify")
        self.assertEqual(self.ask(alice, block("bob@localhost/phone"))["type"], "result")
        self.forget()
        self.ask(alice, publish(NODE, "one"))
        self.clock.advance(0)
        self.assertEqual(self.notifications(phone), [])
        self.assertEqual(len(self.notifications(laptop)), 1)


class FanoutPathTests(PepTestCase):
    """An event whose owner's roster and block lists in play are in memory is fanned out at
    once; otherwise it waits for the reads, and the owner's later events wait behind it."""

    def setUp(self) -> None:
        super().setUp()
        self.subscribe("bob", "alice")

    def test_from_memory_without_reading_the_roster(self) -> None:
        alice = self.online("alice@localhost/desk")
        bob = self.with_caps("bob@localhost/phone", NODE + "+notify")
        waiting = hold_roster_reads(self.pubsub.pep)
        self.ask(alice, publish(NODE, "one"))
        self.assertEqual(waiting, [])
        self.assertEqual(
            [event_items(n) for n in self.notifications(bob)], [("alice@localhost", NODE, ["one"])]
        )

    def test_events_wait_in_order_behind_a_roster_read(self) -> None:
        alice = self.online("alice@localhost/desk")
        bob = self.with_caps("bob@localhost/phone", NODE + "+notify")
        pep_service = self.pubsub.pep
        held_rosters, pep_service.held_rosters = pep_service.held_rosters, None
        waiting = hold_roster_reads(pep_service)
        self.ask(alice, publish(NODE, "one"))
        pep_service.held_rosters = held_rosters  # in memory again, but "one" is still waiting
        self.ask(alice, publish(NODE, "two"))
        self.assertEqual(len(waiting), 1)
        self.assertEqual(self.notifications(bob), [])
        waiting.pop(0)()  # "one" is sent; "two" now reads the roster in turn
        waiting.pop(0)()
        self.assertEqual([event_items(n)[2] for n in self.notifications(bob)], [["one"], ["two"]])

    def test_a_block_list_not_in_memory_is_read(self) -> None:
        alice = self.online("alice@localhost/desk")
        bob = self.with_caps("bob@localhost/phone", NODE + "+notify")
        carol = self.with_caps("carol@localhost/pc", NODE + "+notify")
        self.subscribe("carol", "alice")
        self.assertEqual(self.ask(bob, block("alice@localhost"))["type"], "result")
        self.core.blocking.lists.forget(bob.jid.userhostJID())
        self.forget()
        self.ask(alice, publish(NODE, "one"))
        self.clock.advance(0)
        self.assertEqual(self.notifications(bob), [])
        self.assertEqual(len(self.notifications(carol)), 1)


def configure(node: str, **fields: str) -> str:
    values = "".join(
        f"<field var='pubsub#{name}'><value>{value}</value></field>"
        for name, value in fields.items()
    )
    return (
        f"<iq type='set' id='cfg'><pubsub xmlns='{NS_PUBSUB}#owner'>"
        f"<configure node='{node}'><x xmlns='jabber:x:data' type='submit'>"
        "<field var='FORM_TYPE' type='hidden'>"
        f"<value>{NS_PUBSUB}#node_config</value></field>{values}</x></configure></pubsub></iq>"
    )


class ImplicitRecipientTests(PepTestCase):
    """The implicit recipients of an owner's node are kept between its publications, and
    follow every change of what they were found from."""

    def setUp(self) -> None:
        super().setUp()
        self.subscribe("bob", "alice")
        self.subscribe("carol", "alice")
        self.alice = self.online("alice@localhost/desk")
        self.fanouts: list = []
        broadcaster = self.pubsub.pep.broadcaster
        send = broadcaster.send

        def recorded(fanout) -> None:
            self.fanouts.append(fanout)
            send(fanout)

        self.patch(broadcaster, "send", recorded)

    def published(self, item_id: str, node: str = NODE) -> list[str]:
        """Alice publishes: the full JIDs of the sessions notified without subscribing."""
        self.ask(self.alice, publish(node, item_id))
        self.clock.advance(0)
        [fanout] = self.fanouts
        self.fanouts.clear()
        return sorted(session.full_jid for session in fanout.sessions)

    def test_nothing_changed_nothing_looked_up_again(self) -> None:
        self.with_caps("bob@localhost/phone", NODE + "+notify")
        self.assertEqual(self.published("one"), ["bob@localhost/phone"])
        looked_up = []
        sessions = self.core.sessions
        bound_sessions_of = sessions.bound_sessions_of
        self.patch(
            sessions,
            "bound_sessions_of",
            lambda jid: looked_up.append(jid) or bound_sessions_of(jid),
        )
        self.assertEqual(self.published("two"), ["bob@localhost/phone"])
        self.assertEqual(looked_up, [])

    def test_a_contact_becoming_available(self) -> None:
        bob = self.with_caps("bob@localhost/phone", NODE + "+notify")
        self.send(bob, presence_xml("unavailable"))
        self.assertEqual(self.published("one"), [])
        self.send(bob, presence_xml())  # the caps it announced still hold
        self.assertEqual(self.published("two"), ["bob@localhost/phone"])

    def test_a_contact_becoming_unavailable(self) -> None:
        bob = self.with_caps("bob@localhost/phone", NODE + "+notify")
        self.assertEqual(self.published("one"), ["bob@localhost/phone"])
        self.send(bob, presence_xml("unavailable"))
        self.assertEqual(self.published("two"), [])

    def test_caps_changing_to_notify(self) -> None:
        bob = self.with_caps("bob@localhost/phone", "urn:other+notify")
        self.assertEqual(self.published("one"), [])
        self.announce_caps(bob, "urn:other+notify", NODE + "+notify")
        self.assertEqual(self.published("two"), ["bob@localhost/phone"])

    def test_caps_changing_from_notify(self) -> None:
        bob = self.with_caps("bob@localhost/phone", NODE + "+notify")
        self.assertEqual(self.published("one"), ["bob@localhost/phone"])
        self.announce_caps(bob, "urn:other+notify")
        self.assertEqual(self.published("two"), [])

    def test_a_new_session_bound(self) -> None:
        self.with_caps("bob@localhost/phone", NODE + "+notify")
        self.assertEqual(self.published("one"), ["bob@localhost/phone"])
        self.with_caps("bob@localhost/desk", NODE + "+notify")
        self.with_caps("alice@localhost/phone", NODE + "+notify")  # the owner's own
        self.assertEqual(
            self.published("two"),
            ["alice@localhost/phone", "bob@localhost/desk", "bob@localhost/phone"],
        )

    def test_a_session_ended(self) -> None:
        self.with_caps("bob@localhost/phone", NODE + "+notify")
        desk = self.with_caps("bob@localhost/desk", NODE + "+notify")
        self.assertEqual(self.published("one"), ["bob@localhost/desk", "bob@localhost/phone"])
        self.disconnect(desk)
        self.assertEqual(self.published("two"), ["bob@localhost/phone"])
        kept = [
            s for entry in self.pubsub.pep.recipients._entries.values() for _, s in entry.sessions
        ]
        self.assertNotIn(desk, kept)

    def test_a_closing_session_until_it_is_detached(self) -> None:
        # Its connection closing, it is left out while still bound; detached (XEP-0198), it
        # is no longer closing and is notified again, neither bound nor unbound meanwhile.
        phone = self.with_caps("bob@localhost/phone", NODE + "+notify")
        phone.closed = True
        self.assertEqual(self.published("one"), [])
        phone.closed = False
        self.assertEqual(self.published("two"), ["bob@localhost/phone"])

    def test_a_subscription_removed_from_the_roster(self) -> None:
        self.with_caps("bob@localhost/phone", NODE + "+notify")
        self.with_caps("carol@localhost/pc", NODE + "+notify")
        self.assertEqual(self.published("one"), ["bob@localhost/phone", "carol@localhost/pc"])
        self.send(self.alice, "<presence type='unsubscribed' to='bob@localhost'/>")
        self.clock.advance(0)
        self.forget()
        self.assertEqual(self.published("two"), ["carol@localhost/pc"])  # the roster read again
        self.assertEqual(self.published("three"), ["carol@localhost/pc"])  # and held

    def test_the_access_model_changed(self) -> None:
        self.with_caps("bob@localhost/phone", NODE + "+notify")
        self.assertEqual(self.published("one"), ["bob@localhost/phone"])
        # From memory under open and presence (where the same contacts pass), after the
        # affiliations are read under whitelist.
        for model, recipients in (
            ("open", ["bob@localhost/phone"]),
            ("whitelist", []),
            ("presence", ["bob@localhost/phone"]),
        ):
            answer = self.ask(self.alice, configure(NODE, access_model=model))
            self.assertEqual(answer["type"], "result")
            self.assertEqual(self.published(model), recipients)

    def test_an_explicit_subscriber_is_not_notified_twice(self) -> None:
        bob = self.with_caps("bob@localhost/phone", NODE + "+notify")
        self.assertEqual(self.published("one"), ["bob@localhost/phone"])
        subscribe = (
            f"<iq type='set' id='s' to='alice@localhost'><pubsub xmlns='{NS_PUBSUB}'>"
            f"<subscribe node='{NODE}' jid='bob@localhost'/></pubsub></iq>"
        )
        self.assertEqual(self.ask(bob, subscribe)["type"], "result")
        self.notifications(bob)
        self.assertEqual(self.published("two"), [])
        self.assertEqual([event_items(n)[2] for n in self.notifications(bob)], [["two"]])

    def test_entries_beyond_the_cache_size_are_dropped(self) -> None:
        cache = self.pubsub.pep.recipients
        cache.size = 2
        self.with_caps("bob@localhost/phone", "a+notify", "b+notify", "c+notify")
        for node in ("a", "b", "c"):
            self.assertEqual(self.published("one", node), ["bob@localhost/phone"])
        self.assertEqual(len(cache), 2)
        self.assertEqual(self.published("two", "a"), ["bob@localhost/phone"])


def entry(*accounts: str) -> pep.Recipients:
    return pep.Recipients((), ("presence", ()), (), accounts)


class RecipientCacheTests(unittest.TestCase):
    def test_a_change_drops_the_entries_found_from_that_account_only(self) -> None:
        cache = pep.RecipientCache()
        roster: tuple = ()
        cache.put(("alice@localhost", "n"), entry("alice@localhost", "bob@localhost"))
        cache.put(("carol@localhost", "n"), entry("carol@localhost", "dave@localhost"))
        cache.sessions_changed("bob@localhost")
        self.assertIsNone(cache.get(("alice@localhost", "n"), roster, ("presence", ())))
        self.assertIsNotNone(cache.get(("carol@localhost", "n"), roster, ("presence", ())))
        self.assertEqual(set(cache._dependents), {"carol@localhost", "dave@localhost"})

    def test_another_roster_or_other_rules_are_not_the_entry(self) -> None:
        cache = pep.RecipientCache()
        held: tuple = ()
        cache.put(
            ("alice@localhost", "n"), dataclasses.replace(entry("alice@localhost"), roster=held)
        )
        self.assertIsNone(cache.get(("alice@localhost", "n"), held, ("open", ())))
        self.assertEqual(len(cache), 0)
        cache.put(
            ("alice@localhost", "n"), dataclasses.replace(entry("alice@localhost"), roster=held)
        )
        self.assertIsNone(
            cache.get(("alice@localhost", "n"), (RosterItem("bob@localhost"),), ("presence", ()))
        )
        self.assertEqual(cache._dependents, {})

    def test_the_least_recently_used_beyond_the_size_is_dropped_with_its_links(self) -> None:
        cache = pep.RecipientCache(size=2)
        roster: tuple = ()
        cache.put(("a@localhost", "n"), entry("a@localhost", "x@localhost"))
        cache.put(("b@localhost", "n"), entry("b@localhost", "x@localhost"))
        self.assertIsNotNone(cache.get(("a@localhost", "n"), roster, ("presence", ())))
        cache.put(("c@localhost", "n"), entry("c@localhost"))
        self.assertEqual(len(cache), 2)
        self.assertIsNone(cache.get(("b@localhost", "n"), roster, ("presence", ())))
        self.assertEqual(
            cache._dependents,
            {
                "a@localhost": {("a@localhost", "n")},
                "x@localhost": {("a@localhost", "n")},
                "c@localhost": {("c@localhost", "n")},
            },
        )


def hold_roster_reads(pep_service: pep.PepService) -> list:
    """The service's roster reads from now on wait: each a call in the list that lets it
    finish."""
    rosters = pep_service.rosters
    waiting: list = []

    def held_roster(host: str, user: str):
        reading = rosters.get_roster(host, user)
        gate = defer.Deferred()
        waiting.append(lambda: reading.chainDeferred(gate))
        return gate

    pep_service.rosters = mock.Mock(get_roster=held_roster)
    return waiting


class LastItemBookkeepingTests(PepTestCase):
    def hold_roster_reads(self) -> list:
        """PEP's roster reads from now on wait: each a call in the list that lets it finish."""
        return hold_roster_reads(self.pubsub.pep)

    def test_a_session_that_ends_while_its_roster_is_read_is_not_remembered(self) -> None:
        self.subscribe("bob", "alice")
        waiting = self.hold_roster_reads()
        bob = self.with_caps("bob@localhost/phone", NODE + "+notify")
        self.assertEqual(len(waiting), 1)
        self.disconnect(bob)
        waiting.pop()()
        self.assertEqual(self.pubsub.pep._last_sent, {})

    def test_a_stopping_server_waits_for_last_items_being_sent(self) -> None:
        # The IM core waits for the router's work under way before the database closes; last
        # items still reading the store are part of it.
        self.subscribe("bob", "alice")
        waiting = self.hold_roster_reads()
        self.with_caps("bob@localhost/phone", NODE + "+notify")
        idle = self.core.router.routing.idle()
        self.assertNoResult(idle)
        waiting.pop()()
        self.successResultOf(idle)
