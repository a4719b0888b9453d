"""A third party's extension as an operator installs it: mim-twisted and examples/mim-entity-time
pip-installed (not editable) into a fresh virtualenv, `twistd mim` from there, queried with
slixmpp with and without the extension's config table; a table naming an extension that is not
installed stops the start, and `mimctl check-config`, with one line."""

import os
import shutil
import signal
import sys
from datetime import UTC, datetime

from twisted.internet import reactor
from twisted.internet.utils import getProcessOutputAndValue
from twisted.trial import unittest

from mim_twisted.auth.scram import derive_all
from mim_twisted.storage import open_database
from mim_twisted.xmpp.tls import SELF_SIGNED_NAME
from tests.ci import unavailable
from tests.e2e.harness import Client, free_port, require_asyncio_reactor
from tests.e2e.test_extensions import NS_TIME, ask, error_condition, server_features
from tests.e2e.test_twistd import ProcessOutput, _wait_until_listening

SOURCE = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
# What a source distribution would hold: no virtualenvs, build leftovers or test output.
NOT_SHIPPED = shutil.ignore_patterns(
    ".git", ".venv", ".tox", "build", "dist", "*.egg-info", "__pycache__", "_trial_temp*",
    "mim-data", "dropin.cache",
)  # fmt: skip


class InstalledExtensionTests(unittest.TestCase):
    # One virtualenv for the class, made by the first test: installing takes seconds.
    venv: str | None = None
    install_error: str | None = None

    async def setUp(self) -> None:
        if self.venv is None and self.install_error is None:
            await self.install()
        if self.venv is None:
            unavailable(
                "mim-twisted and the example could not be installed into a new virtualenv",
                f"pip needs the package index: {self.install_error}",
            )
        self.directory = os.path.abspath(self.mktemp())
        os.makedirs(self.directory)

    @classmethod
    async def install(cls) -> None:
        # Under the test run's directory, which trial empties at the next run.
        workspace = os.path.abspath(f"extension_package_{os.getpid()}")
        shutil.rmtree(workspace, ignore_errors=True)
        source = os.path.join(workspace, "source")
        shutil.copytree(SOURCE, source, ignore=NOT_SHIPPED)
        venv = os.path.join(workspace, "venv")
        commands = [
            ["-m", "venv", "--without-pip", venv],
            # The pip of this environment installs into the new one: one pip less to install.
            ["-m", "pip", "--python", os.path.join(venv, "bin", "python")]
            + ["install", "--quiet", "--no-compile", "--disable-pip-version-check"]
            + [source, os.path.join(source, "examples", "mim-entity-time")],
        ]
        for arguments in commands:
            out, err, code = await getProcessOutputAndValue(
                sys.executable, arguments, env=_clean_env()
            )
            if code != 0:
                cls.install_error = f"{' '.join(arguments[:3])}: {err.decode()[-2000:].strip()}"
                return
        cls.venv = venv

    def command(self, name: str) -> str:
        return os.path.join(self.venv, "bin", name)

    def write_config(self, port: int, extra: str = "") -> str:
        path = os.path.join(self.directory, "mim.toml")
        with open(path, "w") as f:
            f.write(f'[server]\ndata_dir = "data"\n[[listeners]]\nport = {port}\n{extra}')
        return path

    async def run_installed(self, name: str, *args: str) -> tuple[str, str, int]:
        out, err, code = await getProcessOutputAndValue(
            self.command(name), args, env=_clean_env(), path=self.directory
        )
        return out.decode(), err.decode(), code

    async def start(self, config: str, port: int) -> None:
        process = ProcessOutput()
        transport = reactor.spawnProcess(
            process,
            self.command("twistd"),
            [self.command("twistd"), "-n", "--pidfile=", "mim", "-c", config],
            env=_clean_env(),
            path=self.directory,
        )
        self.addCleanup(self.stop, transport, process)
        await _wait_until_listening(port, process)
        self.server = (transport, process)

    async def stop(self, transport: object, process: ProcessOutput) -> None:
        if not process.ended.called:
            transport.signalProcess(signal.SIGTERM)
        await process.ended

    async def online(self, port: int) -> Client:
        client = Client(
            "alice@localhost/clock",
            "wonderland",
            port,
            os.path.join(self.directory, "data", SELF_SIGNED_NAME),
            "SCRAM-SHA-256",
        )
        self.addCleanup(client.close)
        self.assertEqual(await client.connect(), "session_start")
        return client

    async def test_installed_apart_from_the_source(self) -> None:
        out, err, code = await self.run_installed(
            "python", "-c", "import mim_entity_time, mim_twisted; print(mim_twisted.__file__)"
        )
        self.assertEqual(code, 0, err)
        self.assertTrue(out.startswith(self.venv), out)
        # The example adds one module to mim-twisted's plugin package and claims nothing else.
        out, err, code = await self.run_installed(
            "python",
            "-c",
            "from importlib.metadata import files\n"
            "for f in files('mim-entity-time'):\n"
            "    if f.parts[0] == 'mim_twisted': print(f)",
        )
        self.assertEqual((out.split(), code), (["mim_twisted/plugins/entity_time.py"], 0), err)

    async def test_enabled_then_not(self) -> None:
        require_asyncio_reactor()
        port = free_port()
        config = self.write_config(port, '[extensions.entity_time]\nutc_offset = "+05:30"\n')
        out, err, code = await self.run_installed("mimctl", "-c", config, "check-config")
        self.assertEqual(code, 0, err)
        self.assertIn("  extensions: entity_time\n", out)

        database = await open_database(
            "sqlite",
            sqlite_path=os.path.join(self.directory, "data", "mim.sqlite3"),
            auto_migrate=True,
        )
        await database.accounts.create_account("localhost", "alice", derive_all("wonderland"))
        await database.close()

        await self.start(config, port)
        client = await self.online(port)
        reply = await ask(client, "localhost", f"{{{NS_TIME}}}time")
        self.assertEqual(reply.get("type"), "result")
        self.assertEqual(reply.findtext(f"{{{NS_TIME}}}time/{{{NS_TIME}}}tzo"), "+05:30")
        utc = reply.findtext(f"{{{NS_TIME}}}time/{{{NS_TIME}}}utc")
        stated = datetime.strptime(utc, "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=UTC)
        self.assertLess(abs((datetime.now(UTC) - stated).total_seconds()), 5)
        self.assertIn(NS_TIME, await server_features(client))
        await client.close()
        await self.stop(*self.server)

        # The same installation without the table: the extension is not there.
        self.write_config(port)
        await self.start(config, port)
        client = await self.online(port)
        reply = await ask(client, "localhost", f"{{{NS_TIME}}}time")
        self.assertEqual(error_condition(reply), "service-unavailable")
        self.assertNotIn(NS_TIME, await server_features(client))

    async def test_an_extension_that_is_not_installed(self) -> None:
        config = self.write_config(free_port(), "[extensions.entity_tme]\n")
        problem = (
            f'{config}: extensions.entity_tme: no extension "entity_tme" is installed'
            ' (installed: "entity_time")'
        )
        out, err, code = await self.run_installed("twistd", "-n", "--pidfile=", "mim", "-c", config)
        self.assertEqual(code, 1, out)
        self.assertEqual(err.splitlines(), [f"mim: {problem}"])
        out, err, code = await self.run_installed("mimctl", "-c", config, "check-config")
        self.assertEqual(code, 1, out)
        self.assertEqual(err.splitlines(), [f"mimctl: {problem}"])


def _clean_env() -> dict[str, str]:
    """This process's environment without what would make the new virtualenv see this one."""
    environment = dict(os.environ)
    for name in ("PYTHONPATH", "VIRTUAL_ENV", "PYTHONHOME"):
        environment.pop(name, None)
    return environment
