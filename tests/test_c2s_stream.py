"""The C2S stream at the protocol level: headers, features, stream errors, SASL, binding."""

import base64

from twisted.internet import defer, endpoints, protocol, reactor, task
from twisted.internet.address import IPv4Address, UNIXAddress
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.trial import unittest

from mim_twisted.auth.scram import derive_all
from mim_twisted.config import Config, load_config
from mim_twisted.storage.memory import MemoryDatabase
from mim_twisted.tap import build_im_core
from mim_twisted.xmpp.c2s import CLOSE_GRACE, C2SFactory, C2SSettings
from mim_twisted.xmpp.connection import BoundSession, ClientConnection, SessionOpener
from mim_twisted.xmpp.namespaces import BIND, CLIENT, SASL, SESSION, STREAMS, TLS
from mim_twisted.xmpp.sasl import plain
from tests.imsupport import HeldStore
from tests.test_sasl_mechanisms import synchronously
from tests.wire import STREAM_ERROR, STREAM_ERRORS, STREAM_FEATURES, parse_server_output
from tests.xml_samples import BILLION_LAUGHS

HEADER = (
    b"<?xml version='1.0'?><stream:stream xmlns='jabber:client' "
    b"xmlns:stream='http://etherx.jabber.org/streams' to='localhost' version='1.0'>"
)


def plain_auth(user: str, password: str) -> bytes:
    token = base64.b64encode(f"\0{user}\0{password}".encode()).decode()
    return (
        f"<auth xmlns='urn:ietf:params:xml:ns:xmpp-sasl' mechanism='PLAIN'>{token}</auth>"
    ).encode()


def bind_request(resource: str = "") -> bytes:
    inner = f"<resource>{resource}</resource>" if resource else ""
    return (
        f"<iq type='set' id='b1'><bind xmlns='urn:ietf:params:xml:ns:xmpp-bind'>{inner}</bind></iq>"
    ).encode()


class StreamTestCase(unittest.TestCase):
    """A stream on a StringTransport; TLS is left out (the end-to-end tests cover STARTTLS)."""

    settings = {}

    def setUp(self) -> None:
        # No reactor runs here: PLAIN hashes in this thread instead of a worker thread.
        self.patch(plain, "run_hash", synchronously)
        self.clock = Clock()
        self.database = MemoryDatabase()
        self.successResultOf(
            self.database.accounts.create_account("localhost", "alice", derive_all("secret"))
        )
        self.core = core = build_im_core(self.config(), self.database, self.clock)
        self.sessions = core.sessions
        values = {
            "domains": frozenset({"localhost"}),
            "tls_options": None,
            "starttls_required": False,
            "mechanisms": ("SCRAM-SHA-256", "SCRAM-SHA-1", "PLAIN"),
            "allow_plain_without_tls": True,
            "max_failures": 3,
            "failure_delay": 0.0,
            "max_stanza_size": 4096,
            "auth_timeout": 30.0,
            "max_outgoing_buffer": 65536,
        }
        values.update(self.settings)
        self.factory = C2SFactory(
            C2SSettings(**values),
            accounts=self.database.accounts,
            im=core.router,
            clock=self.clock,
        )

    def config(self) -> Config:
        return load_config(None)

    def connect(self) -> tuple:
        stream = self.factory.buildProtocol(None)
        transport = StringTransport()
        stream.makeConnection(transport)
        return stream, transport

    def read(self, transport: StringTransport) -> bytes:
        data = transport.value()
        transport.clear()
        return data

    def assertStreamError(self, transport: StringTransport, condition: str) -> None:
        """The output ends with a {streams}error holding the condition, and the stream closes."""
        output = parse_server_output(transport.value())
        self.assertEqual(output.elements[-1].tag, STREAM_ERROR)
        self.assertEqual(output.elements[-1][0].tag, f"{{{STREAM_ERRORS}}}{condition}")
        self.assertEqual(output.stream_error(), condition)
        self.assertTrue(output.closed)
        self.assertTrue(transport.disconnecting)

    def login(self, resource: str = "home") -> tuple:
        stream, transport = self.connect()
        stream.dataReceived(HEADER + plain_auth("alice", "secret"))
        self.assertIn(b"<success xmlns='urn:ietf:params:xml:ns:xmpp-sasl'", transport.value())
        stream.dataReceived(HEADER)
        self.read(transport)
        stream.dataReceived(bind_request(resource))
        self.assertIn(b"<jid>alice@localhost/" + resource.encode(), self.read(transport))
        return stream, transport


class StreamHeaderTests(StreamTestCase):
    def test_header_and_features(self) -> None:
        stream, transport = self.connect()
        stream.dataReceived(HEADER)
        data = transport.value()
        self.assertIn(b"from='localhost' version='1.0'", data)
        self.assertIn(b"<mechanism>SCRAM-SHA-256</mechanism>", data)
        self.assertIn(b"<mechanism>PLAIN</mechanism>", data)

    def test_unknown_domain(self) -> None:
        stream, transport = self.connect()
        stream.dataReceived(HEADER.replace(b"to='localhost'", b"to='example.org'"))
        self.assertStreamError(transport, "host-unknown")

    def test_wrong_default_namespace(self) -> None:
        stream, transport = self.connect()
        stream.dataReceived(HEADER.replace(b"jabber:client", b"jabber:server"))
        self.assertStreamError(transport, "invalid-namespace")

    def test_wrong_stream_namespace(self) -> None:
        stream, transport = self.connect()
        stream.dataReceived(HEADER.replace(b"http://etherx.jabber.org/streams", b"urn:x"))
        self.assertStreamError(transport, "invalid-namespace")

    def test_old_version(self) -> None:
        stream, transport = self.connect()
        stream.dataReceived(HEADER.replace(b"to='localhost' version='1.0'", b"to='localhost'"))
        self.assertStreamError(transport, "unsupported-version")

    def test_not_well_formed(self) -> None:
        stream, transport = self.connect()
        stream.dataReceived(HEADER + b"<message><body></message>")
        self.assertStreamError(transport, "not-well-formed")

    def test_unknown_top_level_element(self) -> None:
        stream, transport = self.connect()
        stream.dataReceived(HEADER + b"<foo xmlns='urn:example'/>")
        self.assertStreamError(transport, "unsupported-stanza-type")

    def test_client_closes_the_stream(self) -> None:
        stream, transport = self.connect()
        stream.dataReceived(HEADER + b"</stream:stream>")
        self.assertTrue(transport.value().endswith(b"</stream:stream>"))
        self.assertTrue(transport.disconnecting)


class RestrictedXmlTests(StreamTestCase):
    def check(self, document: bytes) -> None:
        stream, transport = self.connect()
        stream.dataReceived(document)
        self.assertStreamError(transport, "restricted-xml")

    def test_billion_laughs_is_rejected_before_expansion(self) -> None:
        self.check(BILLION_LAUGHS)

    def test_comment(self) -> None:
        self.check(HEADER + b"<!-- hello -->")

    def test_processing_instruction(self) -> None:
        self.check(HEADER + b"<?evil instruction?>")

    def test_dtd_inside_the_stream(self) -> None:
        self.check(b"<!DOCTYPE stream:stream>" + HEADER)


class StanzaSizeTests(StreamTestCase):
    def test_oversized_stanza_in_one_piece(self) -> None:
        stream, transport = self.connect()
        stream.dataReceived(HEADER + b"<message><body>" + b"x" * 5000 + b"</body></message>")
        self.assertStreamError(transport, "policy-violation")

    def test_oversized_stanza_in_many_pieces(self) -> None:
        stream, transport = self.connect()
        stream.dataReceived(HEADER + b"<message><body>")
        for _ in range(50):
            stream.dataReceived(b"y" * 100)
        self.assertStreamError(transport, "policy-violation")

    def test_many_small_stanzas_in_one_buffer_are_fine(self) -> None:
        stream, transport = self.login()
        stream.dataReceived(b"<presence/>" * 1000)
        self.assertFalse(transport.disconnecting)


class TimeoutTests(StreamTestCase):
    def test_no_authentication_in_time(self) -> None:
        stream, transport = self.connect()
        stream.dataReceived(HEADER)
        self.clock.advance(31)
        self.assertStreamError(transport, "connection-timeout")

    def test_authenticated_streams_are_not_timed_out(self) -> None:
        stream, transport = self.login()
        self.clock.advance(31)
        self.assertFalse(transport.disconnecting)


class SaslTests(StreamTestCase):
    def test_plain_success_then_restart_offers_bind(self) -> None:
        stream, transport = self.connect()
        stream.dataReceived(HEADER + plain_auth("alice", "secret"))
        self.assertIn(b"<success", self.read(transport))
        stream.dataReceived(HEADER)
        features = self.read(transport)
        self.assertIn(b"<bind xmlns='urn:ietf:params:xml:ns:xmpp-bind'/>", features)
        self.assertIn(b"<optional/>", features)
        self.assertNotIn(b"mechanisms", features)

    def test_wrong_password_then_retry(self) -> None:
        stream, transport = self.connect()
        stream.dataReceived(HEADER + plain_auth("alice", "wrong"))
        self.assertIn(b"<not-authorized/>", self.read(transport))
        self.assertFalse(transport.disconnecting)
        stream.dataReceived(plain_auth("alice", "secret"))
        self.assertIn(b"<success", self.read(transport))

    def test_too_many_failures_close_the_stream(self) -> None:
        stream, transport = self.connect()
        stream.dataReceived(HEADER)
        for _ in range(3):
            stream.dataReceived(plain_auth("alice", "wrong"))
        self.assertStreamError(transport, "policy-violation")

    def test_mechanism_not_offered(self) -> None:
        stream, transport = self.connect()
        stream.dataReceived(
            HEADER + b"<auth xmlns='urn:ietf:params:xml:ns:xmpp-sasl' mechanism='EXTERNAL'/>"
        )
        self.assertIn(b"<invalid-mechanism/>", transport.value())

    def test_bad_base64(self) -> None:
        stream, transport = self.connect()
        stream.dataReceived(
            HEADER + b"<auth xmlns='urn:ietf:params:xml:ns:xmpp-sasl' mechanism='PLAIN'>!!</auth>"
        )
        self.assertIn(b"<incorrect-encoding/>", transport.value())

    def test_authzid_of_someone_else(self) -> None:
        stream, transport = self.connect()
        token = base64.b64encode(b"bob@localhost\0alice\0secret")
        stream.dataReceived(
            HEADER
            + b"<auth xmlns='urn:ietf:params:xml:ns:xmpp-sasl' mechanism='PLAIN'>"
            + token
            + b"</auth>"
        )
        self.assertIn(b"<invalid-authzid/>", transport.value())

    def test_stanza_before_authentication(self) -> None:
        stream, transport = self.connect()
        stream.dataReceived(HEADER + b"<message to='bob@localhost'><body>hi</body></message>")
        self.assertStreamError(transport, "not-authorized")


class DelayedFailureTests(StreamTestCase):
    settings = {"failure_delay": 2.0}

    def test_failures_are_answered_after_a_growing_delay(self) -> None:
        stream, transport = self.connect()
        stream.dataReceived(HEADER)
        self.read(transport)
        stream.dataReceived(plain_auth("alice", "wrong"))
        self.assertNotIn(b"failure", transport.value())
        self.clock.advance(2)
        self.assertIn(b"<not-authorized/>", self.read(transport))
        stream.dataReceived(plain_auth("alice", "wrong"))
        self.clock.advance(2)
        self.assertEqual(self.read(transport), b"")
        self.clock.advance(2)
        self.assertIn(b"<not-authorized/>", self.read(transport))


class PlainOnlyOverTlsTests(StreamTestCase):
    settings = {"allow_plain_without_tls": False}

    def test_plain_is_not_offered_in_the_clear(self) -> None:
        stream, transport = self.connect()
        stream.dataReceived(HEADER)
        self.assertNotIn(b"<mechanism>PLAIN</mechanism>", transport.value())
        self.assertIn(b"<mechanism>SCRAM-SHA-1</mechanism>", transport.value())


class BindTests(StreamTestCase):
    def test_generated_resource(self) -> None:
        stream, transport = self.connect()
        stream.dataReceived(HEADER + plain_auth("alice", "secret"))
        stream.dataReceived(HEADER)
        self.read(transport)
        stream.dataReceived(bind_request())
        self.assertIn(b"<jid>alice@localhost/", transport.value())
        self.assertEqual(len(self.sessions), 1)

    def test_invalid_resource(self) -> None:
        stream, transport = self.connect()
        stream.dataReceived(HEADER + plain_auth("alice", "secret"))
        stream.dataReceived(HEADER)
        self.read(transport)
        stream.dataReceived(bind_request("a" * 1100))
        self.assertIn(b"<bad-request", transport.value())
        self.assertEqual(len(self.sessions), 0)

    def test_same_full_jid_replaces_the_old_session(self) -> None:
        old, old_transport = self.login("desk")
        new, new_transport = self.login("desk")
        self.assertStreamError(old_transport, "conflict")
        old.connectionLost()
        self.assertIs(self.sessions.session(new.jid).connection, new)

    def test_binding_opens_a_session_in_the_im_core(self) -> None:
        stream, transport = self.login("desk")
        session = self.sessions.session(stream.jid)
        self.assertIs(stream.session, session)
        self.assertIs(session.connection, stream)
        # The stream and the IM core meet only through the protocols of xmpp.connection.
        self.assertIsInstance(stream, ClientConnection)
        self.assertIsInstance(session, BoundSession)
        self.assertIsInstance(self.factory.im, SessionOpener)
        stream.connectionLost()
        self.assertIsNone(self.sessions.session(stream.jid))

    def test_stanza_after_auth_before_bind(self) -> None:
        stream, transport = self.connect()
        stream.dataReceived(HEADER + plain_auth("alice", "secret"))
        stream.dataReceived(HEADER)
        stream.dataReceived(b"<message to='bob@localhost'><body>hi</body></message>")
        self.assertStreamError(transport, "not-authorized")

    def test_session_establishment_is_answered(self) -> None:
        stream, transport = self.login()
        stream.dataReceived(
            b"<iq type='set' id='s1'><session xmlns='urn:ietf:params:xml:ns:xmpp-session'/></iq>"
        )
        self.assertIn(b"type='result'", transport.value())

    def test_unhandled_iq_gets_service_unavailable(self) -> None:
        stream, transport = self.login()
        stream.dataReceived(b"<iq type='get' id='q1'><query xmlns='urn:example:unknown'/></iq>")
        data = transport.value()
        self.assertIn(b"type='error'", data)
        self.assertIn(b"<service-unavailable", data)
        self.assertFalse(transport.disconnecting)

    def test_from_is_stamped_by_the_server(self) -> None:
        alice, _ = self.login("one")
        other, other_transport = self.login("two")
        alice.dataReceived(
            b"<message from='mallory@localhost' to='alice@localhost/two'><body>hi</body></message>"
        )
        self.assertIn(b"from='alice@localhost/one'", other_transport.value())
        self.assertNotIn(b"mallory", other_transport.value())


class StartTlsRequiredTests(StreamTestCase):
    # A stand-in: these tests never get as far as starting TLS.
    settings = {"starttls_required": True, "tls_options": object()}

    def test_only_starttls_is_offered(self) -> None:
        stream, transport = self.connect()
        stream.dataReceived(HEADER)
        data = transport.value()
        self.assertIn(b"<starttls xmlns='urn:ietf:params:xml:ns:xmpp-tls'><required/>", data)
        self.assertNotIn(b"mechanism", data)

    def test_authenticating_in_the_clear_is_refused(self) -> None:
        stream, transport = self.connect()
        stream.dataReceived(HEADER)
        self.read(transport)
        token = base64.b64encode(b"n,,n=alice,r=abcdefgh").decode()
        stream.dataReceived(
            "<auth xmlns='urn:ietf:params:xml:ns:xmpp-sasl' mechanism='SCRAM-SHA-256'>"
            f"{token}</auth>".encode()
        )
        stream.dataReceived(plain_auth("alice", "secret"))
        data = transport.value()
        self.assertEqual(data.count(b"<encryption-required/>"), 2)
        self.assertIsNone(stream.username)


class SaslWireTests(StreamTestCase):
    def test_challenges_are_written_as_their_elements(self) -> None:
        stream, transport = self.connect()
        stream.dataReceived(HEADER)
        self.read(transport)
        # No initial response: an empty challenge ("=") asks for the client-first-message.
        stream.dataReceived(
            b"<auth xmlns='urn:ietf:params:xml:ns:xmpp-sasl' mechanism='SCRAM-SHA-256'/>"
        )
        self.assertEqual(
            self.read(transport),
            b"<challenge xmlns='urn:ietf:params:xml:ns:xmpp-sasl'>=</challenge>",
        )
        token = base64.b64encode(b"n,,n=alice,r=abcdefgh")
        stream.dataReceived(
            b"<response xmlns='urn:ietf:params:xml:ns:xmpp-sasl'>%s</response>" % token
        )
        [challenge] = parse_server_output(self.read(transport)).elements
        self.assertEqual(challenge.tag, "{urn:ietf:params:xml:ns:xmpp-sasl}challenge")
        self.assertTrue(base64.b64decode(challenge.text).startswith(b"r=abcdefgh"))


class SaslPauseTests(StreamTestCase):
    """Nothing is read from the client while a SASL step waits for the database; a step
    answered at once pauses nothing."""

    def test_a_step_answered_at_once_does_not_pause_reading(self) -> None:
        stream, transport = self.connect()
        pauses: list[str] = []
        transport.pauseProducing = lambda: pauses.append("paused")
        stream.dataReceived(HEADER + plain_auth("alice", "secret"))
        self.assertIn(b"<success", transport.value())
        self.assertEqual(pauses, [])
        self.assertEqual(transport.producerState, "producing")

    def test_a_step_waiting_for_the_database_pauses_reading(self) -> None:
        held = HeldStore(self.database.accounts, answers_only=True)
        self.factory.accounts = held
        stream, transport = self.connect()
        stream.dataReceived(HEADER + plain_auth("alice", "secret"))
        self.assertEqual(transport.producerState, "paused")
        held.release_all()
        self.assertIn(b"<success", transport.value())
        self.assertEqual(transport.producerState, "producing")


class ParserLimitTests(StreamTestCase):
    settings = {"max_stanza_size": 1_000_000}

    def test_deep_nesting_is_refused(self) -> None:
        stream, transport = self.login()
        stream.dataReceived(b"<message><body>" + b"<a>" * 150)
        self.assertStreamError(transport, "policy-violation")

    def test_too_many_elements_are_refused(self) -> None:
        stream, transport = self.login()
        stream.dataReceived(b"<iq type='set' id='x'><q xmlns='urn:x'>" + b"<a/>" * 10_001)
        self.assertStreamError(transport, "policy-violation")

    def test_before_authentication_the_stanza_limit_is_small(self) -> None:
        stream, transport = self.connect()
        stream.dataReceived(HEADER + b"<auth xmlns='urn:ietf:params:xml:ns:xmpp-sasl'>")
        stream.dataReceived(b"A" * 20_000)
        self.assertStreamError(transport, "policy-violation")

    def test_after_authentication_the_configured_limit_applies(self) -> None:
        stream, transport = self.login()
        stream.dataReceived(b"<message to='alice@localhost/home'><body>" + b"A" * 20_000)
        self.assertFalse(transport.disconnecting)


class BindTimeoutTests(StreamTestCase):
    def test_authenticated_but_never_bound(self) -> None:
        stream, transport = self.connect()
        stream.dataReceived(HEADER + plain_auth("alice", "secret"))
        stream.dataReceived(HEADER)
        self.clock.advance(31)
        self.assertStreamError(transport, "connection-timeout")


class UnboundPerAddressTests(StreamTestCase):
    settings = {"max_unbound_per_address": 2}

    def connect_from(self, host: str) -> tuple:
        stream = self.factory.buildProtocol(None)
        transport = StringTransport(peerAddress=IPv4Address("TCP", host, 40000))
        stream.makeConnection(transport)
        return stream, transport

    def test_one_address_may_hold_only_so_many_unbound_connections(self) -> None:
        self.connect_from("192.0.2.1")
        self.connect_from("192.0.2.1")
        _, refused = self.connect_from("192.0.2.1")
        self.assertStreamError(refused, "policy-violation")
        _, other = self.connect_from("192.0.2.2")
        self.assertFalse(other.disconnecting)

    def test_unix_socket_clients_are_not_limited_per_address(self) -> None:
        # They all have the same (empty) address: counting them together would let one client
        # shut the others out.
        for _ in range(3):
            stream = self.factory.buildProtocol(None)
            transport = StringTransport(peerAddress=UNIXAddress(None))
            stream.makeConnection(transport)
            self.assertFalse(transport.disconnecting)

    def test_bound_and_closed_connections_free_their_place(self) -> None:
        first, _ = self.connect_from("127.0.0.1")
        second, _ = self.connect_from("127.0.0.1")
        first.connectionLost()
        second.dataReceived(HEADER + plain_auth("alice", "secret"))
        second.dataReceived(HEADER + bind_request("x"))
        for _ in range(2):
            _, transport = self.connect_from("127.0.0.1")
            self.assertFalse(transport.disconnecting)


class TlsRecordingTransport(StringTransport):
    """A StringTransport that records STARTTLS instead of doing it."""

    tls_options = None

    def startTLS(self, options: object) -> None:
        self.tls_options = options


class NamespaceTests(StreamTestCase):
    """Everything the stream writes is in the right namespace as a client's parser reads it."""

    def test_header_and_features(self) -> None:
        stream, transport = self.connect()
        stream.dataReceived(HEADER)
        output = parse_server_output(transport.value())
        self.assertEqual(output.headers[0].tag, f"{{{STREAMS}}}stream")
        [features] = output.elements
        self.assertEqual(features.tag, STREAM_FEATURES)
        mechanisms = features.findall(f"{{{SASL}}}mechanisms/{{{SASL}}}mechanism")
        self.assertEqual([m.text for m in mechanisms], ["SCRAM-SHA-256", "SCRAM-SHA-1", "PLAIN"])

    def test_sasl_success_bind_features_and_bind_result(self) -> None:
        stream, transport = self.connect()
        stream.dataReceived(HEADER + plain_auth("alice", "secret"))
        self.assertEqual(
            parse_server_output(self.read(transport)).elements[-1].tag, f"{{{SASL}}}success"
        )
        stream.dataReceived(HEADER)
        [features] = parse_server_output(self.read(transport)).elements
        self.assertEqual(features.tag, STREAM_FEATURES)
        self.assertIsNotNone(features.find(f"{{{BIND}}}bind"))
        self.assertIsNotNone(features.find(f"{{{SESSION}}}session/{{{SESSION}}}optional"))
        stream.dataReceived(bind_request("home"))
        [result] = parse_server_output(self.read(transport)).elements
        self.assertEqual(result.tag, f"{{{CLIENT}}}iq")
        self.assertEqual(result.findtext(f"{{{BIND}}}bind/{{{BIND}}}jid"), "alice@localhost/home")

    def test_sasl_failure(self) -> None:
        stream, transport = self.connect()
        stream.dataReceived(HEADER)
        self.read(transport)
        stream.dataReceived(plain_auth("alice", "wrong"))
        [failure] = parse_server_output(self.read(transport)).elements
        self.assertEqual(failure.tag, f"{{{SASL}}}failure")
        self.assertEqual(failure[0].tag, f"{{{SASL}}}not-authorized")

    def test_stream_error_before_the_client_header(self) -> None:
        stream, transport = self.connect()
        stream.dataReceived(b"<?xml version='1.0'?><!DOCTYPE x>")
        self.assertEqual(len(parse_server_output(transport.value()).headers), 1)
        self.assertStreamError(transport, "restricted-xml")

    def test_stream_error_with_text(self) -> None:
        stream, transport = self.connect()
        stream.dataReceived(HEADER + b"<foo xmlns='urn:example'/>")
        error = parse_server_output(transport.value()).elements[-1]
        self.assertEqual(error.tag, STREAM_ERROR)
        self.assertEqual(error.findtext(f"{{{STREAM_ERRORS}}}text"), "Unexpected <foo/>")


class StartTlsNamespaceTests(StreamTestCase):
    settings = {"tls_options": object(), "starttls_required": True}

    def config(self) -> Config:
        return load_config(None)

    def connect(self) -> tuple:
        stream = self.factory.buildProtocol(None)
        transport = TlsRecordingTransport()
        stream.makeConnection(transport)
        return stream, transport

    def test_starttls_feature_proceed_and_the_stream_after_it(self) -> None:
        stream, transport = self.connect()
        stream.dataReceived(HEADER)
        [features] = parse_server_output(self.read(transport)).elements
        self.assertIsNotNone(features.find(f"{{{TLS}}}starttls/{{{TLS}}}required"))
        stream.dataReceived(b"<starttls xmlns='urn:ietf:params:xml:ns:xmpp-tls'/>")
        [proceed] = parse_server_output(self.read(transport)).elements
        self.assertEqual(proceed.tag, f"{{{TLS}}}proceed")
        self.assertIsNotNone(transport.tls_options)
        stream.dataReceived(HEADER)
        [features] = parse_server_output(self.read(transport)).elements
        self.assertEqual(features.tag, STREAM_FEATURES)
        self.assertIsNotNone(features.find(f"{{{SASL}}}mechanisms"))
        self.clock.advance(31)
        self.assertStreamError(transport, "connection-timeout")

    def test_starttls_failure(self) -> None:
        stream, transport = self.connect()
        stream.dataReceived(HEADER + b"<starttls xmlns='urn:ietf:params:xml:ns:xmpp-tls'/>")
        self.read(transport)
        stream.dataReceived(HEADER + b"<starttls xmlns='urn:ietf:params:xml:ns:xmpp-tls'/>")
        output = parse_server_output(transport.value())
        self.assertEqual(output.elements[-1].tag, f"{{{TLS}}}failure")
        self.assertTrue(output.closed)
        self.assertTrue(transport.disconnecting)


class ClosingTests(StreamTestCase):
    """A closing stream lets go of its transport and drops it after a short grace."""

    settings = {"failure_delay": 2.0}

    def assertReleased(self, transport: StringTransport) -> None:
        # TLS (TLSMemoryBIOProtocol) closes only once no producer is registered.
        self.assertIsNone(transport.producer)
        # Reading again: the client's FIN or TLS close_notify must be noticed.
        self.assertEqual(transport.producerState, "producing")
        self.assertTrue(transport.disconnecting)

    def test_stream_error(self) -> None:
        stream, transport = self.connect()
        stream.dataReceived(HEADER + b"<foo xmlns='urn:example'/>")
        self.assertReleased(transport)
        self.clock.advance(CLOSE_GRACE - 0.1)
        self.assertFalse(transport.disconnected)
        self.clock.advance(0.1)
        self.assertTrue(transport.disconnected)  # aborted

    def test_stream_error_while_reading_is_paused(self) -> None:
        stream, transport = self.connect()
        # The first failure is answered after a delay, with reading paused; the second <auth/>
        # in the same write is a policy violation.
        stream.dataReceived(HEADER + plain_auth("alice", "wrong") + plain_auth("alice", "wrong"))
        self.assertStreamError(transport, "policy-violation")
        self.assertReleased(transport)

    def test_closing_stream_end(self) -> None:
        stream, transport = self.connect()
        stream.dataReceived(HEADER + b"</stream:stream>")
        self.assertTrue(parse_server_output(transport.value()).closed)
        self.assertReleased(transport)

    def test_connection_lost_cancels_the_abort(self) -> None:
        stream, transport = self.connect()
        stream.dataReceived(HEADER + b"</stream:stream>")
        stream.connectionLost()
        self.assertEqual(self.clock.getDelayedCalls(), [])
        self.assertEqual(self.factory.streams, set())
        self.assertEqual(self.factory._unbound, {})


class StanzaTimeoutTests(StreamTestCase):
    settings = {"stanza_timeout": 60.0}

    def test_a_stanza_trickled_byte_by_byte_is_cut(self) -> None:
        stream, transport = self.login()
        stream.dataReceived(b"<message to='alice@localhost/home'><body>")
        for _ in range(59):
            self.clock.advance(1)
            stream.dataReceived(b"x")
        self.assertFalse(transport.disconnecting)
        self.clock.advance(1)
        self.assertStreamError(transport, "policy-violation")

    def test_each_stanza_gets_its_own_time(self) -> None:
        stream, transport = self.login()
        stream.dataReceived(b"<presence>")
        self.clock.advance(50)
        stream.dataReceived(b"</presence><presence>")
        self.clock.advance(50)
        self.assertFalse(transport.disconnecting)
        stream.dataReceived(b"</presence>")
        self.clock.advance(100)
        self.assertFalse(transport.disconnecting)

    def test_a_stanza_in_many_pieces_within_the_time_is_fine(self) -> None:
        stream, transport = self.login()
        for piece in (b"<message to='alice@localhost/home'>", b"<body>hi", b"</body></message>"):
            stream.dataReceived(piece)
            self.clock.advance(20)
        self.assertFalse(transport.disconnecting)
        self.assertIn(b"<body>hi</body>", transport.value())


class Received(protocol.Protocol):
    """A raw client: what the server wrote, as it arrives."""

    def __init__(self) -> None:
        self.data = b""
        self.arrived: defer.Deferred | None = None

    def dataReceived(self, data: bytes) -> None:
        self.data += data
        if self.arrived is not None:
            arrived, self.arrived = self.arrived, None
            arrived.callback(None)

    async def until(self, ending: bytes) -> bytes:
        """All that arrived, once it ends with ``ending``."""
        while not self.data.endswith(ending):
            self.arrived = defer.Deferred()
            await self.arrived.addTimeout(5, reactor)
        return self.data


class DirectWriteTests(StreamTestCase):
    """On plain TCP, a turn's first write goes straight to the socket, without the reactor
    watching the socket for writability; the turn's later writes are buffered behind it."""

    async def connect_tcp(self) -> tuple:
        factory = C2SFactory(
            self.factory.settings,
            accounts=self.database.accounts,
            im=self.core.router,
            clock=reactor,
        )
        port = reactor.listenTCP(0, factory, interface="127.0.0.1")
        self.addCleanup(port.stopListening)
        watched = []
        add_writer = reactor.addWriter
        self.patch(reactor, "addWriter", lambda w: (watched.append(w), add_writer(w))[1])
        client = Received()
        endpoint = endpoints.TCP4ClientEndpoint(reactor, "127.0.0.1", port.getHost().port)
        await endpoints.connectProtocol(endpoint, client)
        self.addCleanup(client.transport.abortConnection)
        while not factory.streams:
            await task.deferLater(reactor, 0.01)
        (stream,) = factory.streams
        return stream, client, watched

    async def test_the_header_and_features_are_written_at_once(self) -> None:
        stream, client, watched = await self.connect_tcp()
        client.transport.write(HEADER)
        data = await client.until(b"</stream:features>")
        self.assertTrue(data.startswith(b"<?xml version='1.0'?><stream:stream"))
        self.assertIn(b"<mechanism>PLAIN</mechanism>", data)
        self.assertNotIn(stream.transport, watched)

    async def test_the_later_writes_of_a_turn_follow_in_order(self) -> None:
        stream, client, watched = await self.connect_tcp()
        for n in range(3):
            stream.send(f"<message id='{n}'/>")
        data = await client.until(b"<message id='2'/>")
        self.assertEqual(data, b"<message id='0'/><message id='1'/><message id='2'/>")
        # The first went straight out; the two behind it were buffered.
        self.assertIn(stream.transport, watched)
        await task.deferLater(reactor, 0.01)
        del watched[:]
        stream.send("<message id='3'/>")
        await client.until(b"<message id='3'/>")
        self.assertNotIn(stream.transport, watched)

    async def test_a_bound_client_stanzas_turn_buffering_back_on(self) -> None:
        stream, client, watched = await self.connect_tcp()
        # One reply per reactor turn, as a client that waits for each gets them.
        for sent, reply in [
            (HEADER, b"</stream:features>"),
            (plain_auth("alice", "secret"), b"<success xmlns='urn:ietf:params:xml:ns:xmpp-sasl'/>"),
            (HEADER, b"</stream:features>"),
            (bind_request("home"), b"</iq>"),
        ]:
            client.transport.write(sent)
            await client.until(reply)
        self.assertNotIn(stream.transport, watched)
        client.transport.write(b"<iq type='get' id='p1'><ping xmlns='urn:xmpp:ping'/></iq>")
        await client.until(b"id='p1' type='result'/>")
        self.assertIn(stream.transport, watched)
