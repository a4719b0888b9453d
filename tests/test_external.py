"""SASL EXTERNAL with client certificates: the TLS policy, the mechanism, and the stream.

TLS handshakes run in memory (pyOpenSSL memory BIOs), streams on a StringTransport; the
end-to-end tests in tests/e2e/test_external.py do the same over real sockets with slixmpp.
"""

import base64
import os

from OpenSSL import SSL, crypto
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.logger import Logger
from twisted.trial import unittest
from zope.interface.verify import verifyObject

from mim_twisted.auth.certs import CertificateIdentities, ExternalSettings
from mim_twisted.auth.errors import SaslError
from mim_twisted.auth.scram import derive_all
from mim_twisted.config import load_config
from mim_twisted.storage.memory import MemoryDatabase
from mim_twisted.tap import build_im_core
from mim_twisted.xmpp import tls
from mim_twisted.xmpp.c2s import C2SFactory, C2SSettings
from mim_twisted.xmpp.sasl import external, mechanism_factory, plain
from mim_twisted.xmpp.sasl.mechanism import Challenge, ISaslMechanism, SaslContext, Success
from tests import certfactory
from tests.certfactory import Authority, Issued
from tests.test_c2s_stream import HEADER, bind_request, plain_auth
from tests.test_sasl_mechanisms import synchronously
from tests.wire import STREAM_FEATURES, parse_server_output

# -- TLS in memory ---------------------------------------------------------------------------


class _TLSProtocol:
    """What Twisted's connection creators read from the TLS protocol (ALPN lookup)."""

    class factory:  # noqa: N801
        wrappedFactory = None


def handshake(check: tls.ClientCertificateCheck, client: Issued | None) -> bool:
    """Run a TLS handshake between ``check`` and a client presenting ``client``; whether the
    server side completed it."""
    server = check.serverConnectionForTLS(_TLSProtocol())
    server.set_accept_state()
    context = SSL.Context(SSL.TLS_CLIENT_METHOD)
    if client is not None:
        context.use_certificate(crypto.X509.from_cryptography(client.certificate))
        context.use_privatekey(crypto.PKey.from_cryptography_key(client.key))
    connection = SSL.Connection(context)
    connection.set_connect_state()
    server_done = False
    for _ in range(10):
        for side, other in ((connection, server), (server, connection)):
            try:
                side.do_handshake()
                if side is server:
                    server_done = True
            except SSL.WantReadError:
                pass
            except SSL.Error:
                if side is server:
                    return False
            try:
                other.bio_write(side.bio_read(65536))
            except SSL.WantReadError:
                pass
        if server_done:
            return True
    return server_done


class TLSTestMixin:
    def setUp(self) -> None:
        directory = os.path.abspath(self.mktemp())
        self.server_pem = os.path.join(directory, "server.pem")
        tls.generate_self_signed(self.server_pem, ["localhost"])
        self.ca = Authority()
        self.ca_pem = self.ca.write_pem(directory)

    def options(self, client_ca: bool = True):
        return tls.server_tls_options(
            self.server_pem, self.server_pem, [self.ca_pem] if client_ca else []
        )


class ClientCertificateCheckTests(TLSTestMixin, unittest.TestCase):
    """Which certificates pass, and what each policy does with those that don't."""

    def check(self, client: Issued | None, **policy) -> tuple[tls.ClientCertificateCheck, bool]:
        options = self.options(policy.pop("client_ca", True))
        check = tls.ClientCertificateCheck(options, tls.ClientCertificatePolicy(**policy))
        return check, handshake(check, client)

    def assertVerified(self, client: Issued, **policy) -> None:
        check, completed = self.check(client, **policy)
        self.assertTrue(completed)
        self.assertEqual(check.verified_certificate, client.certificate)
        self.assertIsNone(check.problem)
        self.assertFalse(check.rejected)

    def assertUnverified(self, client: Issued | None, problem: str, **policy) -> None:
        """With "no_external": the handshake completes without a usable certificate.
        With "disconnect": a presented certificate aborts the handshake."""
        check, completed = self.check(client, **policy)
        self.assertTrue(completed)
        self.assertIsNone(check.verified_certificate)
        self.assertIn(problem, check.problem)
        if client is not None:
            check, completed = self.check(client, disconnect_on_failure=True, **policy)
            self.assertFalse(completed)
            self.assertTrue(check.rejected)
            self.assertIn(problem, check.problem)

    def test_provides_the_connection_creator_interface(self) -> None:
        check = tls.ClientCertificateCheck(self.options(), tls.ClientCertificatePolicy())
        from twisted.internet.interfaces import IOpenSSLServerConnectionCreator

        self.assertTrue(verifyObject(IOpenSSLServerConnectionCreator, check))

    def test_ca_signed(self) -> None:
        self.assertVerified(self.ca.issue("bob", ["bob@localhost"]))
        self.assertVerified(self.ca.issue("bob", ["bob@localhost"]), disconnect_on_failure=True)

    def test_no_certificate_is_fine_with_either_policy(self) -> None:
        self.assertUnverified(None, "no client certificate")
        check, completed = self.check(None, disconnect_on_failure=True)
        self.assertTrue(completed)
        self.assertFalse(check.rejected)

    def test_expired(self) -> None:
        self.assertUnverified(self.ca.issue("bob", validity=certfactory.EXPIRED), "expired")

    def test_not_yet_valid(self) -> None:
        client = self.ca.issue("bob", validity=certfactory.NOT_YET_VALID)
        self.assertUnverified(client, "not yet valid")

    def test_untrusted_authority(self) -> None:
        client = Authority("Someone Else's CA").issue("bob", ["bob@localhost"])
        self.assertUnverified(client, "untrusted authority")

    def test_self_signed_refused_by_default(self) -> None:
        self.assertUnverified(certfactory.self_signed("bob", ["bob@localhost"]), "self-signed")

    def test_self_signed_allowed(self) -> None:
        client = certfactory.self_signed("bob", ["bob@localhost"])
        self.assertVerified(client, allow_self_signed=True)
        self.assertVerified(client, allow_self_signed=True, client_ca=False)

    def test_self_signed_allowed_dates_still_checked(self) -> None:
        client = certfactory.self_signed("bob", validity=certfactory.EXPIRED)
        self.assertUnverified(client, "expired", allow_self_signed=True)

    def test_self_signed_allowance_is_not_for_unknown_issuers(self) -> None:
        client = Authority("Someone Else's CA").issue("bob", ["bob@localhost"])
        self.assertUnverified(client, "untrusted authority", allow_self_signed=True)


# -- the mechanism ---------------------------------------------------------------------------

DOMAIN = "localhost"


class ExternalMechanismTests(unittest.TestCase):
    def setUp(self) -> None:
        self.accounts = MemoryDatabase().accounts
        for user in ("bob", "kate"):
            self.successResultOf(self.accounts.create_account(DOMAIN, user, derive_all("x")))
        self.events: list[dict] = []
        self.patch(external, "log", Logger(observer=self.events.append))

    def mechanism(self, *xmpp_addrs: str, common_name=None, **settings) -> ISaslMechanism:
        identities = CertificateIdentities(xmpp_addrs, common_name)
        context = SaslContext(
            DOMAIN,
            self.accounts,
            secure=True,
            client_identities=identities,
            external=ExternalSettings(**settings),
            peer="127.0.0.1:1234",
        )
        return mechanism_factory("EXTERNAL", context)

    def assertFails(self, deferred, condition: str) -> dict:
        """The attempt fails with ``condition``; returns the logged refusal."""
        error = self.failureResultOf(deferred, SaslError).value
        self.assertEqual(error.condition, condition)
        self.assertTrue(error.text)
        self.assertEqual(self.events[-1]["condition"], condition)
        return self.events[-1]

    def test_provides_the_interface(self) -> None:
        self.assertTrue(verifyObject(ISaslMechanism, self.mechanism("bob@localhost")))

    def test_no_authzid(self) -> None:
        result = self.successResultOf(self.mechanism("bob@localhost").start(b""))
        self.assertEqual(result, Success("bob", None))
        event = self.events[-1]
        self.assertEqual(
            (event["jid"], event["method"], event["authzid"]), ("bob@localhost", "standard", None)
        )
        self.assertEqual(event["peer"], "127.0.0.1:1234")

    def test_no_initial_response_gets_an_empty_challenge(self) -> None:
        mechanism = self.mechanism("kate@localhost", "kate@fed1")
        self.assertEqual(self.successResultOf(mechanism.start(None)), Challenge(b""))
        result = self.successResultOf(mechanism.respond(b"kate@localhost"))
        self.assertEqual(result, Success("kate", None))

    def test_one_message_only(self) -> None:
        mechanism = self.mechanism("bob@localhost")
        self.successResultOf(mechanism.start(b""))
        error = self.failureResultOf(mechanism.respond(b""), SaslError).value
        self.assertEqual(error.condition, "malformed-request")

    def test_authzid_is_checked_here_not_by_the_negotiation(self) -> None:
        # The negotiation compares a returned authzid with the bare JID; a valid authzid with a
        # resource or another spelling must not be refused there.
        result = self.successResultOf(self.mechanism("bob@localhost").start(b"Bob@LocalHost/x"))
        self.assertEqual(result, Success("bob", None))

    def test_refusals_are_logged_with_the_reason(self) -> None:
        event = self.assertFails(
            self.mechanism("kate@localhost", "kate@fed1", common_name="kate").start(b""),
            "invalid-authzid",
        )
        self.assertIn("2 xmppAddrs", event["reason"])
        self.assertEqual(event["xmpp_addrs"], ["kate@localhost", "kate@fed1"])
        self.assertEqual(event["common_name"], "kate")
        event = self.assertFails(
            self.mechanism("bob@localhost").start(b"kate@localhost"), "not-authorized"
        )
        self.assertEqual(event["authzid"], "kate@localhost")

    def test_authzid_not_utf8(self) -> None:
        self.assertFails(self.mechanism("bob@localhost").start(b"\xffbob"), "malformed-request")

    def test_existing_accounts_only(self) -> None:
        event = self.assertFails(self.mechanism("carol@localhost").start(b""), "not-authorized")
        self.assertIn("no account", event["reason"])

    def test_any_account_with_auto(self) -> None:
        mechanism = self.mechanism("carol@localhost", require_account=False)
        self.assertEqual(self.successResultOf(mechanism.start(b"")), Success("carol", None))

    def test_methods_from_the_settings(self) -> None:
        mechanism = self.mechanism(common_name="kate", methods=("standard", "common_name"))
        self.assertEqual(self.successResultOf(mechanism.start(b"")), Success("kate", None))
        self.assertEqual(self.events[-1]["method"], "common_name")
        self.assertFails(self.mechanism(common_name="kate").start(b""), "not-authorized")

    def test_without_certificate(self) -> None:
        context = SaslContext(DOMAIN, self.accounts, secure=True)
        mechanism = mechanism_factory("EXTERNAL", context)
        self.assertFails(mechanism.start(b"bob@localhost"), "not-authorized")


# -- the stream ------------------------------------------------------------------------------

NS_SASL = "urn:ietf:params:xml:ns:xmpp-sasl"
NS_TLS = "urn:ietf:params:xml:ns:xmpp-tls"
NS_BIND = "urn:ietf:params:xml:ns:xmpp-bind"


def mechanisms(data: bytes) -> list[str]:
    """The SASL mechanisms offered by the <stream:features/> that ``data`` ends with."""
    features = parse_server_output(data).elements[-1]
    assert features.tag == STREAM_FEATURES, features.tag
    return [m.text for m in features.iterfind(f"{{{NS_SASL}}}mechanisms/{{{NS_SASL}}}mechanism")]


def sasl_answer(data: bytes) -> tuple[str, str | None, list[str]]:
    """The one SASL element in ``data``: (its qualified name, its text, its children's names)."""
    [element] = parse_server_output(data).elements
    return element.tag, element.text, [child.tag for child in element]


def failure(condition: str) -> tuple[str, None, list[str]]:
    """What `sasl_answer` gives for a <failure/> with the condition and a <text/>."""
    return f"{{{NS_SASL}}}failure", None, [f"{{{NS_SASL}}}{condition}", f"{{{NS_SASL}}}text"]


def auth_external(authzid: str | None = None) -> bytes:
    """<auth/> with the authzid as initial response ("=": none); None: no initial response."""
    if authzid is None:
        payload = b""
    else:
        payload = base64.b64encode(authzid.encode()) if authzid else b"="
    return b"<auth xmlns='urn:ietf:params:xml:ns:xmpp-sasl' mechanism='EXTERNAL'>%s</auth>" % (
        payload
    )


class TLSStringTransport(StringTransport):
    """Records the options STARTTLS was started with; the handshake is run by the test."""

    tls_options = None

    def startTLS(self, options: object) -> None:
        self.tls_options = options


class ExternalStreamTests(TLSTestMixin, unittest.TestCase):
    settings: dict = {}

    def setUp(self) -> None:
        super().setUp()
        # No reactor runs here: PLAIN hashes in this thread instead of a worker thread.
        self.patch(plain, "run_hash", synchronously)
        self.clock = Clock()
        database = MemoryDatabase()
        for user in ("alice", "bob", "kate"):
            self.successResultOf(
                database.accounts.create_account(DOMAIN, user, derive_all("secret"))
            )
        core = build_im_core(load_config(None), database, self.clock)
        values = {
            "domains": frozenset({DOMAIN}),
            "tls_options": self.options(),
            "starttls_required": True,
            "mechanisms": ("EXTERNAL", "SCRAM-SHA-256", "PLAIN"),
            "allow_plain_without_tls": False,
            "max_failures": 3,
            "failure_delay": 0.0,
            "max_stanza_size": 4096,
            "auth_timeout": 30.0,
            "max_outgoing_buffer": 65536,
            "client_certificates": tls.ClientCertificatePolicy(),
            "sasl_external": ExternalSettings(methods=("standard", "common_name")),
        }
        values.update(self.settings)
        self.factory = C2SFactory(
            C2SSettings(**values),
            accounts=database.accounts,
            im=core.router,
            clock=self.clock,
        )

    def read(self, transport: StringTransport) -> bytes:
        data = transport.value()
        transport.clear()
        return data

    def connect(self, client: Issued | None) -> tuple:
        """A stream after STARTTLS with ``client`` presented; returns it, its transport and the
        features offered on the encrypted stream."""
        stream = self.factory.buildProtocol(None)
        transport = TLSStringTransport()
        stream.makeConnection(transport)
        stream.dataReceived(HEADER)
        [features] = parse_server_output(self.read(transport)).elements
        self.assertIsNotNone(features.find(f"{{{NS_TLS}}}starttls/{{{NS_TLS}}}required"))
        stream.dataReceived(b"<starttls xmlns='urn:ietf:params:xml:ns:xmpp-tls'/>")
        self.assertEqual(sasl_answer(self.read(transport)), (f"{{{NS_TLS}}}proceed", None, []))
        self.assertIsInstance(transport.tls_options, tls.ClientCertificateCheck)
        if handshake(transport.tls_options, client):
            stream.handshakeCompleted()
        stream.dataReceived(HEADER)
        return stream, transport, self.read(transport)

    def bind(self, stream, transport) -> str:
        """After a <success/>: restart the stream, bind "desk"; the JID bound."""
        self.assertEqual(sasl_answer(self.read(transport)), (f"{{{NS_SASL}}}success", None, []))
        stream.dataReceived(HEADER)
        self.read(transport)
        stream.dataReceived(bind_request("desk"))
        [result] = parse_server_output(self.read(transport)).elements
        self.assertEqual((result.tag, result.get("type")), ("{jabber:client}iq", "result"))
        return result.findtext(f"{{{NS_BIND}}}bind/{{{NS_BIND}}}jid")

    def test_offered_first_with_a_verified_certificate(self) -> None:
        stream, _, features = self.connect(self.ca.issue("bob", ["bob@localhost"]))
        self.assertEqual(mechanisms(features), ["EXTERNAL", "SCRAM-SHA-256", "PLAIN"])
        self.assertEqual(stream.client_identities.xmpp_addrs, ("bob@localhost",))

    def test_single_xmpp_addr_without_authzid(self) -> None:
        stream, transport, _ = self.connect(self.ca.issue("bob", ["bob@localhost"]))
        stream.dataReceived(auth_external(""))
        self.assertEqual(self.bind(stream, transport), "bob@localhost/desk")

    def test_no_initial_response(self) -> None:
        stream, transport, _ = self.connect(self.ca.issue(None, ["kate@localhost", "kate@fed1"]))
        stream.dataReceived(auth_external())
        self.assertEqual(sasl_answer(self.read(transport)), (f"{{{NS_SASL}}}challenge", "=", []))
        response = base64.b64encode(b"kate@localhost")
        stream.dataReceived(
            b"<response xmlns='urn:ietf:params:xml:ns:xmpp-sasl'>%s</response>" % response
        )
        self.assertEqual(self.bind(stream, transport), "kate@localhost/desk")

    def test_failure_keeps_the_stream_open_for_another_attempt(self) -> None:
        stream, transport, _ = self.connect(self.ca.issue(None, ["kate@localhost", "kate@fed1"]))
        stream.dataReceived(auth_external(""))
        self.assertEqual(sasl_answer(self.read(transport)), failure("invalid-authzid"))
        self.assertFalse(transport.disconnecting)
        stream.dataReceived(auth_external("kate@localhost"))
        self.assertEqual(self.bind(stream, transport), "kate@localhost/desk")

    def test_conditions(self) -> None:
        for client, authzid, condition in [
            (self.ca.issue("bob", ["bob@localhost"]), "alice@localhost", "not-authorized"),
            (self.ca.issue("bob", ["bob@fed1"]), "", "not-authorized"),
            (self.ca.issue("x", ["a@localhost", "b@localhost"]), "", "invalid-authzid"),
            (self.ca.issue("not-mike"), "mike@localhost", "invalid-authzid"),
            (self.ca.issue(None), "", "not-authorized"),
            (self.ca.issue("carol", ["carol@localhost"]), "", "not-authorized"),
        ]:
            stream, transport, _ = self.connect(client)
            stream.dataReceived(auth_external(authzid))
            answer = sasl_answer(self.read(transport))
            self.assertEqual(answer, failure(condition), (client, authzid))
            self.assertIsNone(stream.username)

    def test_common_name(self) -> None:
        stream, transport, _ = self.connect(self.ca.issue("alice"))
        stream.dataReceived(auth_external(""))
        self.assertEqual(self.bind(stream, transport), "alice@localhost/desk")

    def test_without_certificate_not_offered_and_passwords_work(self) -> None:
        stream, transport, features = self.connect(None)
        self.assertNotIn(b"EXTERNAL", features)
        self.assertEqual(mechanisms(features), ["SCRAM-SHA-256", "PLAIN"])
        stream.dataReceived(auth_external(""))
        refusal = self.read(transport)
        self.assertEqual(sasl_answer(refusal), failure("invalid-mechanism"))
        [element] = parse_server_output(refusal).elements
        self.assertIn("needs a verified client certificate", element.findtext(f"{{{NS_SASL}}}text"))
        stream.dataReceived(plain_auth("alice", "secret"))
        self.assertEqual(self.bind(stream, transport), "alice@localhost/desk")

    def test_unverified_certificate_not_offered(self) -> None:
        for client in (
            self.ca.issue("bob", ["bob@localhost"], validity=certfactory.EXPIRED),
            Authority("Other CA").issue("bob", ["bob@localhost"]),
            certfactory.self_signed("bob", ["bob@localhost"]),
        ):
            stream, transport, features = self.connect(client)
            self.assertEqual(mechanisms(features), ["SCRAM-SHA-256", "PLAIN"])
            self.assertNotIn(b"EXTERNAL", features)
            self.assertIsNone(stream.client_identities)
            stream.dataReceived(auth_external(""))
            self.assertEqual(sasl_answer(self.read(transport)), failure("invalid-mechanism"))

    def test_not_offered_before_starttls(self) -> None:
        stream = self.factory.buildProtocol(None)
        transport = TLSStringTransport()
        stream.makeConnection(transport)
        stream.client_identities = CertificateIdentities(("bob@localhost",))
        stream.dataReceived(HEADER)
        features = self.read(transport)
        self.assertNotIn(b"EXTERNAL", features)
        self.assertNotIn("EXTERNAL", mechanisms(features))

    def test_after_authentication_no_more_sasl(self) -> None:
        stream, transport, _ = self.connect(self.ca.issue("bob", ["bob@localhost"]))
        stream.dataReceived(auth_external(""))
        self.bind(stream, transport)
        stream.dataReceived(auth_external(""))
        self.assertEqual(parse_server_output(transport.value()).stream_error(), "policy-violation")


class DisconnectPolicyStreamTests(ExternalStreamTests):
    settings = {"client_certificates": tls.ClientCertificatePolicy(disconnect_on_failure=True)}

    def test_unverified_certificate_not_offered(self) -> None:
        for client in (
            self.ca.issue("bob", ["bob@localhost"], validity=certfactory.EXPIRED),
            certfactory.self_signed("bob", ["bob@localhost"]),
        ):
            stream = self.factory.buildProtocol(None)
            transport = TLSStringTransport()
            stream.makeConnection(transport)
            stream.dataReceived(HEADER + b"<starttls xmlns='urn:ietf:params:xml:ns:xmpp-tls'/>")
            self.assertFalse(handshake(transport.tls_options, client))
            self.assertTrue(transport.tls_options.rejected)
            stream.connectionLost()
