"""The admin socket's protocol on a StringTransport: requests it refuses, and the answers' order.

The commands against a running server are in tests/e2e/test_admin.py.
"""

import json

from twisted.internet import defer
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.trial import unittest

from mim_twisted.admin import AdminCommands, AdminProtocol, probe_storage


class SlowDatabase:
    """A database whose cheap query answers only when the test says so."""

    def __init__(self) -> None:
        self.answers: list[defer.Deferred] = []

    def schema_version(self) -> defer.Deferred:
        self.answers.append(defer.Deferred())
        return self.answers[-1]


class AdminProtocolTests(unittest.TestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.commands = AdminCommands(server=None, clock=self.clock)
        self.protocol = AdminProtocol(self.commands)
        self.transport = StringTransport()
        self.protocol.makeConnection(self.transport)

    def responses(self) -> list[dict]:
        return [json.loads(line) for line in self.transport.value().splitlines()]

    def test_not_json(self) -> None:
        self.protocol.dataReceived(b"status\n")
        [response] = self.responses()
        self.assertFalse(response["ok"])

    def test_not_an_object(self) -> None:
        self.protocol.dataReceived(b'["status"]\n')
        self.assertEqual(self.responses(), [{"ok": False, "error": "a request is a JSON object"}])

    def test_unknown_command(self) -> None:
        self.protocol.dataReceived(b'{"command": "shutdown"}\n')
        self.assertEqual(self.responses(), [{"ok": False, "error": "unknown command 'shutdown'"}])

    def test_kick_checks_its_arguments(self) -> None:
        self.protocol.dataReceived(b'{"command": "kick", "jid": "localhost"}\n')
        self.protocol.dataReceived(
            b'{"command": "kick", "jid": "a@localhost", "condition": "conflict"}\n'
        )
        self.assertEqual(
            self.responses(),
            [
                {"ok": False, "error": "'localhost' is not the JID of an account"},
                {
                    "ok": False,
                    "error": "'conflict' is not one of policy-violation, not-authorized, reset",
                },
            ],
        )

    def test_answers_keep_the_order_of_requests(self) -> None:
        waiting: defer.Deferred = defer.Deferred()

        async def slow(request: dict) -> str:
            await waiting
            return "first"

        async def fast(request: dict) -> str:
            return "second"

        self.commands.table.update(slow=slow, fast=fast)
        self.protocol.dataReceived(b'{"command": "slow"}\n{"command": "fast"}\n')
        self.assertEqual(self.responses(), [])
        waiting.callback(None)
        self.assertEqual([r["result"] for r in self.responses()], ["first", "second"])

    def test_overlong_request_closes_the_connection(self) -> None:
        self.protocol.dataReceived(b"x" * (AdminProtocol.MAX_LENGTH + 1))
        self.assertTrue(self.transport.disconnecting)


class ProbeStorageTests(unittest.TestCase):
    def test_answering(self) -> None:
        database = SlowDatabase()
        probing = defer.ensureDeferred(probe_storage(database, Clock(), timeout=1))
        database.answers[0].callback(1)
        self.assertIsNone(self.successResultOf(probing))

    def test_not_answering_in_time(self) -> None:
        clock = Clock()
        probing = defer.ensureDeferred(probe_storage(SlowDatabase(), clock, timeout=2))
        clock.advance(2)
        self.assertEqual(self.successResultOf(probing), "no answer within 2 s")

    def test_failing(self) -> None:
        database = SlowDatabase()
        probing = defer.ensureDeferred(probe_storage(database, Clock(), timeout=1))
        database.answers[0].errback(OSError("connection\n  refused"))
        self.assertEqual(self.successResultOf(probing), "connection refused")

    def test_not_open(self) -> None:
        probing = defer.ensureDeferred(probe_storage(None, Clock()))
        self.assertEqual(self.successResultOf(probing), "not open")
