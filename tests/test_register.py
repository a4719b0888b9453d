"""XEP-0077 in-band registration: before authentication on a real C2S stream, after it through
a real Router."""

from twisted.internet import defer
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.trial import unittest

from mim_twisted.auth.scram import ScramCredentials, derive_all, verify_password
from mim_twisted.im.disco import DiscoService
from mim_twisted.im.register import NS_FEATURE, NS_REGISTER, RegistrationService
from mim_twisted.im.sessions import SessionManager
from mim_twisted.storage.memory import MemoryDatabase
from mim_twisted.xmpp.c2s import C2SFactory, C2SSettings
from mim_twisted.xmpp.namespaces import CLIENT
from tests.imsupport import FakeSession, error_condition, make_router, parse, send
from tests.test_sasl_mechanisms import synchronously
from tests.wire import STREAM_FEATURES, parse_server_output

HEADER = (
    b"<?xml version='1.0'?><stream:stream xmlns='jabber:client' "
    b"xmlns:stream='http://etherx.jabber.org/streams' to='localhost' version='1.0'>"
)


def features_of(data: bytes) -> list[str]:
    """The qualified names of the features the server offered in ``data``."""
    [features] = parse_server_output(data).elements
    assert features.tag == STREAM_FEATURES, features.tag
    return [child.tag for child in features]


REGISTER_FEATURE = f"{{{NS_FEATURE}}}register"


def register_iq(kind: str, body: str = "", to: str | None = None) -> str:
    address = f" to='{to}'" if to else ""
    return f"<iq type='{kind}' id='r1'{address}><query xmlns='{NS_REGISTER}'>{body}</query></iq>"


def fields(username: str | None, password: str | None) -> str:
    parts = []
    if username is not None:
        parts.append(f"<username>{username}</username>")
    if password is not None:
        parts.append(f"<password>{password}</password>")
    return "".join(parts)


class RegistrationTestCase(unittest.TestCase):
    enabled = True

    def run_hash(self, function, *args) -> defer.Deferred:
        return synchronously(function, *args)

    def setUp(self) -> None:
        self.clock = Clock()
        self.accounts = MemoryDatabase().accounts
        self.successResultOf(self.accounts.create_account("localhost", "alice", derive_all("old")))
        self.sessions = SessionManager()
        self.router = make_router(self.sessions, self.clock)
        self.disco = DiscoService(self.accounts)
        self.registration = RegistrationService(
            self.accounts,
            self.sessions,
            self.clock,
            enabled=self.enabled,
            iterations=4096,
            run_hash=self.run_hash,
        )
        self.factory = C2SFactory(
            C2SSettings(
                domains=frozenset({"localhost"}),
                tls_options=None,
                starttls_required=False,
                mechanisms=("PLAIN",),
                allow_plain_without_tls=True,
                max_failures=3,
                failure_delay=0.0,
                max_stanza_size=65536,
                auth_timeout=30.0,
                max_outgoing_buffer=65536,
            ),
            accounts=self.accounts,
            im=self.router,
            clock=self.clock,
        )
        self.registration.install_stream(self.factory)
        self.registration.install(self.router, self.disco)

    # -- a connection that has not authenticated --------------------------------------------

    def connect(self, *, secure: bool = True) -> tuple:
        """A stream past its header; `secure` stands in for a completed STARTTLS."""
        stream = self.factory.buildProtocol(None)
        transport = StringTransport()
        stream.makeConnection(transport)
        stream.secure = secure
        stream.dataReceived(HEADER)
        features = transport.value()
        transport.clear()
        return stream, transport, features

    def request(self, connection: tuple, xml: str):
        stream, transport, _ = connection
        stream.dataReceived(xml.encode())
        answer = transport.value()
        transport.clear()
        return parse(answer.decode())

    def password_of(self, username: str, password: str) -> bool:
        stored = self.successResultOf(self.accounts.get_credentials("localhost", username))
        credentials = ScramCredentials.from_text("SCRAM-SHA-256", stored["SCRAM-SHA-256"])
        return verify_password(credentials, password)

    # -- a bound session ----------------------------------------------------------------------

    def bind(self, jid: str, *, secure: bool = True) -> FakeSession:
        session = FakeSession(jid, secure=secure)
        self.sessions.bind(session)
        return session


class DisabledTests(RegistrationTestCase):
    enabled = False

    def test_not_advertised(self) -> None:
        _, _, features = self.connect()
        self.assertNotIn(REGISTER_FEATURE, features_of(features))
        self.assertNotIn(NS_REGISTER, self.disco.server_info().features)

    def test_requests_before_authentication(self) -> None:
        connection = self.connect()
        for xml in (register_iq("get"), register_iq("set", fields("bob", "pw"))):
            self.assertEqual(error_condition(self.request(connection, xml)), "service-unavailable")
        self.assertFalse(self.successResultOf(self.accounts.account_exists("localhost", "bob")))

    def test_requests_after_authentication(self) -> None:
        alice = self.bind("alice@localhost/desk")
        result = send(self.router, alice, register_iq("set", fields("alice", "n3w-secret")))
        self.assertEqual(error_condition(result), "service-unavailable")
        # The refusal does not carry the request, whose copy would hold the new password.
        self.assertEqual(
            [(child.uri, child.name) for child in result.elements()], [(CLIENT, "error")]
        )
        self.assertNotIn("n3w-secret", result.toXml())
        self.assertTrue(self.password_of("alice", "old"))


class BeforeAuthenticationTests(RegistrationTestCase):
    def test_advertised_on_encrypted_streams_only(self) -> None:
        _, _, features = self.connect()
        self.assertIn(REGISTER_FEATURE, features_of(features))
        _, _, features = self.connect(secure=False)
        self.assertNotIn(REGISTER_FEATURE, features_of(features))
        self.assertIn(NS_REGISTER, self.disco.server_info().features)

    def test_refused_before_tls(self) -> None:
        connection = self.connect(secure=False)
        for xml in (register_iq("get"), register_iq("set", fields("bob", "pw"))):
            result = self.request(connection, xml)
            self.assertEqual(error_condition(result), "policy-violation")
        self.assertFalse(self.successResultOf(self.accounts.account_exists("localhost", "bob")))

    def test_fields(self) -> None:
        result = self.request(self.connect(), register_iq("get"))
        self.assertEqual(result["type"], "result")
        query = next(result.elements(NS_REGISTER, "query"))
        self.assertEqual(
            [c.name for c in query.elements()], ["instructions", "username", "password"]
        )

    def test_register(self) -> None:
        result = self.request(self.connect(), register_iq("set", fields("Bob", "s3cret")))
        self.assertEqual((result["type"], result["id"]), ("result", "r1"))
        # The username is nodeprepped; the stored keys verify the password.
        self.assertTrue(self.password_of("bob", "s3cret"))

    def test_existing_username(self) -> None:
        result = self.request(self.connect(), register_iq("set", fields("alice", "mine")))
        self.assertEqual(error_condition(result), "conflict")
        self.assertTrue(self.password_of("alice", "old"))
        # The password sent is not echoed back.
        self.assertNotIn("mine", result.toXml())

    def test_missing_or_empty_fields(self) -> None:
        connection = self.connect()
        for body in (fields("bob", None), fields(None, "pw"), fields("bob", ""), fields("", "pw")):
            result = self.request(connection, register_iq("set", body))
            self.assertEqual(error_condition(result), "not-acceptable", body)
        self.assertFalse(self.successResultOf(self.accounts.account_exists("localhost", "bob")))

    def test_invalid_username_or_password(self) -> None:
        connection = self.connect()
        for body in (fields("bob smith", "pw"), fields("bob@home", "pw"), fields("bob", "\u200e")):
            result = self.request(connection, register_iq("set", body))
            self.assertEqual(error_condition(result), "not-acceptable", body)

    def test_one_account_per_connection(self) -> None:
        connection = self.connect()
        self.request(connection, register_iq("set", fields("bob", "pw")))
        result = self.request(connection, register_iq("set", fields("carol", "pw")))
        self.assertEqual(error_condition(result), "not-acceptable")
        self.assertFalse(self.successResultOf(self.accounts.account_exists("localhost", "carol")))

    def test_a_conflict_does_not_use_up_the_connection(self) -> None:
        connection = self.connect()
        self.request(connection, register_iq("set", fields("alice", "pw")))
        result = self.request(connection, register_iq("set", fields("bob", "pw")))
        self.assertEqual(result["type"], "result")

    def test_remove_needs_authentication(self) -> None:
        result = self.request(self.connect(), register_iq("set", "<remove/>"))
        self.assertEqual(error_condition(result), "unexpected-request")

    def test_malformed_iq(self) -> None:
        connection = self.connect()
        result = self.request(connection, register_iq("get").replace(" id='r1'", ""))
        self.assertEqual(error_condition(result), "bad-request")
        stream, transport, _ = connection
        stream.dataReceived(register_iq("result").encode())
        self.assertEqual(transport.value(), b"")

    def test_other_stanzas_still_need_authentication(self) -> None:
        stream, transport, _ = self.connect()
        stream.dataReceived(b"<iq type='get' id='v'><query xmlns='jabber:iq:version'/></iq>")
        output = parse_server_output(transport.value())
        self.assertEqual((output.stream_error(), output.closed), ("not-authorized", True))


class HashingTests(RegistrationTestCase):
    """The keys are derived by the injected runner (a thread in production), not inline."""

    def setUp(self) -> None:
        self.hashing: list[tuple] = []
        super().setUp()

    def run_hash(self, function, *args) -> defer.Deferred:
        gate: defer.Deferred = defer.Deferred()
        self.hashing.append((function, gate))
        return gate.addCallback(lambda _: function(*args))

    def finish_hashing(self) -> None:
        while self.hashing:
            self.hashing.pop(0)[1].callback(None)

    def test_register(self) -> None:
        connection = self.connect()
        stream, transport, _ = connection
        stream.dataReceived(register_iq("set", fields("bob", "pw")).encode())
        self.assertEqual(transport.value(), b"")
        self.assertEqual([function for function, _ in self.hashing], [derive_all])
        # While the keys are derived, the same connection cannot start another account.
        refused = self.request(connection, register_iq("set", fields("carol", "pw")))
        self.assertEqual(error_condition(refused), "not-acceptable")
        self.finish_hashing()
        self.assertEqual(parse(transport.value().decode())["type"], "result")
        self.assertTrue(self.password_of("bob", "pw"))
        self.assertFalse(self.successResultOf(self.accounts.account_exists("localhost", "carol")))

    def test_change_password(self) -> None:
        alice = self.bind("alice@localhost/desk")
        self.assertIsNone(send(self.router, alice, register_iq("set", fields("alice", "new"))))
        self.assertEqual([function for function, _ in self.hashing], [derive_all])
        self.finish_hashing()
        self.assertEqual(alice.last()["type"], "result")
        self.assertTrue(self.password_of("alice", "new"))


class AfterAuthenticationTests(RegistrationTestCase):
    def setUp(self) -> None:
        super().setUp()
        self.alice = self.bind("alice@localhost/desk")

    def test_get_shows_the_registration(self) -> None:
        result = send(self.router, self.alice, register_iq("get"))
        query = next(result.elements(NS_REGISTER, "query"))
        self.assertIsNotNone(next(query.elements(NS_REGISTER, "registered"), None))
        self.assertEqual(str(next(query.elements(NS_REGISTER, "username"))), "alice")

    def test_change_password(self) -> None:
        # Without 'to' (§3.3 example), to the own bare JID, or to the server.
        for number, to in enumerate((None, "alice@localhost", "localhost")):
            body = fields("alice", f"new{number}")
            result = send(self.router, self.alice, register_iq("set", body, to))
            self.assertEqual(result["type"], "result", to)
            self.assertTrue(self.password_of("alice", f"new{number}"))

    def test_change_password_needs_encryption(self) -> None:
        plain = self.bind("alice@localhost/plain", secure=False)
        result = send(self.router, plain, register_iq("set", fields("alice", "new")))
        self.assertEqual(error_condition(result), "not-authorized")
        self.assertTrue(self.password_of("alice", "old"))

    def test_empty_password_keeps_the_old_one(self) -> None:
        result = send(self.router, self.alice, register_iq("set", fields("alice", "")))
        self.assertEqual(error_condition(result), "bad-request")
        self.assertTrue(self.password_of("alice", "old"))

    def test_someone_elses_username(self) -> None:
        result = send(self.router, self.alice, register_iq("set", fields("bob", "new")))
        self.assertEqual(error_condition(result), "bad-request")
        self.assertNotIn("new", result.toXml())

    def test_another_account_or_domain(self) -> None:
        for to in ("bob@localhost", "example.org"):
            result = send(self.router, self.alice, register_iq("set", fields("alice", "new"), to))
            self.assertEqual(error_condition(result), "service-unavailable", to)
        self.assertTrue(self.password_of("alice", "old"))

    def test_cancel(self) -> None:
        phone = self.bind("alice@localhost/phone")
        result = send(self.router, self.alice, register_iq("set", "<remove/>"))
        self.assertEqual(result["type"], "result")
        self.assertFalse(self.successResultOf(self.accounts.account_exists("localhost", "alice")))
        # The result goes out first; then every session of the account is closed.
        self.assertEqual(self.alice.stream_errors, [])
        self.clock.advance(0)
        self.assertEqual(self.alice.stream_errors, ["not-authorized"])
        self.assertEqual(phone.stream_errors, ["not-authorized"])

    def test_cancel_with_other_elements(self) -> None:
        result = send(
            self.router, self.alice, register_iq("set", "<remove/><username>alice</username>")
        )
        self.assertEqual(error_condition(result), "bad-request")
        self.assertTrue(self.successResultOf(self.accounts.account_exists("localhost", "alice")))

    def test_cancel_an_account_already_gone(self) -> None:
        self.successResultOf(self.accounts.remove_account("localhost", "alice"))
        result = send(self.router, self.alice, register_iq("set", "<remove/>"))
        self.assertEqual(error_condition(result), "registration-required")
