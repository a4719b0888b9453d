"""PubSubObservers: every observer hears every event, in the order added, whatever the others do."""

from twisted.logger import Logger
from twisted.trial import unittest

from mim_twisted.pubsub import core, observers
from mim_twisted.pubsub.observers import PubSubObservers

EVENT = core.NodeCreated("pubsub.localhost", "news", {}, "alice@localhost")


class PubSubObserversTests(unittest.TestCase):
    def test_each_observer_in_order(self) -> None:
        heard: list[tuple[str, object]] = []
        events = PubSubObservers()
        events.add(lambda event: heard.append(("first", event)))
        events.add(lambda event: heard.append(("second", event)))
        events(EVENT)
        self.assertEqual(heard, [("first", EVENT), ("second", EVENT)])

    def test_a_failing_observer_is_logged_and_the_others_still_hear(self) -> None:
        logged: list[dict] = []
        self.patch(observers, "log", Logger(observer=logged.append))
        heard: list[object] = []
        events = PubSubObservers()
        events.add(lambda event: 1 / 0)
        events.add(heard.append)
        events(EVENT)
        self.assertEqual(heard, [EVENT])
        [entry] = logged
        self.assertTrue(entry["log_failure"].check(ZeroDivisionError))
