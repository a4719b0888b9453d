"""The installed `twistd mim` command: help text, a bad config, and a real start with a login."""

import os
import signal
import sys

from twisted.internet import defer, error, protocol, reactor
from twisted.internet.endpoints import TCP4ClientEndpoint
from twisted.internet.utils import getProcessOutputAndValue
from twisted.python.failure import Failure
from twisted.trial import unittest

from mim_twisted.auth.scram import derive_all
from mim_twisted.storage import open_database
from mim_twisted.xmpp.tls import SELF_SIGNED_NAME
from tests.e2e.harness import Client, free_port, require_asyncio_reactor

TWISTD = os.path.join(os.path.dirname(sys.executable), "twistd")


class ProcessOutput(protocol.ProcessProtocol):
    """Collects a child process's output; `ended` fires with how it ended."""

    def __init__(self) -> None:
        self.output = b""
        self.ended: defer.Deferred = defer.Deferred()

    def text(self) -> str:
        return self.output.decode("utf-8", "replace")

    def outReceived(self, data: bytes) -> None:
        self.output += data

    errReceived = outReceived

    def processEnded(self, reason: Failure) -> None:
        self.ended.callback(reason.value)


async def _wait_until_listening(port: int, process: ProcessOutput, seconds: float = 20.0) -> None:
    endpoint_factory = protocol.Factory.forProtocol(protocol.Protocol)
    for _ in range(int(seconds * 10)):
        if process.ended.called:
            raise AssertionError(f"twistd exited early:\n{process.text()}")
        try:
            connection = await TCP4ClientEndpoint(reactor, "127.0.0.1", port).connect(
                endpoint_factory
            )
            connection.transport.loseConnection()
            return
        except error.ConnectError:
            await _sleep(0.1)
    raise AssertionError(f"twistd did not listen on {port}:\n{process.text()}")


def _sleep(seconds: float) -> defer.Deferred:
    d: defer.Deferred = defer.Deferred()
    reactor.callLater(seconds, d.callback, None)
    return d


class TwistdTests(unittest.TestCase):
    async def test_help_lists_the_options(self) -> None:
        out, err, code = await getProcessOutputAndValue(TWISTD, ["mim", "--help"], env=os.environ)
        self.assertEqual(code, 0, err)
        self.assertIn(b"--config", out)
        self.assertIn(b"--log-traffic", out)

    async def test_bad_config_stops_the_start_with_one_line(self) -> None:
        path = os.path.abspath(self.mktemp())
        with open(path, "w") as f:
            f.write('[storage]\nbackend = "mysql"\n')
        out, err, code = await getProcessOutputAndValue(
            TWISTD, ["-n", "--pidfile=", "mim", "-c", path], env=os.environ
        )
        self.assertNotEqual(code, 0)
        self.assertEqual(
            err.decode().strip(),
            f'mim: {path}: storage.backend: must be one of "sqlite", "postgresql" (got "mysql")',
        )

    async def test_start_and_login(self) -> None:
        require_asyncio_reactor()
        directory = os.path.abspath(self.mktemp())
        os.makedirs(directory)
        port = free_port()
        config = os.path.join(directory, "mim.toml")
        with open(config, "w") as f:
            f.write(f'[server]\ndata_dir = "data"\n[[listeners]]\nport = {port}\n')
        database = await open_database(
            "sqlite", sqlite_path=os.path.join(directory, "data", "mim.sqlite3"), auto_migrate=True
        )
        await database.accounts.create_account("localhost", "alice", derive_all("wonderland"))
        await database.close()

        process = ProcessOutput()
        transport = reactor.spawnProcess(
            process,
            TWISTD,
            [TWISTD, "-n", "--pidfile=", "mim", "-c", config],
            env=os.environ,
            path=directory,
        )
        self.addCleanup(self._stop, transport, process)
        await _wait_until_listening(port, process)

        client = Client(
            "alice@localhost/cli",
            "wonderland",
            port,
            os.path.join(directory, "data", SELF_SIGNED_NAME),
            "SCRAM-SHA-256",
        )
        self.addCleanup(client.close)
        self.assertEqual(await client.connect(), "session_start")
        self.assertIn(f"Listening for XMPP clients on 127.0.0.1:{port}".encode(), process.output)

    async def _stop(self, transport: object, process: ProcessOutput) -> None:
        if not process.ended.called:
            transport.signalProcess(signal.SIGTERM)
        ended = await process.ended
        # twistd shuts down cleanly, then re-raises the signal so its exit status reports it.
        self.assertIn(getattr(ended, "signal", None), (None, signal.SIGTERM), process.output)
