"""XEP-0280 Message Carbons at the stanza level, through the IM core as tap.py wires it."""

import dataclasses

from twisted.internet.task import Clock
from twisted.trial import unittest
from twisted.words.xish import domish

from mim_twisted.cluster.sessions import ClusterSessions, Outbox, unpack_stanzas
from mim_twisted.im.carbons import NS_CARBONS, NS_FORWARD, Carbons, eligible
from mim_twisted.im.disco import NS_DISCO_INFO
from tests import test_cluster_sessions as cluster
from tests.imsupport import FakeSession, ImCoreTestCase, error_condition, parse

JABBER_CLIENT = "jabber:client"


def forwarded_message(copy: domish.Element, direction: str) -> domish.Element:
    """The original message inside a carbon copy, checked to be in its namespaces."""
    [wrapper] = copy.elements(NS_CARBONS, direction)
    [forwarded] = wrapper.elements(NS_FORWARD, "forwarded")
    [original] = forwarded.elements(JABBER_CLIENT, "message")
    return original


class EligibilityTests(unittest.TestCase):
    """§6: which messages are copied."""

    def check(self, xml: str, expected: bool) -> None:
        message = parse(xml)
        message["from"] = "alice@localhost/desk"
        message.attributes.setdefault("to", "bob@localhost")
        self.assertEqual(eligible(message), expected, xml)

    def test_chat_and_normal_with_a_body(self) -> None:
        self.check("<message type='chat'/>", True)
        self.check("<message><body>hi</body></message>", True)
        self.check("<message type='normal'><body>hi</body></message>", True)

    def test_chat_states_and_receipts_of_normal_messages(self) -> None:
        self.check(
            "<message><active xmlns='http://jabber.org/protocol/chatstates'/></message>", True
        )
        self.check("<message><received xmlns='urn:xmpp:receipts' id='1'/></message>", True)
        self.check("<message><subject>no body</subject></message>", False)

    def test_other_types_are_not_copied(self) -> None:
        for kind in ("groupchat", "headline", "error"):
            self.check(f"<message type='{kind}'><body>hi</body></message>", False)

    def test_private_and_no_copy_hints(self) -> None:
        self.check(
            "<message type='chat'><body>hi</body><private xmlns='urn:xmpp:carbons:2'/></message>",
            False,
        )
        self.check(
            "<message type='chat'><body>hi</body><no-copy xmlns='urn:xmpp:hints'/></message>",
            False,
        )

    def test_carbons_are_not_copied_again(self) -> None:
        self.check("<message type='chat'><received xmlns='urn:xmpp:carbons:2'/></message>", False)

    def test_messages_between_own_resources_are_not_copied(self) -> None:
        self.check("<message type='chat' to='alice@localhost/phone'/>", False)
        self.check("<message type='chat' to='Alice@localhost'/>", False)
        message = parse("<message type='chat'><body>to oneself</body></message>")
        message["from"] = "alice@localhost/desk"
        self.assertFalse(eligible(message))


class CarbonsTestCase(ImCoreTestCase):
    def enable(self, session: FakeSession, what: str = "enable") -> domish.Element:
        self.send(session, f"<iq type='set' id='c1'><{what} xmlns='{NS_CARBONS}'/></iq>")
        return session.take()[-1]

    def chat(self, sender: FakeSession, to: str, extra: str = "", kind: str = "chat") -> None:
        self.send(
            sender, f"<message to='{to}' type='{kind}' id='m1'><body>Hi</body>{extra}</message>"
        )


class EnableTests(CarbonsTestCase):
    def test_enable_and_disable(self) -> None:
        desk = self.online("alice@localhost/desk")
        reply = self.enable(desk)
        self.assertEqual((reply.name, reply.getAttribute("type")), ("iq", "result"))
        self.assertTrue(desk.carbons)
        reply = self.enable(desk, "disable")
        self.assertEqual(reply.getAttribute("type"), "result")
        self.assertFalse(desk.carbons)

    def test_enable_addressed_to_the_server_or_the_own_account(self) -> None:
        desk = self.online("alice@localhost/desk")
        for to in ("localhost", "alice@localhost"):
            desk.carbons = False
            self.send(desk, f"<iq type='set' id='c1' to='{to}'><enable xmlns='{NS_CARBONS}'/></iq>")
            self.assertEqual(desk.take()[-1].getAttribute("type"), "result", to)
            self.assertTrue(desk.carbons, to)

    def test_not_for_another_account_nor_with_get(self) -> None:
        desk = self.online("alice@localhost/desk")
        self.send(
            desk, f"<iq type='set' id='c1' to='bob@localhost'><enable xmlns='{NS_CARBONS}'/></iq>"
        )
        self.assertEqual(error_condition(desk.take()[-1]), "forbidden")
        self.send(desk, f"<iq type='get' id='c2'><enable xmlns='{NS_CARBONS}'/></iq>")
        self.assertEqual(error_condition(desk.take()[-1]), "bad-request")
        self.assertFalse(desk.carbons)

    def test_advertised_by_the_server(self) -> None:
        desk = self.online("alice@localhost/desk")
        self.send(
            desk, f"<iq type='get' id='d1' to='localhost'><query xmlns='{NS_DISCO_INFO}'/></iq>"
        )
        features = [f["var"] for f in desk.take()[-1].query.elements(NS_DISCO_INFO, "feature")]
        self.assertIn(NS_CARBONS, features)

    def test_switched_off_in_the_config(self) -> None:
        self.config = dataclasses.replace(
            self.config, modules=dataclasses.replace(self.config.modules, carbons=False)
        )
        self.build()
        desk = self.online("alice@localhost/desk")
        self.assertEqual(error_condition(self.enable(desk)), "service-unavailable")
        self.send(
            desk, f"<iq type='get' id='d1' to='localhost'><query xmlns='{NS_DISCO_INFO}'/></iq>"
        )
        features = [f["var"] for f in desk.take()[-1].query.elements(NS_DISCO_INFO, "feature")]
        self.assertNotIn(NS_CARBONS, features)


class CopyTests(CarbonsTestCase):
    def setUp(self) -> None:
        super().setUp()
        self.desk = self.online("alice@localhost/desk", 1)
        self.phone = self.online("alice@localhost/phone", 0)
        self.plain = self.online("alice@localhost/plain", 0)  # carbons never enabled
        for session in (self.desk, self.phone):
            self.enable(session)
        self.bob = self.online("bob@localhost/home")

    def test_sent_copy_to_the_other_enabled_resources(self) -> None:
        self.chat(self.desk, "bob@localhost")
        [copy] = self.phone.take()
        self.assertEqual(
            (copy.name, copy["from"], copy["to"], copy["type"]),
            ("message", "alice@localhost", "alice@localhost/phone", "chat"),
        )
        original = forwarded_message(copy, "sent")
        self.assertEqual(
            (original["from"], original["to"], str(original.body)),
            ("alice@localhost/desk", "bob@localhost", "Hi"),
        )
        self.assertEqual((self.desk.take(), self.plain.take()), ([], []))
        self.assertEqual(len(self.bob.take()), 1)

    def test_received_copy_to_the_resources_that_did_not_get_it(self) -> None:
        # To the bare JID: delivered to desk (highest priority), copied to phone.
        self.chat(self.bob, "alice@localhost")
        [delivered] = self.desk.take()
        self.assertEqual(str(delivered.body), "Hi")
        [copy] = self.phone.take()
        self.assertEqual((copy["from"], copy["to"]), ("alice@localhost", "alice@localhost/phone"))
        original = forwarded_message(copy, "received")
        self.assertEqual(
            (original["from"], original["to"]), ("bob@localhost/home", "alice@localhost")
        )
        self.assertEqual(self.plain.take(), [])

    def test_to_a_full_jid_the_other_resources_get_a_copy(self) -> None:
        self.chat(self.bob, "alice@localhost/phone")
        self.assertEqual(len(self.phone.take()), 1)
        [copy] = self.desk.take()
        forwarded_message(copy, "received")

    def test_no_copy_for_a_resource_that_got_the_message(self) -> None:
        self.send(self.phone, "<presence><priority>1</priority></presence>")
        self.forget()
        self.chat(self.bob, "alice@localhost")
        [to_desk] = self.desk.take()
        [to_phone] = self.phone.take()
        for delivered in (to_desk, to_phone):
            self.assertEqual((delivered["from"], str(delivered.body)), ("bob@localhost/home", "Hi"))

    def test_private_and_no_copy_are_honoured(self) -> None:
        for hint in (f"<private xmlns='{NS_CARBONS}'/>", "<no-copy xmlns='urn:xmpp:hints'/>"):
            self.chat(self.desk, "bob@localhost", hint)
            self.chat(self.bob, "alice@localhost/desk", hint)
            self.assertEqual(self.phone.take(), [], hint)
            self.assertEqual(len(self.bob.take()), 1)
            self.assertEqual(len(self.desk.take()), 1)

    def test_headline_is_not_copied(self) -> None:
        self.chat(self.bob, "alice@localhost/desk", kind="headline")
        self.assertEqual(len(self.desk.take()), 1)
        self.assertEqual(self.phone.take(), [])

    def test_disabled_resources_get_nothing(self) -> None:
        self.enable(self.phone, "disable")
        self.chat(self.desk, "bob@localhost")
        self.chat(self.bob, "alice@localhost")
        self.assertEqual(self.phone.take(), [])

    def test_offline_stored_messages_are_not_copied(self) -> None:
        self.chat(self.desk, "carol@localhost")
        [copy] = self.phone.take()
        forwarded_message(copy, "sent")
        self.assertEqual(self.successResultOf(self.database.offline.count("localhost", "carol")), 1)

    def test_copies_end_with_the_enabled_sessions_and_start_again_with_a_new_one(self) -> None:
        for session in (self.desk, self.phone):
            self.disconnect(session)
        self.forget()
        self.chat(self.plain, "bob@localhost")
        self.chat(self.bob, "alice@localhost/plain")
        self.assertEqual(len(self.bob.take()), 1)
        self.assertEqual(len(self.plain.take()), 1)  # the message, no copy
        tablet = self.online("alice@localhost/tablet")
        self.enable(tablet)
        self.chat(self.plain, "bob@localhost")
        [copy] = tablet.take()
        forwarded_message(copy, "sent")

    def test_disabled_again_by_every_session(self) -> None:
        for session in (self.desk, self.phone):
            self.enable(session, "disable")
        self.chat(self.bob, "alice@localhost/plain")
        self.assertEqual((self.desk.take(), self.phone.take()), ([], []))
        self.enable(self.desk)
        self.chat(self.bob, "alice@localhost/plain")
        forwarded_message(self.desk.take()[0], "received")


class RemoteCopyTests(unittest.TestCase):
    """On a cluster node, a session of the account on another node is sent the copies whether
    or not a session here has carbons on: its node drops those it did not ask for."""

    def test_copy_to_a_session_on_another_node(self) -> None:
        bus, clock = cluster.FakeBus(), Clock()
        table = ClusterSessions("n1", bus, Outbox(bus, clock, lambda _: None), cluster.FakeStore())
        carbons = Carbons(table)
        desk = cluster.FakeSession("alice@localhost/desk")
        table.bind(desk)
        message = parse("<message to='bob@localhost' type='chat'><body>Hi</body></message>")
        message["from"] = "alice@localhost/desk"
        carbons.sent(desk, message)
        clock.advance(0)
        self.assertEqual(bus.sent, [])
        bus.handlers["session"]("n2", ["alice@localhost/phone", 0, None, None])
        carbons.sent(desk, message)
        clock.advance(0)
        [(node, kind, payload)] = bus.sent
        [(jid, xml)] = unpack_stanzas(payload)
        self.assertEqual((node, kind, jid), ("n2", "stanzas", "alice@localhost/phone"))
        forwarded_message(parse(xml), "sent")
