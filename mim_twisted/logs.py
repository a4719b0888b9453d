"""The server's log under twistd: twistd's destination, the configured level and format.

twistd picks a log observer before it starts the application: the one set as the application's
ILogObserver component if there is one, else its own (a text file, standard output with -n, or
syslog). ``LogOutput`` builds the same destination from twistd's options and puts the level
filter (changeable while running, for SIGHUP) and the text or JSON-lines format in front of it.
"""

import signal
import sys
from collections.abc import Mapping
from typing import Any

from twisted.logger import (
    FilteringLogObserver,
    ILogObserver,
    LegacyLogObserverWrapper,
    LogLevel,
    LogLevelFilterPredicate,
    formatEvent,
    jsonFileLogObserver,
    textFileLogObserver,
)
from twisted.python import logfile
from zope.interface import provider

LEVELS = {
    "debug": LogLevel.debug,
    "info": LogLevel.info,
    "warn": LogLevel.warn,
    "error": LogLevel.error,
}


class LogOutput:
    """Where and how the server logs under twistd; ``observer`` is what twistd should use."""

    def __init__(self, twistd_options: Mapping[str, Any], level: str, log_format: str) -> None:
        self._level_filter = LogLevelFilterPredicate(defaultLogLevel=LEVELS[level])
        self.observer = FilteringLogObserver(
            _destination(twistd_options, log_format), [self._level_filter]
        )

    def set_level(self, level: str) -> None:
        self._level_filter.setLogLevelForNamespace("", LEVELS[level])


def _destination(twistd_options: Mapping[str, Any], log_format: str) -> ILogObserver:
    """twistd's own choice of destination (UnixAppLogger._getLogObserver), in ``log_format``."""
    if twistd_options.get("syslog"):
        from twisted.python import syslog

        return LegacyLogObserverWrapper(syslog.SyslogObserver(twistd_options["prefix"]).emit)
    filename = twistd_options.get("logfile") or ""
    daemon = not twistd_options.get("nodaemon")
    if filename == "-" or (not filename and not daemon):
        if daemon:
            sys.exit("Daemons cannot log to stdout, exiting!")
        stream: Any = sys.stdout
    else:
        stream = logfile.LogFile.fromFullPath(filename or "twistd.log")
        _rotate_on_sigusr1(stream)
    if log_format == "json":
        return _json_lines_observer(stream)
    return textFileLogObserver(stream)


def _json_lines_observer(stream: Any) -> ILogObserver:
    # One JSON object per line; "text" is the rendered message, for readers that do not
    # interpret twisted.logger's log_format.
    write_json = jsonFileLogObserver(stream, recordSeparator="")

    @provider(ILogObserver)
    def observe(event: dict) -> None:
        write_json({**event, "text": formatEvent(event)})

    return observe


def _rotate_on_sigusr1(stream: logfile.LogFile) -> None:
    # As twistd does for its own log file: SIGUSR1 rotates it, unless someone handles the signal.
    if signal.getsignal(signal.SIGUSR1) in (None, signal.SIG_DFL):

        def rotate(signum: int, frame: object) -> None:
            from twisted.internet import reactor

            reactor.callFromThread(stream.rotate)

        signal.signal(signal.SIGUSR1, rotate)
