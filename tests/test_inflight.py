"""InFlight: tracked Deferreds, and waiting until none is left."""

from twisted.internet import defer
from twisted.trial import unittest

from mim_twisted.inflight import InFlight


class InFlightTests(unittest.TestCase):
    def test_idle_at_once_with_nothing_tracked(self) -> None:
        self.assertIsNone(self.successResultOf(InFlight().idle()))

    def test_idle_once_every_tracked_work_has_fired(self) -> None:
        work = InFlight()
        first, second = defer.Deferred(), defer.Deferred()
        self.assertIs(work.track(first), first)
        work.track(second)
        idle = work.idle()
        first.callback("result")
        self.assertEqual(self.successResultOf(first), "result")  # left untouched
        self.assertNoResult(idle)
        second.errback(ValueError("failed work counts as finished"))
        self.failureResultOf(second, ValueError)
        self.successResultOf(idle)
        self.assertEqual(len(work), 0)

    def test_a_cancelled_wait_is_forgotten(self) -> None:
        work = InFlight()
        running = work.track(defer.Deferred())
        idle = work.idle()
        idle.cancel()
        self.failureResultOf(idle, defer.CancelledError)
        running.callback(None)  # no waiter left to call
