"""Presence (RFC 6121 §4) and presence subscriptions (§3) between local users, at the stanza level
through the IM core as tap.py wires it."""

from collections.abc import Callable

from twisted.internet import defer
from twisted.logger import Logger
from twisted.words.protocols.jabber.jid import JID

from mim_twisted import hooks
from mim_twisted.im import presence as presence_module
from mim_twisted.im.presence import parse_priority
from mim_twisted.storage.interfaces import OfflineMessage, RosterItem
from mim_twisted.tap import PRESENCE_STOP_TIMEOUT, ImCoreService
from tests.imsupport import (
    FakeSession,
    HeldStore,
    ImCoreTestCase,
    error_condition,
    parse,
    presence_xml,
    pushed_items,
    summary,
    without_pushes,
)

SUBSCRIPTION_TYPES = ("subscribe", "subscribed", "unsubscribe", "unsubscribed")


def presences(stanzas: list) -> list[tuple]:
    return [summary(stanza) for stanza in stanzas if stanza.name == "presence"]


def subscription_stanzas(stanzas: list) -> list[tuple]:
    return [s for s in presences(stanzas) if s[1] in SUBSCRIPTION_TYPES]


class PresenceTestCase(ImCoreTestCase):
    users = ("alice", "bob", "carol", "dave", "eve")


class InitialPresenceTests(PresenceTestCase):
    def test_broadcast_to_contacts_who_may_see_it_and_to_own_resources(self) -> None:
        self.subscribe("bob", "alice")
        self.subscribe("alice", "bob")  # both
        self.subscribe("carol", "alice")  # Alice's 'from'
        self.subscribe("alice", "dave")  # Alice's 'to': Dave does not see her
        self.put("alice", RosterItem("eve@localhost", ask=True))
        self.put("alice", RosterItem("frank@example.org", subscription="both"))
        bob = self.online("bob@localhost/phone")
        bob_negative = self.online("bob@localhost/tablet", -1)
        bob_connected = self.connect("bob@localhost/idle")
        carol = self.online("carol@localhost/desk")
        dave = self.online("dave@localhost/desk")
        eve = self.online("eve@localhost/desk")
        laptop = self.online("alice@localhost/laptop")
        watch = self.connect("alice@localhost/watch")
        phone = self.connect("alice@localhost/phone")
        self.send(phone, presence_xml(priority=1, status="Here"))
        me = "alice@localhost/phone"
        for session, to in [
            (bob, "bob@localhost"),
            (bob_negative, "bob@localhost"),
            (carol, "carol@localhost"),
            (laptop, "alice@localhost"),
        ]:
            [received] = session.take()
            self.assertEqual(summary(received), ("presence", None, me, to), session.jid)
            self.assertEqual(str(received.status), "Here")
            self.assertEqual(str(received.priority), "1")
        for session in (bob_connected, dave, eve, watch):
            self.assertEqual(session.sent, [], session.jid)
        # RFC 6121 §4.2.2: "including the resource that generated the presence".
        self.assertEqual(presences(phone.sent)[0], ("presence", None, me, "alice@localhost"))
        self.assertIsNotNone(phone.presence)
        self.assertEqual(phone.priority, 1)

    def test_the_new_session_receives_the_presence_of_contacts_it_sees(self) -> None:
        self.subscribe("alice", "bob")
        self.subscribe("alice", "dave")
        self.subscribe("carol", "alice")  # Carol sees Alice, not the other way round
        bob = self.online("bob@localhost/phone", 2)
        self.send(bob, presence_xml(priority=2, status="Busy"))
        self.online("bob@localhost/tablet", -1)
        self.connect("bob@localhost/idle")
        self.online("carol@localhost/desk")
        phone = self.connect("alice@localhost/phone")
        self.send(phone, "<presence/>")
        received = phone.take()
        me = "alice@localhost/phone"
        self.assertEqual(
            presences(received),
            [
                ("presence", None, me, "alice@localhost"),
                ("presence", None, "bob@localhost/phone", me),
                ("presence", None, "bob@localhost/tablet", me),
            ],
        )
        self.assertEqual(str(received[1].status), "Busy")

    def test_pending_subscription_requests_come_with_initial_presence(self) -> None:
        alice = self.online("alice@localhost/desk")
        self.send(alice, presence_xml("subscribe", "bob@localhost"))
        phone = self.connect("bob@localhost/phone")
        self.send(phone, "<presence/>")
        request = ("presence", "subscribe", "alice@localhost", "bob@localhost")
        self.assertEqual(subscription_stanzas(phone.take()), [request])
        self.send(phone, "<presence><show>away</show></presence>")
        self.assertEqual(subscription_stanzas(phone.take()), [])
        # Until it is answered, every new session of the contact is asked (§3.1.3).
        laptop = self.connect("bob@localhost/laptop")
        self.send(laptop, "<presence/>")
        self.assertEqual(subscription_stanzas(laptop.take()), [request])

    def test_an_update_is_broadcast_and_nothing_more(self) -> None:
        self.subscribe("alice", "bob")
        self.subscribe("bob", "alice")
        bob = self.online("bob@localhost/phone")
        phone = self.online("alice@localhost/phone", 1)
        laptop = self.online("alice@localhost/laptop")
        available: list = []
        self.core.hooks.add(hooks.USER_AVAILABLE, available.append)
        self.send(phone, presence_xml(priority=-3, status="Away"))
        update = ("presence", None, "alice@localhost/phone")
        for session in (bob, laptop, phone):
            [received] = session.take()
            self.assertEqual(summary(received)[:3], update)
            self.assertEqual(str(received.status), "Away")
        self.assertEqual(str(phone.presence.status), "Away")
        self.assertEqual(phone.priority, -3)
        self.assertEqual(available, [])

    def test_priority(self) -> None:
        for text, expected in [
            ("0", 0),
            ("-128", -128),
            ("127", 127),
            ("+5", 5),
            (" 7 ", 7),
            ("128", None),
            ("-129", None),
            ("high", None),
            ("", None),
            ("5.0", None),
            ("1_0", None),
            ("\u0663", None),  # ARABIC-INDIC DIGIT THREE: a digit to int(), not to xs:byte
        ]:
            self.assertEqual(parse_priority(parse(presence_xml(priority=text))), expected, text)
        self.assertEqual(parse_priority(parse("<presence/>")), 0)

    def test_invalid_priority_is_bad_request(self) -> None:
        self.subscribe("bob", "alice")
        bob = self.online("bob@localhost/phone")
        phone = self.connect("alice@localhost/phone")
        self.send(phone, presence_xml(priority=128))
        [reply] = phone.take()
        self.assertEqual(error_condition(reply), "bad-request")
        self.assertEqual(reply["to"], "alice@localhost/phone")
        self.assertIsNone(phone.presence)
        self.send(phone, presence_xml(priority=5, status="first"))
        self.forget()
        self.send(phone, presence_xml(priority="x", status="second"))
        self.assertEqual(error_condition(phone.take()[0]), "bad-request")
        self.assertEqual((str(phone.presence.status), phone.priority), ("first", 5))
        self.assertEqual(bob.sent, [])

    def test_broadcast_of_another_type(self) -> None:
        phone = self.online("alice@localhost/phone")
        for kind in ("subscribe", "subscribed", "bogus"):
            self.send(phone, presence_xml(kind))
            [reply] = phone.take()
            self.assertEqual(error_condition(reply), "bad-request", kind)
        for kind in ("probe", "error"):
            self.send(phone, presence_xml(kind))
            self.assertEqual(phone.take(), [], kind)


class UnavailableTests(PresenceTestCase):
    def setUp(self) -> None:
        super().setUp()
        self.subscribe("bob", "alice")
        self.subscribe("alice", "bob")
        self.subscribe("carol", "alice")
        self.subscribe("alice", "dave")
        self.bob = self.online("bob@localhost/phone")
        self.carol = self.online("carol@localhost/desk")
        self.dave = self.online("dave@localhost/desk")
        self.eve = self.online("eve@localhost/desk")
        self.laptop = self.online("alice@localhost/laptop")
        self.phone = self.online("alice@localhost/phone")
        self.send(self.phone, presence_xml(to="eve@localhost/desk"))
        self.forget()
        self.ended: list[tuple] = []
        self.core.hooks.add(
            hooks.USER_UNAVAILABLE, lambda session, presence: self.ended.append((session, presence))
        )

    def assertUnavailableBroadcast(self, status: str | None) -> None:
        me = "alice@localhost/phone"
        for session, to in [
            (self.bob, "bob@localhost"),
            (self.carol, "carol@localhost"),
            (self.laptop, "alice@localhost"),
            (self.eve, "eve@localhost/desk"),
        ]:
            [received] = session.take()
            self.assertEqual(summary(received), ("presence", "unavailable", me, to), session.jid)
            status_element = next(received.elements(received.uri, "status"), None)
            self.assertEqual(None if status_element is None else str(status_element), status)
        self.assertEqual((self.dave.sent, self.phone.sent), ([], []))
        self.assertIsNone(self.phone.presence)
        self.assertEqual(self.phone.directed_to, set())

    def test_explicit_unavailable(self) -> None:
        self.send(self.phone, presence_xml("unavailable", status="Bye"))
        self.assertUnavailableBroadcast("Bye")
        [(session, presence)] = self.ended
        self.assertIs(session, self.phone)
        self.assertEqual(str(presence.status), "Bye")
        # Ending the connection afterwards has nothing more to say.
        self.disconnect(self.phone)
        self.assertEqual([s.sent for s in (self.bob, self.laptop, self.eve)], [[], [], []])
        self.assertEqual(len(self.ended), 1)

    def test_disconnect(self) -> None:
        self.disconnect(self.phone)
        self.assertUnavailableBroadcast(None)
        self.assertEqual(self.ended, [(self.phone, None)])

    def test_unavailable_again_is_not_broadcast(self) -> None:
        self.send(self.phone, presence_xml("unavailable"))
        self.forget()
        self.send(self.phone, presence_xml("unavailable"))
        self.assertEqual([s.sent for s in (self.bob, self.laptop, self.eve)], [[], [], []])
        self.assertEqual(len(self.ended), 1)

    def test_a_session_never_available_tells_only_its_directed_presence(self) -> None:
        hidden = self.connect("alice@localhost/hidden")
        self.send(hidden, presence_xml(to="eve@localhost/desk"))
        self.eve.take()
        self.disconnect(hidden)
        [received] = self.eve.take()
        self.assertEqual(
            summary(received),
            ("presence", "unavailable", "alice@localhost/hidden", "eve@localhost/desk"),
        )
        silent = self.connect("alice@localhost/silent")
        self.send(silent, presence_xml("unavailable"))
        self.disconnect(silent)
        for session in (self.bob, self.carol, self.laptop, self.phone, self.eve):
            self.assertEqual(session.sent, [], session.jid)
        self.assertEqual(self.ended, [])


class DirectedPresenceTests(PresenceTestCase):
    def setUp(self) -> None:
        super().setUp()
        self.eve = self.online("eve@localhost/desk")
        self.eve_phone = self.online("eve@localhost/phone")
        self.alice = self.online("alice@localhost/phone")

    def test_remembered_until_directed_unavailable(self) -> None:
        self.send(self.alice, "<presence to='eve@localhost/desk'><show>chat</show></presence>")
        [received] = self.eve.take()
        self.assertEqual(
            summary(received), ("presence", None, "alice@localhost/phone", "eve@localhost/desk")
        )
        self.assertEqual(str(received.show), "chat")
        self.assertEqual(self.alice.directed_to, {"eve@localhost/desk"})
        self.send(self.alice, presence_xml("unavailable", "eve@localhost/desk"))
        [received] = self.eve.take()
        self.assertEqual(summary(received)[:2], ("presence", "unavailable"))
        self.assertEqual(self.alice.directed_to, set())
        self.disconnect(self.alice)
        self.assertEqual((self.eve.sent, self.eve_phone.sent), ([], []))

    def test_to_a_bare_jid(self) -> None:
        self.send(self.alice, presence_xml(to="eve@localhost"))
        for session in (self.eve, self.eve_phone):
            [received] = session.take()
            self.assertEqual(
                summary(received), ("presence", None, "alice@localhost/phone", "eve@localhost")
            )
        self.assertEqual(self.alice.directed_to, {"eve@localhost"})
        self.send(self.alice, presence_xml("unavailable"))
        for session in (self.eve, self.eve_phone):
            self.assertEqual(summary(session.take()[0])[:2], ("presence", "unavailable"))

    def test_errors(self) -> None:
        for to, condition in [
            ("eve@example.net", "remote-server-not-found"),
            ("eve@@localhost", "jid-malformed"),
        ]:
            self.send(self.alice, presence_xml(to=to))
            [reply] = self.alice.take()
            self.assertEqual(error_condition(reply), condition, to)
        self.assertEqual(self.alice.directed_to, set())


class PresenceHookTests(PresenceTestCase):
    def test_user_available_once_per_initial_presence(self) -> None:
        calls: list[tuple] = []
        self.core.hooks.add(
            hooks.USER_AVAILABLE, lambda session: calls.append((session, len(session.sent)))
        )
        alice = self.connect("alice@localhost/phone")
        self.send(alice, presence_xml(priority=-1))
        self.send(alice, presence_xml(priority=1))
        self.send(alice, presence_xml(to="bob@localhost"))
        # After the session got its own presence (and its offline messages).
        self.assertEqual(calls, [(alice, 1)])


class SubscriptionTestCase(PresenceTestCase):
    def setUp(self) -> None:
        super().setUp()
        self.alice = self.online("alice@localhost/phone")
        self.alice_watch = self.online("alice@localhost/watch", roster=False)
        self.bob = self.online("bob@localhost/phone")

    def request(self, session: FakeSession, kind: str, to: str) -> None:
        self.send(session, presence_xml(kind, to))


class SubscribeTests(SubscriptionTestCase):
    def test_to_an_online_contact(self) -> None:
        self.request(self.alice, "subscribe", "bob@localhost")
        self.assertEqual(
            pushed_items(self.alice.take()),
            [{"jid": "bob@localhost", "subscription": "none", "ask": "subscribe"}],
        )
        self.assertEqual(pushed_items(self.alice_watch.take()), [])
        self.assertEqual(
            presences(self.bob.take()),
            [("presence", "subscribe", "alice@localhost", "bob@localhost")],
        )
        self.assertEqual(self.item("alice", "bob@localhost"), RosterItem("bob@localhost", ask=True))
        pending = self.item("bob", "alice@localhost")
        self.assertEqual((pending.pending_in, pending.in_roster), (True, False))
        self.assertEqual(summary(parse(pending.pending_in_stanza))[1], "subscribe")

    def test_to_a_full_jid_goes_between_bare_jids(self) -> None:
        self.send(
            self.alice,
            "<presence type='subscribe' to='bob@localhost/phone'><status>Hi</status></presence>",
        )
        [received] = self.bob.take()
        self.assertEqual(
            summary(received), ("presence", "subscribe", "alice@localhost", "bob@localhost")
        )
        self.assertEqual(str(received.status), "Hi")

    def test_to_an_offline_contact(self) -> None:
        self.request(self.alice, "subscribe", "carol@localhost")
        carol = self.connect("carol@localhost/desk")
        self.send(carol, "<presence/>")
        self.assertEqual(
            subscription_stanzas(carol.take()),
            [("presence", "subscribe", "alice@localhost", "carol@localhost")],
        )

    def test_to_a_user_that_does_not_exist(self) -> None:
        self.request(self.alice, "subscribe", "nobody@localhost")
        received = self.alice.take()
        self.assertEqual(
            pushed_items(received),
            [
                {"jid": "nobody@localhost", "subscription": "none", "ask": "subscribe"},
                {"jid": "nobody@localhost", "subscription": "none"},
            ],
        )
        self.assertEqual(
            presences(received),
            [("presence", "unsubscribed", "nobody@localhost", "alice@localhost")],
        )
        self.assertEqual(self.item("alice", "nobody@localhost"), RosterItem("nobody@localhost"))

    def test_to_another_domain(self) -> None:
        self.request(self.alice, "subscribe", "bob@example.net")
        self.assertEqual(
            [error_condition(s) for s in without_pushes(self.alice.take())],
            ["remote-server-not-found"],
        )

    def test_when_already_subscribed_the_server_answers(self) -> None:
        self.subscribe("alice", "bob")
        self.request(self.alice, "subscribe", "bob@localhost")
        # §3.1.3: Bob is not asked again; Alice's server ignores the 'subscribed' that answers
        # a request it does not know of (§3.1.6), and Alice gets Bob's presence again.
        self.assertEqual(self.bob.take(), [])
        self.assertEqual(
            presences(self.alice.take()),
            [("presence", None, "bob@localhost/phone", "alice@localhost")],
        )

    def test_withdrawn_request_leaves_nothing_behind(self) -> None:
        self.request(self.alice, "subscribe", "carol@localhost")
        self.request(self.alice, "unsubscribe", "carol@localhost")
        # The hidden item that held the pending request is deleted, not kept empty.
        self.assertIsNone(self.item("carol", "alice@localhost"))
        carol = self.connect("carol@localhost/desk")
        self.send(carol, "<presence/>")
        self.assertEqual(subscription_stanzas(carol.take()), [])


class ApprovalTests(SubscriptionTestCase):
    def setUp(self) -> None:
        super().setUp()
        self.request(self.alice, "subscribe", "bob@localhost")
        self.bob_laptop = self.online("bob@localhost/laptop", roster=False)

    def test_subscribed(self) -> None:
        self.request(self.bob, "subscribed", "alice@localhost")
        self.assertEqual(
            pushed_items(self.bob.take()), [{"jid": "alice@localhost", "subscription": "from"}]
        )
        self.assertEqual(pushed_items(self.bob_laptop.take()), [])
        received = self.alice.take()
        self.assertEqual(pushed_items(received), [{"jid": "bob@localhost", "subscription": "to"}])
        # §3.1.5: the approval, then the presence of each of Bob's available resources.
        approval = [
            ("presence", "subscribed", "bob@localhost", "alice@localhost"),
            ("presence", None, "bob@localhost/phone", "alice@localhost"),
            ("presence", None, "bob@localhost/laptop", "alice@localhost"),
        ]
        self.assertEqual(presences(received), approval)
        self.assertEqual(presences(self.alice_watch.take()), approval)
        self.assertEqual(
            self.item("alice", "bob@localhost"), RosterItem("bob@localhost", subscription="to")
        )
        self.assertEqual(
            self.item("bob", "alice@localhost"),
            RosterItem("alice@localhost", subscription="from"),
        )
        # From now on Alice is told of Bob's presence, and Bob is not told of hers.
        self.send(self.bob, presence_xml(status="later"))
        self.assertEqual(str(self.alice.take()[0].status), "later")
        self.forget()
        self.send(self.alice, presence_xml(status="mine"))
        self.assertEqual(self.bob.take(), [])

    def test_unsubscribed_denies(self) -> None:
        self.request(self.bob, "unsubscribed", "alice@localhost")
        self.assertIsNone(self.item("bob", "alice@localhost"))
        self.assertEqual(pushed_items(self.bob.take()), [])
        received = self.alice.take()
        self.assertEqual(pushed_items(received), [{"jid": "bob@localhost", "subscription": "none"}])
        self.assertEqual(
            subscription_stanzas(received),
            [("presence", "unsubscribed", "bob@localhost", "alice@localhost")],
        )


class CancellationTests(SubscriptionTestCase):
    def setUp(self) -> None:
        super().setUp()
        self.subscribe("alice", "bob")
        self.subscribe("bob", "alice")

    def test_unsubscribe(self) -> None:
        self.request(self.alice, "unsubscribe", "bob@localhost")
        received = self.alice.take()
        self.assertEqual(pushed_items(received), [{"jid": "bob@localhost", "subscription": "from"}])
        # §3.3.3: Alice no longer sees Bob, so Bob's server tells her he is gone.
        self.assertEqual(
            presences(received),
            [("presence", "unavailable", "bob@localhost/phone", "alice@localhost")],
        )
        received = self.bob.take()
        self.assertEqual(pushed_items(received), [{"jid": "alice@localhost", "subscription": "to"}])
        self.assertEqual(
            presences(received),
            [("presence", "unsubscribe", "alice@localhost", "bob@localhost")],
        )

    def test_unsubscribed(self) -> None:
        self.request(self.bob, "unsubscribed", "alice@localhost")
        received = self.alice.take()
        self.assertEqual(pushed_items(received), [{"jid": "bob@localhost", "subscription": "from"}])
        # §3.2.2: the end of Bob's presence reaches Alice before the cancellation does.
        self.assertEqual(
            presences(received),
            [
                ("presence", "unavailable", "bob@localhost/phone", "alice@localhost"),
                ("presence", "unsubscribed", "bob@localhost", "alice@localhost"),
            ],
        )
        self.assertEqual(
            pushed_items(self.bob.take()), [{"jid": "alice@localhost", "subscription": "to"}]
        )

    def test_roster_remove_cancels_both_ways(self) -> None:
        self.send(
            self.alice,
            "<iq type='set' id='r1'><query xmlns='jabber:iq:roster'>"
            "<item jid='bob@localhost' subscription='remove'/></query></iq>",
        )
        received = self.alice.take()
        self.assertEqual(
            pushed_items(received), [{"jid": "bob@localhost", "subscription": "remove"}]
        )
        self.assertEqual(
            presences(received),
            [("presence", "unavailable", "bob@localhost/phone", "alice@localhost")],
        )
        self.assertEqual(summary(received[-1])[:2], ("iq", "result"))
        self.assertIsNone(self.item("alice", "bob@localhost"))
        received = self.bob.take()
        self.assertEqual(
            presences(received),
            [
                ("presence", "unsubscribe", "alice@localhost", "bob@localhost"),
                ("presence", "unavailable", "alice@localhost/phone", "bob@localhost"),
                ("presence", "unavailable", "alice@localhost/watch", "bob@localhost"),
                ("presence", "unsubscribed", "alice@localhost", "bob@localhost"),
            ],
        )
        self.assertEqual(
            pushed_items(received),
            [
                {"jid": "alice@localhost", "subscription": "to"},
                {"jid": "alice@localhost", "subscription": "none"},
            ],
        )
        self.assertEqual(self.item("bob", "alice@localhost"), RosterItem("alice@localhost"))


class PreApprovalTests(SubscriptionTestCase):
    def test_pre_approved_request_is_answered_by_the_server(self) -> None:
        self.request(self.bob, "subscribed", "alice@localhost")
        self.assertEqual(
            pushed_items(self.bob.take()),
            [{"jid": "alice@localhost", "subscription": "none", "approved": "true"}],
        )
        self.assertEqual(self.alice.take(), [])  # §3.4.2: noted, not routed
        self.request(self.alice, "subscribe", "bob@localhost")
        self.assertEqual(
            pushed_items(self.bob.take()), [{"jid": "alice@localhost", "subscription": "from"}]
        )
        received = self.alice.take()
        self.assertEqual(
            pushed_items(received),
            [
                {"jid": "bob@localhost", "subscription": "none", "ask": "subscribe"},
                {"jid": "bob@localhost", "subscription": "to"},
            ],
        )
        self.assertEqual(
            presences(received),
            [
                ("presence", "subscribed", "bob@localhost", "alice@localhost"),
                ("presence", None, "bob@localhost/phone", "alice@localhost"),
            ],
        )


class SubscriptionHookTests(SubscriptionTestCase):
    def test_changes_are_announced(self) -> None:
        changes: list[tuple[JID, RosterItem]] = []
        self.core.hooks.add(
            hooks.PRESENCE_SUBSCRIPTION_CHANGED,
            lambda owner, item: changes.append((owner.full(), item.jid, item.subscription)),
        )
        self.request(self.alice, "subscribe", "bob@localhost")
        self.request(self.bob, "subscribed", "alice@localhost")
        self.assertEqual(
            changes,
            [
                ("alice@localhost", "bob@localhost", "none"),
                ("bob@localhost", "alice@localhost", "none"),  # the request, pending
                ("bob@localhost", "alice@localhost", "from"),
                ("alice@localhost", "bob@localhost", "to"),
            ],
        )


class InterleavedRosters:
    """A roster store where, once, another node's change lands between a read and the write
    that follows it (as when two nodes of a cluster change one roster at once)."""

    def __init__(self, store: object) -> None:
        self.inner = store
        # The change, made before the next write to the roster of `self.owner`.
        self.owner: str | None = None
        self.interleave: Callable[[], defer.Deferred] | None = None

    def __getattr__(self, name: str) -> object:
        return getattr(self.inner, name)

    def replace_item(self, domain: str, username: str, *args: object) -> defer.Deferred:
        interleave = self.interleave if username == self.owner else None
        if interleave is None:
            return self.inner.replace_item(domain, username, *args)
        self.interleave = None
        return interleave().addCallback(lambda _: self.inner.replace_item(domain, username, *args))


class AnotherNodeMeanwhileTests(SubscriptionTestCase):
    def setUp(self) -> None:
        super().setUp()
        self.rosters = self.database.rosters = InterleavedRosters(self.database.rosters)
        self.build()
        self.alice = self.online("alice@localhost/phone")

    def test_an_outbound_request_keeps_what_another_node_wrote_meanwhile(self) -> None:
        # Bob's request for Alice's presence was handled on another node (Alice's item for Bob
        # is pending-in there) after Alice's node read the item, before it wrote ask.
        pending = RosterItem("bob@localhost", pending_in=True, in_roster=False)
        self.rosters.owner = "alice"
        self.rosters.interleave = lambda: self.rosters.inner.put_item("localhost", "alice", pending)
        self.request(self.alice, "subscribe", "bob@localhost")
        item = self.item("alice", "bob@localhost")
        self.assertEqual((item.ask, item.pending_in), (True, True))

    def test_an_inbound_approval_keeps_what_another_node_wrote_meanwhile(self) -> None:
        # Alice asked Bob; Bob's approval is applied to Alice's roster here, after another
        # node, handling Bob's own request for Alice's presence, wrote a pending-in for Bob.
        self.put("alice", RosterItem("bob@localhost", ask=True))
        self.put("bob", RosterItem("alice@localhost", pending_in=True, in_roster=False))
        bob = self.online("bob@localhost/phone")
        meanwhile = RosterItem("bob@localhost", ask=True, pending_in=True)
        self.rosters.owner = "alice"
        self.rosters.interleave = lambda: self.rosters.inner.put_item(
            "localhost", "alice", meanwhile
        )
        self.request(bob, "subscribed", "alice@localhost")
        item = self.item("alice", "bob@localhost")
        self.assertEqual((item.subscription, item.ask, item.pending_in), ("to", False, True))


class HeldRostersTestCase(PresenceTestCase):
    """The core on a roster store that answers when the test says; Bob is online, sees Alice."""

    def setUp(self) -> None:
        super().setUp()
        self.subscribe("bob", "alice")
        self.rosters = self.database.rosters = HeldStore(self.database.rosters)
        self.build()
        self.bob = self.connect("bob@localhost/phone")
        self.send(self.bob, "<presence/>")
        self.rosters.release()
        self.bob.take()


class OrderingTests(HeldRostersTestCase):
    def test_back_to_back_presences_are_handled_in_order(self) -> None:
        phone = self.connect("alice@localhost/phone")
        self.send(phone, presence_xml(priority=1, status="first"))
        self.send(phone, presence_xml(priority=2, status="second"))
        self.assertEqual(self.rosters.calls(), ["get_roster"])  # the second waits its turn
        self.assertEqual(self.bob.take(), [])
        self.rosters.release()
        # The second reads the roster the first read, kept while Alice is online.
        first, second = self.bob.take()
        self.assertEqual((str(first.status), str(second.status)), ("first", "second"))
        self.assertEqual((str(phone.presence.status), phone.priority), ("second", 2))
        self.assertEqual(self.rosters.calls(), [])
        self.successResultOf(self.core.presence.idle())

    def test_a_session_that_ends_while_its_presence_waits_is_not_announced(self) -> None:
        kept = OfflineMessage("bob@localhost/phone", "<message><body>kept</body></message>")
        self.successResultOf(self.database.offline.store("localhost", "alice", kept, 10))
        available: list = []
        self.core.hooks.add(hooks.USER_AVAILABLE, available.append)
        phone = self.connect("alice@localhost/phone")
        self.request_subscription(phone)
        self.send(phone, "<presence/>")
        self.disconnect(phone)
        while self.rosters.waiting:
            self.rosters.release()
        self.successResultOf(self.core.presence.idle())
        self.assertEqual(presences(self.bob.sent), [])
        self.assertEqual(phone.sent, [])
        self.assertEqual(available, [])
        self.assertEqual(self.successResultOf(self.database.offline.count("localhost", "alice")), 1)

    def test_a_session_that_ends_while_its_roster_is_read(self) -> None:
        phone = self.connect("alice@localhost/phone")
        self.send(phone, "<presence/>")
        self.disconnect(phone)
        self.rosters.release()
        self.assertEqual(self.rosters.calls(), [])
        self.assertEqual((self.bob.sent, phone.sent), ([], []))

    def request_subscription(self, session: FakeSession) -> None:
        self.send(session, presence_xml("subscribe", "carol@localhost"))
        self.assertEqual(self.rosters.calls(), ["get_item"])


class QueueTests(HeldRostersTestCase):
    """Each session's presence stanzas wait in one queue, drained by one loop."""

    def setUp(self) -> None:
        super().setUp()
        self.presence = self.core.presence
        self.alice = self.connect("alice@localhost/phone")
        self.send(self.alice, "<presence/>")  # waits for the roster, and the rest behind it

    def directed(self, count: int) -> None:
        for _ in range(count):
            self.send(self.alice, presence_xml(to="bob@localhost/phone"))

    def test_many_stanzas_finishing_at_once(self) -> None:
        # Chained callbacks once overflowed the stack here: the RecursionError was swallowed,
        # the queue never moved again, and neither the unavailable presence nor idle() came.
        self.presence.max_queued = 5000
        self.directed(1500)
        self.assertNoResult(self.presence.idle())
        self.rosters.release()
        self.assertEqual(len(presences(self.bob.take())), 1 + 1500)
        self.successResultOf(self.presence.idle())
        self.disconnect(self.alice)
        self.rosters.release_all()
        self.assertEqual(
            presences(self.bob.take()),
            [
                ("presence", "unavailable", "alice@localhost/phone", "bob@localhost"),
                ("presence", "unavailable", "alice@localhost/phone", "bob@localhost/phone"),
            ],
        )
        self.successResultOf(self.presence.idle())

    def test_a_session_that_sends_too_many_is_closed(self) -> None:
        self.directed(100)
        self.assertEqual(self.alice.stream_errors, [])
        self.directed(1)
        self.assertEqual(self.alice.stream_errors, ["policy-violation"])
        self.rosters.release()
        # A session closed by a stream error is gone at once: nothing it queued is acted on.
        self.assertEqual(presences(self.bob.take()), [])
        self.successResultOf(self.presence.idle())

    def test_the_end_of_a_session_is_queued_whatever_the_length(self) -> None:
        self.directed(100)
        self.disconnect(self.alice)
        self.rosters.release_all()
        # Gone before its turn came: nothing of what it sent is acted on, but the end is told.
        self.assertEqual(self.bob.take(), [])
        self.successResultOf(self.presence.idle())

    def test_a_failing_stanza_does_not_stop_the_queue(self) -> None:
        def broken(session: FakeSession, presence: object) -> None:
            raise RuntimeError("listener failed")

        self.presence.caps_listeners.append(broken)
        self.directed(1)
        idle = self.presence.idle()
        self.rosters.release()
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)
        self.assertEqual(len(presences(self.bob.take())), 2)
        self.successResultOf(idle)

    def test_idle_with_a_timeout_gives_up_on_what_waits(self) -> None:
        events: list[dict] = []
        self.patch(presence_module, "log", Logger(observer=events.append))
        self.directed(3)
        idle = self.presence.idle(timeout=10)
        self.clock.advance(9)
        self.assertNoResult(idle)
        self.clock.advance(1)
        self.assertIsNone(self.successResultOf(idle))
        [event] = events
        self.assertEqual((event["busy"], event["count"]), (1, 3))
        self.assertEqual(event["dropped"], "alice@localhost/phone: 3")
        # The stanza under way ends when the database answers; those waiting were dropped.
        self.rosters.release()
        self.assertEqual(len(presences(self.bob.take())), 1)
        self.successResultOf(self.presence.idle())

    def test_live_messages_held_for_a_dropped_presence_are_kept(self) -> None:
        self.patch(presence_module, "log", Logger(observer=lambda event: None))
        desk = self.connect("alice@localhost/desk")
        self.send(desk, presence_xml("subscribe", "carol@localhost"))  # waits for the roster
        self.send(desk, "<presence/>")  # behind it: live messages for desk wait on it
        self.send(
            self.bob, "<message to='alice@localhost/desk' type='chat'><body>live</body></message>"
        )
        self.assertEqual(desk.take(), [])
        self.disconnect(desk)  # as the stop closes every connection
        idle = self.presence.idle(timeout=10)
        self.clock.advance(10)
        self.successResultOf(idle)
        [kept] = self.successResultOf(self.database.offline.pop_all("localhost", "alice"))
        self.assertEqual(str(parse(kept.stanza).body), "live")

    def stopped_im_core(self) -> defer.Deferred:
        """Stop the IM core's service, as the server's stop does, over this test's core."""
        im = ImCoreService(self.config, None, self.clock)
        im.core = self.core
        im.running = True
        return im.stopService()

    def test_stopping_the_server_waits_for_presence_work_at_most_a_while(self) -> None:
        stopped = self.stopped_im_core()
        self.clock.advance(PRESENCE_STOP_TIMEOUT - 1)
        self.assertNoResult(stopped)
        self.clock.advance(1)
        self.successResultOf(stopped)

    def test_stopping_the_server_when_presence_work_ends_in_time(self) -> None:
        stopped = self.stopped_im_core()
        self.assertNoResult(stopped)
        self.rosters.release()
        self.successResultOf(stopped)
        self.assertEqual(self.clock.getDelayedCalls(), [])


class DirectedPresenceLimitTests(PresenceTestCase):
    def setUp(self) -> None:
        super().setUp()
        self.alice = self.online("alice@localhost/phone")
        self.eve = self.online("eve@localhost/desk")

    def test_remembered_for_a_limited_number_of_addresses(self) -> None:
        limit = self.core.presence.max_directed
        self.assertEqual(limit, 1000)
        for i in range(limit):
            self.send(self.alice, presence_xml(to=f"nobody@localhost/r{i}"))
        self.assertEqual(self.alice.take(), [])
        self.send(self.alice, presence_xml(to="eve@localhost/desk"))
        [reply] = self.alice.take()
        self.assertEqual(error_condition(reply), "resource-constraint")
        self.assertEqual(self.eve.take(), [])
        self.assertEqual(len(self.alice.directed_to), limit)
        # An update to an address already remembered is no new entry.
        self.send(self.alice, presence_xml(to="nobody@localhost/r7", status="again"))
        self.assertEqual(self.alice.take(), [])
        # Directed unavailable presence frees an entry.
        self.send(self.alice, presence_xml("unavailable", "nobody@localhost/r7"))
        self.send(self.alice, presence_xml(to="eve@localhost/desk"))
        self.assertEqual(self.alice.take(), [])
        self.assertEqual(
            presences(self.eve.take())[0][:3], ("presence", None, self.alice.jid.full())
        )
        self.disconnect(self.alice)
        self.assertEqual(presences(self.eve.take())[0][:2], ("presence", "unavailable"))


class RosterLockTests(PresenceTestCase):
    """A subscription change and a roster set on the same item, with the store answering late."""

    def setUp(self) -> None:
        super().setUp()
        self.rosters = self.database.rosters = HeldStore(self.database.rosters)
        self.build()
        self.database.rosters = self.rosters.inner  # what the test itself reads is not held
        self.alice = self.connect("alice@localhost/phone")
        self.bob = self.connect("bob@localhost/phone")
        for session in (self.alice, self.bob):
            self.send(session, "<presence/>")
        self.send(self.alice, presence_xml("subscribe", "bob@localhost"))
        self.rosters.release_all()
        self.forget()

    def roster_set(self, session: FakeSession, item: str) -> None:
        self.send(
            session, f"<iq type='set' id='set1'><query xmlns='jabber:iq:roster'>{item}</query></iq>"
        )

    def test_approval_and_roster_set_in_one_packet(self) -> None:
        self.request_approval()
        self.roster_set(self.bob, "<item jid='alice@localhost' name='Alice'/>")
        self.assertEqual(self.rosters.calls(), ["get_item"])  # the roster set waits its turn
        self.rosters.release_all()
        self.assertApproved()

    def test_roster_set_and_approval_in_one_packet(self) -> None:
        self.roster_set(self.bob, "<item jid='alice@localhost' name='Alice'/>")
        self.request_approval()
        self.assertEqual(self.rosters.calls(), ["get_item"])
        self.rosters.release_all()
        self.assertApproved()

    def test_roster_removal_and_approval(self) -> None:
        putting = self.core.roster.rosters.put_item(
            "localhost", "bob", RosterItem("alice@localhost", pending_in=True)
        )
        self.rosters.release_all()
        self.successResultOf(putting)
        self.roster_set(self.bob, "<item jid='alice@localhost' subscription='remove'/>")
        self.request_approval()
        self.rosters.release_all()
        # The removal refused the request (RFC 6121 §2.5.2), so the approval finds none and is
        # a pre-approval (§3.4); Alice is not subscribed, as Bob's roster says.
        self.assertEqual(
            self.item("bob", "alice@localhost"), RosterItem("alice@localhost", approved=True)
        )
        self.assertEqual(self.item("alice", "bob@localhost"), RosterItem("bob@localhost"))
        self.assertEqual(len(self.core.roster.locks), 0)

    def request_approval(self) -> None:
        self.send(self.bob, presence_xml("subscribed", "alice@localhost"))

    def assertApproved(self) -> None:
        self.assertEqual(
            self.item("bob", "alice@localhost"),
            RosterItem("alice@localhost", "Alice", subscription="from"),
        )
        self.assertEqual(
            self.item("alice", "bob@localhost"), RosterItem("bob@localhost", subscription="to")
        )
        # The last push that Bob got is what his roster holds.
        self.assertEqual(
            pushed_items(self.bob.take())[-1],
            {"jid": "alice@localhost", "name": "Alice", "subscription": "from"},
        )
        self.assertEqual(len(self.core.roster.locks), 0)
        self.assertIs(self.core.roster.locks, self.core.presence.locks)
