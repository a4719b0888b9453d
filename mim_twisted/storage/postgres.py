"""Storage in PostgreSQL through a pool of asynchronous psycopg2 connections (see pgpool.py)."""

import functools
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import UTC, datetime
from importlib.resources.abc import Traversable
from typing import TypeVar

from psycopg2 import errors
from twisted.internet.defer import Deferred, succeed
from twisted.internet.interfaces import IReactorTime
from twisted.python.failure import Failure
from zope.interface import implementer

from mim_twisted.storage import migrations, sql
from mim_twisted.storage.interfaces import (
    IDatabase,
    NodeNotFound,
    PubSubItem,
    StorageUnavailable,
)
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


# An item stamped in the statement that writes it, a microsecond after the node's newest item
# at least (see next_modified_at); a missing node makes node_id NULL, which the table refuses.
UPSERT_ITEM_AFTER_NEWEST = (
    "INSERT INTO pubsub_items (node_id, item_id, payload, publisher, created_at, modified_at)"
    " SELECT node.id, ?, ?, ?, stamp.at, stamp.at"
    f" FROM (SELECT {sql.NODE_ID} AS id) AS node CROSS JOIN LATERAL"
    " (SELECT greatest(CAST(? AS TIMESTAMPTZ), max(i.modified_at) + interval '1 microsecond')"
    " AS at FROM pubsub_items AS i WHERE i.node_id = node.id) AS stamp"
    " ON CONFLICT (node_id, item_id) DO UPDATE SET"
    " payload = excluded.payload, publisher = excluded.publisher,"
    " modified_at = excluded.modified_at"
)
TRIM_NAMED_ITEMS = (
    f"DELETE FROM pubsub_items WHERE node_id = {sql.NODE_ID} AND item_id NOT IN"
    f" (SELECT item_id FROM pubsub_items WHERE node_id = {sql.NODE_ID}"
    " ORDER BY modified_at DESC LIMIT ?)"
)
TRIM_NAMED_ITEMS_BUT = f"DELETE FROM pubsub_items WHERE node_id = {sql.NODE_ID} AND item_id <> ?"


# The most publications stored in one transaction: a bound on its size and on how long its
# node locks are held.
MAX_PUBLICATIONS_PER_TRANSACTION = 32


@dataclass
class _Publication:
    service: str
    name: str
    items: list[PubSubItem]
    max_items: int | None
    stored: Deferred[None]


class PostgresPubSubStore(sql.SQLPubSubStore):
    """Publications in one round trip instead of two, and those of one reactor turn in one.

    The items' modified_at is worked out by the statements that write them rather than read
    first (a publication's CPU and latency are mostly its round trips). Each statement of the
    transaction sees what was committed before it began, as the two round trips did: the node's
    lock is still taken first.

    Each node's publications come one after another from its worker queue, but the queues of
    other nodes publish in the same reactor turn (a PEP load: several accounts' device lists
    per turn): those are stored together, in one transaction and one round trip, instead of
    each in its own (a group commit across nodes). Their node locks are taken in the order of
    (service, node), so that two such transactions never wait for each other crosswise. If the
    transaction fails, each publication is stored again alone, so that one's failure (its node
    deleted meanwhile, an item refused) is its own; an unavailable database fails them all.
    """

    def __init__(self, run: sql.Run) -> None:
        super().__init__(run)
        # Whose turns are collected: the database's pool's reactor (set by PostgresDatabase).
        self.clock: IReactorTime | None = None
        self._this_turn: list[_Publication] = []

    def publish_items(
        self, service: str, name: str, items: Iterable[PubSubItem], max_items: int | None
    ) -> Deferred[None]:
        items = list(items)
        if not items:
            return super().publish_items(service, name, items, max_items)
        if not self._this_turn:
            if self.clock is None:
                raise RuntimeError("PostgresPubSubStore.clock is not set")
            self.clock.callLater(0, self._store_turn)
        stored: Deferred[None] = Deferred()
        self._this_turn.append(_Publication(service, name, items, max_items, stored))
        return stored

    def _store_turn(self) -> None:
        publications, self._this_turn = self._this_turn, []
        for first in range(0, len(publications), MAX_PUBLICATIONS_PER_TRANSACTION):
            group = publications[first : first + MAX_PUBLICATIONS_PER_TRANSACTION]
            if len(group) == 1:
                self._store_alone(group[0])
            else:
                # Sorting is stable: one node's publications keep their order.
                group.sort(key=lambda p: (p.service, p.name))
                storing = self._publish_together(group)
                storing.addCallbacks(
                    self._stored,
                    self._not_stored_together,
                    callbackArgs=(group,),
                    errbackArgs=(group,),
                )

    def _store_alone(self, publication: _Publication) -> None:
        storing = self._publish_together([publication])
        storing.addErrback(_node_not_found, publication.service, publication.name)
        storing.chainDeferred(publication.stored)

    @staticmethod
    def _stored(_: None, group: list[_Publication]) -> None:
        for publication in group:
            publication.stored.callback(None)

    def _not_stored_together(self, failure: Failure, group: list[_Publication]) -> None:
        if failure.check(StorageUnavailable):
            for publication in group:
                publication.stored.errback(failure)
            return
        for publication in group:
            self._store_alone(publication)

    @sql.transaction
    def _publish_together(self, publications: list[_Publication]) -> sql.Transaction[None]:
        now = datetime.now(UTC)
        steps = []
        for publication in publications:
            service, name, items = publication.service, publication.name, publication.items
            steps.append((sql.LOCK_NODE, (service, name)))
            for item in items:
                row = (item.item_id, item.payload, item.publisher, service, name, now)
                steps.append((UPSERT_ITEM_AFTER_NEWEST, row))
            if publication.max_items == 1:
                steps.append((TRIM_NAMED_ITEMS_BUT, (service, name, items[-1].item_id)))
            elif publication.max_items is not None:
                row = (service, name, service, name, publication.max_items)
                steps.append((TRIM_NAMED_ITEMS, row))
        yield sql.Batch(*steps, last=True)


def _node_not_found(failure: Failure, service: str, name: str) -> None:
    failure.trap(errors.NotNullViolation)
    if failure.value.diag.column_name != "node_id":
        failure.raiseException()
    raise NodeNotFound(f"{service} {name}")


@implementer(IDatabase)
class PostgresDatabase(sql.SQLStores):
    """The database at ``dsn`` (a libpq connection string) over ``pool_size`` connections.

    Usable once ``start()`` has fired. ``schema_dir`` is where the schema files are read from;
    tests point it elsewhere, and pass ``pool_options`` to the ConnectionPool.
    """

    pubsub_store = PostgresPubSubStore

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
        self.pubsub.clock = self._pool.reactor

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
