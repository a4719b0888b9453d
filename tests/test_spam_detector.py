"""examples/spam_detector.py: the detector's rules (tests/e2e/test_spam_detector.py runs it)."""

import importlib.util
import os

from twisted.trial import unittest

SCRIPT = os.path.join(
    os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "examples", "spam_detector.py"
)


def load_example():
    spec = importlib.util.spec_from_file_location("spam_detector", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


class SpamDetectorTests(unittest.TestCase):
    def setUp(self) -> None:
        self.detector = load_example().SpamDetector(3, 10.0, ["lottery", "free money"])

    def test_rate(self) -> None:
        for second in range(3):
            self.assertEqual(self.detector.check("a@localhost", "hi", float(second)), [])
        self.assertEqual(self.detector.check("a@localhost", "hi", 3.0), ["4 messages in 10 s"])
        self.assertEqual(self.detector.check("b@localhost", "hi", 3.0), [])  # per sender
        self.assertEqual(self.detector.check("a@localhost", "hi", 12.5), [])  # the window slid

    def test_words(self) -> None:
        self.assertEqual(
            self.detector.check("a@localhost", "Win the LOTTERY, free money!", 0.0),
            ["listed words: free money, lottery"],
        )
        self.assertEqual(self.detector.check("a@localhost", "lotteryticket", 1.0), [])
