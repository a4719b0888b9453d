"""The SASL mechanisms against the memory account store, with clients computed in the tests."""

import threading

from twisted.internet import defer
from twisted.logger import Logger
from twisted.trial import unittest
from zope.interface.verify import verifyObject

from mim_twisted.auth.errors import SaslError
from mim_twisted.auth.scram import derive_all, derive_credentials
from mim_twisted.extensions import ServerRegistry
from mim_twisted.storage.memory import MemoryDatabase
from mim_twisted.xmpp import sasl
from mim_twisted.xmpp.sasl import mechanism as mechanism_module
from mim_twisted.xmpp.sasl import mechanism_factory, plain
from mim_twisted.xmpp.sasl.mechanism import Challenge, ISaslMechanism, SaslContext, Success
from mim_twisted.xmpp.sasl.plain import PlainMechanism
from tests.test_scram import client_final

DOMAIN = "example.org"


def synchronously(function, *args) -> defer.Deferred:
    """A password-hash runner for tests without a reactor: in this thread, at once."""
    return defer.maybeDeferred(function, *args)


class MechanismTestMixin:
    def setUp(self) -> None:
        self.patch(plain, "run_hash", synchronously)
        self.accounts = MemoryDatabase().accounts
        self.successResultOf(self.accounts.create_account(DOMAIN, "alice", derive_all("secret")))

    def mechanism(self, name: str):
        return mechanism_factory(name, SaslContext(DOMAIN, self.accounts, secure=True))

    def assertFails(self, deferred, condition: str) -> SaslError:
        error = self.failureResultOf(deferred, SaslError).value
        self.assertEqual(error.condition, condition)
        return error


class FactoryTests(MechanismTestMixin, unittest.TestCase):
    def test_builtin_mechanisms(self) -> None:
        self.assertEqual(
            set(sasl.BUILTIN_MECHANISMS), {"EXTERNAL", "SCRAM-SHA-256", "SCRAM-SHA-1", "PLAIN"}
        )
        for name in sasl.BUILTIN_MECHANISMS:
            mechanism = self.mechanism(name)
            self.assertTrue(verifyObject(ISaslMechanism, mechanism))
            self.assertEqual(mechanism.name, name)

    def test_each_attempt_gets_a_new_mechanism(self) -> None:
        self.assertIsNot(self.mechanism("PLAIN"), self.mechanism("PLAIN"))

    def test_unknown_mechanism(self) -> None:
        error = self.assertRaises(SaslError, self.mechanism, "DIGEST-MD5")
        self.assertEqual(error.condition, "invalid-mechanism")

    def test_a_server_registry_is_extensible(self) -> None:
        class TestMechanism(PlainMechanism):
            name = "X-TEST"

        registry = ServerRegistry()
        registry.add_sasl_mechanism(TestMechanism)
        context = SaslContext(DOMAIN, self.accounts, secure=True)
        self.assertIsInstance(registry.create_sasl_mechanism("X-TEST", context), TestMechanism)
        # Only that server's: the built-in table and other servers' registries stay as they were.
        self.assertRaises(SaslError, ServerRegistry().create_sasl_mechanism, "X-TEST", context)
        self.assertRaises(SaslError, self.mechanism, "X-TEST")

    def test_mechanism_names_are_unique(self) -> None:
        self.assertRaises(ValueError, ServerRegistry().add_sasl_mechanism, PlainMechanism)

    def test_a_mechanism_implements_the_interface(self) -> None:
        self.assertRaises(TypeError, ServerRegistry().add_sasl_mechanism, object)


class ScramMechanismTestMixin(MechanismTestMixin):
    name: str

    def client_first(self, mechanism, client_first: bytes) -> bytes:
        """Send client_first; the server-first-message the mechanism answers with."""
        result = self.successResultOf(mechanism.start(client_first))
        self.assertIsInstance(result, Challenge)
        return result.data

    def login(self, client_first: bytes, password: str = "secret", gs2_header: bytes = b"n,,"):
        """A whole exchange; the mechanism's last Deferred and the server-final a client expects."""
        mechanism = self.mechanism(self.name)
        server_first = self.client_first(mechanism, client_first)
        bare = client_first[len(gs2_header) :]
        final, server_final = client_final(self.name, password, bare, server_first, gs2_header)
        return mechanism.respond(final), server_final

    def test_success(self) -> None:
        result, server_final = self.login(b"n,,n=alice,r=abcdef")
        self.assertEqual(self.successResultOf(result), Success("alice", None, server_final))

    def test_username_nodeprepped(self) -> None:
        result, server_final = self.login(b"n,,n=Alice,r=abcdef")
        self.assertEqual(self.successResultOf(result), Success("alice", None, server_final))

    def test_authzid_returned_as_sent(self) -> None:
        header = b"n,a=Alice@example.org,"
        result, _ = self.login(header + b"n=alice,r=abcdef", gs2_header=header)
        self.assertEqual(self.successResultOf(result).authzid, "Alice@example.org")

    def test_no_initial_response(self) -> None:
        mechanism = self.mechanism(self.name)
        for initial in (None, b""):
            self.assertEqual(self.successResultOf(mechanism.start(initial)), Challenge(b""))
        challenge = self.successResultOf(mechanism.respond(b"n,,n=alice,r=abcdef"))
        self.assertTrue(challenge.data.startswith(b"r=abcdef"))

    def test_wrong_password(self) -> None:
        result, _ = self.login(b"n,,n=alice,r=abcdef", password="wrong")
        self.assertFails(result, "not-authorized")

    def test_unknown_user_fails_at_the_end(self) -> None:
        result, _ = self.login(b"n,,n=bob,r=abcdef")
        self.assertFails(result, "not-authorized")

    def test_unknown_user_salt_stable_across_spellings(self) -> None:
        def salt_and_iterations(client_first: bytes) -> bytes:
            server_first = self.client_first(self.mechanism(self.name), client_first)
            return server_first.split(b",", 1)[1]

        self.assertEqual(
            salt_and_iterations(b"n,,n=bob,r=abc"), salt_and_iterations(b"n,,n=BOB,r=xyz")
        )

    def test_unknown_user_gets_the_configured_iteration_count(self) -> None:
        context = SaslContext(DOMAIN, self.accounts, secure=True, scram_iterations=10000)
        mechanism = mechanism_factory(self.name, context)
        server_first = self.client_first(mechanism, b"n,,n=bob,r=abc")
        self.assertTrue(server_first.endswith(b",i=10000"), server_first)

    def test_username_failing_nodeprep(self) -> None:
        mechanism = self.mechanism(self.name)
        self.assertFails(mechanism.start(b"n,,n=alice@example.org,r=abc"), "not-authorized")

    def test_malformed_client_first(self) -> None:
        self.assertFails(self.mechanism(self.name).start(b"n,,r=abc"), "malformed-request")

    def test_response_after_success(self) -> None:
        mechanism = self.mechanism(self.name)
        server_first = self.client_first(mechanism, b"n,,n=alice,r=abcdef")
        final, _ = client_final(self.name, "secret", b"n=alice,r=abcdef", server_first)
        self.successResultOf(mechanism.respond(final))
        self.assertFails(mechanism.respond(final), "malformed-request")

    def test_unreadable_stored_credentials(self) -> None:
        events: list[dict] = []
        self.patch(mechanism_module, "log", Logger(observer=events.append))
        broken = {"SCRAM-SHA-1": "garbage", "SCRAM-SHA-256": "garbage"}
        self.successResultOf(self.accounts.create_account(DOMAIN, "carol", broken))
        start = self.mechanism(self.name).start(b"n,,n=carol,r=abc")
        self.assertFails(start, "temporary-auth-failure")
        self.assertEqual([event["username"] for event in events], ["carol"])


class ScramSha256MechanismTests(ScramMechanismTestMixin, unittest.TestCase):
    name = "SCRAM-SHA-256"


class ScramSha1MechanismTests(ScramMechanismTestMixin, unittest.TestCase):
    name = "SCRAM-SHA-1"


class PlainMechanismTests(MechanismTestMixin, unittest.TestCase):
    def authenticate(self, message: bytes):
        return self.mechanism("PLAIN").start(message)

    def test_success(self) -> None:
        result = self.successResultOf(self.authenticate(b"\0alice\0secret"))
        self.assertEqual(result, Success("alice", None, None))

    def test_username_nodeprepped_and_password_saslprepped(self) -> None:
        self.successResultOf(self.accounts.set_credentials(DOMAIN, "alice", derive_all("IX")))
        result = self.authenticate("\0Alice\0I\u00adX".encode())
        self.assertEqual(self.successResultOf(result).username, "alice")

    def test_authzid_returned_as_sent(self) -> None:
        result = self.successResultOf(self.authenticate(b"Alice@example.org\0alice\0secret"))
        self.assertEqual(result.authzid, "Alice@example.org")

    def test_no_initial_response(self) -> None:
        mechanism = self.mechanism("PLAIN")
        self.assertEqual(self.successResultOf(mechanism.start(None)), Challenge(b""))
        result = self.successResultOf(mechanism.respond(b"\0alice\0secret"))
        self.assertEqual(result.username, "alice")

    def test_wrong_password(self) -> None:
        self.assertFails(self.authenticate(b"\0alice\0Secret"), "not-authorized")

    def test_unknown_user(self) -> None:
        self.assertFails(self.authenticate(b"\0bob\0secret"), "not-authorized")

    def test_username_failing_nodeprep(self) -> None:
        self.assertFails(self.authenticate(b"\0alice@example.org\0secret"), "not-authorized")
        self.assertFails(self.authenticate(b"\0al\x07ice\0secret"), "not-authorized")

    def test_malformed(self) -> None:
        for message in [
            b"alice",
            b"alice\0secret",
            b"\0alice\0secret\0",
            b"\0\0secret",
            b"\0alice\0",
            b"\0al\xffice\0secret",
        ]:
            self.assertFails(self.authenticate(message), "malformed-request")

    def test_sha1_only_account(self) -> None:
        credentials = {"SCRAM-SHA-1": derive_credentials("SCRAM-SHA-1", "old").to_text()}
        self.successResultOf(self.accounts.create_account(DOMAIN, "dave", credentials))
        self.successResultOf(self.authenticate(b"\0dave\0old"))

    def test_unreadable_stored_credentials(self) -> None:
        self.patch(mechanism_module, "log", Logger(observer=lambda event: None))
        broken = {"SCRAM-SHA-1": "garbage", "SCRAM-SHA-256": "v1,garbage"}
        self.successResultOf(self.accounts.create_account(DOMAIN, "carol", broken))
        self.assertFails(self.authenticate(b"\0carol\0secret"), "temporary-auth-failure")

    def test_the_hash_is_handed_to_the_runner(self) -> None:
        # Known and unknown accounts alike: the PBKDF2 runs wherever run_hash puts it.
        started: list[tuple] = []

        def held(function, *args) -> defer.Deferred:
            started.append((function, defer.Deferred()))
            return started[-1][1].addCallback(lambda _: function(*args))

        self.patch(plain, "run_hash", held)
        known, unknown = self.authenticate(b"\0alice\0secret"), self.authenticate(b"\0bob\0x")
        self.assertEqual([function for function, _ in started], [plain.verify_password] * 2)
        self.assertNoResult(known)
        self.assertNoResult(unknown)
        for _, gate in started:
            gate.callback(None)
        self.assertEqual(self.successResultOf(known).username, "alice")
        self.assertFails(unknown, "not-authorized")


class HashInThreadTests(unittest.TestCase):
    def setUp(self) -> None:
        self.patch(plain, "_hashing", defer.DeferredSemaphore(plain.MAX_CONCURRENT_HASHES))

    async def test_runs_in_another_thread(self) -> None:
        self.assertNotEqual(await plain.hash_in_thread(threading.get_ident), threading.get_ident())

    def test_concurrent_hashes_are_bounded(self) -> None:
        running: list[defer.Deferred] = []

        def thread(function, *args) -> defer.Deferred:
            running.append(defer.Deferred().addCallback(lambda _: function(*args)))
            return running[-1]

        self.patch(plain, "deferToThread", thread)
        results = [plain.hash_in_thread(str, n) for n in range(plain.MAX_CONCURRENT_HASHES + 2)]
        self.assertEqual(len(running), plain.MAX_CONCURRENT_HASHES)
        running[0].callback(None)
        self.assertEqual(len(running), plain.MAX_CONCURRENT_HASHES + 1)
        for index in range(1, len(results)):  # each one ending lets a waiting one start
            running[index].callback(None)
        self.assertEqual([self.successResultOf(r) for r in results], ["0", "1", "2", "3", "4", "5"])
