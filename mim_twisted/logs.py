"""The server's log under twistd: twistd's destination, the configured level and format.

twistd picks a log observer before it starts the application: the one set as the application's
ILogObserver component if there is one, else its own (a text file, standard output with -n, or
syslog). ``LogOutput`` builds the same destination from twistd's options and puts the level
filter (changeable while running, for SIGHUP) and the text or JSON-lines format in front of it.
"""

import json
import signal
import sys
from collections.abc import Mapping
from typing import Any

from twisted.logger import (
    FileLogObserver,
    FilteringLogObserver,
    ILogObserver,
    LegacyLogObserverWrapper,
    LogLevel,
    LogLevelFilterPredicate,
    eventAsJSON,
    formatEvent,
    formatEventAsClassicLogText,
    formatTime,
)
from twisted.python import logfile

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
    return FileLogObserver(stream, ClassicText())


def _json_lines_observer(stream: Any) -> ILogObserver:
    # One JSON object per line; "text" is the rendered message, for readers that do not
    # interpret twisted.logger's log_format. A worker's log goes to its supervisor this way.
    return FileLogObserver(stream, json_line)


# Each level as Twisted's eventAsJSON writes it (a constant eventFromJSON makes again).
_LEVELS_AS_JSON = {
    level: json.loads(eventAsJSON({"log_level": level}))["log_level"]
    for level in LogLevel.iterconstants()
}
# Written by eventAsJSON, told by nothing: the Logger object ({"unpersistable": true}) and the
# fields again, formatted for readers without their values.
_LEFT_OUT = frozenset(("log_logger", "log_flattened"))
_PLAIN_TYPES = frozenset((str, int, float, bool, type(None)))


def json_line(event: dict) -> str:
    """The event as one line of JSON, with its message as "text".

    An event whose fields are all strings, numbers or None (the server's own: a line per
    login) is written by ``json.dumps`` as they are, with the level as Twisted writes it;
    ``eventAsJSON`` would also flatten every field, a dozen times the work, for values that
    JSON keeps as they are. Any other event is Twisted's to write."""
    text = format_message(event)
    plain: dict[str, Any] = {}
    for key, value in event.items():
        if key in _LEFT_OUT:
            continue
        if key == "log_level":
            value = _LEVELS_AS_JSON.get(value)
            if value is None:
                break
        elif type(value) not in _PLAIN_TYPES:
            break
        plain[key] = value
    else:
        plain["text"] = text
        return json.dumps(plain) + "\n"
    return eventAsJSON({**event, "text": text}) + "\n"


def _rotate_on_sigusr1(stream: logfile.LogFile) -> None:
    # As twistd does for its own log file: SIGUSR1 rotates it, unless someone handles the signal.
    if signal.getsignal(signal.SIGUSR1) in (None, signal.SIG_DFL):

        def rotate(signum: int, frame: object) -> None:
            from twisted.internet import reactor

            reactor.callFromThread(stream.rotate)

        signal.signal(signal.SIGUSR1, rotate)


def format_message(event: dict) -> str:
    """The event's message, as Twisted's ``formatEvent`` makes it, for less: one with neither
    Twisted's call syntax ("{f()}") nor flattened fields is formatted by ``str.format_map``,
    which gives the same text, instead of ``string.Formatter`` in Python."""
    message = event.get("log_format")
    if type(message) is str and "()" not in message and "log_flattened" not in event:
        try:
            return message.format_map(event)
        except Exception:
            pass  # Twisted's formatEvent says what could not be formatted
    return formatEvent(event)


class ClassicText:
    """The text of twistd's log (``formatEventAsClassicLogText``), made for less: a busy server
    logs a line per login, and Twisted makes each line's time stamp through a new time zone
    object and its message through ``string.Formatter``. Here the stamp is made once per second
    and the message by ``format_message``; an event with a failure is Twisted's to format."""

    def __init__(self) -> None:
        self._second: int | None = None
        self._stamp = "-"

    def __call__(self, event: dict) -> str | None:
        system = event.get("log_system")
        if "log_failure" in event or not (system is None or type(system) is str):
            return formatEventAsClassicLogText(event, formatTime=self._time)
        text = format_message(event)
        if not text:
            return None
        if system is None:
            level = event.get("log_level")
            system = f"{event.get('log_namespace', '-')}#{'-' if level is None else level.name}"
        line = f"{self._time(event.get('log_time'))} [{system}] {text}"
        return line.replace("\n", "\n\t") + "\n"

    def _time(self, when: float | None) -> str:
        # The stamp has whole seconds (RFC 3339 with the local offset): one per second.
        if when is None:
            return "-"
        second = int(when)
        if second != self._second:
            self._second, self._stamp = second, formatTime(second)
        return self._stamp
