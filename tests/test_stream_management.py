"""XEP-0198 Stream Management at the protocol level: streams on StringTransports, time on a
Clock. Counting and acknowledgements both ways, the server's ack requests, detaching on an
abrupt disconnect, resumption, <failed/>, and what becomes of unacknowledged stanzas when a
session ends for good."""

import dataclasses

from twisted.internet import defer
from twisted.trial import unittest
from twisted.words.protocols.jabber.jid import JID

from mim_twisted import hooks
from mim_twisted.auth.scram import derive_all
from mim_twisted.config import Config, load_config
from mim_twisted.im.stream_management import (
    ACK_REQUEST_AFTER,
    ACK_REQUEST_DELAY,
    OVERFLOW_GRACE,
    HandledCountTooHigh,
    StanzaLedger,
)
from mim_twisted.xmpp.namespaces import SM, STANZAS
from tests.test_c2s_stream import HEADER, StreamTestCase, bind_request, plain_auth
from tests.wire import STREAM_FEATURES, parse_server_output

CLIENT = "{jabber:client}"


def sm(name: str) -> str:
    return f"{{{SM}}}{name}"


def chat(to: str, body: str) -> bytes:
    return f"<message to='{to}' type='chat'><body>{body}</body></message>".encode()


class LedgerTests(unittest.TestCase):
    """The pure counting, modulo 2^32."""

    def test_acknowledging_forgets_the_oldest(self) -> None:
        ledger = StanzaLedger(resumable=True)
        for stanza in ("a", "b", "c"):
            ledger.stanza_sent(stanza)
        ledger.acknowledge(2)
        self.assertEqual(list(ledger.unacked), ["c"])
        ledger.acknowledge(2)  # the same h again changes nothing
        self.assertEqual(list(ledger.unacked), ["c"])
        self.assertRaises(HandledCountTooHigh, ledger.acknowledge, 4)

    def test_counts_wrap_around(self) -> None:
        ledger = StanzaLedger(resumable=False)
        ledger.sent = ledger.handled = 2**32 - 1
        ledger.stanza_handled()
        ledger.stanza_sent("x")
        ledger.stanza_sent("y")
        self.assertEqual((ledger.handled, ledger.sent), (0, 1))
        ledger.acknowledge(0)
        self.assertEqual(list(ledger.unacked), ["y"])


class StreamManagementTestCase(StreamTestCase):
    resume_timeout = 60.0
    max_unacked = 1000

    def setUp(self) -> None:
        super().setUp()
        self.core.install(self.factory)
        for user in ("bob", "carol"):
            self.successResultOf(
                self.database.accounts.create_account("localhost", user, derive_all("secret"))
            )

    def config(self) -> Config:
        config = load_config(None)
        options = dataclasses.replace(
            config.stream_management,
            resume_timeout=self.resume_timeout,
            max_unacked=self.max_unacked,
        )
        limits = dataclasses.replace(config.limits, max_outgoing_buffer=65536)
        return dataclasses.replace(config, stream_management=options, limits=limits)

    def authenticate(self, user: str) -> tuple:
        stream, transport = self.connect()
        stream.dataReceived(HEADER + plain_auth(user, "secret"))
        stream.dataReceived(HEADER)
        return stream, transport

    def bind(self, user: str, resource: str, *, enable: bytes | None = None) -> tuple:
        stream, transport = self.authenticate(user)
        stream.dataReceived(bind_request(resource))
        if enable is not None:
            stream.dataReceived(enable)
        self.read(transport)
        return stream, transport

    def online(self, user: str, resource: str, *, resume: bool = True) -> tuple:
        """Bound, stream management enabled (resumable or not), available; output read."""
        enable = f"<enable xmlns='{SM}' resume='{'true' if resume else 'false'}'/>".encode()
        stream, transport = self.bind(user, resource, enable=enable)
        stream.dataReceived(b"<presence/>")
        self.successResultOf(self.core.presence.idle())
        self.acknowledge_all(stream)
        self.read(transport)
        return stream, transport

    def acknowledge_all(self, stream) -> None:
        stream.dataReceived(f"<a xmlns='{SM}' h='{stream.session.ledger.sent}'/>".encode())

    def elements(self, transport) -> list:
        return parse_server_output(self.read(transport)).elements

    def enabled_id(self, stream) -> str:
        return stream.session.resumption_id

    def drop(self, stream) -> None:
        """The TCP connection breaks: no </stream:stream>, no stream error."""
        stream.connectionLost()

    def resume(self, user: str, previd: str, h: int) -> tuple:
        stream, transport = self.authenticate(user)
        self.read(transport)
        stream.dataReceived(f"<resume xmlns='{SM}' previd='{previd}' h='{h}'/>".encode())
        return stream, transport

    def offline_bodies(self, user: str) -> list[str]:
        stored = self.successResultOf(self.database.offline.pop_all("localhost", user))
        return [record.stanza.split("<body>")[1].split("</body>")[0] for record in stored]


class EnableTests(StreamManagementTestCase):
    def test_offered_after_authentication(self) -> None:
        stream, transport = self.authenticate("alice")
        features = parse_server_output(transport.value()).elements[-1]
        self.assertEqual(features.tag, STREAM_FEATURES)
        self.assertIsNotNone(features.find(sm("sm")))

    def test_enable_with_resumption(self) -> None:
        stream, transport = self.bind("alice", "home")
        stream.dataReceived(f"<enable xmlns='{SM}' resume='true'/>".encode())
        [enabled] = self.elements(transport)
        self.assertEqual(enabled.tag, sm("enabled"))
        self.assertEqual(enabled.get("resume"), "true")
        self.assertEqual(enabled.get("max"), "60")
        self.assertTrue(enabled.get("id"))

    def test_enable_twice_or_before_binding_fails(self) -> None:
        stream, transport = self.authenticate("alice")
        self.read(transport)
        stream.dataReceived(f"<enable xmlns='{SM}'/>".encode())
        [failed] = self.elements(transport)
        self.assertEqual(failed.tag, sm("failed"))
        self.assertIsNotNone(failed.find(f"{{{STANZAS}}}unexpected-request"))
        stream.dataReceived(bind_request("home"))
        stream.dataReceived(f"<enable xmlns='{SM}'/>".encode())
        stream.dataReceived(f"<enable xmlns='{SM}'/>".encode())
        tags = [element.tag for element in self.elements(transport)]
        self.assertEqual(tags, [CLIENT + "iq", sm("enabled"), sm("failed")])

    def test_ack_before_enable_or_resume_after_binding_fails(self) -> None:
        stream, transport = self.bind("alice", "home")
        stream.dataReceived(f"<r xmlns='{SM}'/>".encode())
        self.assertEqual([e.tag for e in self.elements(transport)], [sm("failed")])
        stream.dataReceived(f"<enable xmlns='{SM}' resume='true'/>".encode())
        stream.dataReceived(f"<resume xmlns='{SM}' previd='x' h='0'/>".encode())
        self.assertEqual([e.tag for e in self.elements(transport)], [sm("enabled"), sm("failed")])
        stream.dataReceived(f"<nonsense xmlns='{SM}'/>".encode())
        output = parse_server_output(transport.value())
        self.assertEqual(output.stream_error(), "unsupported-stanza-type")


class AckTests(StreamManagementTestCase):
    def test_handled_stanzas_are_counted(self) -> None:
        stream, transport = self.online("alice", "home")  # its presence counted: 1
        ping = b"<iq type='get' id='p'><ping xmlns='urn:xmpp:ping'/></iq>"
        stream.dataReceived(ping + ping + f"<r xmlns='{SM}'/>".encode())
        answers = self.elements(transport)
        self.assertEqual(answers[-1].tag, sm("a"))
        self.assertEqual(answers[-1].get("h"), "3")

    def test_the_server_asks_after_a_few_stanzas_or_a_short_while(self) -> None:
        alice, alice_out = self.online("alice", "home")
        bob, _ = self.online("bob", "desk")
        self.clock.advance(ACK_REQUEST_DELAY)
        self.read(alice_out)
        bob.dataReceived(chat("alice@localhost/home", "one"))
        self.assertEqual([e.tag for e in self.elements(alice_out)], [CLIENT + "message"])
        self.clock.advance(ACK_REQUEST_DELAY)
        self.assertEqual([e.tag for e in self.elements(alice_out)], [sm("r")])
        self.assertEqual(len(alice.session.ledger.unacked), 1)
        self.acknowledge_all(alice)
        self.assertEqual(len(alice.session.ledger.unacked), 0)
        for n in range(ACK_REQUEST_AFTER):
            bob.dataReceived(chat("alice@localhost/home", str(n)))
        tags = [e.tag for e in self.elements(alice_out)]
        self.assertEqual(tags, [CLIENT + "message"] * ACK_REQUEST_AFTER + [sm("r")])

    def test_acking_more_than_was_sent_is_a_stream_error(self) -> None:
        alice, alice_out = self.online("alice", "home")
        sent = alice.session.ledger.sent
        alice.dataReceived(f"<a xmlns='{SM}' h='{sent + 7}'/>".encode())
        output = parse_server_output(alice_out.value())
        self.assertEqual(output.stream_error(), "undefined-condition")
        too_high = output.elements[-1].find(sm("handled-count-too-high"))
        self.assertIsNotNone(too_high)
        self.assertEqual(
            (too_high.get("h"), too_high.get("send-count")), (str(sent + 7), str(sent))
        )

    def test_the_error_for_a_stanza_that_failed_is_counted(self) -> None:
        alice, alice_out = self.online("alice", "home")
        sent = alice.session.ledger.sent

        def broken(session, stanza) -> None:
            raise RuntimeError("a bug")

        self.patch(self.core.router, "route_from_client", broken)
        alice.dataReceived(b"<iq type='get' id='v1'><query xmlns='jabber:iq:version'/></iq>")
        [answer] = self.elements(alice_out)
        self.assertEqual((answer.tag, answer.get("type")), (CLIENT + "iq", "error"))
        self.flushLoggedErrors(RuntimeError)
        alice.dataReceived(f"<a xmlns='{SM}' h='{sent + 1}'/>".encode())
        self.assertIsNone(parse_server_output(alice_out.value()).stream_error())
        self.assertEqual(len(alice.session.ledger.unacked), 0)

    def test_too_many_unacked_stanzas_end_the_session(self) -> None:
        self.patch(self, "max_unacked", 3)
        self.setUp()
        alice, alice_out = self.online("alice", "home")
        bob, bob_out = self.online("bob", "desk")
        self.clock.advance(ACK_REQUEST_DELAY)
        for n in range(4):
            bob.dataReceived(chat("alice@localhost/home", str(n)))
        self.clock.advance(OVERFLOW_GRACE - 1)
        self.assertIsNone(parse_server_output(alice_out.value()).stream_error())
        self.clock.advance(1)
        output = parse_server_output(alice_out.value())
        self.assertEqual(output.stream_error(), "resource-constraint")
        alice.connectionLost()
        # Its presence was already acknowledged by nobody: the four messages go offline.
        self.assertEqual(self.offline_bodies("alice"), ["0", "1", "2", "3"])

    def test_too_many_unacked_bytes_end_the_session(self) -> None:
        alice, _ = self.online("alice", "home")
        bob, bob_out = self.online("bob", "desk")
        self.drop(alice)
        for n in range(16):  # 17 of about 3.9 kB each: over the 64 kB budget, far under 1000
            bob.dataReceived(chat("alice@localhost/home", f"{n} " + "x" * 3800))
            self.assertIsNotNone(self.sessions.session(JID("alice@localhost/home")))
        bob.dataReceived(chat("alice@localhost/home", "16 " + "x" * 3800))
        self.clock.advance(0)  # no one to ask for an acknowledgement: at once
        self.assertIsNone(self.sessions.session(JID("alice@localhost/home")))
        bodies = [body.split()[0] for body in self.offline_bodies("alice")]
        self.assertEqual(bodies, [str(n) for n in range(17)])


class LoginBurstTests(StreamManagementTestCase):
    """Presence and offline messages sent in one go at login, before the client could ack."""

    max_unacked = 3

    def login_with_offline_messages(self, count: int) -> tuple:
        bob, _ = self.online("bob", "desk")
        for n in range(count):
            bob.dataReceived(chat("alice@localhost", str(n)))
        enable = f"<enable xmlns='{SM}' resume='true'/>".encode()
        alice, alice_out = self.bind("alice", "home", enable=enable)
        alice.dataReceived(b"<presence/>")
        self.successResultOf(self.core.presence.idle())
        return alice, alice_out

    def test_a_burst_over_the_limit_is_not_the_end_if_the_client_acks(self) -> None:
        alice, alice_out = self.login_with_offline_messages(5)
        elements = self.elements(alice_out)
        bodies = [e.findtext(CLIENT + "body") for e in elements if e.tag == CLIENT + "message"]
        self.assertEqual(bodies, ["0", "1", "2", "3", "4"])
        self.assertIn(sm("r"), [e.tag for e in elements])
        self.clock.advance(OVERFLOW_GRACE - 1)
        self.acknowledge_all(alice)
        self.clock.advance(OVERFLOW_GRACE)
        self.assertIsNone(parse_server_output(alice_out.value()).stream_error())
        self.assertIs(self.sessions.session(JID("alice@localhost/home")), alice.session)

    def test_a_burst_never_acked_is_stored_once_in_order(self) -> None:
        alice, alice_out = self.login_with_offline_messages(5)
        self.clock.advance(OVERFLOW_GRACE)
        output = parse_server_output(alice_out.value())
        self.assertEqual(output.stream_error(), "resource-constraint")
        alice.connectionLost()
        stored = self.successResultOf(self.database.offline.pop_all("localhost", "alice"))
        messages = [parse_server_output(record.stanza.encode()).elements[0] for record in stored]
        bodies = [message.findtext(CLIENT + "body") for message in messages]
        self.assertEqual(bodies, ["0", "1", "2", "3", "4"])
        for message in messages:
            self.assertEqual(len(message.findall("{urn:xmpp:delay}delay")), 1)

    def test_a_detached_session_over_the_limit_during_delivery_stores_each_once(self) -> None:
        bob, _ = self.online("bob", "desk")
        for n in range(5):
            bob.dataReceived(chat("alice@localhost", str(n)))
        enable = f"<enable xmlns='{SM}' resume='true'/>".encode()
        alice, _ = self.bind("alice", "home", enable=enable)
        pop_all = self.database.offline.pop_all
        reading = defer.Deferred()
        self.patch(self.database.offline, "pop_all", lambda *args: reading)
        alice.dataReceived(b"<presence/>")
        self.drop(alice)  # while the store is read
        self.patch(self.database.offline, "pop_all", pop_all)
        reading.callback(self.successResultOf(pop_all("localhost", "alice")))
        self.clock.advance(0)
        self.successResultOf(self.core.presence.idle())
        self.assertIsNone(self.sessions.session(JID("alice@localhost/home")))
        self.assertEqual(self.offline_bodies("alice"), ["0", "1", "2", "3", "4"])


class ResumptionTests(StreamManagementTestCase):
    def test_an_abrupt_disconnect_detaches_the_session(self) -> None:
        self.subscribe_alice_and_bob()
        alice, _ = self.online("alice", "home")
        bob, bob_out = self.online("bob", "desk")
        self.drop(alice)
        self.successResultOf(self.core.presence.idle())
        # Still online for everyone: no unavailable presence, still in the session table.
        self.assertEqual(self.elements(bob_out), [])
        session = self.sessions.session(JID("alice@localhost/home"))
        self.assertIsNotNone(session)
        self.assertIsNotNone(session.presence)

    def test_the_session_ends_for_hooks_only_when_it_times_out(self) -> None:
        # The event pusher's "offline" event comes from USER_UNAVAILABLE.
        ended, unavailable = [], []
        self.core.hooks.add(hooks.SESSION_ENDED, ended.append)
        self.core.hooks.add(hooks.USER_UNAVAILABLE, lambda s, presence: unavailable.append(s))
        alice, _ = self.online("alice", "home")
        self.drop(alice)
        self.successResultOf(self.core.presence.idle())
        self.assertEqual((ended, unavailable), ([], []))
        self.clock.advance(self.resume_timeout)
        self.successResultOf(self.core.presence.idle())
        self.assertEqual([session.jid.full() for session in ended], ["alice@localhost/home"])
        self.assertEqual(unavailable, ended)

    def test_resume_sends_what_was_not_acknowledged(self) -> None:
        alice, alice_out = self.online("alice", "home")
        previd = self.enabled_id(alice)
        bob, bob_out = self.online("bob", "desk")
        self.clock.advance(ACK_REQUEST_DELAY)
        self.read(alice_out)
        self.acknowledge_all(alice)
        acked = alice.session.ledger.sent
        bob.dataReceived(chat("alice@localhost/home", "in flight"))
        self.drop(alice)
        bob.dataReceived(chat("alice@localhost/home", "while away"))
        self.assertEqual(self.elements(bob_out), [])  # no error: the session takes it
        handled = alice.session.ledger.handled
        new, new_out = self.resume("alice", previd, acked)
        resumed, *stanzas = self.elements(new_out)
        self.assertEqual(resumed.tag, sm("resumed"))
        self.assertEqual((resumed.get("previd"), resumed.get("h")), (previd, str(handled)))
        bodies = [s.findtext(CLIENT + "body") for s in stanzas if s.tag == CLIENT + "message"]
        self.assertEqual(bodies, ["in flight", "while away"])
        self.assertEqual(stanzas[-1].tag, sm("r"))
        self.assertIs(new.session, self.sessions.session(JID("alice@localhost/home")))
        self.assertEqual(new.jid, JID("alice@localhost/home"))
        # The resumed stream carries the session on: stanzas both ways.
        bob.dataReceived(chat("alice@localhost/home", "after"))
        new.dataReceived(chat("bob@localhost/desk", "back"))
        self.assertEqual(self.elements(new_out)[0].findtext(CLIENT + "body"), "after")
        self.assertEqual(self.elements(bob_out)[0].findtext(CLIENT + "body"), "back")
        self.assertEqual(self.core.router.stream_management.resumptions, 1)

    def test_resume_takes_over_a_connection_not_yet_noticed_broken(self) -> None:
        alice, alice_out = self.online("alice", "home")
        new, new_out = self.resume("alice", self.enabled_id(alice), alice.session.ledger.sent)
        self.assertEqual(parse_server_output(alice_out.value()).stream_error(), "conflict")
        alice.connectionLost()
        self.assertIs(self.sessions.session(JID("alice@localhost/home")), new.session)
        self.assertEqual(self.elements(new_out)[0].tag, sm("resumed"))

    def test_unknown_or_someone_elses_session_fails(self) -> None:
        alice, _ = self.online("alice", "home")
        previd, acked = self.enabled_id(alice), alice.session.ledger.sent
        self.drop(alice)
        for user, claimed in (("alice", "nonsense"), ("bob", previd)):
            stream, transport = self.resume(user, claimed, 0)
            [failed] = self.elements(transport)
            self.assertEqual(failed.tag, sm("failed"))
            self.assertIsNotNone(failed.find(f"{{{STANZAS}}}item-not-found"))
            self.assertIsNone(stream.jid)
        # alice's session is still there to be resumed
        stream, transport = self.resume("alice", previd, acked)
        self.assertEqual(self.elements(transport)[0].tag, sm("resumed"))

    def test_a_session_without_resumption_ends_at_once(self) -> None:
        alice, _ = self.online("alice", "home", resume=False)
        self.drop(alice)
        self.assertIsNone(self.sessions.session(JID("alice@localhost/home")))

    def test_binding_the_same_full_jid_replaces_a_detached_session(self) -> None:
        alice, _ = self.online("alice", "home")
        previd = self.enabled_id(alice)
        bob, _ = self.online("bob", "desk")
        self.clock.advance(ACK_REQUEST_DELAY)
        bob.dataReceived(chat("alice@localhost/home", "kept"))
        self.drop(alice)
        new, _ = self.bind("alice", "home")
        self.assertIs(self.sessions.session(JID("alice@localhost/home")), new.session)
        self.assertEqual(self.offline_bodies("alice"), ["kept"])
        stream, transport = self.resume("alice", previd, 0)
        self.assertEqual(self.elements(transport)[0].tag, sm("failed"))

    def subscribe_alice_and_bob(self) -> None:
        from mim_twisted.storage.interfaces import RosterItem

        for owner, contact in (("alice", "bob"), ("bob", "alice")):
            item = RosterItem(f"{contact}@localhost", subscription="both")
            self.successResultOf(self.database.rosters.put_item("localhost", owner, item))


class TimeoutTests(StreamManagementTestCase):
    def test_unacked_messages_go_offline_when_the_session_times_out(self) -> None:
        alice, _ = self.online("alice", "home")
        previd = self.enabled_id(alice)
        bob, bob_out = self.online("bob", "desk")
        self.clock.advance(ACK_REQUEST_DELAY)
        bob.dataReceived(chat("alice@localhost/home", "unacked"))
        self.drop(alice)
        bob.dataReceived(chat("alice@localhost", "while away"))
        self.clock.advance(self.resume_timeout)
        self.successResultOf(self.core.presence.idle())
        self.assertIsNone(self.sessions.session(JID("alice@localhost/home")))
        self.assertEqual(self.offline_bodies("alice"), ["unacked", "while away"])
        self.assertEqual(self.core.router.stream_management.timeouts, 1)
        stream, transport = self.resume("alice", previd, 0)
        [failed] = self.elements(transport)
        self.assertIsNotNone(failed.find(f"{{{STANZAS}}}item-not-found"))

    def test_unacked_requests_are_answered_with_an_error(self) -> None:
        alice, _ = self.online("alice", "home")
        bob, bob_out = self.online("bob", "desk")
        self.clock.advance(ACK_REQUEST_DELAY)
        self.read(bob_out)
        version = "<query xmlns='jabber:iq:version'/>"
        bob.dataReceived(
            f"<iq type='get' id='v1' to='alice@localhost/home'>{version}</iq>".encode()
        )
        self.drop(alice)
        self.assertEqual(self.elements(bob_out), [])
        self.clock.advance(self.resume_timeout)
        [answer] = [e for e in self.elements(bob_out) if e.tag == CLIENT + "iq"]
        self.assertEqual((answer.get("type"), answer.get("id")), ("error", "v1"))
        self.assertIsNotNone(answer.find(f"{CLIENT}error/{{{STANZAS}}}service-unavailable"))

    def test_a_clean_close_ends_the_session_and_keeps_what_was_unacked(self) -> None:
        alice, _ = self.online("alice", "home")
        bob, _ = self.online("bob", "desk")
        self.clock.advance(ACK_REQUEST_DELAY)
        bob.dataReceived(chat("alice@localhost/home", "unread"))
        alice.dataReceived(b"</stream:stream>")
        alice.connectionLost()
        self.assertIsNone(self.sessions.session(JID("alice@localhost/home")))
        self.assertEqual(self.offline_bodies("alice"), ["unread"])

    def test_unacked_messages_go_to_another_available_resource(self) -> None:
        alice, _ = self.online("alice", "home")
        other, other_out = self.online("alice", "work")
        bob, _ = self.online("bob", "desk")
        self.clock.advance(ACK_REQUEST_DELAY)
        self.read(other_out)
        bob.dataReceived(chat("alice@localhost/home", "redirected"))
        self.drop(alice)
        self.clock.advance(self.resume_timeout)
        bodies = [e.findtext(CLIENT + "body") for e in self.elements(other_out)]
        self.assertIn("redirected", bodies)
        self.assertEqual(self.offline_bodies("alice"), [])

    def test_a_stop_waits_for_the_unacked_messages_being_stored(self) -> None:
        alice, _ = self.online("alice", "home")
        bob, _ = self.online("bob", "desk")
        self.clock.advance(ACK_REQUEST_DELAY)
        bob.dataReceived(chat("alice@localhost/home", "unacked"))
        store = self.database.offline.store
        writes: list[defer.Deferred] = []

        def slow_store(*args) -> defer.Deferred:
            writing = defer.Deferred()
            writing.addCallback(lambda _: store(*args))
            writes.append(writing)
            return writing

        self.patch(self.database.offline, "store", slow_store)
        alice.dataReceived(b"</stream:stream>")
        alice.connectionLost()
        stopped = self.core.router.routing.idle()
        self.assertNoResult(stopped)  # what the IM core's stop waits for before the database
        writes[0].callback(None)
        self.successResultOf(stopped)
        self.assertEqual(self.offline_bodies("alice"), ["unacked"])

    def test_unacked_messages_wait_behind_another_resources_offline_messages(self) -> None:
        alice, _ = self.online("alice", "home")
        other, other_out = self.online("alice", "work")
        bob, _ = self.online("bob", "desk")
        self.clock.advance(ACK_REQUEST_DELAY)
        self.read(other_out)
        bob.dataReceived(chat("alice@localhost/home", "rescued"))
        # The other resource's stored messages are still on their way to it.
        self.core.presence.offline.hold(other.session)
        self.drop(alice)
        self.clock.advance(self.resume_timeout)
        messages = [e for e in self.elements(other_out) if e.tag == CLIENT + "message"]
        self.assertEqual(messages, [])
        self.successResultOf(
            defer.ensureDeferred(self.core.presence.offline.release(other.session))
        )
        bodies = [e.findtext(CLIENT + "body") for e in self.elements(other_out)]
        self.assertEqual(bodies, ["rescued"])
