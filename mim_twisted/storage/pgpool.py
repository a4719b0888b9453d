"""A pool of asynchronous PostgreSQL connections (txpostgres) that lives through server restarts.

Each of the pool's connections is watched while idle, so one the server closes (a restart, an
administrator's pg_terminate_backend) is noticed at once, not by the next request. A lost
connection is replaced, at once and then with a doubling back-off; an outage is logged once when
it begins and once when every connection is back.

Transactions are begun and committed here, so that a failure is known to have happened before or
during COMMIT (which a body may have sent with its last statement: `Session.execute`). One whose
connection was lost before COMMIT was sent has not been committed, so it runs again on another
connection; so does a read-only one that lost it during COMMIT. A writing one that lost it during
COMMIT may or may not have been committed: it fails with OutcomeUnknown rather than risk doing
twice what it did. While no connection is up, a request waits a moment for one, then fails
with DatabaseUnavailable.

A statement that is a whole transaction by itself (``run(..., alone=True)``) is sent without
BEGIN and COMMIT: PostgreSQL commits it as it ends, in one round trip instead of three. One that
writes and lost its connection on the way may or may not have been committed, as during a
COMMIT: OutcomeUnknown; a read runs again.
"""

import collections
import time
from collections.abc import Awaitable, Callable
from typing import TypeVar

import psycopg2
from twisted.internet import defer
from twisted.internet import error as internet_error
from twisted.internet.defer import Deferred, FirstError, gatherResults
from twisted.logger import Logger
from twisted.python.failure import Failure
from txpostgres import txpostgres

from mim_twisted.storage.interfaces import StorageUnavailable

T = TypeVar("T")

log = Logger()

# Seconds a connection attempt may take; libpq leaves the timing of asynchronous ones to us.
CONNECT_TIMEOUT = 5.0
# The pause before the second attempt to replace a lost connection (the first is immediate); it
# doubles with each failure, up to the maximum.
RECONNECT_DELAY = 0.1
MAX_RECONNECT_DELAY = 2.0
# Seconds a request waits for a connection while there is none: a quick restart goes unnoticed,
# while in a longer outage requests fail soon rather than pile up.
OUTAGE_WAIT = 1.0


# Also psycopg2 errors, which mimctl reports in one line.
class DatabaseUnavailable(psycopg2.OperationalError, StorageUnavailable):
    """PostgreSQL cannot be reached now; nothing of the request was committed."""


class OutcomeUnknown(psycopg2.OperationalError, StorageUnavailable):
    """The connection was lost during COMMIT: the transaction may or may not have been committed."""


def _one_line(error: BaseException) -> str:
    # psycopg2's messages span lines ("server closed the connection unexpectedly\n\tThis ...").
    return " ".join(str(error).split()) or type(error).__name__


def _reads_only(statement: str) -> bool:
    """Whether the statement, or each of several separated by ";", is a SELECT."""
    return all(part.lstrip()[:6].upper() == "SELECT" for part in statement.split(";"))


def _no_row_locks(statement: str) -> bool:
    """For SELECTs: whether they lock no rows (no FOR UPDATE / FOR SHARE): plain reads."""
    return " FOR " not in statement.upper()


class Session:
    """The statements of one transaction on one connection; remembers whether any wrote.

    With ``lazy_begin`` the transaction is begun only by its first statement that is not a plain
    read, BEGIN sent in the same round trip as it, and committed only if begun. The plain reads
    before it run on their own: under READ COMMITTED each statement sees what was committed
    when it started, in a transaction or not, and a plain read holds no row lock, so they read
    what they would read inside it, one or two round trips sooner. Only for bodies whose plain
    SELECTs have no side effects (not, say, pg_advisory_xact_lock).
    """

    def __init__(
        self, cursor: txpostgres.Cursor, *, lazy_begin: bool = False, alone: bool = False
    ) -> None:
        self._cursor = cursor
        self.wrote = False
        self.begun = not lazy_begin
        # One statement, committed by itself as it ends (``ConnectionPool.run``).
        self.alone = alone
        self._executed = False
        # Set when COMMIT was sent with the body's last statement (``execute(commit=True)``).
        self.committing = False
        self.committed = False

    async def execute(
        self, statement: str, parameters: tuple | None = None, *, commit: bool = False
    ) -> list[tuple]:
        """Run ``statement`` (psycopg2 placeholders, none read without ``parameters``); its
        rows, ``[]`` for one without. With ``commit`` it is the body's last statement: the
        transaction, if begun, is committed in the same round trip, and no rows come back."""
        if self.committed:
            raise RuntimeError("the transaction is committed already")
        if self.alone:
            if self._executed:
                raise RuntimeError("a body run alone has one statement")
            self._executed = True
        reads_only = _reads_only(statement)
        if not reads_only:
            self.wrote = True
        if not self.begun and not self.alone and not (reads_only and _no_row_locks(statement)):
            # One simple-query message: psycopg2 fills the parameters in on the client side,
            # and the rows are the last statement's.
            statement = "BEGIN; " + statement
            self.begun = True
        if commit and self.begun:
            statement += "; COMMIT"
            self.committing = True
        await self._cursor.execute(statement, parameters)
        if self.committing:
            self.committed = True
            return []
        # psycopg2's fetchall raises for a statement that returns no rows.
        return [] if self._cursor.description is None else self._cursor.fetchall()


Body = Callable[[Session], Awaitable[T]]


class _ConnectionLost(Exception):
    def __init__(self, cause: BaseException, retryable: bool) -> None:
        super().__init__(_one_line(cause))
        self.retryable = retryable


class _Connection(txpostgres.Connection):
    """A txpostgres connection that reports its loss while idle instead of raising it.

    txpostgres keeps an idle connection registered for reading (for NOTIFY); when the server
    closes it, psycopg2's poll raises in doRead, which the reactor would log as an unhandled
    error.
    """

    def __init__(self, reactor: object, on_lost: Callable[["_Connection", Exception], None]):
        super().__init__(reactor)
        self._on_lost = on_lost

    def doRead(self) -> None:
        try:
            super().doRead()
        except psycopg2.Error as error:
            self._on_lost(self, error)

    def discard(self) -> None:
        """Stop watching and free the connection, whatever state it is in."""
        if self._connection is None:
            return
        self.reactor.removeReader(self)
        self.reactor.removeWriter(self)
        if not self._connection.closed:
            txpostgres.Connection.close(self)
        else:
            # A broken connection (closed == 2) still holds libpq's socket until closed.
            self._connection.close()
            for cursor in set(self._cursors):
                cursor.connectionLost(Failure(internet_error.ConnectionDone()))
            self.connectionLost(Failure(internet_error.ConnectionDone()))


def _is_lost(connection: _Connection, error: BaseException) -> bool:
    if isinstance(error, internet_error.ConnectionDone | internet_error.ConnectionLost):
        return True
    raw = connection.pollable()
    return raw is None or bool(raw.closed)


class ConnectionPool:
    """``size`` connections to the database at ``dsn`` (a libpq connection string).

    Usable once ``start()`` has fired; ``run`` runs a transaction body on one of them.
    """

    def __init__(
        self,
        dsn: str,
        size: int,
        *,
        reactor: object = None,
        connect_timeout: float = CONNECT_TIMEOUT,
        reconnect_delay: float = RECONNECT_DELAY,
        max_reconnect_delay: float = MAX_RECONNECT_DELAY,
        outage_wait: float = OUTAGE_WAIT,
    ) -> None:
        if reactor is None:
            from twisted.internet import reactor
        self.reactor = reactor
        self._dsn = dsn
        self._size = size
        self._connect_timeout = connect_timeout
        self._reconnect_delay = reconnect_delay
        self._max_reconnect_delay = max_reconnect_delay
        self._outage_wait = outage_wait
        self._live: set[_Connection] = set()
        self._idle: collections.deque[_Connection] = collections.deque()
        self._waiting: collections.deque[Deferred[_Connection]] = collections.deque()
        # Connections being made, and the pending attempts to replace lost ones.
        self._connecting: set[_Connection] = set()
        self._retries: set = set()
        self._closed = False
        # Since when connections are missing (monotonic seconds), None when all are there.
        self._outage_since: float | None = None
        # Why the latest attempt to connect failed, while none has succeeded since.
        self._unreachable: str | None = None

    # Connecting.

    def start(self) -> Deferred["ConnectionPool"]:
        """Open the connections; fails with the first connection's error if any fails."""

        def failed(failure: Failure) -> Failure:
            self.close()
            return failure.value.subFailure if failure.check(FirstError) else failure

        attempts = [self._connect().addCallback(self._add) for _ in range(self._size)]
        return gatherResults(attempts, consumeErrors=True).addCallbacks(lambda _: self, failed)

    def _connect(self) -> Deferred[_Connection]:
        connection = _Connection(self.reactor, self._lost)
        connecting = connection.connect(self._dsn)
        self._connecting.add(connection)
        # Closing the connection fails its pending poll, and so the attempt.
        timeout = self.reactor.callLater(self._connect_timeout, connection.discard)

        def done(result: object) -> object:
            self._connecting.discard(connection)
            if timeout.active():
                timeout.cancel()
            if isinstance(result, Failure):
                connection.discard()
                if result.check(internet_error.ConnectionDone):
                    message = f"no answer within {self._connect_timeout} s"
                    return Failure(DatabaseUnavailable(f"PostgreSQL: {message}"))
            return result

        return connecting.addBoth(done)

    def _add(self, connection: _Connection) -> None:
        self._live.add(connection)
        self._release(connection)

    def _lost(self, connection: _Connection, reason: BaseException) -> None:
        """``connection`` is dead: forget it, replace it, and log if an outage begins."""
        if connection not in self._live:
            return
        self._live.discard(connection)
        if connection in self._idle:
            self._idle.remove(connection)
        connection.discard()
        if self._closed:
            return
        if self._outage_since is None:
            self._outage_since = time.monotonic()
            log.warn("PostgreSQL connection lost: {reason}; reconnecting", reason=_one_line(reason))
        # A restart ends every connection: read what the idle ones hold now, so that those the
        # server closed too are replaced in this outage rather than found one by one later
        # (each then a new "lost" after a "restored").
        for idle in list(self._idle):
            idle.doRead()
        if not self._live:
            for request in self._waiting:
                self._limit_wait(request)
        self._replace(0.0)

    def _replace(self, delay: float) -> None:
        """Make a new connection after ``delay`` seconds, retrying with back-off."""

        def attempt() -> None:
            self._retries.discard(call)
            self._connect().addCallbacks(connected, failed)

        def connected(connection: _Connection) -> None:
            if self._closed:
                connection.discard()
                return
            self._unreachable = None
            self._add(connection)
            if self._outage_since is not None and len(self._live) == self._size:
                log.info(
                    "PostgreSQL connection restored after {seconds:.1f} s",
                    seconds=time.monotonic() - self._outage_since,
                )
                self._outage_since = None

        def failed(failure: Failure) -> None:
            if self._closed:
                return
            self._unreachable = _one_line(failure.value)
            next_delay = min(max(delay * 2, self._reconnect_delay), self._max_reconnect_delay)
            self._replace(next_delay)

        call = self.reactor.callLater(delay, attempt)
        self._retries.add(call)

    # Lending connections.

    def _release(self, connection: _Connection) -> None:
        if connection not in self._live:
            return
        if self._waiting:
            self._waiting.popleft().callback(connection)
        else:
            self._idle.append(connection)

    def _unavailable(self) -> DatabaseUnavailable:
        if self._closed:
            return DatabaseUnavailable("PostgreSQL: the connection pool is closed")
        reason = self._unreachable or f"no connection within {self._outage_wait} s"
        return DatabaseUnavailable(f"PostgreSQL is unreachable: {reason}")

    def _limit_wait(self, request: Deferred[_Connection]) -> None:
        request.addTimeout(self._outage_wait, self.reactor)

    def _fail_waiting(self) -> None:
        waiting, self._waiting = self._waiting, collections.deque()
        for request in waiting:
            request.errback(self._unavailable())

    async def _acquire(self) -> _Connection:
        if self._idle:
            return self._idle.popleft()
        if self._closed:
            raise self._unavailable()
        request: Deferred[_Connection] = Deferred()
        self._waiting.append(request)
        if not self._live:
            self._limit_wait(request)
        try:
            return await request
        except defer.TimeoutError:
            self._waiting.remove(request)
            raise self._unavailable() from None

    # Running transactions.

    def run(self, body: Body[T], *, lazy_begin: bool = False, alone: bool = False) -> Deferred[T]:
        """Run ``body`` in a transaction on one of the connections; Deferred with its result.
        ``lazy_begin``: its leading plain reads run before the transaction (see Session).
        ``alone``: its one statement is sent without BEGIN and COMMIT, and commits as it ends."""
        return Deferred.fromCoroutine(self._run(body, lazy_begin, alone))

    async def _run(self, body: Body[T], lazy_begin: bool, alone: bool) -> T:
        # Every idle connection may turn out dead before the pool learns that they all are.
        for _ in range(self._size):
            try:
                return await self._run_once(body, lazy_begin, alone)
            except _ConnectionLost as lost:
                if not lost.retryable:
                    raise OutcomeUnknown(
                        f"PostgreSQL connection lost during COMMIT ({lost}): the change may or"
                        " may not have been saved"
                    ) from None
        try:
            return await self._run_once(body, lazy_begin, alone)
        except _ConnectionLost as lost:
            raise DatabaseUnavailable(f"PostgreSQL connection lost: {lost}") from None

    async def _run_once(self, body: Body[T], lazy_begin: bool, alone: bool) -> T:
        connection = await self._acquire()
        # A statement alone commits as it ends: it is its own COMMIT.
        committing = alone
        session = None
        try:
            cursor = connection.cursor()
            if not (lazy_begin or alone):
                await cursor.execute("BEGIN")
            session = Session(cursor, lazy_begin=lazy_begin or alone, alone=alone)
            result = await body(session)
            if session.begun and not session.committed:
                committing = True
                await cursor.execute("COMMIT")
            return result
        except Exception as error:
            if _is_lost(connection, error):
                self._lost(connection, error)
                # Before COMMIT nothing was committed; a transaction that only read may run again.
                wrote = session is not None and session.wrote
                committing = committing or (session is not None and session.committing)
                raise _ConnectionLost(error, retryable=not (committing and wrote)) from None
            if session is None or session.begun:
                await self._roll_back(connection)
            raise
        finally:
            self._release(connection)

    async def _roll_back(self, connection: _Connection) -> None:
        try:
            await connection.cursor().execute("ROLLBACK")
        except Exception as error:
            # The request's own error is what its caller needs; a connection that cannot roll
            # back is of no further use.
            self._lost(connection, error)

    def close(self) -> None:
        """Close the connections and stop reconnecting; waiting requests fail."""
        self._closed = True
        for call in self._retries:
            call.cancel()
        self._retries.clear()
        for connection in [*self._live, *self._connecting]:
            connection.discard()
        self._live.clear()
        self._idle.clear()
        self._fail_waiting()
