"""The worker supervisor's pure parts: each worker's config, the one-line config errors, the
options, and a worker's log lines in the supervisor's log (e2e: tests/e2e/test_workers.py)."""

import json
import os

from twisted.logger import LogLevel, eventAsJSON, globalLogPublisher
from twisted.python import usage
from twisted.trial import unittest

from mim_twisted.config import ConfigError, load_config
from mim_twisted.tap import Options
from mim_twisted.workers import WorkerProcess, check_workers, worker_config


class WorkerConfigTests(unittest.TestCase):
    def load(self, text: str) -> object:
        path = os.path.abspath(self.mktemp())
        with open(path, "w") as f:
            f.write(text)
        return load_config(path)

    def test_node_admin_socket_and_metrics_port_are_the_workers_own(self) -> None:
        config = self.load(
            '[admin]\nsocket = "/run/mim/admin.sock"\n'
            '[metrics]\nenabled = true\nendpoint = "tcp:9090:interface=127.0.0.1"\n'
        )
        second = worker_config(config, 2, "host.42")
        self.assertEqual(second.cluster.node, "host.42.2")
        self.assertEqual(second.admin_socket, "/run/mim/admin.sock.2")
        self.assertEqual(second.metrics.endpoint, "tcp:9091:interface=127.0.0.1")
        self.assertEqual(worker_config(config, 1, "n").metrics.endpoint, config.metrics.endpoint)
        self.assertEqual(second.listeners, config.listeners)

    def test_metrics_endpoints_by_keyword_and_on_unix_sockets(self) -> None:
        for endpoint, third in (
            ("tcp:port=9100:interface=\\:\\:1", "tcp:port=9102:interface=\\:\\:1"),
            ("tcp6:9100", "tcp6:9102"),
            ("unix:/run/mim/metrics.sock:mode=600", "unix:/run/mim/metrics.sock.3:mode=600"),
            ("unix:address=/run/m.sock", "unix:address=/run/m.sock.3"),
        ):
            config = self.load(f"[metrics]\nendpoint = {json.dumps(endpoint)}\n")
            self.assertEqual(worker_config(config, 3, "n").metrics.endpoint, third)

    def test_several_workers_need_the_cluster(self) -> None:
        config = self.load("[server]\n")
        check_workers(config, 1)
        with self.assertRaises(ConfigError) as raised:
            check_workers(config, 3)
        self.assertEqual(
            str(raised.exception),
            f"{config.source}: 3 workers need cluster.enabled = true (each worker is a cluster"
            " node)",
        )


class OptionsTests(unittest.TestCase):
    def test_workers(self) -> None:
        options = Options()
        options.parseOptions(["--workers", "2"])
        self.assertEqual(options["workers"], 2)
        options = Options()
        options.parseOptions([])
        self.assertIsNone(options["workers"])

    def test_workers_must_be_a_positive_integer(self) -> None:
        for value in ("0", "two"):
            with self.assertRaises(usage.UsageError):
                Options().parseOptions(["--workers", value])


class WorkerLogTests(unittest.TestCase):
    def setUp(self) -> None:
        self.events: list[dict] = []
        globalLogPublisher.addObserver(self.events.append)
        self.addCleanup(globalLogPublisher.removeObserver, self.events.append)

    def test_a_log_line_is_an_event_of_the_supervisors_log_with_the_worker(self) -> None:
        line = eventAsJSON(
            {
                "log_namespace": "mim_twisted.tap",
                "log_level": LogLevel.warn,
                "log_format": "Listening on {address}",
                "address": "127.0.0.1:5222",
                "log_time": 1.0,
            }
        )
        process = WorkerProcess(2)
        # Split across reads, as a pipe may deliver it.
        process.childDataReceived(1, line[:10].encode())
        process.childDataReceived(1, line[10:].encode() + b"\nnot json\n")
        [event, other] = [e for e in self.events if e.get("log_namespace") != __name__]
        self.assertEqual(event["worker"], 2)
        self.assertEqual(event["address"], "127.0.0.1:5222")
        self.assertEqual(event["log_level"], LogLevel.warn)
        self.assertEqual(event["log_time"], 1.0)
        self.assertEqual(event["log_system"], "worker 2 mim_twisted.tap#warn")
        self.assertEqual(other["line"], "not json")
        self.assertEqual(other["index"], 2)
