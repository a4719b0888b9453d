"""A request that fails because storage is away logs one line, not a traceback; a bug still
logs its traceback. Either way the client gets its error answer."""

from twisted.internet import defer
from twisted.logger import Logger, LogLevel
from twisted.python.failure import Failure
from twisted.trial import unittest
from twisted.words.xish import domish

from mim_twisted.storage.interfaces import StorageUnavailable, log_request_failure
from tests.imsupport import ImCoreTestCase, error_condition

PROBE = ("urn:example:probe", "query")
PROBE_IQ = "<iq type='get' id='p1' to='localhost'><query xmlns='urn:example:probe'/></iq>"


class LogRequestFailureTests(unittest.TestCase):
    def setUp(self) -> None:
        self.events: list[dict] = []
        self.log = Logger(observer=self.events.append)

    def test_storage_outage_is_one_warning_without_traceback(self) -> None:
        failure = Failure(StorageUnavailable("PostgreSQL is unreachable"))
        log_request_failure(self.log, failure, "handling IQ from {jid}", jid="a@localhost/r")
        [event] = self.events
        self.assertEqual(event["log_level"], LogLevel.warn)
        self.assertNotIn("log_failure", event)
        self.assertEqual(event["reason"], "PostgreSQL is unreachable")
        self.assertEqual(event["jid"], "a@localhost/r")

    def test_a_bug_keeps_its_traceback(self) -> None:
        failure = Failure(ZeroDivisionError("bug"))
        log_request_failure(self.log, failure, "handling IQ from {jid}", jid="a@localhost/r")
        [event] = self.events
        self.assertEqual(event["log_level"], LogLevel.critical)
        self.assertIs(event["log_failure"], failure)


class RouterFailureTests(ImCoreTestCase):
    def ask(self, raised: Exception) -> domish.Element:
        self.core.router.server_iq[PROBE] = lambda session, iq, target: defer.fail(raised)
        session = self.online("alice@localhost/phone")
        self.send(session, PROBE_IQ)
        [answer] = session.take()
        return answer

    def test_storage_outage_answers_without_a_logged_error(self) -> None:
        answer = self.ask(StorageUnavailable("database away"))
        self.assertEqual(error_condition(answer), "internal-server-error")
        self.assertEqual(self.flushLoggedErrors(), [])

    def test_a_bug_answers_and_is_logged(self) -> None:
        answer = self.ask(ZeroDivisionError("bug"))
        self.assertEqual(error_condition(answer), "internal-server-error")
        self.assertEqual(len(self.flushLoggedErrors(ZeroDivisionError)), 1)
