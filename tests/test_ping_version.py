"""XEP-0199 ping and XEP-0092 software version of the server, through a real Router."""

from twisted.internet.task import Clock
from twisted.trial import unittest

import mim_twisted
from mim_twisted.im import ping, version
from mim_twisted.im.disco import DiscoService
from mim_twisted.im.sessions import SessionManager
from mim_twisted.storage.memory import MemoryDatabase
from tests.imsupport import FakeSession, error_condition, make_router, send

PING = f"<ping xmlns='{ping.NS_PING}'/>"


class ServerTestCase(unittest.TestCase):
    def setUp(self) -> None:
        self.sessions = SessionManager()
        self.router = make_router(self.sessions, Clock())
        self.disco = DiscoService(MemoryDatabase().accounts)
        ping.install(self.router, self.disco)
        version.install(self.router, self.disco)
        self.alice = FakeSession("alice@localhost/desk")
        self.bob = FakeSession("bob@localhost/phone")
        self.sessions.bind(self.alice)
        self.sessions.bind(self.bob)

    def iq(self, payload: str, to: str | None = None, kind: str = "get"):
        address = f" to='{to}'" if to else ""
        return send(self.router, self.alice, f"<iq type='{kind}' id='p1'{address}>{payload}</iq>")


class PingTests(ServerTestCase):
    def assertEmptyResult(self, result, sender: str | None) -> None:
        self.assertEqual(result["type"], "result")
        self.assertEqual(result["id"], "p1")
        self.assertEqual(result.getAttribute("from"), sender)
        self.assertEqual(list(result.elements()), [])

    def test_ping_the_server(self) -> None:
        self.assertEmptyResult(self.iq(PING, "localhost"), "localhost")
        self.assertEmptyResult(self.iq(PING, "example.org"), "example.org")

    def test_ping_without_to(self) -> None:
        self.assertEmptyResult(self.iq(PING), None)

    def test_ping_own_bare_jid(self) -> None:
        self.assertEmptyResult(self.iq(PING, "alice@localhost"), "alice@localhost")

    def test_ping_another_bare_jid_is_not_answered_for(self) -> None:
        self.assertEqual(error_condition(self.iq(PING, "bob@localhost")), "service-unavailable")

    def test_ping_to_a_full_jid_reaches_the_client(self) -> None:
        self.assertIsNone(self.iq(PING, "bob@localhost/phone"))
        self.assertEqual(self.bob.last()["from"], "alice@localhost/desk")

    def test_set_is_not_allowed(self) -> None:
        self.assertEqual(error_condition(self.iq(PING, "localhost", "set")), "not-allowed")

    def test_advertised(self) -> None:
        self.assertIn(ping.NS_PING, self.disco.server_info().features)


class VersionTests(ServerTestCase):
    def test_name_and_version_without_os(self) -> None:
        result = self.iq(f"<query xmlns='{version.NS_VERSION}'/>", "localhost")
        self.assertEqual(result["type"], "result")
        query = next(result.elements(version.NS_VERSION, "query"))
        fields = {child.name: str(child) for child in query.elements()}
        self.assertEqual(fields, {"name": "mim-twisted", "version": mim_twisted.__version__})

    def test_set_is_not_allowed(self) -> None:
        result = self.iq(f"<query xmlns='{version.NS_VERSION}'/>", "localhost", "set")
        self.assertEqual(error_condition(result), "not-allowed")

    def test_not_answered_for_accounts(self) -> None:
        result = self.iq(f"<query xmlns='{version.NS_VERSION}'/>", "bob@localhost")
        self.assertEqual(error_condition(result), "service-unavailable")

    def test_advertised(self) -> None:
        self.assertIn(version.NS_VERSION, self.disco.server_info().features)
