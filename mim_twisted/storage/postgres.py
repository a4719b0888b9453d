"""Storage in PostgreSQL through a txpostgres pool of asynchronous psycopg2 connections."""

from collections.abc import Mapping
from importlib.resources.abc import Traversable

from psycopg2.errors import UniqueViolation
from twisted.internet.defer import Deferred, FirstError, inlineCallbacks, succeed
from twisted.python.failure import Failure
from txpostgres import txpostgres
from zope.interface import implementer

from mim_twisted.storage import migrations
from mim_twisted.storage.interfaces import (
    CREDENTIAL_MECHANISMS,
    AccountExists,
    AccountNotFound,
    IAccountStore,
    IDatabase,
)

# The key of the advisory lock that serialises migrations: the ASCII of "mim_sch".
_MIGRATION_LOCK = 0x6D696D5F736368


def _require_row(rows: list[tuple], domain: str, username: str) -> None:
    if not rows:
        raise AccountNotFound(f"{username}@{domain}")


@inlineCallbacks
def _read_version(cursor: txpostgres.Cursor):
    yield cursor.execute("SELECT to_regclass('schema_version') IS NOT NULL")
    if not cursor.fetchone()[0]:
        return 0
    yield cursor.execute("SELECT version FROM schema_version")
    return cursor.fetchone()[0]


@implementer(IAccountStore)
class PostgresAccountStore:
    def __init__(self, pool: txpostgres.ConnectionPool) -> None:
        self._pool = pool

    def create_account(
        self, domain: str, username: str, credentials: Mapping[str, str]
    ) -> Deferred[None]:
        d = self._pool.runOperation(
            "INSERT INTO users (server, username, scram_sha1, scram_sha256)"
            " VALUES (%s, %s, %s, %s)",
            (domain, username, *(credentials[m] for m in CREDENTIAL_MECHANISMS)),
        )

        def account_exists(failure: Failure) -> None:
            failure.trap(UniqueViolation)
            raise AccountExists(f"{username}@{domain}")

        return d.addErrback(account_exists)

    def get_credentials(self, domain: str, username: str) -> Deferred[dict[str, str] | None]:
        d = self._pool.runQuery(
            "SELECT scram_sha1, scram_sha256 FROM users WHERE server = %s AND username = %s",
            (domain, username),
        )
        return d.addCallback(
            lambda rows: dict(zip(CREDENTIAL_MECHANISMS, rows[0], strict=True)) if rows else None
        )

    def set_credentials(
        self, domain: str, username: str, credentials: Mapping[str, str]
    ) -> Deferred[None]:
        d = self._pool.runQuery(
            "UPDATE users SET scram_sha1 = %s, scram_sha256 = %s"
            " WHERE server = %s AND username = %s RETURNING 1",
            (*(credentials[m] for m in CREDENTIAL_MECHANISMS), domain, username),
        )
        return d.addCallback(_require_row, domain, username)

    def remove_account(self, domain: str, username: str) -> Deferred[None]:
        d = self._pool.runQuery(
            "DELETE FROM users WHERE server = %s AND username = %s RETURNING 1", (domain, username)
        )
        return d.addCallback(_require_row, domain, username)

    def account_exists(self, domain: str, username: str) -> Deferred[bool]:
        d = self._pool.runQuery(
            "SELECT 1 FROM users WHERE server = %s AND username = %s", (domain, username)
        )
        return d.addCallback(bool)

    def list_accounts(self, domain: str) -> Deferred[list[str]]:
        # Sorted here, not by ORDER BY, whose order depends on the database's collation.
        d = self._pool.runQuery("SELECT username FROM users WHERE server = %s", (domain,))
        return d.addCallback(lambda rows: sorted(username for (username,) in rows))


@implementer(IDatabase)
class PostgresDatabase:
    """The database at ``dsn`` (a libpq connection string) over ``pool_size`` connections.

    Usable once ``start()`` has fired. ``schema_dir`` is where the schema files are read from;
    tests point it elsewhere.
    """

    def __init__(
        self, dsn: str, pool_size: int, *, schema_dir: Traversable = migrations.SCHEMA_DIR
    ) -> None:
        self._schema_dir = schema_dir
        self._pool = txpostgres.ConnectionPool(None, dsn, min=pool_size)
        self.accounts = PostgresAccountStore(self._pool)

    def start(self) -> Deferred["PostgresDatabase"]:
        """Open the connections; Deferred firing with this database."""

        def close_opened(failure: Failure) -> Failure:
            self._close_connections()
            # The pool wraps the first connection's failure, which is what the caller wants.
            return failure.value.subFailure if failure.check(FirstError) else failure

        return self._pool.start().addCallbacks(lambda _: self, close_opened)

    def schema_version(self) -> Deferred[int]:
        return self._pool.runInteraction(_read_version)

    def migrate(self) -> Deferred[int]:
        return self._pool.runInteraction(self._migrate)

    @inlineCallbacks
    def _migrate(self, cursor: txpostgres.Cursor):
        # runInteraction wraps this in a transaction, and PostgreSQL's DDL is transactional: a
        # failing script leaves the database as it was. The lock, held to the end of the
        # transaction, makes a concurrent migration wait for this one and then find nothing to do.
        yield cursor.execute("SELECT pg_advisory_xact_lock(%s)", (_MIGRATION_LOCK,))
        installed = yield _read_version(cursor)
        for step in migrations.plan(installed, "postgresql", self._schema_dir):
            for statement in step.statements:
                yield cursor.execute(statement)
            yield cursor.execute("DELETE FROM schema_version")
            yield cursor.execute(
                "INSERT INTO schema_version (version) VALUES (%s)", (step.version,)
            )
        return (yield _read_version(cursor))

    def close(self) -> Deferred[None]:
        self._close_connections()
        return succeed(None)

    def _close_connections(self) -> None:
        for connection in self._pool.connections:
            # One whose connect failed before psycopg2 made a connection has nothing to close.
            if connection.pollable() is not None:
                connection.close()
