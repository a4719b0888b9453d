"""Storage in MySQL or MariaDB through a pool of PyMySQL connections on threads (mysqlpool.py).

sql.py's statements are written in the dialect SQLite and PostgreSQL share; MySQL lacks some of
it, so each statement is translated once (``mysql_statement``, cached):

* ``?`` placeholders become PyMySQL's ``%s``;
* ``ON CONFLICT (...) DO UPDATE SET c = excluded.c`` becomes ``ON DUPLICATE KEY UPDATE c =
  VALUES(c)``; ``ON CONFLICT DO NOTHING`` becomes a plain INSERT whose duplicate-key error
  means "no row";
* MySQL has no RETURNING: an INSERT's is answered from its success, its AUTO_INCREMENT id
  (``RETURNING id``) and the values it inserted (``RETURNING jid``); an UPDATE's or DELETE's
  ``RETURNING 1`` from its row count; a DELETE's other columns are read first by a SELECT of
  the same rows FOR UPDATE;
* the few statements beyond these rules have their MySQL form in ``_REWRITTEN``.

A statement none of these covers is refused when first translated (tests/test_storage.py
translates every statement of sql.py), never sent in a form MySQL would misread.
"""

import dataclasses
import functools
import re
from collections.abc import Callable, Mapping
from importlib.resources.abc import Traversable
from typing import Any, TypeVar

import pymysql
from pymysql.constants import ER
from twisted.internet.defer import Deferred, succeed
from zope.interface import implementer

from mim_twisted.storage import migrations, sql
from mim_twisted.storage.interfaces import IDatabase
from mim_twisted.storage.mysqlpool import ConnectionPool, Session

T = TypeVar("T")

# The name of the lock (GET_LOCK) that serialises migrations.
_MIGRATION_LOCK = "mim_twisted.schema"
# Seconds a migration waits for another one to finish.
_MIGRATION_LOCK_WAIT = 60

_UPSERT = re.compile(r" ON CONFLICT \([^)]*\) DO UPDATE SET ")
_EXCLUDED = re.compile(r"\bexcluded\.(\w+)")
_DO_NOTHING = " ON CONFLICT DO NOTHING"
_RETURNING = re.compile(r" RETURNING (.*)$")
_INSERT_COLUMNS = re.compile(r"^INSERT INTO \w+ \(([^)]*)\) VALUES \([?, ]*\)")
_DELETE = re.compile(r"^DELETE FROM (\w+)( WHERE .*)?$")

# Makes the rows a statement stands for from its cursor, the rows it gave and its parameters.
RowsMaker = Callable[[Any, list[tuple], tuple], list[tuple]]


@dataclasses.dataclass(frozen=True)
class MySQLStatement:
    """How a statement of sql.py runs on MySQL: ``text`` with ``%s`` placeholders, then the
    rows it stands for made from the cursor, the rows it gave and its parameters (``rows``);
    or ``run`` instead, for a rewritten one."""

    text: str
    rows: RowsMaker = lambda cursor, rows, parameters: rows
    # A duplicate key means "no row", as ON CONFLICT DO NOTHING does.
    no_row_on_duplicate: bool = False
    run: Callable[[Session, tuple], list[tuple]] | None = None


def _placeholders(statement: str) -> str:
    # PyMySQL would read a literal "%" as the start of a placeholder.
    return statement.replace("%", "%%").replace("?", "%s")


def _increment_roster_version(session: Session, parameters: tuple) -> list[tuple]:
    session.execute(
        "UPDATE users SET roster_version = roster_version + 1 WHERE server = %s AND username = %s",
        parameters,
    )
    if not session.cursor.rowcount:
        return []
    # The UPDATE holds the row's lock: no one else has changed it since.
    return session.execute(
        "SELECT roster_version FROM users WHERE server = %s AND username = %s", parameters
    )


def _trim_items(session: Session, parameters: tuple) -> list[tuple]:
    # MySQL refuses LIMIT in an IN subquery and a subquery on the table a DELETE deletes from.
    # modified_at is unique within a node (it grows with every publication, see sql.py): every
    # item as old as the newest one beyond the first max_items goes.
    node_id, _, max_items = parameters
    rows = session.execute(
        "SELECT modified_at FROM pubsub_items WHERE node_id = %s"
        " ORDER BY modified_at DESC LIMIT 1 OFFSET %s",
        (node_id, max_items),
    )
    if rows:
        session.execute(
            "DELETE FROM pubsub_items WHERE node_id = %s AND modified_at <= %s",
            (node_id, rows[0][0]),
        )
    return []


# Statements of sql.py that no rule translates.
_REWRITTEN: dict[str, Callable[[Session, tuple], list[tuple]]] = {
    sql.INCREMENT_ROSTER_VERSION: _increment_roster_version,
    sql.TRIM_ITEMS: _trim_items,
}


def _inserted_rows(text: str, returning: list[str], statement: str) -> RowsMaker:
    """The row an INSERT of one row returns: ``1``, its AUTO_INCREMENT ``id``, or the values
    it inserted, which are its parameters."""
    match = _INSERT_COLUMNS.match(text)
    columns = [c.strip() for c in match.group(1).split(",")] if match else []
    # Per returned column: the index of its parameter, or "1", or "id".
    sources: list[int | str] = []
    for name in returning:
        if name in columns:
            sources.append(columns.index(name))
        elif name in ("1", "id"):
            sources.append(name)
        else:
            raise NotImplementedError(f"no MySQL translation for RETURNING {name}: {statement}")

    def value(source: int | str, cursor: Any, parameters: tuple) -> object:
        if source == "1":
            return 1
        return cursor.lastrowid if source == "id" else parameters[source]

    return lambda cursor, rows, parameters: [
        tuple(value(source, cursor, parameters) for source in sources)
    ]


def _counted_rows(cursor: Any, rows: list[tuple], parameters: tuple) -> list[tuple]:
    """What ``RETURNING 1`` returns: a row per row the statement matched."""
    return [(1,)] * cursor.rowcount


def _deleting_rows(text: str, returning: str) -> Callable[[Session, tuple], list[tuple]]:
    """A DELETE that returns columns of the rows it deletes: the rows are read and locked
    first, so that no other transaction changes them before they go. A row another
    transaction inserts in between (READ COMMITTED takes no gap locks) would go unreported:
    sql.py's transactions lock their account's row first where that matters."""
    table, where = _DELETE.match(text).groups()
    select = _placeholders(f"SELECT {returning} FROM {table}{where or ''} FOR UPDATE")
    delete = _placeholders(text)

    def run(session: Session, parameters: tuple) -> list[tuple]:
        rows = session.execute(select, parameters)
        if rows:
            session.execute(delete, parameters)
        return rows

    return run


@functools.cache
def mysql_statement(statement: str) -> MySQLStatement:
    """How ``statement`` (in sql.py's dialect) runs on MySQL; NotImplementedError if it
    cannot."""
    if statement in _REWRITTEN:
        return MySQLStatement(statement, run=_REWRITTEN[statement])
    text = statement
    no_row_on_duplicate = _DO_NOTHING in text
    text = text.replace(_DO_NOTHING, "")
    if _UPSERT.search(text):
        text = _EXCLUDED.sub(r"VALUES(\1)", _UPSERT.sub(" ON DUPLICATE KEY UPDATE ", text))
    if "ON CONFLICT" in text or "excluded." in text:
        raise NotImplementedError(f"no MySQL translation for this ON CONFLICT: {statement}")
    rows = MySQLStatement.rows
    if returning := _RETURNING.search(text):
        text, returned = text[: returning.start()], returning.group(1)
        verb = text.split(None, 1)[0].upper()
        if verb == "INSERT":
            rows = _inserted_rows(text, [c.strip() for c in returned.split(",")], statement)
        elif verb in ("UPDATE", "DELETE") and returned == "1":
            rows = _counted_rows
        elif verb == "DELETE" and _DELETE.match(text):
            return MySQLStatement(statement, run=_deleting_rows(text, returned))
        else:
            raise NotImplementedError(f"no MySQL translation for RETURNING {returned}: {statement}")
    return MySQLStatement(_placeholders(text), rows, no_row_on_duplicate)


def execute(session: Session, statement: str, parameters: tuple) -> list[tuple]:
    """Run one statement of sql.py on MySQL; the rows PostgreSQL would have returned."""
    translated = mysql_statement(statement)
    if translated.run is not None:
        return translated.run(session, parameters)
    try:
        rows = session.execute(translated.text, parameters)
    except pymysql.err.IntegrityError as error:
        # MySQL undoes only the failed statement: the transaction goes on, as after PostgreSQL's
        # ON CONFLICT DO NOTHING.
        if translated.no_row_on_duplicate and error.args[0] == ER.DUP_ENTRY:
            return []
        raise
    return translated.rows(session.cursor, rows, parameters)


def _sql_transaction(make_transaction: sql.TransactionFactory[T]) -> Callable[[Session], T]:
    """The pool's transaction body for a transaction of sql.py, made anew for each attempt."""

    def body(session: Session) -> T:
        transaction = make_transaction()
        rows = None
        while True:
            try:
                step = transaction.send(rows)
            except StopIteration as done:
                return done.value
            for statement, parameters in sql.steps(step):
                rows = execute(session, statement, parameters)

    return body


def _read_version(session: Session) -> int:
    rows = session.execute(
        "SELECT count(*) FROM information_schema.tables"
        " WHERE table_schema = DATABASE() AND table_name = 'schema_version'"
    )
    if not rows[0][0]:
        return 0
    return session.execute("SELECT version FROM schema_version")[0][0]


@implementer(IDatabase)
class MySQLDatabase(sql.SQLStores):
    """The database reached with ``connect_options`` (PyMySQL's connect() keyword arguments:
    host, port, database, user, password, unix_socket) over ``pool_size`` connections.

    Usable once ``start()`` has fired. ``schema_dir`` is where the schema files are read from;
    tests point it elsewhere, and pass ``pool_options`` to the ConnectionPool.
    """

    def __init__(
        self,
        connect_options: Mapping[str, Any],
        pool_size: int,
        *,
        schema_dir: Traversable = migrations.SCHEMA_DIR,
        **pool_options: Any,
    ) -> None:
        self._schema_dir = schema_dir
        self._pool = ConnectionPool(connect_options, pool_size, **pool_options)
        super().__init__(self._run)

    def _run(self, make_transaction: sql.TransactionFactory[T], alone: bool = False) -> Deferred[T]:
        # A statement alone is a transaction like any other here.
        return self._pool.run(_sql_transaction(make_transaction))

    def start(self) -> Deferred["MySQLDatabase"]:
        """Connect; Deferred firing with this database."""
        return self._pool.start().addCallback(lambda _: self)

    def schema_version(self) -> Deferred[int]:
        return self._pool.run(_read_version)

    def migrate(self) -> Deferred[int]:
        return self._pool.run(self._migrate)

    def _migrate(self, session: Session) -> int:
        # The lock makes a concurrent migration (mimctl while the server starts) wait for this
        # one and then find nothing to do. MySQL commits each CREATE or ALTER at once: a failing
        # script stops with the version where it was, but its statements before the failure
        # stay done.
        [(locked,)] = session.execute(
            "SELECT GET_LOCK(%s, %s)", (_MIGRATION_LOCK, _MIGRATION_LOCK_WAIT)
        )
        if locked != 1:
            raise pymysql.err.OperationalError(
                ER.LOCK_WAIT_TIMEOUT, "another migration has held the schema lock for too long"
            )
        try:
            installed = _read_version(session)
            for step in migrations.plan(installed, "mysql", self._schema_dir):
                for statement in step.statements:
                    session.execute(statement)
                session.execute("DELETE FROM schema_version")
                session.execute("INSERT INTO schema_version (version) VALUES (%s)", (step.version,))
            # Committed before the lock goes: a migration that waited on it must read this
            # version, not the empty table the last step's DELETE left uncommitted.
            session.execute("COMMIT")
            return _read_version(session)
        finally:
            session.execute("SELECT RELEASE_LOCK(%s)", (_MIGRATION_LOCK,))

    def close(self) -> Deferred[None]:
        self._pool.close()
        return succeed(None)
