"""The data directory and its files are the owner's alone, whatever the umask (issue 8, item 4).

Each test sets the umask 022 that a daemon usually runs with, and checks the modes of the data
directory, the SQLite database and its -wal and -shm files, and the self-signed certificate's key,
as made by the server and by mimctl, and as tightened when an earlier version left them readable.
"""

import io
import os
import sqlite3
import stat

from twisted.logger import formatEvent, globalLogPublisher
from twisted.trial import unittest

from mim_twisted import ctl
from mim_twisted.auth.scram import derive_all
from mim_twisted.config import load_config
from mim_twisted.storage import permissions
from mim_twisted.storage.sqlite import SQLiteDatabase
from mim_twisted.tap import MimService
from mim_twisted.xmpp.tls import SELF_SIGNED_NAME, generate_self_signed

CONFIG = """\
[server]
domains = ["localhost"]
data_dir = "data"
[[listeners]]
address = "127.0.0.1"
port = 0
"""


def mode(path: str) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


class PermissionTestCase(unittest.TestCase):
    def setUp(self) -> None:
        previous = os.umask(0o022)
        self.addCleanup(os.umask, previous)
        self.directory = os.path.abspath(self.mktemp())
        os.makedirs(self.directory)
        self.config_path = os.path.join(self.directory, "mim.toml")
        with open(self.config_path, "w") as f:
            f.write(CONFIG)
        self.data_dir = os.path.join(self.directory, "data")
        self.database_path = os.path.join(self.data_dir, "mim.sqlite3")
        self.messages: list[str] = []

        def observe(event: dict) -> None:
            self.messages.append(formatEvent(event))

        globalLogPublisher.addObserver(observe)
        self.addCleanup(globalLogPublisher.removeObserver, observe)

    def open_reader(self) -> sqlite3.Connection:
        """A second connection to the database: while it is open, -wal and -shm stay."""
        reader = sqlite3.connect(self.database_path)
        self.addCleanup(reader.close)
        reader.execute("SELECT count(*) FROM users").fetchall()
        return reader

    def assertPrivate(self, *names: str) -> None:
        self.assertEqual(oct(mode(self.data_dir)), oct(0o700))
        for name in names:
            self.assertEqual(
                (name, oct(mode(os.path.join(self.data_dir, name)))), (name, oct(0o600))
            )

    def make_loose_data_dir(self) -> sqlite3.Connection:
        """What an earlier version left under umask 022: everything readable by all.

        Returns the connection that keeps the database's -wal and -shm files in place.
        """
        os.makedirs(self.data_dir, mode=0o755)
        generate_self_signed(os.path.join(self.data_dir, SELF_SIGNED_NAME), ["localhost"])
        os.chmod(os.path.join(self.data_dir, SELF_SIGNED_NAME), 0o644)
        earlier = sqlite3.connect(self.database_path)
        self.addCleanup(earlier.close)
        earlier.execute("PRAGMA journal_mode=WAL")
        earlier.execute("CREATE TABLE leftover (x)")
        earlier.commit()
        for name in ("mim.sqlite3", "mim.sqlite3-wal", "mim.sqlite3-shm"):
            self.assertEqual(mode(os.path.join(self.data_dir, name)), 0o644)
        return earlier

    def assertTightened(self, *names: str) -> None:
        for path in (self.data_dir, *(os.path.join(self.data_dir, name) for name in names)):
            logged = [
                m for m in self.messages if m.startswith(f"Tightened the permissions of {path} ")
            ]
            self.assertEqual(len(logged), 1, (path, self.messages))


class ServerPermissionTests(PermissionTestCase):
    async def start_server(self) -> MimService:
        server = MimService(load_config(self.config_path))
        server.startService()
        self.addCleanup(server.stopService)
        return await server.ready

    async def test_new_data_directory(self) -> None:
        server = await self.start_server()
        await server.database.accounts.create_account(
            "localhost", "alice", derive_all("secret", 4096)
        )
        self.open_reader()
        self.assertPrivate(SELF_SIGNED_NAME, "mim.sqlite3", "mim.sqlite3-wal", "mim.sqlite3-shm")
        self.assertEqual([m for m in self.messages if m.startswith("Tightened")], [])

    async def test_readable_files_of_an_earlier_version_are_tightened(self) -> None:
        self.make_loose_data_dir()
        await self.start_server()
        self.assertPrivate(SELF_SIGNED_NAME, "mim.sqlite3", "mim.sqlite3-wal", "mim.sqlite3-shm")
        self.assertTightened(SELF_SIGNED_NAME, "mim.sqlite3", "mim.sqlite3-wal", "mim.sqlite3-shm")


class CtlPermissionTests(PermissionTestCase):
    async def mimctl(self, *argv: str, stdin: str = "") -> None:
        args = ctl.build_parser().parse_args(argv)
        stderr = io.StringIO()
        status = await ctl.run(
            load_config(self.config_path), args, io.StringIO(stdin), io.StringIO(), stderr
        )
        self.assertEqual((status, stderr.getvalue()), (0, ""))

    async def test_new_data_directory(self) -> None:
        await self.mimctl("migrate")
        self.assertPrivate("mim.sqlite3")
        self.open_reader()
        await self.mimctl("register", "--password-stdin", "alice@localhost", stdin="secret\n")
        self.assertPrivate("mim.sqlite3", "mim.sqlite3-wal", "mim.sqlite3-shm")

    async def test_register_creates_a_private_data_directory(self) -> None:
        await self.mimctl("register", "--password-stdin", "alice@localhost", stdin="secret\n")
        self.assertPrivate("mim.sqlite3")

    async def test_readable_files_of_an_earlier_version_are_tightened(self) -> None:
        self.make_loose_data_dir()
        await self.mimctl("migrate")
        self.assertPrivate(SELF_SIGNED_NAME, "mim.sqlite3", "mim.sqlite3-wal", "mim.sqlite3-shm")
        self.assertTightened(SELF_SIGNED_NAME, "mim.sqlite3", "mim.sqlite3-wal", "mim.sqlite3-shm")


class SQLiteDatabasePermissionTests(PermissionTestCase):
    async def test_a_database_outside_the_data_directory(self) -> None:
        # The directory is made private when the database makes it, the files always.
        path = os.path.join(self.directory, "elsewhere", "deeper", "mim.sqlite3")
        database = SQLiteDatabase(path)
        self.addCleanup(database.close)
        await database.migrate()
        self.assertEqual(mode(os.path.dirname(path)), 0o700)
        for name in ("", "-wal", "-shm"):
            self.assertEqual(mode(path + name), 0o600)

    def test_an_existing_directory_of_the_operator_is_left_alone(self) -> None:
        directory = os.path.join(self.directory, "shared")
        os.makedirs(directory, mode=0o755)
        database = SQLiteDatabase(os.path.join(directory, "mim.sqlite3"))
        self.addCleanup(database.close)
        self.assertEqual(mode(directory), 0o755)
        self.assertEqual(mode(os.path.join(directory, "mim.sqlite3")), 0o600)


class DirectoryRaceTests(PermissionTestCase):
    def test_a_directory_made_meanwhile_by_another_process_is_tightened(self) -> None:
        # Two workers starting together: both find no directory, the other makes it first.
        path = os.path.join(os.path.abspath(self.mktemp()), "data")
        real_stat = os.stat
        made_by_the_other: list[str] = []

        def stat_after_the_other_made_it(target, *args, **kwargs):
            if target == path and not made_by_the_other:
                made_by_the_other.append(target)
                os.makedirs(path, mode=0o755)
                os.chmod(path, 0o755)
                raise FileNotFoundError(target)
            return real_stat(target, *args, **kwargs)

        self.patch(os, "stat", stat_after_the_other_made_it)
        permissions.secure_directory(path)
        self.assertEqual(stat.S_IMODE(real_stat(path).st_mode), 0o700)
