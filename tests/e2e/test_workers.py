"""`twistd -n mim --workers 2` as an operator runs it: two worker processes accepting on the one
port, each with its own admin socket; a worker killed with SIGKILL is restarted and serves again;
SIGTERM stops everything and leaves no process behind; a worker that cannot start fails the
start with its one line."""

import asyncio
import json
import os
import re
import shutil
import signal
import socket
import tempfile

from psycopg2.extensions import parse_dsn
from twisted.internet import reactor
from twisted.internet.utils import getProcessOutputAndValue
from twisted.trial import unittest

from mim_twisted.auth.scram import derive_all
from mim_twisted.storage import open_database
from mim_twisted.xmpp.tls import SELF_SIGNED_NAME
from tests import pgsupport
from tests.e2e.harness import (
    STREAM_HEADER,
    Client,
    RawClient,
    eventually,
    free_port,
    require_asyncio_reactor,
    wait_for,
)
from tests.e2e.test_operator_process import MIMCTL
from tests.e2e.test_twistd import TWISTD, ProcessOutput, _sleep

WORKER_STARTED = re.compile(rb"Worker (\d+) started \(pid (\d+)\)")


def _ask_worker(directory: str, index: int, command: str) -> object:
    """What worker ``index`` answers on its admin socket (a blocking exchange: it is local and
    the worker answers at once)."""
    with socket.socket(socket.AF_UNIX) as admin:
        admin.settimeout(5)
        admin.connect(os.path.join(directory, "data", f"admin.sock.{index}"))
        admin.sendall(json.dumps({"command": command}).encode() + b"\n")
        response = json.loads(admin.makefile("rb").readline())
    assert response["ok"], response
    return response["result"]


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            # A zombie has ended; only its parent's wait is missing.
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


class WorkersTests(unittest.TestCase):
    async def setUp(self) -> None:
        require_asyncio_reactor()
        # A short directory: the admin sockets' paths must fit in 107 bytes.
        self.directory = tempfile.mkdtemp(prefix="mim-workers-")
        self.addCleanup(shutil.rmtree, self.directory, True)
        self.port = free_port()
        self.dsn = pgsupport.create_temp_database(self)
        database = await open_database("postgresql", postgresql_dsn=self.dsn, auto_migrate=True)
        for user in ("alice", "bob", "carol", "dave"):
            await database.accounts.create_account("localhost", user, derive_all("secret"))
        await database.close()

    def write_config(self, extra: str = "") -> str:
        path = os.path.join(self.directory, "mim.toml")
        with open(path, "w") as f:
            f.write(
                f'[server]\ndata_dir = "data"\n[[listeners]]\nport = {self.port}\n'
                f'[storage]\nbackend = "postgresql"\n'
                f"[storage.postgresql]\ndsn = {json.dumps(self.dsn)}\n"
                f'[cluster]\nenabled = true\nname = "{parse_dsn(self.dsn)["dbname"]}"\n{extra}'
            )
        return path

    async def start(self) -> tuple[object, ProcessOutput]:
        process = ProcessOutput()
        self.config = self.write_config("workers = 2\n")
        transport = reactor.spawnProcess(
            process,
            TWISTD,
            [TWISTD, "-n", "--pidfile=", "mim", "-c", self.config],
            env=os.environ,
            path=self.directory,
        )
        self.addCleanup(self._kill, transport, process)
        await self.wait_for_output(process, b"2 workers started")
        return transport, process

    async def wait_for_output(self, process: ProcessOutput, text: bytes, count: int = 1) -> None:
        for _ in range(300):
            if process.output.count(text) >= count:
                return
            if process.ended.called:
                break
            await _sleep(0.1)
        raise AssertionError(f"no {text!r} in the output:\n{process.text()}")

    async def mimctl(self, *argv: str) -> tuple[int, str, str]:
        out, err, code = await getProcessOutputAndValue(
            MIMCTL, ["-c", self.config, *argv], env=os.environ
        )
        return code, out.decode(), err.decode()

    def worker_pids(self, process: ProcessOutput) -> dict[int, int]:
        """The pid of each worker's last start."""
        return {int(i): int(pid) for i, pid in WORKER_STARTED.findall(process.output)}

    async def _kill(self, transport: object, process: ProcessOutput) -> None:
        if not process.ended.called:
            transport.signalProcess(signal.SIGKILL)
            await process.ended

    async def login(self, user: str, resource: str = "res") -> Client:
        client = Client(
            f"{user}@localhost/{resource}",
            "secret",
            self.port,
            os.path.join(self.directory, "data", SELF_SIGNED_NAME),
            None,
        )
        self.addCleanup(client.close)
        self.assertEqual(await client.connect(), "session_start")
        return client

    async def login_on(self, user: str, index: int) -> Client:
        """A session of ``user`` on worker ``index``: logins until one lands there."""
        for attempt in range(30):
            client = await self.login(user, f"r{attempt}")
            sessions = _ask_worker(self.directory, index, "sessions")
            if any(s["jid"] == f"{user}@localhost/r{attempt}" for s in sessions):
                return client
            await client.close()
        raise AssertionError(f"30 logins of {user} and none on worker {index}")

    async def connection_on(self, index: int) -> RawClient:
        """Open connections until worker ``index`` has one (the last one opened): the kernel
        hands each to whichever worker accepts first, so several land on both."""
        for _ in range(50):
            client = RawClient(self.port)
            self.addCleanup(client.close)
            await client.connect()
            await client.send(STREAM_HEADER)
            await client.read_until(b"</stream:features>")
            if _ask_worker(self.directory, index, "status")["connections"]:
                return client
        raise AssertionError(f"50 connections and none on worker {index}")

    async def test_two_workers_share_the_port_restart_and_stop(self) -> None:
        transport, process = await self.start()
        self.assertIn(b"in 2 workers", process.output)
        # Made once, by the supervisor: workers making their own overwrote each other's.
        self.assertEqual(process.output.count(b"Generated a self-signed certificate"), 1)
        await self.connection_on(1)
        await self.connection_on(2)

        # mimctl asks both workers and merges their answers.
        await self.login("alice")
        await self.login("bob")
        code, out, err = await self.mimctl("status")
        self.assertEqual((code, err), (0, ""))
        self.assertRegex(out, r"^mim-twisted \S+ running in 2 workers, up ")
        self.assertIn("  sessions: 2 (connections: ", out)
        code, out, err = await self.mimctl("sessions")
        self.assertEqual(
            [line.split("\t")[0] for line in out.splitlines()],
            ["alice@localhost/res", "bob@localhost/res"],
        )
        code, out, err = await self.mimctl("kick", "bob@localhost")
        self.assertEqual((code, out), (0, "ended the session of bob@localhost/res\n"))

        # Two users on different workers talk as on one server.
        carol = await self.login_on("carol", 1)
        dave = await self.login_on("dave", 2)
        received = dave.next_event("message", lambda m: m["body"] == "across")
        # Worker 1 learns of dave's session from worker 2's announcement on the bus: until
        # then a message for it is kept offline, so it is sent until one arrives.
        for _ in range(50):
            carol.xmpp.send_message(mto=dave.bound_jid, mbody="across", mtype="chat")
            await wait_for(asyncio.sleep(0.1))
            if received.done():
                break
        message = await wait_for(received)
        self.assertEqual(message["from"].bare, "carol@localhost")

        pids = self.worker_pids(process)
        os.kill(pids[1], signal.SIGKILL)
        await self.wait_for_output(
            process, f"Worker 1 (pid {pids[1]}) ended (signal SIGKILL)".encode()
        )
        await self.wait_for_output(process, b"Worker 1 started", count=2)
        restarted = self.worker_pids(process)[1]
        self.assertNotEqual(restarted, pids[1])
        await eventually(lambda: _ready(self.directory, 1))
        client = await self.connection_on(1)

        # SIGHUP reaches each worker, which reloads as a single server does.
        transport.signalProcess(signal.SIGHUP)
        await self.wait_for_output(process, b"Reloaded TLS certificate", count=2)
        self.assertRegex(process.text(), r"worker 1 \S+ Reloaded TLS certificate")
        self.assertRegex(process.text(), r"worker 2 \S+ Reloaded TLS certificate")

        # Each worker stops as a single server does: its clients are told why.
        transport.signalProcess(signal.SIGTERM)
        self.assertIn(b"<system-shutdown", await client.read_until_closed())
        ended = await process.ended
        self.assertIn(getattr(ended, "signal", None), (None, signal.SIGTERM), process.text())
        self.assertEqual(getattr(ended, "exitCode", None) or 0, 0, process.text())
        for pid in (restarted, pids[2]):
            self.assertFalse(_alive(pid), f"worker {pid} outlived the supervisor")
        self.assertIn(f"Worker 2 (pid {pids[2]}) stopped (signal SIGTERM)".encode(), process.output)
        self.assertNotIn(b"Traceback", process.output)

    async def test_a_worker_that_cannot_start_fails_the_start(self) -> None:
        # Worker 2's metrics port (the configured one + 1) is taken.
        taken = socket.socket()
        self.addCleanup(taken.close)
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        metrics_port = taken.getsockname()[1] - 1
        config = self.write_config(
            f'[metrics]\nenabled = true\nendpoint = "tcp:{metrics_port}:interface=127.0.0.1"\n'
        )
        out, err, code = await getProcessOutputAndValue(
            TWISTD,
            ["-n", "--pidfile=", "mim", "-c", config, "--workers", "2"],
            env=os.environ,
            path=self.directory,
        )
        self.assertEqual(code, 1, out)
        [line] = err.decode().splitlines()
        self.assertRegex(line, rf"^mim: could not start: .*{metrics_port + 1}")
        self.assertNotIn(b"Traceback", out)

    async def test_several_workers_need_the_cluster(self) -> None:
        path = os.path.join(self.directory, "single.toml")
        with open(path, "w") as f:
            f.write(f"[[listeners]]\nport = {self.port}\n")
        out, err, code = await getProcessOutputAndValue(
            TWISTD, ["-n", "--pidfile=", "mim", "-c", path, "--workers", "2"], env=os.environ
        )
        self.assertEqual(code, 1, out)
        self.assertEqual(
            err.decode().splitlines(),
            [f"mim: {path}: 2 workers need cluster.enabled = true (each worker is a cluster node)"],
        )


def _ready(directory: str, index: int) -> bool:
    try:
        _ask_worker(directory, index, "status")
    except OSError:
        return False
    return True
