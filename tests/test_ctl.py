"""Tests for mimctl: its commands against a SQLite database, and the installed console script."""

import getpass
import io
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
from contextlib import redirect_stderr

from twisted.internet.threads import deferToThread
from twisted.trial import unittest

from mim_twisted import ctl
from mim_twisted.auth.scram import HASHES, ScramCredentials, verify_password
from mim_twisted.config import load_config
from mim_twisted.storage import migrations
from mim_twisted.tap import open_storage
from tests import mysqlsupport
from tests.ci import unavailable

CONFIG = """\
[server]
domains = ["localhost", "example.org"]
data_dir = "data"
"""


class CtlTestCase(unittest.TestCase):
    """Each test has its own config file and data directory, in a fresh temporary directory."""

    config_text = CONFIG

    def setUp(self) -> None:
        self.directory = os.path.abspath(self.mktemp())
        os.makedirs(self.directory)
        self.config_path = os.path.join(self.directory, "mim.toml")
        with open(self.config_path, "w") as f:
            f.write(self.config_text)
        self.database_path = os.path.join(self.directory, "data", "mim.sqlite3")

    async def mimctl(self, *argv: str, stdin: str = "") -> tuple[int, str, str]:
        """Run mimctl with ``argv`` in this process: its exit status, stdout and stderr."""
        args = ctl.build_parser().parse_args(argv)
        stdout, stderr = io.StringIO(), io.StringIO()
        status = await ctl.run(
            load_config(self.config_path), args, io.StringIO(stdin), stdout, stderr
        )
        return status, stdout.getvalue(), stderr.getvalue()

    async def with_password(
        self, command: str, address: str, password: str
    ) -> tuple[int, str, str]:
        """Run ``command`` (register or passwd) for ``address`` with ``password`` on stdin."""
        return await self.mimctl(command, "--password-stdin", address, stdin=password + "\n")

    async def credentials(self, domain: str, username: str) -> dict[str, str] | None:
        database = await open_storage(load_config(self.config_path))
        try:
            return await database.accounts.get_credentials(domain, username)
        finally:
            await database.close()

    async def assertPassword(self, domain: str, username: str, password: str) -> None:
        credentials = await self.credentials(domain, username)
        self.assertEqual(set(credentials), set(HASHES))
        for mechanism, text in credentials.items():
            self.assertNotIn(password, text)
            self.assertTrue(verify_password(ScramCredentials.from_text(mechanism, text), password))


class AccountTests(CtlTestCase):
    async def test_register(self) -> None:
        self.assertEqual(
            await self.with_password("register", "Alice@LocalHost", "s3cret pass"),
            (0, "registered alice@localhost\n", ""),
        )
        await self.assertPassword("localhost", "alice", "s3cret pass")
        credentials = await self.credentials("localhost", "alice")
        scram = ScramCredentials.from_text("SCRAM-SHA-256", credentials["SCRAM-SHA-256"])
        self.assertFalse(verify_password(scram, "s3cret"))

    async def test_register_twice(self) -> None:
        await self.with_password("register", "alice@localhost", "one")
        self.assertEqual(
            await self.with_password("register", "alice@localhost", "two"),
            (1, "", "mimctl: alice@localhost is already registered\n"),
        )
        await self.assertPassword("localhost", "alice", "one")

    async def test_unusable_password(self) -> None:
        for stdin in ["", "\n", "bad\x07bell\n"]:
            status, _, stderr = await self.mimctl(
                "register", "--password-stdin", "alice@localhost", stdin=stdin
            )
            self.assertEqual(status, 1)
            self.assertTrue(stderr.startswith("mimctl: unusable password: "), stderr)
        self.assertIsNone(await self.credentials("localhost", "alice"))

    async def test_password_at_the_terminal(self) -> None:
        answers: list[str] = []

        def answer(prompt: str) -> str:
            if not answers:
                raise EOFError()  # Ctrl-D
            return answers.pop(0)

        self.patch(getpass, "getpass", answer)
        status, _, stderr = await self.mimctl("register", "alice@localhost")
        self.assertEqual((status, stderr), (1, "mimctl: no password given\n"))
        answers[:] = ["secret", "secreT"]
        status, _, stderr = await self.mimctl("register", "alice@localhost")
        self.assertEqual((status, stderr), (1, "mimctl: the passwords do not match\n"))
        answers[:] = ["secret", "secret"]
        status, _, stderr = await self.mimctl("register", "alice@localhost")
        self.assertEqual((status, stderr), (0, ""))
        await self.assertPassword("localhost", "alice", "secret")

    async def test_domain_not_served(self) -> None:
        for argv in [
            ("register", "--password-stdin", "bob@example.com"),
            ("list-users", "example.com"),
        ]:
            status, _, stderr = await self.mimctl(*argv, stdin="pass\n")
            self.assertEqual(status, 1)
            self.assertEqual(
                stderr,
                "mimctl: example.com is not a domain of this server "
                "(it serves localhost, example.org)\n",
            )

    def test_bad_jid(self) -> None:
        parser = ctl.build_parser()
        for command, argument, metavar in [
            ("register", "alice", "JID"),
            ("register", "alice@localhost/phone", "JID"),
            ("passwd", "al ice@localhost", "JID"),
            ("unregister", "alice@", "JID"),
            ("list-users", "alice@localhost", "DOMAIN"),
        ]:
            stderr = io.StringIO()
            self.patch(sys, "stderr", stderr)
            with self.assertRaises(SystemExit) as raised:
                parser.parse_args([command, argument])
            self.assertEqual(raised.exception.code, 2)
            self.assertIn(f"error: argument {metavar}: {argument!r} is not", stderr.getvalue())

    async def test_database_unreachable(self) -> None:
        with open(self.config_path, "a") as f:
            # Nothing listens on port 1: the connection is refused at once.
            f.write(
                '[storage]\nbackend = "postgresql"\n'
                '[storage.postgresql]\ndsn = "host=127.0.0.1 port=1 dbname=mim"\n'
            )
        status, stdout, stderr = await self.mimctl("list-users", "localhost")
        self.assertEqual((status, stdout), (1, ""))
        self.assertTrue(stderr.startswith("mimctl: postgresql database: "), stderr)
        self.assertEqual(stderr.count("\n"), 1)

    async def test_mysql_unreachable(self) -> None:
        with open(self.config_path, "a") as f:
            f.write('[storage]\nbackend = "mysql"\n[storage.mysql]\nport = 1\n')
        status, stdout, stderr = await self.mimctl("migrate")
        self.assertEqual((status, stdout), (1, ""))
        self.assertTrue(stderr.startswith("mimctl: mysql database: Can't connect to"), stderr)
        self.assertTrue(stderr.endswith(" (error 2003)\n"), stderr)

    async def test_unregister(self) -> None:
        await self.with_password("register", "alice@localhost", "pass")
        self.assertEqual(
            await self.mimctl("unregister", "alice@localhost"),
            (0, "unregistered alice@localhost\n", ""),
        )
        self.assertIsNone(await self.credentials("localhost", "alice"))
        self.assertEqual(
            await self.mimctl("unregister", "alice@localhost"),
            (1, "", "mimctl: alice@localhost is not registered\n"),
        )

    async def test_passwd(self) -> None:
        await self.with_password("register", "alice@localhost", "old")
        self.assertEqual(
            await self.with_password("passwd", "alice@localhost", "new"),
            (0, "changed the password of alice@localhost\n", ""),
        )
        await self.assertPassword("localhost", "alice", "new")
        self.assertEqual(
            await self.with_password("passwd", "bob@localhost", "new"),
            (1, "", "mimctl: bob@localhost is not registered\n"),
        )

    async def test_list_users(self) -> None:
        for address in ["carol@localhost", "alice@localhost", "bob@localhost", "dave@example.org"]:
            await self.with_password("register", address, "pass")
        self.assertEqual(
            await self.mimctl("list-users", "LocalHost"),
            (0, "alice@localhost\nbob@localhost\ncarol@localhost\n", ""),
        )
        self.assertEqual(
            await self.mimctl("list-users", "example.org"), (0, "dave@example.org\n", "")
        )


class CheckConfigTests(CtlTestCase):
    async def test_ok(self) -> None:
        status, stdout, stderr = await self.mimctl("check-config")
        self.assertEqual((status, stderr), (0, ""))
        self.assertEqual(
            stdout.splitlines(),
            [
                f"mimctl: {self.config_path}: OK",
                "  domains: localhost, example.org",
                "  listeners: 127.0.0.1:5222 (STARTTLS required)",
                f"  storage: sqlite, {self.database_path}",
            ],
        )
        self.assertFalse(os.path.exists(os.path.join(self.directory, "data")))

    async def test_embedded_default(self) -> None:
        args = ctl.build_parser().parse_args(["check-config"])
        stdout = io.StringIO()
        status = await ctl.run(load_config(None), args, io.StringIO(), stdout, io.StringIO())
        self.assertEqual(status, 0)
        self.assertEqual(stdout.getvalue().splitlines()[0], "mimctl: embedded default: OK")

    async def test_postgresql_password_not_shown(self) -> None:
        with open(self.config_path, "a") as f:
            f.write(
                '[storage]\nbackend = "postgresql"\n'
                '[storage.postgresql]\ndsn = "host=db.example dbname=mim password=hunter2"\n'
            )
        status, stdout, _ = await self.mimctl("check-config")
        self.assertEqual(status, 0)
        self.assertIn("  storage: postgresql, ", stdout)
        self.assertIn("host=db.example", stdout)
        self.assertNotIn("hunter2", stdout)

    async def test_mysql_password_not_shown(self) -> None:
        with open(self.config_path, "a") as f:
            f.write(
                '[storage]\nbackend = "mysql"\n'
                '[storage.mysql]\nhost = "db.example"\npassword = "hunter2"\n'
            )
        status, stdout, _ = await self.mimctl("check-config")
        self.assertEqual(status, 0)
        self.assertIn("  storage: mysql, database=mim user=mim host=db.example port=3306\n", stdout)
        self.assertNotIn("hunter2", stdout)

    def test_invalid_file(self) -> None:
        with open(self.config_path, "a") as f:
            f.write('[storage]\nbackend = "oracle"\n')
        stderr = io.StringIO()
        self.patch(sys, "stderr", stderr)
        self.assertEqual(ctl.main(["-c", self.config_path, "check-config"]), 1)
        self.assertEqual(
            stderr.getvalue(),
            f'mimctl: {self.config_path}: storage.backend: must be one of "sqlite", '
            '"postgresql", "mysql" (got "oracle")\n',
        )


class MigrateTests(CtlTestCase):
    config_text = CONFIG + "[storage]\nauto_migrate = false\n"

    async def test_migrate(self) -> None:
        newest = migrations.newest_version()
        self.assertEqual(
            await self.with_password("register", "alice@localhost", "pass"),
            (
                1,
                "",
                f"mimctl: the database schema is at version 0, this code needs version {newest}: "
                "run `mimctl migrate`\n",
            ),
        )
        self.assertEqual(await self.mimctl("migrate"), (0, f"schema version 0 -> {newest}\n", ""))
        self.assertEqual(
            await self.mimctl("migrate"), (0, f"schema is up to date (version {newest})\n", "")
        )
        self.assertEqual(
            await self.with_password("register", "alice@localhost", "pass"),
            (0, "registered alice@localhost\n", ""),
        )


class MySQLMigrateTests(MigrateTests):
    """mimctl migrate, and the account commands after it, on MySQL (the server never migrates
    it by itself)."""

    def setUp(self) -> None:
        options = mysqlsupport.create_temp_database(self)
        self.config_text = CONFIG + (
            '[storage]\nbackend = "mysql"\n[storage.mysql]\n'
            + "".join(f"{key} = {json.dumps(value)}\n" for key, value in options.items())
        )
        super().setUp()


class ConsoleScriptTests(CtlTestCase):
    async def test_installed_script(self) -> None:
        script = os.path.join(os.path.dirname(sys.executable), "mimctl")
        if not os.path.exists(script):
            unavailable(f"mimctl is not installed next to {sys.executable}", "pip install -e .")

        def mimctl(*argv: str, stdin: str = "") -> subprocess.CompletedProcess:
            return subprocess.run(
                [script, "-c", self.config_path, *argv],
                input=stdin,
                capture_output=True,
                text=True,
                cwd=self.directory,
                timeout=60,
            )

        done = await deferToThread(mimctl, "check-config")
        self.assertEqual((done.returncode, done.stderr), (0, ""))
        self.assertEqual(done.stdout.splitlines()[0], f"mimctl: {self.config_path}: OK")
        done = await deferToThread(
            mimctl, "register", "--password-stdin", "alice@localhost", stdin="pass\n"
        )
        self.assertEqual(
            (done.returncode, done.stdout, done.stderr), (0, "registered alice@localhost\n", "")
        )
        done = await deferToThread(mimctl, "list-users", "localhost")
        self.assertEqual((done.returncode, done.stdout, done.stderr), (0, "alice@localhost\n", ""))


class LiveCommandTests(CtlTestCase):
    """The live commands with no server running (tests/e2e/test_admin.py runs one)."""

    def setUp(self) -> None:
        # A short directory: a UNIX socket path holds at most 107 bytes.
        socket_directory = tempfile.mkdtemp(prefix="mim-ctl-")
        self.addCleanup(shutil.rmtree, socket_directory, True)
        self.socket = os.path.join(socket_directory, "admin.sock")
        self.config_text = CONFIG + f'[admin]\nsocket = "{self.socket}"\n'
        super().setUp()

    def not_running(self) -> tuple[int, str, str]:
        return 1, "", f"mimctl: mim-twisted is not running (no admin socket at {self.socket})\n"

    async def test_live_commands_say_the_server_is_not_running(self) -> None:
        for argv in (["status"], ["sessions"], ["kick", "alice@localhost/desk"], ["stats"]):
            self.assertEqual(await self.mimctl(*argv), self.not_running(), argv)

    async def test_socket_left_by_a_dead_server(self) -> None:
        with socket.socket(socket.AF_UNIX) as left:
            left.bind(self.socket)  # bound, never listening: connections are refused
        self.assertEqual(await self.mimctl("status"), self.not_running())

    async def test_account_commands_say_nothing_about_sessions(self) -> None:
        await self.with_password("register", "alice@localhost", "old")
        self.assertEqual(
            await self.with_password("passwd", "alice@localhost", "new"),
            (0, "changed the password of alice@localhost\n", ""),
        )
        self.assertEqual(
            await self.mimctl("unregister", "alice@localhost"),
            (0, "unregistered alice@localhost\n", ""),
        )

    async def test_admin_socket_disabled(self) -> None:
        with open(self.config_path, "a") as f:
            f.write("enabled = false\n")
        self.assertEqual(
            await self.mimctl("stats"),
            (1, "", f"mimctl: {self.config_path}: admin.enabled is false: no admin socket\n"),
        )

    async def test_sessions_of_a_domain_not_served(self) -> None:
        status, out, err = await self.mimctl("sessions", "example.com")
        self.assertEqual((status, out), (1, ""))
        self.assertIn("example.com is not a domain of this server", err)

    def test_kick_needs_an_account_jid(self) -> None:
        with self.assertRaises(SystemExit) as exited, redirect_stderr(io.StringIO()):
            ctl.build_parser().parse_args(["kick", "localhost"])
        self.assertEqual(exited.exception.code, 2)
