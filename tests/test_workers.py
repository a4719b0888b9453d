"""The worker supervisor's pure parts: each worker's config, the one-line config errors, the
options, and a worker's log lines in the supervisor's log (e2e: tests/e2e/test_workers.py)."""

import json
import os
import stat

from twisted.logger import LogLevel, eventAsJSON, globalLogPublisher
from twisted.python import usage
from twisted.trial import unittest

from mim_twisted.config import ConfigError, load_config
from mim_twisted.ctl import MERGES, admin_sockets
from mim_twisted.tap import Options, makeService, prepare_workers
from mim_twisted.workers import (
    WorkerProcess,
    WorkerStartFailed,
    WorkerSupervisor,
    check_workers,
    worker_config,
)
from mim_twisted.xmpp.tls import SELF_SIGNED_NAME


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

    def test_the_workers_key(self) -> None:
        path = os.path.abspath(self.mktemp())
        with open(path, "w") as f:
            f.write('[storage]\nbackend = "postgresql"\n[cluster]\nenabled = true\nworkers = 2\n')
        self.assertEqual(load_config(path).cluster.workers, 2)
        self.assertEqual(load_config(None).cluster.workers, 1)
        for text, error in (
            ("[cluster]\nworkers = 0\n", "cluster.workers: must be an integer 1..64 (got 0)"),
            (
                "[cluster]\nworkers = 2\n",
                "cluster.workers: needs cluster.enabled = true (each worker is a node)",
            ),
        ):
            with open(path, "w") as f:
                f.write(text)
            with self.assertRaises(ConfigError) as raised:
                load_config(path)
            self.assertEqual(str(raised.exception), f"{path}: {error}")

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


class MimctlMergeTests(unittest.TestCase):
    """mimctl's view of several workers: one answer made of each worker's."""

    def test_status(self) -> None:
        answering = {"backend": "postgresql", "answering": True, "problem": None}
        down = {"backend": "postgresql", "answering": False, "problem": "no answer within 5 s"}
        merged = MERGES["status"](
            [
                {
                    "version": "1",
                    "uptime": 5.0,
                    "sessions": 2,
                    "connections": 3,
                    "storage": answering,
                },
                {"version": "1", "uptime": 9.0, "sessions": 1, "connections": 1, "storage": down},
            ]
        )
        self.assertEqual(
            merged,
            {
                "version": "1",
                "uptime": 9.0,
                "sessions": 3,
                "connections": 4,
                "storage": down,
                "workers": 2,
            },
        )

    def test_sessions_kick_and_stats(self) -> None:
        self.assertEqual(
            MERGES["sessions"]([[{"jid": "b@x/r"}], [{"jid": "a@x/r"}, {"jid": "c@x/r"}]]),
            [{"jid": "a@x/r"}, {"jid": "b@x/r"}, {"jid": "c@x/r"}],
        )
        self.assertEqual(MERGES["kick"]([["a@x/1"], [], ["a@x/2"]]), ["a@x/1", "a@x/2"])
        self.assertEqual(
            MERGES["stats"]([{"logins": 2, "b": 1}, {"logins": 3, "a": 4}]),
            {"a": 4, "b": 1, "logins": 5},
        )

    def test_admin_sockets(self) -> None:
        config = load_config(None)
        self.assertEqual(admin_sockets(config), [config.admin_socket])
        path = os.path.abspath(self.mktemp())
        with open(path, "w") as f:
            f.write('[storage]\nbackend = "postgresql"\n[cluster]\nenabled = true\nworkers = 2\n')
        config = load_config(path)
        self.assertEqual(
            admin_sockets(config), [f"{config.admin_socket}.1", f"{config.admin_socket}.2"]
        )


class PrepareTests(unittest.TestCase):
    """What the supervisor makes once before the workers start (they raced to make it)."""

    def config(self, extra: str = "") -> object:
        directory = os.path.abspath(self.mktemp())
        os.makedirs(directory)
        path = os.path.join(directory, "mim.toml")
        with open(path, "w") as f:
            f.write(f"[server]\ndata_dir = {json.dumps(os.path.join(directory, 'data'))}\n{extra}")
        return load_config(path)

    def test_the_data_directory_and_the_certificate_are_made_once(self) -> None:
        config = self.config()
        prepare_workers(config)
        self.assertEqual(stat.S_IMODE(os.stat(config.data_dir).st_mode), 0o700)
        certificate = os.path.join(config.data_dir, SELF_SIGNED_NAME)
        with open(certificate, "rb") as f:
            made = f.read()
        prepare_workers(config)
        with open(certificate, "rb") as f:
            self.assertEqual(f.read(), made)

    def test_unusable_tls_files_are_one_line(self) -> None:
        garbage = os.path.abspath(self.mktemp())
        with open(garbage, "w") as f:
            f.write("not a certificate\n")
        config = self.config(
            f"[tls]\ncertificate = {json.dumps(garbage)}\nprivate_key = {json.dumps(garbage)}\n"
        )
        error = self.assertRaises(WorkerStartFailed, prepare_workers, config)
        self.assertEqual(
            str(error), f"mim: could not start: {garbage}: no PEM certificate in the file"
        )

    def test_the_supervisor_prepares_before_it_starts_workers(self) -> None:
        path = os.path.abspath(self.mktemp())
        with open(path, "w") as f:
            f.write(
                '[storage]\nbackend = "postgresql"\n[cluster]\nenabled = true\nworkers = 2\n'
                "[admin]\nenabled = false\n"
            )
        options = Options()
        options.parseOptions(["-c", path])
        supervisor = makeService(options)
        self.assertIsInstance(supervisor, WorkerSupervisor)
        self.assertEqual(supervisor.prepare.func, prepare_workers)
