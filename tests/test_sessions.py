"""The IM core's sessions as the stream layer sees them: opened on binding through the router,
fed stanzas, ended when the connection is lost; and the layering that this keeps."""

import ast
import os

from twisted.internet.address import IPv4Address
from twisted.trial import unittest
from twisted.words.protocols.jabber.jid import JID
from twisted.words.xish import domish

from mim_twisted.im.sessions import Session
from mim_twisted.xmpp.connection import BoundSession, ClientConnection
from tests.imsupport import ImCoreTestCase, parse, presence_xml

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class FakeConnection:
    """A client stream as the IM core sees it (`ClientConnection`)."""

    def __init__(self, *, secure: bool = True) -> None:
        self.domain = "localhost"
        self.peer = IPv4Address("TCP", "127.0.0.1", 40000)
        self.secure = secure
        self.closed = False
        self.sent: list[domish.Element] = []
        self.stream_errors: list[tuple[str, str | None]] = []

    def send(self, stanza: domish.Element | bytes | str) -> None:
        if isinstance(stanza, domish.Element):
            stanza = stanza.toXml(defaultUri="jabber:client")
        elif isinstance(stanza, bytes):
            stanza = stanza.decode("utf-8")
        self.sent.append(parse(stanza))

    def stream_error(
        self, condition: str, text: str | None = None, app_condition: domish.Element | None = None
    ) -> None:
        self.stream_errors.append((condition, text))
        self.closed = True


class OpenedSessionTests(ImCoreTestCase):
    def open(self, jid: str, connection: FakeConnection | None = None) -> Session:
        connection = connection or FakeConnection()
        opened: ClientConnection = connection
        session: BoundSession = self.core.router.open_session(opened, JID(jid))
        self.assertIsInstance(session, Session)
        return session

    def stanza(self, session: Session, xml: str) -> None:
        """As C2SStream hands a stanza over: 'from' stamped with the full JID."""
        stanza = parse(xml)
        stanza["from"] = session.jid.full()
        session.stanza_received(stanza)

    def test_opening_binds_the_full_jid(self) -> None:
        connection = FakeConnection(secure=False)
        session = self.open("alice@localhost/desk", connection)
        self.assertIs(self.core.sessions.session(JID("alice@localhost/desk")), session)
        self.assertEqual(session.jid, JID("alice@localhost/desk"))
        self.assertIs(session.connection, connection)
        self.assertFalse(session.secure)
        self.assertIsNone(session.presence)
        self.assertIsNone(session.message_priority)
        self.assertFalse(session.roster_requested)

    def test_stanzas_are_routed_and_answers_written_to_the_connection(self) -> None:
        bob = self.open("bob@localhost/phone")
        alice = self.open("alice@localhost/desk")
        self.stanza(bob, presence_xml())
        self.stanza(alice, "<message to='bob@localhost' type='chat'><body>hi</body></message>")
        received = bob.connection.sent[-1]
        self.assertEqual((received.name, received["from"]), ("message", "alice@localhost/desk"))
        self.stanza(alice, "<iq type='get' id='p1'><ping xmlns='urn:xmpp:ping'/></iq>")
        self.assertEqual(alice.connection.sent[-1]["type"], "result")

    def test_a_second_binding_of_the_jid_replaces_the_first(self) -> None:
        old = self.open("alice@localhost/desk")
        new = self.open("alice@localhost/desk")
        self.assertEqual(
            old.connection.stream_errors, [("conflict", "Replaced by a new connection")]
        )
        self.assertTrue(old.closed)
        self.assertIs(self.core.sessions.session(JID("alice@localhost/desk")), new)
        old.connection_lost(old.connection)
        self.assertIs(self.core.sessions.session(JID("alice@localhost/desk")), new)

    def test_a_lost_connection_ends_the_session_for_everyone(self) -> None:
        self.subscribe("bob", "alice")
        bob = self.open("bob@localhost/phone")
        alice = self.open("alice@localhost/desk")
        for session in (bob, alice):
            self.stanza(session, presence_xml())
        self.successResultOf(self.core.presence.idle())
        alice.connection.closed = True
        alice.connection_lost(alice.connection)
        self.successResultOf(self.core.presence.idle())
        self.assertIsNone(self.core.sessions.session(alice.jid))
        last = bob.connection.sent[-1]
        self.assertEqual(
            (last.name, last["type"], last["from"]),
            ("presence", "unavailable", "alice@localhost/desk"),
        )

    def test_stream_errors_close_the_connection(self) -> None:
        session = self.open("alice@localhost/desk")
        session.stream_error("policy-violation", "Too much")
        self.assertEqual(session.connection.stream_errors, [("policy-violation", "Too much")])
        self.assertTrue(session.closed)
        self.assertIsNone(self.core.sessions.session(session.jid))

    def test_live_sessions_leave_out_closing_ones(self) -> None:
        alice = self.open("alice@localhost/desk")
        bob = self.open("bob@localhost/phone")
        bob.stream_error("policy-violation")
        self.assertEqual(list(self.core.sessions.live_sessions()), [alice])
        self.assertEqual(len(self.core.sessions), 2)  # until bob's connection is gone

    def test_the_full_jid_as_text(self) -> None:
        session = self.open("Alice@LocalHost/desk")
        self.assertEqual(session.full_jid, "alice@localhost/desk")
        self.assertEqual(session.full_jid, session.jid.full())

    def test_bound_sessions_of_closing_ones_too(self) -> None:
        alice = self.open("alice@localhost/desk")
        phone = self.open("alice@localhost/phone")
        phone.stream_error("policy-violation")
        self.assertEqual(self.core.sessions.sessions_of(JID("alice@localhost")), [alice])
        self.assertEqual(
            self.core.sessions.bound_sessions_of(JID("alice@localhost")), [alice, phone]
        )


class SessionsChangedTests(ImCoreTestCase):
    """The table tells its listeners of each change of what an account's sessions offer:
    bound, unbound, available or not (as received), other caps features."""

    def setUp(self) -> None:
        super().setUp()
        self.changed: list[str] = []
        self.core.sessions.on_sessions_changed.append(self.changed.append)

    def test_bound_and_unbound(self) -> None:
        alice = self.connect("alice@localhost/desk")
        replacing = self.connect("alice@localhost/desk")
        self.disconnect(alice)  # replaced: nothing is unbound
        self.disconnect(replacing)
        self.assertEqual(self.changed, ["alice@localhost"] * 3)

    def test_becoming_available_or_unavailable_as_received(self) -> None:
        alice = self.connect("alice@localhost/desk")
        self.changed.clear()
        self.send(alice, presence_xml())
        self.send(alice, presence_xml(priority=-1))  # available still
        self.send(alice, presence_xml(to="bob@localhost"))  # directed
        self.assertEqual(self.changed, ["alice@localhost"])
        self.send(alice, presence_xml("unavailable"))
        self.send(alice, presence_xml("unavailable"))
        self.assertEqual(self.changed, ["alice@localhost"] * 2)

    def test_a_failing_listener_breaks_neither_binding_nor_the_others(self) -> None:
        def failing(bare_jid: str) -> None:
            raise RuntimeError("listener bug")

        self.core.sessions.on_sessions_changed.insert(0, failing)
        alice = self.connect("alice@localhost/desk")
        self.send(alice, presence_xml())
        self.assertEqual(self.changed, ["alice@localhost"] * 2)
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 2)
        self.assertIsNotNone(self.core.sessions.session(alice.jid))


class LayeringTests(unittest.TestCase):
    """The stream layer hands bound resources to the IM core through `xmpp.connection`: it never
    imports the IM core or PubSub, which sit above it."""

    def test_the_stream_layer_imports_nothing_above_it(self) -> None:
        above = ("mim_twisted.im", "mim_twisted.pubsub", "mim_twisted.tap", "mim_twisted.admin")
        found = []
        for folder, _, files in os.walk(os.path.join(ROOT, "mim_twisted", "xmpp")):
            for name in files:
                if not name.endswith(".py"):
                    continue
                path = os.path.join(folder, name)
                with open(path, encoding="utf-8") as source:
                    tree = ast.parse(source.read(), path)
                for node in ast.walk(tree):
                    if isinstance(node, ast.Import):
                        modules = [alias.name for alias in node.names]
                    elif isinstance(node, ast.ImportFrom) and node.module:
                        modules = [node.module]
                    else:
                        continue
                    found += [
                        f"{os.path.relpath(path, ROOT)}: {module}"
                        for module in modules
                        if module.startswith(above)
                    ]
        self.assertEqual(found, [])
