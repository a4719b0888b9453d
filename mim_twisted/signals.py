"""SIGHUP under twistd: reload instead of dying (the default action of SIGHUP ends a process).

twistd handles SIGINT and SIGTERM (stop) and, when it writes a log file, SIGUSR1 (rotate it).
"""

import signal
from collections.abc import Callable
from typing import Any

from twisted.application import service


class ReloadOnHangup(service.Service):
    """While running, a SIGHUP calls ``reload`` in the reactor thread."""

    def __init__(self, reload: Callable[[], None], reactor: Any = None) -> None:
        if reactor is None:
            from twisted.internet import reactor
        self._reload = reload
        self._reactor = reactor
        self._previous: Any = None

    def startService(self) -> None:
        super().startService()
        self._previous = signal.signal(signal.SIGHUP, self._hangup)

    def stopService(self) -> None:
        # None: the previous handler was not set from Python; the default is the closest.
        signal.signal(signal.SIGHUP, self._previous or signal.SIG_DFL)
        return super().stopService()

    def _hangup(self, signum: int, frame: object) -> None:
        # A signal handler may run between any two bytecodes: hand the work to the reactor.
        self._reactor.callFromThread(self._reload)
