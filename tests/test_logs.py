"""The log under twistd: level filter (changed on reload), text or JSON lines, twistd's file."""

import json
import os
import signal

from twisted.internet import reactor, task
from twisted.logger import (
    Logger,
    LogLevel,
    LogPublisher,
    eventAsJSON,
    eventFromJSON,
    formatEventAsClassicLogText,
)
from twisted.trial import unittest

from mim_twisted.config import load_config
from mim_twisted.logs import LEVELS, ClassicText, LogOutput, format_message, json_line


class LogOutputTests(unittest.TestCase):
    def output(self, level: str, log_format: str) -> tuple[Logger, str]:
        previous = signal.getsignal(signal.SIGUSR1)
        self.addCleanup(signal.signal, signal.SIGUSR1, previous)
        path = os.path.abspath(self.mktemp())
        self.log_output = LogOutput({"logfile": path, "nodaemon": False}, level, log_format)
        publisher = LogPublisher(self.log_output.observer)
        return Logger(namespace="mim_twisted.test", observer=publisher), path

    def lines(self, path: str) -> list[str]:
        with open(path) as f:
            return f.read().splitlines()

    def test_level_filters_and_changes(self) -> None:
        log, path = self.output("info", "text")
        log.debug("{peer} disconnected", peer="127.0.0.1:1")
        log.info("listening")
        self.log_output.set_level("debug")
        log.debug("{peer} disconnected", peer="127.0.0.1:2")
        lines = self.lines(path)
        self.assertEqual(len(lines), 2)
        self.assertTrue(lines[0].endswith("[mim_twisted.test#info] listening"))
        self.assertTrue(lines[1].endswith("[mim_twisted.test#debug] 127.0.0.1:2 disconnected"))

    def test_json_lines(self) -> None:
        log, path = self.output("warn", "json")
        log.info("not written")
        log.warn("login failed for {user} from {address}", user="alice", address="127.0.0.1")
        [line] = self.lines(path)
        event = json.loads(line)
        self.assertEqual(event["text"], "login failed for alice from 127.0.0.1")
        self.assertEqual((event["user"], event["address"]), ("alice", "127.0.0.1"))
        self.assertEqual(event["log_level"]["name"], "warn")
        self.assertEqual(event["log_namespace"], "mim_twisted.test")

    async def test_sigusr1_rotates_the_file(self) -> None:
        log, path = self.output("info", "text")
        log.info("before")
        signal.getsignal(signal.SIGUSR1)(signal.SIGUSR1, None)
        await task.deferLater(reactor, 0.01, lambda: None)
        log.info("after")
        self.assertEqual(len(self.lines(path + ".1")), 1)
        self.assertEqual(len(self.lines(path)), 1)

    def test_daemon_cannot_log_to_stdout(self) -> None:
        with self.assertRaises(SystemExit):
            LogOutput({"logfile": "-", "nodaemon": False}, "info", "text")


class ClassicTextTests(unittest.TestCase):
    def test_same_text_as_twisted(self) -> None:
        events: list[dict] = []
        log = Logger(namespace="mim_twisted.test", observer=LogPublisher(events.append))
        log.info("{peer} bound {jid}", peer="127.0.0.1:1", jid="alice@localhost/phone")
        log.info("two\nlines {value!r} {number:.2f}", value="it's", number=3.14159)
        log.info("called {function()}", function=lambda: "once")
        log.info("missing {field}")
        log.info("")
        log.warn("{items[0]} {number.real}", items=["first"], number=3)
        try:
            raise ValueError("bad")
        except ValueError:
            log.failure("failed {what}", what="division")
        events.append({"log_format": "from a worker", "log_system": "worker 1 x#info"})
        events.append({"log_format": "no time, level or namespace"})
        events.append({"log_format": "system not text", "log_system": 5, "log_time": 0.0})
        text = ClassicText()
        for event in events:
            self.assertEqual(text(event), formatEventAsClassicLogText(event))


class JsonLineTests(unittest.TestCase):
    def events(self) -> list[dict]:
        events: list[dict] = []
        log = Logger(namespace="mim_twisted.test", observer=LogPublisher(events.append))
        log.info("{peer} bound {jid}", peer="127.0.0.1:1", jid="alice@localhost/phone")
        log.warn(
            "{count} of {share:.1f} {flag} {nothing}", count=3, share=0.25, flag=True, nothing=None
        )
        log.info("an object: {value}", value=object())
        return events

    def test_plain_events_read_back_as_twisted_writes_them(self) -> None:
        for event in self.events():
            ours = eventFromJSON(json_line(event))
            twisted = eventFromJSON(eventAsJSON({**event, "text": format_message(event)}))
            for key in ("log_logger", "log_flattened"):
                twisted.pop(key, None)
                ours.pop(key, None)
            self.assertEqual(ours, twisted)
            self.assertIs(ours["log_level"], event["log_level"])
            self.assertTrue(json_line(event).endswith("\n"))

    def test_read_back_the_text_is_the_same(self) -> None:
        # As the worker would have written it (Twisted's text of a flattened event read back
        # would drop the format spec of "{share:.1f}").
        text = ClassicText()
        for event in self.events():
            self.assertEqual(
                text(eventFromJSON(json_line(event))), formatEventAsClassicLogText(event)
            )


class LevelNamesTests(unittest.TestCase):
    def test_every_configurable_level_is_known(self) -> None:
        for name in ("debug", "info", "warn", "error"):
            path = os.path.abspath(self.mktemp())
            with open(path, "w") as f:
                f.write(f'[log]\nlevel = "{name}"\n')
            self.assertEqual(LEVELS[load_config(path).log.level], getattr(LogLevel, name))
