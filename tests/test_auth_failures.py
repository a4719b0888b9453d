"""Failed-login budgets on the stream: SASL answers across connections, and the log line."""

import base64
import os
import re
import xml.etree.ElementTree as ET

from twisted.internet import defer
from twisted.internet.address import IPv4Address, UNIXAddress
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.logger import Logger, formatEvent
from twisted.trial import unittest

from mim_twisted.auth.scram import derive_all
from mim_twisted.auth.throttle import FailureBudgetSettings
from mim_twisted.config import ConfigError, load_config
from mim_twisted.storage.memory import MemoryDatabase
from mim_twisted.tap import build_im_core, failure_budget_settings
from mim_twisted.xmpp.c2s import C2SFactory, C2SSettings
from mim_twisted.xmpp.sasl import negotiation, plain

SASL = "urn:ietf:params:xml:ns:xmpp-sasl"
STREAMS = "http://etherx.jabber.org/streams"
HEADER = (
    b"<?xml version='1.0'?><stream:stream xmlns='jabber:client' "
    b"xmlns:stream='http://etherx.jabber.org/streams' to='localhost' version='1.0'>"
)
README = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "README.md")


def fail2ban_regex() -> str:
    """README's fail2ban failregex, with <HOST> as fail2ban expands it (roughly) for IPv4."""
    with open(README) as f:
        line = next(line for line in f if line.startswith("failregex = "))
    return line.removeprefix("failregex = ").strip().replace("<HOST>", r"(?P<host>[\d.]+)")


def plain_auth(user: str, password: str) -> bytes:
    token = base64.b64encode(f"\0{user}\0{password}".encode()).decode()
    return f"<auth xmlns='{SASL}' mechanism='PLAIN'>{token}</auth>".encode()


def top_level_elements(data: bytes) -> list[ET.Element]:
    """The elements the server wrote after its stream header, parsed namespace-aware."""
    parser = ET.XMLPullParser(events=("start", "end"))
    parser.feed(b"<stream:stream xmlns='jabber:client' xmlns:stream='%s'>" % STREAMS.encode())
    parser.feed(data.split(b"</stream:stream>")[0])
    depth, elements = 0, []
    for event, element in parser.read_events():
        depth += 1 if event == "start" else -1
        if event == "end" and depth == 1:
            elements.append(element)
    return elements


class AuthFailureBudgetStreamTests(unittest.TestCase):
    def setUp(self) -> None:
        self.hashes = 0
        self.held: list[defer.Deferred] | None = None
        self.patch(plain, "run_hash", self.run_hash)
        self.logged: list[str] = []
        self.patch(negotiation, "log", Logger(observer=self.collect_log))
        self.clock = Clock()
        database = MemoryDatabase()
        for user in ("alice", "bob"):
            self.successResultOf(
                database.accounts.create_account("localhost", user, derive_all("secret"))
            )
        core = build_im_core(load_config(None), database, self.clock)
        self.factory = C2SFactory(
            C2SSettings(
                domains=frozenset({"localhost"}),
                tls_options=None,
                starttls_required=False,
                mechanisms=("PLAIN",),
                allow_plain_without_tls=True,
                max_failures=3,
                failure_delay=0.0,
                max_stanza_size=4096,
                auth_timeout=30.0,
                max_outgoing_buffer=65536,
                failure_budget=FailureBudgetSettings(
                    address_failures=4, account_failures=3, window=60.0
                ),
            ),
            accounts=database.accounts,
            im=core.router,
            clock=self.clock,
        )

    def run_hash(self, function, *args) -> defer.Deferred:
        self.hashes += 1
        if self.held is None:
            return defer.maybeDeferred(function, *args)
        result = defer.Deferred()
        self.held.append(result)
        return result.addCallback(lambda _: function(*args))

    def collect_log(self, event: dict) -> None:
        self.logged.append(formatEvent(event))

    def attempt(self, user: str, password: str, host: str | None = "192.0.2.1") -> str:
        """Log in on a new connection from ``host``; the SASL answer as a qualified name, with
        the condition for a failure: "{ns}success" or "{ns}failure/{ns}not-authorized"."""
        transport = self.send_auth(user, password, host)
        return self.answer(transport)

    def send_auth(self, user: str, password: str, host: str | None) -> StringTransport:
        """None: from a UNIX socket's client."""
        stream = self.factory.buildProtocol(None)
        peer = UNIXAddress(None) if host is None else IPv4Address("TCP", host, 40000)
        transport = StringTransport(peerAddress=peer)
        stream.makeConnection(transport)
        stream.dataReceived(HEADER)
        transport.clear()
        stream.dataReceived(plain_auth(user, password))
        return transport

    def answer(self, transport: StringTransport) -> str:
        answer = top_level_elements(transport.value())[0]
        if answer.tag == f"{{{SASL}}}failure":
            return f"{answer.tag}/{answer[0].tag}"
        return answer.tag

    def test_unix_socket_clients_share_no_address_budget(self) -> None:
        not_authorized = f"{{{SASL}}}failure/{{{SASL}}}not-authorized"
        for user in ("bob", "carol", "dave", "erin", "frank", "bob"):
            self.assertEqual(self.attempt(user, "wrong", None), not_authorized)
        self.assertEqual(self.attempt("alice", "secret", None), f"{{{SASL}}}success")
        # The account budget (3) still counts their failures.
        self.assertEqual(self.attempt("bob", "wrong", None), not_authorized)
        self.assertEqual(
            self.attempt("bob", "secret", None),
            f"{{{SASL}}}failure/{{{SASL}}}temporary-auth-failure",
        )

    def test_failures_over_several_connections_spend_the_address_budget(self) -> None:
        # Other accounts' budgets (3) are not spent: this is the address's (4).
        for user in ("alice", "bob", "carol", "dave"):
            self.assertEqual(
                self.attempt(user, "wrong"), f"{{{SASL}}}failure/{{{SASL}}}not-authorized"
            )
        # Even the right password, and without checking it.
        hashes = self.hashes
        self.assertEqual(
            self.attempt("alice", "secret"), f"{{{SASL}}}failure/{{{SASL}}}temporary-auth-failure"
        )
        self.assertEqual(self.hashes, hashes)
        # Another address is not concerned.
        self.assertEqual(self.attempt("alice", "secret", "192.0.2.2"), f"{{{SASL}}}success")
        # After the window the address may log in again.
        self.clock.advance(60)
        self.assertEqual(self.attempt("alice", "secret"), f"{{{SASL}}}success")

    def test_spent_account_refuses_only_the_addresses_that_failed_on_it(self) -> None:
        for host in ("198.51.100.1", "198.51.100.2", "198.51.100.3"):
            self.attempt("alice", "wrong", host)
        refused = f"{{{SASL}}}failure/{{{SASL}}}temporary-auth-failure"
        self.assertEqual(self.attempt("alice", "secret", "198.51.100.1"), refused)
        self.assertEqual(self.attempt("alice", "wrong", "198.51.100.1"), refused)
        self.assertEqual(self.attempt("bob", "secret", "198.51.100.1"), f"{{{SASL}}}success")
        self.assertEqual(self.attempt("alice", "secret", "192.0.2.9"), f"{{{SASL}}}success")

    def test_attempts_in_flight_when_the_budget_is_spent_are_refused_alike(self) -> None:
        self.held = []
        wrong = [self.send_auth(user, "wrong", "192.0.2.1") for user in ("a", "b", "c", "d")]
        right = self.send_auth("alice", "secret", "192.0.2.1")
        last_wrong = self.send_auth("alice", "wrong", "192.0.2.1")
        for held in self.held:
            held.callback(None)
        not_authorized = f"{{{SASL}}}failure/{{{SASL}}}not-authorized"
        refused = f"{{{SASL}}}failure/{{{SASL}}}temporary-auth-failure"
        self.assertEqual([self.answer(t) for t in wrong], [not_authorized] * 4)
        self.assertEqual(self.answer(right), refused)
        self.assertEqual(self.answer(last_wrong), refused)

    def test_each_failure_is_one_line_for_fail2ban(self) -> None:
        regex = fail2ban_regex()
        self.attempt("Alice", "wrong")
        for _ in range(4):
            self.attempt("bob", "wrong")
        failures = [line for line in self.logged if re.search(regex, line)]
        self.assertEqual(len(failures), 5)
        self.assertTrue(
            failures[0].startswith(
                "SASL authentication failed for user alice@localhost from 192.0.2.1: not-authorized"
            ),
            failures[0],
        )
        refused = self.attempt("bob", "secret")
        self.assertTrue(refused.endswith("temporary-auth-failure"))
        self.assertRegex(
            self.logged[-1],
            "^SASL authentication failed for user - from 192.0.2.1: temporary-auth-failure",
        )
        self.assertEqual(re.search(regex, self.logged[-1])["host"], "192.0.2.1")

    def test_malformed_names_are_counted_but_not_logged_as_accounts(self) -> None:
        self.attempt("a b\nSASL authentication failed for user x from 203.0.113.1", "wrong")
        self.assertRegex(self.logged[-1], "^SASL authentication failed for user - from 192.0.2.1: ")
        self.assertFalse([line for line in self.logged if "203.0.113.1" in line])


class FailureBudgetConfigTests(unittest.TestCase):
    def load(self, auth: str):
        path = self.mktemp()
        with open(path, "w") as f:
            f.write(f"[auth]\n{auth}\n")
        return load_config(path)

    def test_defaults(self) -> None:
        self.assertEqual(failure_budget_settings(load_config(None)), FailureBudgetSettings())

    def test_keys_reach_the_budget(self) -> None:
        config = self.load(
            "address_failure_budget = 0\naccount_failure_budget = 5\nfailure_window = 30"
        )
        self.assertEqual(
            failure_budget_settings(config),
            FailureBudgetSettings(address_failures=0, account_failures=5, window=30.0),
        )

    def test_bad_values_name_the_file_and_key(self) -> None:
        for auth, key in (
            ("address_failure_budget = -1", "auth.address_failure_budget"),
            ("account_failure_budget = 1.5", "auth.account_failure_budget"),
            ("failure_window = 0", "auth.failure_window"),
        ):
            error = self.assertRaises(ConfigError, self.load, auth)
            self.assertIn(f": {key}: must be", str(error))
            self.assertNotIn("\n", str(error))
