"""Storage in an SQLite file, the embedded default: the stdlib driver in adbapi's thread pool."""

import os
import sqlite3
from importlib.resources.abc import Traversable
from typing import TypeVar

from twisted.enterprise import adbapi
from twisted.internet.defer import Deferred, succeed
from zope.interface import implementer

from mim_twisted.storage import migrations, sql
from mim_twisted.storage.interfaces import IDatabase

T = TypeVar("T")


def _configure_connection(connection: sqlite3.Connection) -> None:
    # WAL lets mimctl read while the server writes, and with WAL synchronous=NORMAL loses no
    # committed data on a crash (only on power loss) while sparing an fsync per commit.
    connection.execute("PRAGMA journal_mode=WAL")
    # Off by default in SQLite; the per-account tables rely on ON DELETE CASCADE from users.
    connection.execute("PRAGMA foreign_keys=ON")
    connection.execute("PRAGMA synchronous=NORMAL")


def _execute(cursor: adbapi.Transaction, transaction: sql.Transaction[T]) -> T:
    """Run ``transaction`` (see sql.py) on adbapi's thread, which commits it or rolls it back."""
    rows = None
    while True:
        try:
            statement, parameters = transaction.send(rows)
        except StopIteration as done:
            return done.value
        cursor.execute(statement.removesuffix(sql.FOR_UPDATE), parameters)
        rows = cursor.fetchall()


def _read_version(cursor: adbapi.Transaction) -> int:
    cursor.execute("SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'schema_version'")
    if cursor.fetchone() is None:
        return 0
    cursor.execute("SELECT version FROM schema_version")
    return cursor.fetchone()[0]


@implementer(IDatabase)
class SQLiteDatabase:
    """The database in the file ``path``, whose directory is created if missing.

    ``schema_dir`` is where the schema files are read from; tests point it elsewhere.
    """

    def __init__(self, path: str, *, schema_dir: Traversable = migrations.SCHEMA_DIR):
        if sqlite3.sqlite_version_info < (3, 35):
            # Said now rather than as a syntax error at the first statement with RETURNING.
            raise RuntimeError(
                f"SQLite {sqlite3.sqlite_version} is too old: mim-twisted needs 3.35 or later"
            )
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        self._schema_dir = schema_dir
        # One connection: SQLite has one writer at a time anyway, and a single connection keeps
        # every query behind the previous write.
        self._pool = adbapi.ConnectionPool(
            "sqlite3",
            path,
            check_same_thread=False,
            cp_min=1,
            cp_max=1,
            cp_openfun=_configure_connection,
        )
        self.accounts = sql.SQLAccountStore(self._run)
        self.rosters = sql.SQLRosterStore(self._run)
        self.offline = sql.SQLOfflineStore(self._run)
        self.pubsub = sql.SQLPubSubStore(self._run)

    def _run(self, transaction: sql.Transaction[T]) -> Deferred[T]:
        return self._pool.runInteraction(_execute, transaction)

    def schema_version(self) -> Deferred[int]:
        return self._pool.runInteraction(_read_version)

    def migrate(self) -> Deferred[int]:
        return self._pool.runInteraction(self._migrate)

    def _migrate(self, cursor: adbapi.Transaction) -> int:
        # IMMEDIATE takes the write lock before the version is read, so a concurrent migration
        # (mimctl while the server starts) waits for this one and then finds nothing to do.
        # SQLite's DDL is transactional: a failing script leaves the database as it was.
        cursor.execute("BEGIN IMMEDIATE")
        for step in migrations.plan(_read_version(cursor), "sqlite", self._schema_dir):
            for statement in step.statements:
                cursor.execute(statement)
            cursor.execute("DELETE FROM schema_version")
            cursor.execute("INSERT INTO schema_version (version) VALUES (?)", (step.version,))
        return _read_version(cursor)

    def close(self) -> Deferred[None]:
        self._pool.close()
        return succeed(None)
