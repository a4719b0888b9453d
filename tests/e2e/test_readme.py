"""README.md's first command, run as a new user would: a fresh virtualenv in a copy of the
project, the server started on the embedded default, and a real login to it."""

import os
import re
import shutil
import signal
import socket
import subprocess

from twisted.internet import reactor, threads
from twisted.trial import unittest

from tests.e2e.harness import Client, eventually, require_asyncio_reactor
from tests.e2e.test_twistd import ProcessOutput

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
DEFAULT_PORT = 5222
LISTENING = f"Listening for XMPP clients on 127.0.0.1:{DEFAULT_PORT} "


def readme_commands() -> list[str]:
    with open(os.path.join(ROOT, "README.md")) as f:
        return re.findall(r"```sh\n(.+?)\n```", f.read())


def copy_project(target: str) -> None:
    """The files git tracks, as a fresh clone would have them."""
    files = subprocess.run(
        ["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, check=True
    ).stdout.split(b"\0")
    for name in filter(None, (f.decode() for f in files)):
        source = os.path.join(ROOT, name)
        destination = os.path.join(target, name)
        os.makedirs(os.path.dirname(destination), exist_ok=True)
        if os.path.islink(source):
            os.symlink(os.readlink(source), destination)
        else:
            shutil.copy2(source, destination)


def port_is_free(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) != 0


class ReadmeTests(unittest.TestCase):
    timeout = 600

    async def test_install_and_start_command(self) -> None:
        require_asyncio_reactor()
        self.assertTrue(port_is_free(DEFAULT_PORT), "port 5222 is in use: stop that server first")
        command = readme_commands()[0]
        self.assertIn("twistd -n mim", command)
        project = os.path.abspath(self.mktemp())
        copy_project(project)

        output = ProcessOutput()
        transport = reactor.spawnProcess(
            output,
            "/usr/bin/setsid",
            ["setsid", "bash", "-c", command],
            env=os.environ,
            path=project,
        )
        self.addCleanup(self._stop, transport, output)
        # The server's own line, not just a taken port: another program may bind 5222 meanwhile.
        await eventually(lambda: output.ended.called or LISTENING in output.text(), timeout=540)
        self.assertFalse(output.ended.called, output.text())

        mimctl = os.path.join(project, ".venv", "bin", "mimctl")
        registered = await threads.deferToThread(
            subprocess.run,
            [mimctl, "register", "--password-stdin", "alice@localhost"],
            input=b"wonderland\n",
            cwd=project,
            capture_output=True,
        )
        self.assertEqual(registered.returncode, 0, registered.stderr)

        certificate = os.path.join(project, "mim-data", "self-signed.pem")
        client = Client(
            "alice@localhost/readme", "wonderland", DEFAULT_PORT, certificate, "SCRAM-SHA-256"
        )
        self.addCleanup(client.close)
        self.assertEqual(await client.connect(), "session_start")

    async def _stop(self, transport: object, output: "ProcessOutput") -> None:
        if not output.ended.called:
            # The command is `venv && pip && twistd`: stop the whole process group.
            os.killpg(transport.pid, signal.SIGTERM)
        await output.ended
