"""Storage in PostgreSQL through a pool of asynchronous psycopg2 connections (see pgpool.py)."""

import functools
from importlib.resources.abc import Traversable
from typing import TypeVar

from twisted.internet.defer import Deferred, succeed
from zope.interface import implementer

from mim_twisted.storage import migrations, sql
from mim_twisted.storage.interfaces import IDatabase
from mim_twisted.storage.pgpool import Body, ConnectionPool, Session

T = TypeVar("T")

# The key of the advisory lock that serialises migrations: the ASCII of "mim_sch".
_MIGRATION_LOCK = 0x6D696D5F736368


async def _read_version(session: Session) -> int:
    rows = await session.execute("SELECT to_regclass('schema_version') IS NOT NULL")
    if not rows[0][0]:
        return 0
    rows = await session.execute("SELECT version FROM schema_version")
    return rows[0][0]


@functools.cache
def _postgres_statement(statement: str) -> str:
    """The statement with psycopg2's placeholders; each is translated once, then cached."""
    # psycopg2 would read a literal "%" as the start of a placeholder.
    return statement.replace("%", "%%").replace("?", "%s")


def _sql_transaction(make_transaction: sql.TransactionFactory[T]):
    """The pool's transaction body for a transaction of sql.py, made anew for each attempt."""

    async def body(session: Session) -> T:
        transaction = make_transaction()
        rows = None
        while True:
            try:
                step = transaction.send(rows)
            except StopIteration as done:
                return done.value
            if session.committed:
                raise RuntimeError("a transaction went on after its last batch")
            if isinstance(step, sql.Batch):
                # One simple-query message: psycopg2 fills the parameters in on the client side.
                statement = "; ".join(_postgres_statement(text) for text, _ in step.steps)
                parameters = tuple(value for _, values in step.steps for value in values)
                rows = await session.execute(statement, parameters, commit=step.last)
            else:
                statement, parameters = _postgres_statement(step[0]), step[1]
                rows = await session.execute(statement, parameters)

    return body


@implementer(IDatabase)
class PostgresDatabase(sql.SQLStores):
    """The database at ``dsn`` (a libpq connection string) over ``pool_size`` connections.

    Usable once ``start()`` has fired. ``schema_dir`` is where the schema files are read from;
    tests point it elsewhere, and pass ``pool_options`` to the ConnectionPool.
    """

    def __init__(
        self,
        dsn: str,
        pool_size: int,
        *,
        schema_dir: Traversable = migrations.SCHEMA_DIR,
        **pool_options: object,
    ) -> None:
        self._schema_dir = schema_dir
        self._pool = ConnectionPool(dsn, pool_size, **pool_options)
        super().__init__(self._run)

    def _run(self, make_transaction: sql.TransactionFactory[T], alone: bool = False) -> Deferred[T]:
        # sql.py's plain SELECTs have no side effects: they may run before the transaction.
        return self._pool.run(_sql_transaction(make_transaction), lazy_begin=True, alone=alone)

    def run(self, body: Body[T], *, alone: bool = False) -> Deferred[T]:
        """Run `body(session)` in a transaction, for statements of PostgreSQL's own (the
        cluster's session table); retried as the pool retries. ``alone``: the body runs one
        statement, sent without BEGIN and COMMIT (see pgpool)."""
        return self._pool.run(body, alone=alone)

    def start(self) -> Deferred["PostgresDatabase"]:
        """Open the connections; Deferred firing with this database."""
        return self._pool.start().addCallback(lambda _: self)

    def schema_version(self) -> Deferred[int]:
        return self._pool.run(_read_version)

    def migrate(self) -> Deferred[int]:
        return self._pool.run(self._migrate)

    async def _migrate(self, session: Session) -> int:
        # The pool runs this in a transaction, and PostgreSQL's DDL is transactional: a failing
        # script leaves the database as it was. The lock, held to the end of the transaction,
        # makes a concurrent migration wait for this one and then find nothing to do.
        await session.execute("SELECT pg_advisory_xact_lock(%s)", (_MIGRATION_LOCK,))
        installed = await _read_version(session)
        for step in migrations.plan(installed, "postgresql", self._schema_dir):
            for statement in step.statements:
                await session.execute(statement)
            await session.execute("DELETE FROM schema_version")
            await session.execute(
                "INSERT INTO schema_version (version) VALUES (%s)", (step.version,)
            )
        return await _read_version(session)

    def close(self) -> Deferred[None]:
        self._pool.close()
        return succeed(None)
