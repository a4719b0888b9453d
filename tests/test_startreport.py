"""The start report to twistd's daemon parent: the status pipe is taken and written once.

A failed start (one line, exit status 1) ends the process, so it is tested end to end in
tests/e2e/test_twistd.py.
"""

import os

from twisted.internet.testing import MemoryReactor
from twisted.trial import unittest

from mim_twisted.startreport import StartReport


class StatusPipeTests(unittest.TestCase):
    def pipe(self) -> tuple[int, int]:
        read, write = os.pipe()
        self.addCleanup(os.close, read)
        return read, write

    def test_success_is_reported_after_the_start(self) -> None:
        read, write = self.pipe()
        twistd_options = {"statusPipe": write, "nodaemon": False}
        report = StartReport(twistd_options, MemoryReactor())
        report.claim()
        # twistd finds no pipe and leaves the report to the server.
        self.assertNotIn("statusPipe", twistd_options)
        report.started()
        self.assertEqual(os.read(read, 100), b"0")
        self.assertEqual(os.read(read, 100), b"")  # written once, then closed

    def test_foreground_has_no_pipe(self) -> None:
        report = StartReport({"nodaemon": True}, MemoryReactor())
        report.claim()
        report.started()
