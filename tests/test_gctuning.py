"""The garbage collector's settings for the server process."""

import gc

from twisted.trial import unittest

from mim_twisted.gctuning import YOUNG_GENERATION_THRESHOLD, tune_for_server


class TuneForServerTests(unittest.TestCase):
    def setUp(self) -> None:
        threshold = gc.get_threshold()
        self.addCleanup(gc.set_threshold, *threshold)
        # The test process is not a server: its objects go back to the collector's care.
        self.addCleanup(gc.unfreeze)

    def test_freezes_what_exists_and_collects_the_young_less_often(self) -> None:
        _, middle, oldest = gc.get_threshold()
        tune_for_server()
        self.assertGreater(gc.get_freeze_count(), 0)
        self.assertEqual(gc.get_threshold(), (YOUNG_GENERATION_THRESHOLD, middle, oldest))
