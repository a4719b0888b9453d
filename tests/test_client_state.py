"""XEP-0352 Client State Indication: what an inactive client's session holds back, drops and
sends at once; <active/> sending what was held; the module switch."""

import dataclasses

from twisted.trial import unittest
from twisted.words.xish import domish

from mim_twisted.config import Config
from mim_twisted.im.client_state import MAX_HELD, NS_CSI, ClientState
from mim_twisted.storage.interfaces import RosterItem
from mim_twisted.xmpp.namespaces import SM
from tests.imsupport import parse
from tests.test_c2s_stream import bind_request
from tests.test_stream_management import CLIENT, StreamManagementTestCase, chat
from tests.wire import STREAM_FEATURES, parse_server_output

INACTIVE = f"<inactive xmlns='{NS_CSI}'/>".encode()
ACTIVE = f"<active xmlns='{NS_CSI}'/>".encode()
PEP_EVENT = (
    "<message from='{owner}' to='alice@localhost/home'>"
    "<event xmlns='http://jabber.org/protocol/pubsub#event'>"
    "<items node='{node}'><item id='{item}'/></items></event></message>"
)


def presence(sender: str, type: str | None = None) -> str:
    kind = f" type='{type}'" if type else ""
    return f"<presence from='{sender}' to='alice@localhost/home'{kind}/>"


def as_element(stanza: domish.Element | bytes | str) -> domish.Element:
    if isinstance(stanza, domish.Element):
        return stanza
    return parse(stanza.decode() if isinstance(stanza, bytes) else stanza)


class ClientStateTests(unittest.TestCase):
    """The pure rules, on stanzas as elements, strings and bytes."""

    def inactive(self) -> ClientState:
        state = ClientState()
        state.inactive = True
        return state

    def test_an_active_client_gets_everything(self) -> None:
        self.assertIs(ClientState().hold(presence("bob@localhost/a")), False)

    def test_latest_presence_per_contact_resource(self) -> None:
        state = self.inactive()
        self.assertIs(state.hold(presence("bob@localhost/a")), True)
        self.assertIs(state.hold(presence("carol@localhost/b").encode()), True)
        self.assertIs(state.hold(parse(presence("bob@localhost/a", "unavailable"))), True)
        held = [as_element(stanza) for stanza in state.release()]
        self.assertEqual(
            [(stanza["from"], stanza.getAttribute("type")) for stanza in held],
            [("carol@localhost/b", None), ("bob@localhost/a", "unavailable")],
        )
        self.assertEqual(state.release(), [])

    def test_latest_pep_notification_per_publisher_node_and_item(self) -> None:
        state = self.inactive()
        for owner, node, item in (
            ("bob@localhost", "urn:xmpp:avatar:metadata", "current"),
            ("bob@localhost", "http://jabber.org/protocol/tune", "current"),
            ("bob@localhost", "urn:xmpp:avatar:metadata", "current"),
            ("carol@localhost", "urn:xmpp:avatar:metadata", "current"),
        ):
            self.assertIs(state.hold(PEP_EVENT.format(owner=owner, node=node, item=item)), True)
        held = [parse(s) for s in state.release()]
        self.assertEqual(
            [(s["from"], s.event.items["node"]) for s in held],
            [
                ("bob@localhost", "http://jabber.org/protocol/tune"),
                ("bob@localhost", "urn:xmpp:avatar:metadata"),
                ("carol@localhost", "urn:xmpp:avatar:metadata"),
            ],
        )

    def test_each_item_of_a_multi_item_node_and_every_retraction_kept(self) -> None:
        state = self.inactive()
        bookmarks = "urn:xmpp:bookmarks:1"
        retract = PEP_EVENT.replace("<item id='{item}'/>", "<retract id='{item}'/>")
        for stanza in (
            PEP_EVENT.format(owner="bob@localhost", node=bookmarks, item="room1"),
            PEP_EVENT.format(owner="bob@localhost", node=bookmarks, item="room2"),
            retract.format(owner="bob@localhost", node=bookmarks, item="room1"),
            retract.format(owner="bob@localhost", node=bookmarks, item="room2"),
            PEP_EVENT.format(owner="bob@localhost", node=bookmarks, item="room1"),
        ):
            self.assertIs(state.hold(stanza), True)
        events = []
        for stanza in state.release():
            [entry] = parse(stanza).event.items.elements()
            events.append((entry.name, entry["id"]))
        self.assertEqual(
            events,
            [("item", "room2"), ("retract", "room1"), ("retract", "room2"), ("item", "room1")],
        )

    def test_messages_and_requests_go_at_once(self) -> None:
        state = self.inactive()
        for stanza in (
            "<message from='bob@localhost/a' type='chat'><body>hi</body></message>",
            presence("bob@localhost", "subscribe"),
            "<iq from='bob@localhost/a' type='get' id='1'><ping xmlns='urn:xmpp:ping'/></iq>",
            # a generic PubSub service's notification: subscribed to on purpose
            PEP_EVENT.format(owner="pubsub.localhost", node="news", item="1"),
        ):
            self.assertIs(state.hold(stanza), False, stanza)

    def test_chat_states_alone_are_dropped(self) -> None:
        state = self.inactive()
        composing = (
            "<message from='bob@localhost/a' type='chat'>"
            "<composing xmlns='http://jabber.org/protocol/chatstates'/></message>"
        )
        self.assertIsNone(state.hold(composing))
        with_body = composing.replace("<composing", "<body>hi</body><composing")
        self.assertIs(state.hold(with_body), False)

    def test_holding_is_bounded(self) -> None:
        state = self.inactive()
        for n in range(MAX_HELD + 1):
            state.hold(presence(f"user{n}@localhost/a"))
        self.assertTrue(state.overflowing())
        self.assertEqual(len(state.release()), MAX_HELD + 1)


class InactiveSessionTests(StreamManagementTestCase):
    def befriend(self) -> None:
        for owner, contact in (("alice", "bob"), ("bob", "alice")):
            item = RosterItem(f"{contact}@localhost", subscription="both")
            self.successResultOf(self.database.rosters.put_item("localhost", owner, item))

    def test_offered_after_authentication(self) -> None:
        stream, transport = self.authenticate("alice")
        features = parse_server_output(transport.value()).elements[-1]
        self.assertEqual(features.tag, STREAM_FEATURES)
        self.assertIsNotNone(features.find(f"{{{NS_CSI}}}csi"))

    def test_presence_waits_messages_do_not(self) -> None:
        self.befriend()
        alice, alice_out = self.online("alice", "home")
        bob, _ = self.online("bob", "desk")
        self.read(alice_out)
        alice.dataReceived(INACTIVE)
        sent_before = alice.session.ledger.sent
        for status in ("away", "dnd"):
            bob.dataReceived(f"<presence><show>{status}</show></presence>".encode())
            self.successResultOf(self.core.presence.idle())
        bob.dataReceived(chat("alice@localhost/home", "now"))
        [message] = self.elements(alice_out)
        self.assertEqual(message.findtext(CLIENT + "body"), "now")
        # What is held is not sent, so not counted for stream management either.
        self.assertEqual(alice.session.ledger.sent, sent_before + 1)
        alice.dataReceived(ACTIVE)
        [update] = self.elements(alice_out)
        self.assertEqual(update.tag, CLIENT + "presence")
        self.assertEqual(update.findtext(CLIENT + "show"), "dnd")
        self.assertEqual(alice.session.ledger.sent, sent_before + 2)

    def test_a_resumed_stream_starts_active(self) -> None:
        self.befriend()
        alice, _ = self.online("alice", "home")
        previd, acked = alice.session.resumption_id, alice.session.ledger.sent
        bob, _ = self.online("bob", "desk")
        alice.dataReceived(INACTIVE)
        bob.dataReceived(b"<presence><show>away</show></presence>")
        self.successResultOf(self.core.presence.idle())
        alice.connectionLost()
        new, new_out = self.resume("alice", previd, acked + 1)  # bob's initial presence
        tags = [e.tag for e in self.elements(new_out)]
        self.assertEqual(tags[0], f"{{{SM}}}resumed")
        self.assertIn(CLIENT + "presence", tags)


class SwitchedOffTests(StreamManagementTestCase):
    def config(self) -> Config:
        config = super().config()
        return dataclasses.replace(config, modules=dataclasses.replace(config.modules, csi=False))

    def test_not_offered_nor_understood(self) -> None:
        stream, transport = self.authenticate("alice")
        features = parse_server_output(transport.value()).elements[-1]
        self.assertIsNone(features.find(f"{{{NS_CSI}}}csi"))
        stream.dataReceived(bind_request("home"))
        self.read(transport)
        stream.dataReceived(INACTIVE)
        self.assertEqual(
            parse_server_output(transport.value()).stream_error(), "unsupported-stanza-type"
        )
