"""SIGHUP while the reload service runs: the reload is called in the reactor thread."""

import os
import signal

from twisted.internet import reactor
from twisted.trial import unittest

from mim_twisted.signals import ReloadOnHangup
from tests.e2e.harness import eventually


class ReloadOnHangupTests(unittest.TestCase):
    async def test_sighup_calls_reload_until_stopped(self) -> None:
        before = signal.getsignal(signal.SIGHUP)
        reloads: list[None] = []
        hangup = ReloadOnHangup(lambda: reloads.append(None), reactor)
        hangup.startService()
        self.addCleanup(signal.signal, signal.SIGHUP, before)
        os.kill(os.getpid(), signal.SIGHUP)
        await eventually(lambda: reloads)
        hangup.stopService()
        self.assertEqual(signal.getsignal(signal.SIGHUP), before)
