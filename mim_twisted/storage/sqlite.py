"""Storage in an SQLite file, the embedded default: the stdlib driver in adbapi's thread pool."""

import os
import sqlite3
from collections.abc import Mapping
from importlib.resources.abc import Traversable

from twisted.enterprise import adbapi
from twisted.internet.defer import Deferred, succeed
from zope.interface import implementer

from mim_twisted.storage import migrations
from mim_twisted.storage.interfaces import (
    CREDENTIAL_MECHANISMS,
    AccountExists,
    AccountNotFound,
    IAccountStore,
    IDatabase,
)


def _configure_connection(connection: sqlite3.Connection) -> None:
    # WAL lets mimctl read while the server writes, and with WAL synchronous=NORMAL loses no
    # committed data on a crash (only on power loss) while sparing an fsync per commit.
    connection.execute("PRAGMA journal_mode=WAL")
    # Off by default in SQLite; the per-account tables rely on ON DELETE CASCADE from users.
    connection.execute("PRAGMA foreign_keys=ON")
    connection.execute("PRAGMA synchronous=NORMAL")


def _insert_account(
    cursor: adbapi.Transaction, domain: str, username: str, credentials: Mapping[str, str]
) -> None:
    try:
        cursor.execute(
            "INSERT INTO users (server, username, scram_sha1, scram_sha256) VALUES (?, ?, ?, ?)",
            (domain, username, *(credentials[m] for m in CREDENTIAL_MECHANISMS)),
        )
    except sqlite3.IntegrityError as error:
        raise AccountExists(f"{username}@{domain}") from error


def _update_credentials(
    cursor: adbapi.Transaction, domain: str, username: str, credentials: Mapping[str, str]
) -> None:
    cursor.execute(
        "UPDATE users SET scram_sha1 = ?, scram_sha256 = ? WHERE server = ? AND username = ?",
        (*(credentials[m] for m in CREDENTIAL_MECHANISMS), domain, username),
    )
    if cursor.rowcount == 0:
        raise AccountNotFound(f"{username}@{domain}")


def _delete_account(cursor: adbapi.Transaction, domain: str, username: str) -> None:
    cursor.execute("DELETE FROM users WHERE server = ? AND username = ?", (domain, username))
    if cursor.rowcount == 0:
        raise AccountNotFound(f"{username}@{domain}")


def _read_version(cursor: adbapi.Transaction) -> int:
    cursor.execute("SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'schema_version'")
    if cursor.fetchone() is None:
        return 0
    cursor.execute("SELECT version FROM schema_version")
    return cursor.fetchone()[0]


@implementer(IAccountStore)
class SQLiteAccountStore:
    def __init__(self, pool: adbapi.ConnectionPool) -> None:
        self._pool = pool

    def create_account(
        self, domain: str, username: str, credentials: Mapping[str, str]
    ) -> Deferred[None]:
        return self._pool.runInteraction(_insert_account, domain, username, credentials)

    def get_credentials(self, domain: str, username: str) -> Deferred[dict[str, str] | None]:
        d = self._pool.runQuery(
            "SELECT scram_sha1, scram_sha256 FROM users WHERE server = ? AND username = ?",
            (domain, username),
        )
        return d.addCallback(
            lambda rows: dict(zip(CREDENTIAL_MECHANISMS, rows[0], strict=True)) if rows else None
        )

    def set_credentials(
        self, domain: str, username: str, credentials: Mapping[str, str]
    ) -> Deferred[None]:
        return self._pool.runInteraction(_update_credentials, domain, username, credentials)

    def remove_account(self, domain: str, username: str) -> Deferred[None]:
        return self._pool.runInteraction(_delete_account, domain, username)

    def account_exists(self, domain: str, username: str) -> Deferred[bool]:
        d = self._pool.runQuery(
            "SELECT 1 FROM users WHERE server = ? AND username = ?", (domain, username)
        )
        return d.addCallback(bool)

    def list_accounts(self, domain: str) -> Deferred[list[str]]:
        # Sorted here, not by ORDER BY, so that every backend sorts by code point alike.
        d = self._pool.runQuery("SELECT username FROM users WHERE server = ?", (domain,))
        return d.addCallback(lambda rows: sorted(username for (username,) in rows))


@implementer(IDatabase)
class SQLiteDatabase:
    """The database in the file ``path``, whose directory is created if missing.

    ``schema_dir`` is where the schema files are read from; tests point it elsewhere.
    """

    def __init__(self, path: str, *, schema_dir: Traversable = migrations.SCHEMA_DIR):
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
        self.accounts = SQLiteAccountStore(self._pool)

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
