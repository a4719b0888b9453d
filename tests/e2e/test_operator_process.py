"""An operator's view of a real `twistd -n mim` process: mimctl's live commands through the
admin socket, a deleted account's session ended, Prometheus metrics, and the socket removed on
SIGTERM."""

import os
import shutil
import signal
import sys
import tempfile

from prometheus_client.parser import text_string_to_metric_families
from twisted.internet import reactor
from twisted.internet.utils import getProcessOutputAndValue
from twisted.trial import unittest
from twisted.web.client import Agent, readBody

from mim_twisted.auth.scram import derive_all
from mim_twisted.storage import open_database
from mim_twisted.xmpp.tls import SELF_SIGNED_NAME
from tests.ci import unavailable
from tests.e2e.harness import Client, free_port, require_asyncio_reactor, wait_for
from tests.e2e.test_twistd import TWISTD, ProcessOutput, _wait_for_file_gone, _wait_until_listening

MIMCTL = os.path.join(os.path.dirname(sys.executable), "mimctl")


class OperatorProcessTests(unittest.TestCase):
    async def test_admin_socket_and_metrics_of_a_running_process(self) -> None:
        require_asyncio_reactor()
        if not os.path.exists(MIMCTL):
            unavailable(f"mimctl is not installed next to {sys.executable}", "pip install -e .")
        # A short directory: the admin socket's path must fit in 107 bytes.
        directory = tempfile.mkdtemp(prefix="mim-operator-")
        self.addCleanup(shutil.rmtree, directory, True)
        port, metrics_port = free_port(), free_port()
        self.config = os.path.join(directory, "mim.toml")
        with open(self.config, "w") as f:
            f.write(
                f'[server]\ndata_dir = "data"\n[[listeners]]\nport = {port}\n'
                f'[metrics]\nenabled = true\nendpoint = "tcp:{metrics_port}:interface=127.0.0.1"\n'
            )
        database = await open_database(
            "sqlite", sqlite_path=os.path.join(directory, "data", "mim.sqlite3"), auto_migrate=True
        )
        await database.accounts.create_account("localhost", "victim", derive_all("pass"))
        await database.close()

        process = ProcessOutput()
        transport = reactor.spawnProcess(
            process,
            TWISTD,
            [TWISTD, "-n", "--pidfile=", "mim", "-c", self.config],
            env=os.environ,
            path=directory,
        )
        self.addCleanup(self._stop, transport, process)
        await _wait_until_listening(port, process)
        socket_path = os.path.join(directory, "data", "admin.sock")
        self.assertTrue(os.path.exists(socket_path), process.text())

        victim = Client(
            "victim@localhost/desk",
            "pass",
            port,
            os.path.join(directory, "data", SELF_SIGNED_NAME),
            None,
        )
        self.addCleanup(victim.close)
        self.assertEqual(await victim.connect(), "session_start")

        code, out, err = await self.mimctl("status")
        self.assertEqual((code, err), (0, ""))
        self.assertIn("  sessions: 1 (connections: 1)", out.splitlines())

        agent = Agent(reactor)
        response = await agent.request(b"GET", f"http://127.0.0.1:{metrics_port}/metrics".encode())
        families = {
            family.name: family
            for family in text_string_to_metric_families((await readBody(response)).decode())
        }
        logins = {
            (s.labels["mechanism"], s.labels["result"]): s.value
            for s in families["mim_logins"].samples
        }
        self.assertEqual(logins, {("SCRAM-SHA-256", "success"): 1})
        response = await agent.request(b"GET", f"http://127.0.0.1:{metrics_port}/health".encode())
        self.assertEqual(response.code, 200)
        await readBody(response)

        ended = victim.next_event("disconnected")
        code, out, err = await self.mimctl("unregister", "victim@localhost")
        self.assertEqual(
            (code, out, err),
            (0, "unregistered victim@localhost\nended 1 live session(s) (not-authorized)\n", ""),
        )
        await wait_for(ended)

        transport.signalProcess(signal.SIGTERM)
        await process.ended
        await _wait_for_file_gone(socket_path)
        code, out, err = await self.mimctl("stats")
        self.assertEqual(
            (code, out, err),
            (1, "", f"mimctl: mim-twisted is not running (no admin socket at {socket_path})\n"),
        )

    async def mimctl(self, *argv: str) -> tuple[int, str, str]:
        out, err, code = await getProcessOutputAndValue(
            MIMCTL, ["-c", self.config, *argv], env=os.environ
        )
        return code, out.decode(), err.decode()

    async def _stop(self, transport: object, process: ProcessOutput) -> None:
        if not process.ended.called:
            transport.signalProcess(signal.SIGTERM)
        await process.ended
