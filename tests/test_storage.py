"""The storage backends against their contract, and the schema migrations on real databases."""

import os
import sqlite3
from importlib.resources.abc import Traversable
from pathlib import Path

import psycopg2
from twisted.internet.defer import Deferred, succeed
from twisted.trial.unittest import SynchronousTestCase, TestCase

from mim_twisted.storage import open_database
from mim_twisted.storage.interfaces import IDatabase, SchemaOutdated, SchemaTooNew
from mim_twisted.storage.memory import MemoryDatabase
from mim_twisted.storage.migrations import (
    SCHEMA_DIR,
    Step,
    newest_version,
    plan,
    split_statements,
)
from mim_twisted.storage.postgres import PostgresDatabase
from mim_twisted.storage.sqlite import SQLiteDatabase
from tests import pgsupport
from tests.storage_contract import AccountStoreContract, credentials

BACKENDS = ("sqlite", "postgresql")


class MemoryStorageTests(AccountStoreContract, TestCase):
    def open_empty_database(self) -> Deferred[IDatabase]:
        return succeed(MemoryDatabase())


class SQLiteStorageTests(AccountStoreContract, TestCase):
    def open_empty_database(self) -> Deferred[IDatabase]:
        # In a directory that does not exist yet: the database creates it.
        database = SQLiteDatabase(os.path.join(self.mktemp(), "data", "mim.sqlite3"))
        self.addCleanup(database.close)
        return succeed(database)


class PostgresStorageTests(AccountStoreContract, TestCase):
    def open_empty_database(self) -> Deferred[IDatabase]:
        database = PostgresDatabase(pgsupport.create_temp_database(self), pool_size=2)
        self.addCleanup(database.close)
        return database.start()


def write_schema_dir(path: str, upgrades: dict[int, str]) -> Path:
    """A schema directory at ``path``: the packaged schema with ``upgrades`` (version: SQL, the
    same for every backend) as upgrade scripts and, as the convention wants, in the full schema."""
    schema_dir = Path(path)
    for backend in BACKENDS:
        full_schema = (SCHEMA_DIR / f"{backend}.sql").read_text(encoding="utf-8")
        (schema_dir / "upgrades" / backend).mkdir(parents=True)
        for version, script in sorted(upgrades.items()):
            (schema_dir / "upgrades" / backend / f"{version:03d}.sql").write_text(script)
            full_schema += "\n" + script
        (schema_dir / f"{backend}.sql").write_text(full_schema)
    return schema_dir


MOTD_UPGRADES = {
    2: "CREATE TABLE motd (id INTEGER PRIMARY KEY, body TEXT NOT NULL);",
    # Runs only after 2 has created the table.
    3: "ALTER TABLE motd ADD COLUMN author TEXT;",
}


class StatementSplittingTests(SynchronousTestCase):
    def test_splits_at_semicolons_and_drops_comments(self) -> None:
        script = "-- header\nCREATE TABLE a (x INTEGER); /* between */ CREATE TABLE b (y TEXT);\n"
        self.assertEqual(
            split_statements(script), ["CREATE TABLE a (x INTEGER)", "CREATE TABLE b (y TEXT)"]
        )

    def test_semicolons_inside_quotes_do_not_split(self) -> None:
        script = "INSERT INTO t VALUES ('a;b', 'it''s; ok'); SELECT \"odd;name\" FROM t"
        self.assertEqual(
            split_statements(script),
            ["INSERT INTO t VALUES ('a;b', 'it''s; ok')", 'SELECT "odd;name" FROM t'],
        )

    def test_dollar_quoted_body_is_one_statement(self) -> None:
        body = "CREATE FUNCTION f() RETURNS int AS $body$ SELECT 1; $body$ LANGUAGE sql"
        self.assertEqual(split_statements(body + "; SELECT 2;"), [body, "SELECT 2"])

    def test_comment_markers_inside_strings_are_text(self) -> None:
        self.assertEqual(split_statements("SELECT '--x', '/*y*/';"), ["SELECT '--x', '/*y*/'"])

    def test_only_comments_is_no_statement(self) -> None:
        self.assertEqual(split_statements("-- nothing ;\n/* here; */\n"), [])


class PlanTests(SynchronousTestCase):
    def test_packaged_upgrade_scripts_match_across_backends(self) -> None:
        def script_names(backend: str) -> set[str]:
            directory = SCHEMA_DIR / "upgrades" / backend
            return {entry.name for entry in directory.iterdir()} if directory.is_dir() else set()

        self.assertEqual(script_names("sqlite"), script_names("postgresql"))

    def test_packaged_full_schemas_create_the_version_and_users_tables(self) -> None:
        for backend in BACKENDS:
            (step,) = plan(0, backend)
            self.assertEqual(step.version, newest_version())
            created = [s.split("(")[0].split()[-1] for s in step.statements]
            self.assertEqual(created, ["schema_version", "users"])

    def test_newest_version_is_the_highest_upgrade_script(self) -> None:
        schema_dir = write_schema_dir(self.mktemp(), MOTD_UPGRADES)
        (schema_dir / "upgrades" / "README.md").write_text("not a script")
        (schema_dir / "upgrades" / "sqlite" / "notes.txt").write_text("not a script")
        self.assertEqual(newest_version(schema_dir), 3)

    def test_newest_version_without_upgrades_is_1(self) -> None:
        self.assertEqual(newest_version(Path(self.mktemp())), 1)

    def test_empty_database_gets_the_full_schema(self) -> None:
        schema_dir = write_schema_dir(self.mktemp(), MOTD_UPGRADES)
        (step,) = plan(0, "sqlite", schema_dir)
        self.assertEqual(step.version, 3)
        self.assertIn(split_statements(MOTD_UPGRADES[3])[0], step.statements)

    def test_outdated_database_gets_the_upgrades_in_order(self) -> None:
        schema_dir = write_schema_dir(self.mktemp(), MOTD_UPGRADES)
        self.assertEqual(
            plan(1, "postgresql", schema_dir),
            [
                Step(2, split_statements(MOTD_UPGRADES[2])),
                Step(3, split_statements(MOTD_UPGRADES[3])),
            ],
        )
        self.assertEqual(plan(2, "postgresql", schema_dir), [Step(3, ["ALTER TABLE motd ADD COLUMN author TEXT"])])
        self.assertEqual(plan(3, "postgresql", schema_dir), [])

    def test_database_newer_than_code_is_refused(self) -> None:
        schema_dir = write_schema_dir(self.mktemp(), MOTD_UPGRADES)
        error = self.assertRaises(SchemaTooNew, plan, 4, "sqlite", schema_dir)
        self.assertIn("version 4", str(error))

    def test_missing_upgrade_script_is_an_error(self) -> None:
        schema_dir = write_schema_dir(self.mktemp(), MOTD_UPGRADES)
        (schema_dir / "upgrades" / "sqlite" / "002.sql").unlink()
        self.assertRaises(FileNotFoundError, plan, 1, "sqlite", schema_dir)


class SQLMigrationTests:
    """Migrations run on a real database; mixed into a TestCase per SQL backend, which provides:

    ``backend``, the name open_database knows it by; ``open_at(schema_dir)``, the test's one
    database (empty at first) opened with schema files from ``schema_dir`` and closed by cleanups;
    ``open_with_factory(auto_migrate)``, the same through open_database; ``columns(table)``, the
    column names of ``table`` read with a connection of the test's own, [] if there is none.
    """

    backend: str

    def open_at(self, schema_dir: Traversable) -> Deferred[IDatabase]:
        raise NotImplementedError

    def open_with_factory(self, auto_migrate: bool) -> Deferred[IDatabase]:
        raise NotImplementedError

    def columns(self, table: str) -> list[str]:
        raise NotImplementedError

    async def open_migrated_at_version_1(self) -> IDatabase:
        database = await self.open_at(SCHEMA_DIR)
        self.assertEqual(await database.migrate(), 1)
        await database.accounts.create_account("example.org", "alice", credentials("a"))
        return database

    async def test_empty_database_is_at_version_0(self) -> None:
        database = await self.open_at(SCHEMA_DIR)
        self.assertEqual(await database.schema_version(), 0)

    async def test_migrate_creates_the_full_schema(self) -> None:
        database = await self.open_at(SCHEMA_DIR)
        self.assertEqual(await database.migrate(), newest_version())
        self.assertEqual(
            self.columns("users"),
            ["server", "username", "scram_sha1", "scram_sha256", "created_at"],
        )

    async def test_upgrade_scripts_run_in_order_and_keep_data(self) -> None:
        await self.open_migrated_at_version_1()
        upgraded = await self.open_at(write_schema_dir(self.mktemp(), MOTD_UPGRADES))
        self.assertEqual(await upgraded.schema_version(), 1)
        self.assertEqual(await upgraded.migrate(), 3)
        self.assertEqual(await upgraded.schema_version(), 3)
        self.assertEqual(self.columns("motd"), ["id", "body", "author"])
        self.assertTrue(await upgraded.accounts.account_exists("example.org", "alice"))

    async def test_failing_upgrade_leaves_the_database_as_it_was(self) -> None:
        await self.open_migrated_at_version_1()
        broken = {2: MOTD_UPGRADES[2] + "\nSELECT * FROM no_such_table;"}
        upgraded = await self.open_at(write_schema_dir(self.mktemp(), broken))
        await self.assertFailure(upgraded.migrate(), Exception)
        self.assertEqual(await upgraded.schema_version(), 1)
        self.assertEqual(self.columns("motd"), [])

    async def test_database_newer_than_code_is_refused(self) -> None:
        newer = await self.open_at(write_schema_dir(self.mktemp(), MOTD_UPGRADES))
        self.assertEqual(await newer.migrate(), 3)
        current = await self.open_at(SCHEMA_DIR)
        await self.assertFailure(current.migrate(), SchemaTooNew)
        await self.assertFailure(self.open_with_factory(auto_migrate=True), SchemaTooNew)
        self.assertEqual(await current.schema_version(), 3)

    async def test_foreign_keys_cascade_from_users(self) -> None:
        database = await self.open_migrated_at_version_1()
        notes = {
            2: "CREATE TABLE notes (server TEXT NOT NULL, username TEXT NOT NULL, body TEXT,"
            " FOREIGN KEY (server, username) REFERENCES users (server, username)"
            " ON DELETE CASCADE);"
            " INSERT INTO notes (server, username, body) SELECT server, username, 'hi' FROM users;"
        }
        upgraded = await self.open_at(write_schema_dir(self.mktemp(), notes))
        await upgraded.migrate()
        await database.accounts.remove_account("example.org", "alice")
        self.assertEqual(self.count_rows("notes"), 0)

    async def test_open_database_refuses_outdated_schema_without_auto_migrate(self) -> None:
        error = await self.assertFailure(self.open_with_factory(auto_migrate=False), SchemaOutdated)
        self.assertIn("mimctl migrate", str(error))
        self.assertEqual(self.columns("users"), [])

    async def test_open_database_migrates_with_auto_migrate(self) -> None:
        database = await self.open_with_factory(auto_migrate=True)
        self.assertEqual(await database.schema_version(), newest_version())
        reopened = await self.open_with_factory(auto_migrate=False)
        self.assertEqual(await reopened.schema_version(), newest_version())
