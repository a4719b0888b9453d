"""XEP-0191 Blocking Command at the stanza level, through the IM core as tap.py wires it."""

import dataclasses

from twisted.trial import unittest
from twisted.words.protocols.jabber.jid import JID
from twisted.words.xish import domish

from mim_twisted import hooks
from mim_twisted.im import blocking
from mim_twisted.im.blocking import NS_BLOCKING, NS_BLOCKING_ERRORS, blocks
from mim_twisted.im.disco import NS_DISCO_INFO
from mim_twisted.im.roster import NS_ROSTER
from tests.imsupport import (
    FakeSession,
    HeldStore,
    ImCoreTestCase,
    error_condition,
    presence_xml,
    summary,
)


def items(element: domish.Element) -> list[str]:
    return [item["jid"] for item in element.elements(NS_BLOCKING, "item")]


class MatchingTests(unittest.TestCase):
    """Which JIDs an item blocks (XEP-0016 §2.1 order: full, bare, domain/resource, domain)."""

    def test_items(self) -> None:
        cases = [
            ("eve@example.org/phone", "eve@example.org/phone", True),
            ("eve@example.org/phone", "eve@example.org/laptop", False),
            ("eve@example.org/phone", "eve@example.org", False),
            ("eve@example.org", "eve@example.org/phone", True),
            ("eve@example.org", "eve@example.org", True),
            ("eve@example.org", "bob@example.org", False),
            ("example.org", "eve@example.org/phone", True),
            ("example.org", "example.org", True),
            ("example.org", "eve@example.com", False),
            ("example.org/bot", "example.org/bot", True),
            ("example.org/bot", "eve@example.org/bot", True),
            ("example.org/bot", "eve@example.org/phone", False),
        ]
        for item, jid, expected in cases:
            self.assertEqual(blocks(frozenset({item}), JID(jid)), expected, (item, jid))


class BlockingTestCase(ImCoreTestCase):
    def iq(self, session: FakeSession, xml: str, kind: str = "set") -> domish.Element:
        self.send(session, f"<iq type='{kind}' id='b1'>{xml}</iq>")
        return session.take()[-1]

    def block(self, session: FakeSession, *jids: str, name: str = "block") -> domish.Element:
        children = "".join(f"<item jid='{jid}'/>" for jid in jids)
        return self.iq(session, f"<{name} xmlns='{NS_BLOCKING}'>{children}</{name}>")

    def block_list(self, session: FakeSession) -> list[str]:
        reply = self.iq(session, f"<blocklist xmlns='{NS_BLOCKING}'/>", "get")
        self.assertEqual(reply["type"], "result")
        return items(next(reply.elements(NS_BLOCKING, "blocklist")))

    def stored(self, user: str = "bob") -> list[str]:
        return self.successResultOf(self.database.block_lists.get_block_list("localhost", user))


class BlockListTests(BlockingTestCase):
    def test_block_list_round_trip_and_pushes(self) -> None:
        phone = self.online("bob@localhost/phone")
        laptop = self.online("bob@localhost/laptop")
        quiet = self.online("bob@localhost/quiet")  # never asked for the list: no pushes
        self.assertEqual(self.block_list(phone), [])
        self.assertEqual(self.block_list(laptop), [])
        self.send(
            phone,
            f"<iq type='set' id='b1'><block xmlns='{NS_BLOCKING}'>"
            "<item jid='Eve@Example.com'/><item jid='example.net'/></block></iq>",
        )
        [laptop_push] = laptop.take()
        phone_push, reply = phone.take()
        self.assertEqual((reply["type"], reply["id"]), ("result", "b1"))
        for push in (laptop_push, phone_push):
            self.assertEqual(summary(push)[:2], ("iq", "set"))
            [change] = push.elements(NS_BLOCKING, "block")
            self.assertEqual(items(change), ["eve@example.com", "example.net"])
        self.assertEqual(quiet.take(), [])
        self.assertEqual(self.block_list(laptop), ["eve@example.com", "example.net"])
        self.assertEqual(self.stored(), ["eve@example.com", "example.net"])

    def test_unblock_some_and_all(self) -> None:
        phone = self.online("bob@localhost/phone")
        self.block(phone, "a@example.com", "b@example.com", "c@example.com")
        reply = self.block(phone, "b@example.com", name="unblock")
        self.assertEqual(reply["type"], "result")
        self.assertEqual(self.block_list(phone), ["a@example.com", "c@example.com"])
        self.block(phone, name="unblock")
        self.assertEqual(self.block_list(phone), [])
        self.assertEqual(self.stored(), [])

    def test_pushes_come_before_the_result(self) -> None:
        phone = self.online("bob@localhost/phone")
        self.block_list(phone)
        self.send(phone, f"<iq type='set' id='u1'><unblock xmlns='{NS_BLOCKING}'/></iq>")
        push, result = phone.take()
        [change] = push.elements(NS_BLOCKING, "unblock")
        self.assertEqual(items(change), [])  # all
        self.assertEqual((result["type"], result["id"]), ("result", "u1"))

    def test_bad_requests(self) -> None:
        phone = self.online("bob@localhost/phone")
        self.assertEqual(error_condition(self.block(phone)), "bad-request")
        self.assertEqual(error_condition(self.block(phone, "@bad@")), "jid-malformed")
        reply = self.iq(phone, f"<blocklist xmlns='{NS_BLOCKING}'/>", "set")
        self.assertEqual(error_condition(reply), "bad-request")
        reply = self.iq(phone, f"<block xmlns='{NS_BLOCKING}'><item jid='a@b'/></block>", "get")
        self.assertEqual(error_condition(reply), "bad-request")
        self.send(
            phone,
            f"<iq type='get' id='x' to='alice@localhost'><blocklist xmlns='{NS_BLOCKING}'/></iq>",
        )
        self.assertEqual(error_condition(phone.take()[-1]), "forbidden")
        self.assertEqual(self.stored(), [])

    def test_bounded(self) -> None:
        self.patch(blocking, "MAX_BLOCKED_JIDS", 2)
        self.build()
        phone = self.online("bob@localhost/phone")
        self.block(phone, "a@example.com", "b@example.com")
        reply = self.block(phone, "c@example.com")
        self.assertEqual(error_condition(reply), "resource-constraint")
        self.assertEqual(self.stored(), ["a@example.com", "b@example.com"])

    def test_persisted_across_a_restart(self) -> None:
        phone = self.online("bob@localhost/phone")
        self.block(phone, "alice@localhost")
        self.build()  # a new core: nothing in memory
        bob = self.online("bob@localhost/phone")
        alice = self.online("alice@localhost/desk")
        self.send(alice, "<message to='bob@localhost' type='chat'><body>hi</body></message>")
        self.assertEqual(error_condition(alice.take()[-1]), "service-unavailable")
        self.assertEqual(bob.take(), [])

    def test_advertised_and_switched_off_in_the_config(self) -> None:
        phone = self.online("bob@localhost/phone")
        self.assertIn(NS_BLOCKING, self.server_features(phone))
        self.config = dataclasses.replace(
            self.config, modules=dataclasses.replace(self.config.modules, blocking=False)
        )
        self.build()
        phone = self.online("bob@localhost/phone")
        self.assertNotIn(NS_BLOCKING, self.server_features(phone))
        self.assertEqual(error_condition(self.block(phone, "a@b")), "service-unavailable")

    def server_features(self, session: FakeSession) -> list[str]:
        self.send(
            session, f"<iq type='get' id='d1' to='localhost'><query xmlns='{NS_DISCO_INFO}'/></iq>"
        )
        return [f["var"] for f in session.take()[-1].query.elements(NS_DISCO_INFO, "feature")]


class RoutingTests(BlockingTestCase):
    """bob blocks alice: nothing from her reaches him, nothing from him reaches her."""

    users = ("alice", "bob", "carol", "dave", "eve")

    def setUp(self) -> None:
        super().setUp()
        self.subscribe("alice", "bob")
        self.subscribe("bob", "alice")
        self.bob = self.online("bob@localhost/phone")
        self.alice = self.online("alice@localhost/desk")
        self.forget()

    def test_blocking_sends_unavailable_presence_to_the_contact(self) -> None:
        self.block(self.bob, "alice@localhost")
        [presence] = self.alice.take()
        self.assertEqual(
            summary(presence),
            ("presence", "unavailable", "bob@localhost/phone", "alice@localhost"),
        )

    def test_only_contacts_subscribed_to_the_user_are_sent_unavailable_presence(self) -> None:
        # carol sees bob's presence, dave is seen by bob, eve shares nothing with him.
        self.subscribe("carol", "bob")
        self.subscribe("bob", "dave")
        others = [self.online(f"{user}@localhost/desk") for user in ("carol", "dave", "eve")]
        self.block(self.bob, "carol@localhost", "dave@localhost", "eve@localhost")
        self.block(self.bob, "localhost/desk")  # a domain/resource entry: carol's and alice's
        sent = [[summary(stanza) for stanza in session.take()] for session in others]
        gone = ("presence", "unavailable", "bob@localhost/phone")
        self.assertEqual(
            sent, [[(*gone, "carol@localhost"), (*gone, "carol@localhost/desk")], [], []]
        )
        self.block(self.bob, "localhost/desk", "dave@localhost", name="unblock")
        self.assertEqual([session.take() for session in others[1:]], [[], []])
        # alice's bare JID is not blocked: her desk is sent bob's presence again.
        self.assertEqual(
            [summary(stanza) for stanza in self.alice.take()][-1],
            ("presence", None, "bob@localhost/phone", "alice@localhost/desk"),
        )

    def test_a_contact_still_blocked_by_another_entry_is_not_sent_presence(self) -> None:
        self.block(self.bob, "alice@localhost", "localhost")
        self.forget()
        self.block(self.bob, "alice@localhost", name="unblock")
        self.assertEqual(self.alice.take(), [])

    def test_incoming_messages_iqs_and_presence_are_not_delivered(self) -> None:
        self.block(self.bob, "alice@localhost")
        self.forget()
        for to in ("bob@localhost", "bob@localhost/phone"):
            self.send(self.alice, f"<message to='{to}' type='chat'><body>hi</body></message>")
            self.assertEqual(error_condition(self.alice.take()[-1]), "service-unavailable")
            self.send(
                self.alice, f"<iq to='{to}' type='get' id='q'><query xmlns='{NS_DISCO_INFO}'/></iq>"
            )
            self.assertEqual(error_condition(self.alice.take()[-1]), "service-unavailable")
            self.send(self.alice, presence_xml(to=to))
            self.send(self.alice, presence_xml(type="subscribe", to=to))
            self.send(self.alice, f"<iq to='{to}' type='result' id='r'/>")
            self.assertEqual(self.alice.take(), [])
        self.send(self.alice, presence_xml(status="broadcast"))
        self.assertEqual(self.bob.take(), [])

    def test_outgoing_stanzas_are_refused_as_blocked(self) -> None:
        self.block(self.bob, "alice@localhost")
        self.forget()
        stanzas = [
            "<message to='alice@localhost' type='chat'><body>hi</body></message>",
            "<iq to='alice@localhost/desk' type='get' id='q'><ping xmlns='urn:xmpp:ping'/></iq>",
            presence_xml(to="alice@localhost/desk"),
        ]
        for xml in stanzas:
            self.send(self.bob, xml)
            reply = self.bob.take()[-1]
            self.assertEqual(error_condition(reply), "not-acceptable", xml)
            [stanza_error] = [c for c in reply.elements() if c.name == "error"]
            self.assertEqual(len(list(stanza_error.elements(NS_BLOCKING_ERRORS, "blocked"))), 1)
        self.send(self.bob, presence_xml(status="broadcast"))
        self.assertEqual(self.alice.take(), [])

    def test_unblocking_sends_presence_again_and_lets_stanzas_through(self) -> None:
        self.block(self.bob, "alice@localhost")
        self.forget()
        self.block(self.bob, "alice@localhost", name="unblock")
        [presence] = self.alice.take()
        self.assertEqual(
            summary(presence), ("presence", None, "bob@localhost/phone", "alice@localhost")
        )
        self.send(self.alice, "<message to='bob@localhost' type='chat'><body>hi</body></message>")
        self.assertEqual(str(self.bob.take()[-1].body), "hi")

    def test_a_new_session_is_not_sent_a_blocked_contacts_presence(self) -> None:
        self.block(self.bob, "alice@localhost")
        self.forget()
        for session in (self.connect("bob@localhost/laptop"), self.connect("alice@localhost/tab")):
            self.send(session, presence_xml())
            contacts = [s["from"] for s in session.take() if s.name == "presence"]
            self.assertEqual(
                [jid for jid in contacts if jid.split("@")[0] != session.jid.user], [], contacts
            )

    def test_messages_to_an_offline_blocking_user_are_not_stored(self) -> None:
        self.block(self.bob, "alice@localhost")
        self.disconnect(self.bob)
        self.forget()
        self.build()  # its list read from the store
        alice = self.online("alice@localhost/desk")
        self.send(alice, "<message to='bob@localhost' type='chat'><body>hi</body></message>")
        self.assertEqual(error_condition(alice.take()[-1]), "service-unavailable")
        self.assertEqual(self.successResultOf(self.database.offline.count("localhost", "bob")), 0)

    def test_stanzas_wait_for_the_list_in_order(self) -> None:
        held = HeldStore(self.database.block_lists)
        self.database.block_lists = held
        self.build()
        carol = self.connect("carol@localhost/home")
        bob = self.connect("bob@localhost/phone")
        for n in range(3):
            self.send(
                carol, f"<message to='bob@localhost/phone' type='chat'><body>{n}</body></message>"
            )
        self.assertEqual(bob.take(), [])
        held.release_all()
        self.assertEqual([str(m.body) for m in bob.take()], ["0", "1", "2"])

    def test_a_sessions_stanzas_wait_behind_one_held_at_the_gate(self) -> None:
        held = HeldStore(self.database.block_lists)
        self.database.block_lists = held
        self.build()
        sent: list[str] = []
        self.core.hooks.add(
            hooks.MESSAGE_SENT, lambda session, message: sent.append(str(message.body))
        )
        alice = self.connect("alice@localhost/desk")
        bob = self.connect("bob@localhost/phone")
        carol = self.connect("carol@localhost/home")
        self.send(alice, "<message to='bob@localhost/phone' type='chat'><body>0</body></message>")
        held.release_all()  # alice's and bob's lists
        self.send(alice, "<message to='carol@localhost/home' type='chat'><body>1</body></message>")
        self.send(alice, "<message to='bob@localhost/phone' type='chat'><body>2</body></message>")
        self.assertEqual(sent, ["0"])
        held.release_all()  # carol's
        self.assertEqual(sent, ["0", "1", "2"])
        self.assertEqual([str(m.body) for m in bob.take()], ["0", "2"])
        self.assertEqual([str(m.body) for m in carol.take()], ["1"])

    def test_a_bounded_wait(self) -> None:
        held = HeldStore(self.database.block_lists)
        self.database.block_lists = held
        self.build()
        self.core.router.max_held = 1
        alice = self.connect("alice@localhost/desk")
        for n in range(3):
            self.send(alice, f"<message to='bob@localhost' type='chat'><body>{n}</body></message>")
        self.assertEqual(alice.stream_errors, ["policy-violation"])

    def test_after_a_restart_presence_is_held_to_the_stored_list(self) -> None:
        # bob's first stanza is his broadcast presence, which needs no gate: the presence layer
        # reads his list before it goes to his contacts.
        self.successResultOf(
            self.database.block_lists.block("localhost", "bob", ["alice@localhost"])
        )
        self.build()
        alice = self.online("alice@localhost/desk")
        bob = self.connect("bob@localhost/phone")
        self.send(bob, presence_xml())
        self.assertEqual(
            [s["from"] for s in bob.take() if s.name == "presence"], ["bob@localhost/phone"]
        )
        self.assertEqual(alice.take(), [])
        self.send(alice, presence_xml(status="back"))
        self.assertEqual(bob.take(), [])

    def test_a_list_is_forgotten_with_the_accounts_last_session(self) -> None:
        self.block(self.bob, "alice@localhost")
        self.disconnect(self.bob)
        # The account is removed and made again while the server runs: nothing is blocked.
        self.successResultOf(self.database.accounts.remove_account("localhost", "bob"))
        self.successResultOf(self.database.accounts.create_account("localhost", "bob", {}))
        bob = self.online("bob@localhost/phone")
        self.send(self.alice, "<message to='bob@localhost' type='chat'><body>hi</body></message>")
        self.assertEqual([str(m.body) for m in bob.take()], ["hi"])


class LazyReadTests(BlockingTestCase):
    """A list is read when first needed, not at every login."""

    users = ("alice", "bob", "carol")

    def setUp(self) -> None:
        super().setUp()
        self.held = HeldStore(self.database.block_lists)
        self.database.block_lists = self.held
        self.build()

    def test_a_login_with_no_subscription_reads_no_list(self) -> None:
        carol = self.connect("carol@localhost/home")
        self.send(carol, presence_xml())
        self.send(carol, f"<iq type='get' id='r1'><query xmlns='{NS_ROSTER}'/></iq>")
        self.send(carol, "<iq type='get' id='p1' to='localhost'><ping xmlns='urn:xmpp:ping'/></iq>")
        self.assertEqual(self.held.calls(), [])
        self.assertEqual(
            [(s.name, s.getAttribute("type")) for s in carol.take()],
            [("presence", None), ("iq", "result"), ("iq", "result")],
        )

    def test_a_broadcast_to_a_contact_waits_for_the_list(self) -> None:
        self.subscribe("alice", "bob")
        alice = self.connect("alice@localhost/desk")
        self.send(alice, presence_xml())
        self.held.release_all()
        self.forget()
        bob = self.connect("bob@localhost/phone")
        self.send(bob, presence_xml())
        self.assertEqual(self.held.calls(), ["get_block_list"])
        self.assertEqual(alice.take(), [])
        self.held.release_all()
        self.assertEqual([s["from"] for s in alice.take()], ["bob@localhost/phone"])

    def test_a_stanza_to_someone_else_reads_the_list(self) -> None:
        carol = self.connect("carol@localhost/home")
        self.send(carol, "<message to='example.org' type='chat'><body>hi</body></message>")
        self.assertEqual(self.held.calls(), ["get_block_list"])
