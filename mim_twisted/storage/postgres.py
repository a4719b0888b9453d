"""Storage in PostgreSQL through a txpostgres pool of asynchronous psycopg2 connections."""

import functools
from importlib.resources.abc import Traversable
from typing import TypeVar

from twisted.internet.defer import Deferred, FirstError, inlineCallbacks, succeed
from twisted.python.failure import Failure
from txpostgres import txpostgres
from zope.interface import implementer

from mim_twisted.storage import migrations, sql
from mim_twisted.storage.interfaces import IDatabase

T = TypeVar("T")

# The key of the advisory lock that serialises migrations: the ASCII of "mim_sch".
_MIGRATION_LOCK = 0x6D696D5F736368


@inlineCallbacks
def _read_version(cursor: txpostgres.Cursor):
    yield cursor.execute("SELECT to_regclass('schema_version') IS NOT NULL")
    if not cursor.fetchone()[0]:
        return 0
    yield cursor.execute("SELECT version FROM schema_version")
    return cursor.fetchone()[0]


@functools.cache
def _postgres_statement(statement: str) -> str:
    """The statement with psycopg2's placeholders; each is translated once, then cached."""
    # psycopg2 would read a literal "%" as the start of a placeholder.
    return statement.replace("%", "%%").replace("?", "%s")


@inlineCallbacks
def _execute(cursor: txpostgres.Cursor, make_transaction: sql.TransactionFactory[T]):
    """Run a transaction (see sql.py) in the transaction that runInteraction opened."""
    transaction = make_transaction()
    rows = None
    while True:
        try:
            statement, parameters = transaction.send(rows)
        except StopIteration as done:
            return done.value
        yield cursor.execute(_postgres_statement(statement), parameters)
        # psycopg2's fetchall raises for a statement that returns no rows.
        rows = [] if cursor.description is None else cursor.fetchall()


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
        self.accounts = sql.SQLAccountStore(self._run)
        self.rosters = sql.SQLRosterStore(self._run)
        self.offline = sql.SQLOfflineStore(self._run)
        self.pubsub = sql.SQLPubSubStore(self._run)

    def _run(self, make_transaction: sql.TransactionFactory[T]) -> Deferred[T]:
        return self._pool.runInteraction(_execute, make_transaction)

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
