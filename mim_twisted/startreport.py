"""How a start under twistd is reported: to twistd's daemon parent and in the exit status.

The server starts asynchronously (database, then listeners), after twistd considers the
application started. So the report is sent from here once the start has finished:

- in daemon mode twistd's parent process waits on a status pipe and exits with 0 only if the
  child wrote "0"; twistd writes that as soon as ``startService`` returns, so ``claim`` takes the
  pipe away from it and ``started``/``failed`` write the real outcome;
- a failed start prints one line on the original standard error and ends the process with exit
  status 1 once the reactor has stopped and twistd has cleaned up (pidfile, log), so systemd's
  ``Restart=on-failure`` and shell scripts see it.
"""

import atexit
import os
import sys
from collections.abc import MutableMapping
from typing import Any

from twisted.python.util import untilConcludes

# twistd's parent reads at most this many bytes from the status pipe.
STATUS_PIPE_LIMIT = 100

FAILED_EXIT_STATUS = 1


class StartReport:
    """Reports the outcome of one start to whoever waits on it.

    ``twistd_options`` are twistd's own options (the parent of the plugin's options): in daemon
    mode they hold the status pipe under "statusPipe" once twistd has forked.
    """

    def __init__(
        self,
        twistd_options: MutableMapping[str, Any] | None,
        reactor: Any,
        status_pipe: int | None = None,
    ) -> None:
        self._twistd_options = twistd_options
        self._reactor = reactor
        # A worker's supervisor reads its report on a pipe of its own (mim_twisted.workers).
        self._status_pipe: int | None = status_pipe

    def claim(self) -> None:
        """Take the status pipe before twistd reports success on it; call from startService."""
        if self._twistd_options is not None and self._status_pipe is None:
            self._status_pipe = self._twistd_options.pop("statusPipe", None)

    def started(self) -> None:
        self._write_status(b"0")

    def failed(self, line: str) -> None:
        """Show ``line`` (one line, the reason) and end the process with a failure status."""
        sys.__stderr__.write(line + "\n")
        sys.__stderr__.flush()
        # twistd's parent prints what follows "1 " (a repr of it, cut to the pipe's limit).
        self._write_status(f"1 {line}".encode()[:STATUS_PIPE_LIMIT])
        atexit.register(_exit_with_failure)
        self._reactor.callWhenRunning(self._reactor.stop)

    def _write_status(self, status: bytes) -> None:
        if self._status_pipe is None:
            return
        pipe, self._status_pipe = self._status_pipe, None
        untilConcludes(os.write, pipe, status)
        untilConcludes(os.close, pipe)


def _exit_with_failure() -> None:
    # Python offers no exit status once twistd's run() has returned normally; this runs after
    # twistd's own cleanup, as the last step of the interpreter's exit.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(FAILED_EXIT_STATUS)
