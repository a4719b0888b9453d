"""Storage in an SQLite file, the embedded default: the stdlib driver in adbapi's thread pool."""

import os
import sqlite3
from importlib.resources.abc import Traversable
from typing import TypeVar

from twisted.enterprise import adbapi
from twisted.internet import task
from twisted.internet.defer import Deferred, succeed
from twisted.logger import Logger
from zope.interface import implementer

from mim_twisted.storage import migrations, permissions, sql
from mim_twisted.storage.interfaces import IDatabase, StorageUnavailable

T = TypeVar("T")

log = Logger()

# How long a statement waits for another process's write lock (mimctl's, a backup's) before
# SQLite says "database is locked", in seconds.
BUSY_TIMEOUT = 5.0
# Then the transaction, rolled back by then, is tried again after each of these pauses, in
# seconds; the reactor goes on meanwhile.
BUSY_RETRY_DELAYS = (0.1, 0.5, 2.0)


def _configure_connection(connection: sqlite3.Connection) -> None:
    # WAL lets mimctl read while the server writes, and with WAL synchronous=NORMAL loses no
    # committed data on a crash (only on power loss) while sparing an fsync per commit.
    connection.execute("PRAGMA journal_mode=WAL")
    # Off by default in SQLite; the per-account tables rely on ON DELETE CASCADE from users.
    connection.execute("PRAGMA foreign_keys=ON")
    connection.execute("PRAGMA synchronous=NORMAL")


def _execute(cursor: adbapi.Transaction, make_transaction: sql.TransactionFactory[T]) -> T:
    """Run a transaction (see sql.py) on adbapi's thread, which commits it or rolls it back."""
    transaction = make_transaction()
    rows = None
    while True:
        try:
            step = transaction.send(rows)
        except StopIteration as done:
            return done.value
        for statement, parameters in sql.steps(step):
            cursor.execute(statement.replace(sql.FOR_UPDATE, ""), parameters)
            rows = cursor.fetchall()


def _read_version(cursor: adbapi.Transaction) -> int:
    cursor.execute("SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'schema_version'")
    if cursor.fetchone() is None:
        return 0
    cursor.execute("SELECT version FROM schema_version")
    return cursor.fetchone()[0]


# Also an sqlite3 error, which mimctl reports in one line.
class DatabaseBusy(sqlite3.OperationalError, StorageUnavailable):
    """Another process held the database's lock through every retry; nothing was committed."""


def _is_busy(error: sqlite3.OperationalError) -> bool:
    """Whether ``error`` is SQLite's SQLITE_BUSY: another connection holds a lock."""
    return error.sqlite_errorcode & 0xFF == sqlite3.SQLITE_BUSY


@implementer(IDatabase)
class SQLiteDatabase(sql.SQLStores):
    """The database in the file ``path``, whose directory is created if missing.

    ``schema_dir`` is where the schema files are read from; tests point it elsewhere.
    """

    def __init__(
        self,
        path: str,
        *,
        schema_dir: Traversable = migrations.SCHEMA_DIR,
        busy_timeout: float = BUSY_TIMEOUT,
        busy_retry_delays: tuple[float, ...] = BUSY_RETRY_DELAYS,
        reactor: object = None,
    ):
        if sqlite3.sqlite_version_info < (3, 35):
            # Said now rather than as a syntax error at the first statement with RETURNING.
            raise RuntimeError(
                f"SQLite {sqlite3.sqlite_version} is too old: mim-twisted needs 3.35 or later"
            )
        if reactor is None:
            from twisted.internet import reactor
        self._reactor = reactor
        self._busy_retry_delays = busy_retry_delays
        directory = os.path.dirname(os.path.abspath(path))
        # A directory the operator chose is theirs to protect; one made here is private.
        if not os.path.isdir(directory):
            permissions.secure_directory(directory)
        # The database holds the SCRAM keys. SQLite gives its -wal and -shm files the mode of
        # the database file, so a private database keeps them private too.
        permissions.secure_file(path)
        for companion in (path + "-wal", path + "-shm"):
            permissions.secure_existing_file(companion)
        self._schema_dir = schema_dir
        # One connection: SQLite has one writer at a time anyway, and a single connection keeps
        # every query behind the previous write.
        self._pool = adbapi.ConnectionPool(
            "sqlite3",
            path,
            check_same_thread=False,
            timeout=busy_timeout,
            cp_min=1,
            cp_max=1,
            cp_openfun=_configure_connection,
        )
        super().__init__(self._run)

    def _run(self, make_transaction: sql.TransactionFactory[T], alone: bool = False) -> Deferred[T]:
        # A statement alone is a transaction like any other here.
        return self._run_interaction(_execute, make_transaction)

    def schema_version(self) -> Deferred[int]:
        return self._run_interaction(_read_version)

    def migrate(self) -> Deferred[int]:
        return self._run_interaction(self._migrate)

    def _run_interaction(self, interaction, *args) -> Deferred:
        """adbapi's runInteraction, tried again while another process holds the write lock."""
        return Deferred.fromCoroutine(self._run_retrying_when_busy(interaction, *args))

    async def _run_retrying_when_busy(self, interaction, *args):
        for delay in self._busy_retry_delays:
            try:
                return await self._pool.runInteraction(interaction, *args)
            except sqlite3.OperationalError as error:
                # adbapi has rolled the transaction back: nothing of it was committed.
                if not _is_busy(error):
                    raise
                log.warn("SQLite: {error}; trying again in {delay} s", error=error, delay=delay)
            await task.deferLater(self._reactor, delay)
        try:
            return await self._pool.runInteraction(interaction, *args)
        except sqlite3.OperationalError as error:
            if _is_busy(error):
                raise DatabaseBusy(
                    f"SQLite: {error}, still after {len(self._busy_retry_delays)} retries"
                ) from None
            raise

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
