"""A pool of blocking PyMySQL connections on threads that lives through server restarts.

The same semantics as pgpool.py, on threads as adbapi runs a DB-API driver: each of ``size``
threads takes an idle connection, or makes one, and runs a transaction body on it. A connection
found dead is dropped with every idle one (a restart has killed them all) and replaced by the
next request; an outage is logged once when it is noticed and once when a connection is made
again.

Transactions are begun and committed here, so that a failure is known to have happened before
or during COMMIT. One whose connection was lost before COMMIT was sent has not been committed
(the server rolls back a transaction whose client went away), so it runs again on a new
connection; so does a read-only one that lost it during COMMIT, and one that InnoDB chose as a
deadlock victim (rolled back whole). A writing one that lost it during COMMIT may or may not
have been committed: it fails with OutcomeUnknown rather than risk doing twice what it did.
While the server cannot be reached, a request keeps trying to connect for a moment, then fails
with DatabaseUnavailable.
"""

import collections
import threading
import time
from collections.abc import Callable, Mapping
from typing import Any, TypeVar

import pymysql
from pymysql.constants import CLIENT, ER
from twisted.internet.defer import Deferred
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.python.threadpool import ThreadPool

from mim_twisted.storage.interfaces import StorageUnavailable

T = TypeVar("T")

log = Logger()

# Seconds a connection attempt may take.
CONNECT_TIMEOUT = 5.0
# The pause after a failed attempt to connect during an outage; it doubles with each failure,
# up to the maximum.
RECONNECT_DELAY = 0.1
MAX_RECONNECT_DELAY = 2.0
# Seconds a request keeps trying to connect while the server cannot be reached: a quick restart
# goes unnoticed, while in a longer outage requests fail soon rather than pile up.
OUTAGE_WAIT = 1.0
# How many times a transaction chosen as a deadlock victim runs again.
DEADLOCK_RETRIES = 3

# READ COMMITTED, PostgreSQL's default, is what sql.py's transactions are written for: each
# statement sees what was committed before it began, and writers to one account or node wait
# for its row lock (FOR UPDATE) rather than for InnoDB's gap locks, which REPEATABLE READ, the
# default, takes and which deadlock concurrent inserts. Strict mode refuses a value that does
# not fit its column instead of truncating it.
SESSION_SETUP = (
    "SET SESSION TRANSACTION ISOLATION LEVEL READ COMMITTED",
    "SET SESSION sql_mode = 'TRADITIONAL'",
    "SET SESSION time_zone = '+00:00'",
)

# Client-side codes (2xxx) and server ones that mean the connection is gone.
_LOST_CODES = frozenset(
    {
        2003,  # can't connect
        2006,  # server has gone away
        2013,  # lost connection during query
        2055,  # lost connection (system error)
        ER.SERVER_SHUTDOWN,  # 1053
        1927,  # MariaDB: connection was killed
        4031,  # disconnected by the server for inactivity
    }
)


# Also PyMySQL errors, which mimctl reports in one line.
class DatabaseUnavailable(pymysql.err.OperationalError, StorageUnavailable):
    """MySQL cannot be reached now; nothing of the request was committed."""


class CannotConnect(pymysql.err.OperationalError):
    """The first connection failed (refused, access denied, no such database); str() is one
    line."""


class OutcomeUnknown(pymysql.err.OperationalError, StorageUnavailable):
    """The connection was lost during COMMIT: the transaction may or may not have been committed."""


def _one_line(error: BaseException) -> str:
    if isinstance(error, pymysql.err.MySQLError) and len(error.args) == 2:
        return " ".join(str(error.args[1]).split()) or type(error).__name__
    return " ".join(str(error).split()) or type(error).__name__


def _is_lost(error: BaseException) -> bool:
    if isinstance(error, pymysql.err.InterfaceError | OSError):
        return True  # a closed connection, or its socket
    return (
        isinstance(error, pymysql.err.OperationalError)
        and error.args[:1]
        and (error.args[0] in _LOST_CODES)
    )


def _is_deadlock(error: BaseException) -> bool:
    return isinstance(error, pymysql.err.OperationalError) and error.args[:1] == (ER.LOCK_DEADLOCK,)


class Session:
    """The statements of one transaction on one connection; remembers whether any wrote."""

    def __init__(self, cursor: pymysql.cursors.Cursor) -> None:
        self.cursor = cursor
        self.wrote = False

    def execute(self, statement: str, parameters: tuple | None = None) -> list[tuple]:
        """Run ``statement`` (PyMySQL's ``%s`` placeholders, none read without
        ``parameters``); its rows, ``[]`` for one without."""
        if statement.lstrip()[:6].upper() != "SELECT":
            self.wrote = True
        self.cursor.execute(statement, parameters)
        return list(self.cursor.fetchall())


Body = Callable[[Session], T]


class _ConnectionLost(Exception):
    def __init__(self, cause: BaseException, retryable: bool) -> None:
        super().__init__(_one_line(cause))
        self.retryable = retryable


class ConnectionPool:
    """Up to ``size`` connections made with ``connect_options`` (PyMySQL's keyword arguments:
    host, port, database, user, password, unix_socket).

    Usable once ``start()`` has fired; ``run`` runs a transaction body on one of them, on one of
    the pool's threads; ``close`` stops the threads and closes the connections.
    """

    def __init__(
        self,
        connect_options: Mapping[str, Any],
        size: int,
        *,
        reactor: Any = None,
        connect_timeout: float = CONNECT_TIMEOUT,
        reconnect_delay: float = RECONNECT_DELAY,
        max_reconnect_delay: float = MAX_RECONNECT_DELAY,
        outage_wait: float = OUTAGE_WAIT,
    ) -> None:
        if reactor is None:
            from twisted.internet import reactor
        self._reactor = reactor
        self._connect_options = dict(connect_options)
        self._connect_timeout = connect_timeout
        self._reconnect_delay = reconnect_delay
        self._max_reconnect_delay = max_reconnect_delay
        self._outage_wait = outage_wait
        self._threads = ThreadPool(minthreads=0, maxthreads=size, name="mim-mysql")
        # Shared by the threads, under the lock.
        self._lock = threading.Lock()
        self._idle: collections.deque[pymysql.connections.Connection] = collections.deque()
        self._closed = False
        # Since when the server is known unreachable (monotonic seconds), None when it is not.
        self._outage_since: float | None = None
        # The outages so far, and in which of them each open connection was made: a connection
        # older than the latest outage that turns out dead is no news, and not logged again.
        self._outages = 0
        self._made_after: dict[pymysql.connections.Connection, int] = {}

    # On the reactor's thread.

    def start(self) -> Deferred["ConnectionPool"]:
        """Start the threads and make a first connection; fails with its error if it fails."""
        self._threads.start()

        def failed(failure: Failure) -> Failure:
            self.close()
            error = failure.value
            if isinstance(error, pymysql.err.MySQLError) and len(error.args) == 2:
                return Failure(CannotConnect(f"{_one_line(error)} (error {error.args[0]})"))
            return failure

        opening = deferToThreadPool(self._reactor, self._threads, self._open_first)
        return opening.addCallbacks(lambda _: self, failed)

    def run(self, body: Body[T]) -> Deferred[T]:
        """Run ``body`` in a transaction on one of the connections; Deferred with its result."""
        if self._closed:
            return Deferred.fromCoroutine(self._refuse_closed())
        return deferToThreadPool(self._reactor, self._threads, self._run, body)

    async def _refuse_closed(self) -> None:
        raise DatabaseUnavailable("MySQL: the connection pool is closed")

    def close(self) -> None:
        """Let the running transactions finish, then stop the threads and close the
        connections; later requests fail."""
        self._closed = True
        self._threads.stop()
        with self._lock:
            idle, self._idle = list(self._idle), collections.deque()
        for connection in idle:
            self._discard(connection)

    def _log(self, level: str, message: str, **fields: object) -> None:
        # twisted.logger's observers expect the reactor's thread.
        self._reactor.callFromThread(getattr(log, level), message, **fields)

    # On the pool's threads.

    def _connect(self) -> pymysql.connections.Connection:
        connection = pymysql.connect(
            **self._connect_options,
            charset="utf8mb4",
            connect_timeout=self._connect_timeout,
            autocommit=False,
            # An UPDATE's row count is the rows it matched, not only those it changed: what
            # PostgreSQL's "RETURNING 1" tells sql.py.
            client_flag=CLIENT.FOUND_ROWS,
        )
        try:
            with connection.cursor() as cursor:
                for statement in SESSION_SETUP:
                    cursor.execute(statement)
        except BaseException:
            connection.close()
            raise
        with self._lock:
            self._made_after[connection] = self._outages
        return connection

    def _discard(self, connection: pymysql.connections.Connection) -> None:
        with self._lock:
            self._made_after.pop(connection, None)
        connection.close()

    def _open_first(self) -> None:
        connection = self._connect()
        with self._lock:
            self._idle.append(connection)

    def _acquire(self) -> pymysql.connections.Connection:
        with self._lock:
            if self._idle:
                return self._idle.popleft()
        deadline = time.monotonic() + self._outage_wait
        delay = self._reconnect_delay
        while True:
            try:
                connection = self._connect()
            except pymysql.err.MySQLError as error:
                if not _is_lost(error):
                    raise  # access denied, unknown database: no use trying again
                self._outage_began(error)
                if self._closed or time.monotonic() + delay > deadline:
                    raise DatabaseUnavailable(f"MySQL is unreachable: {_one_line(error)}") from None
                time.sleep(delay)
                delay = min(delay * 2, self._max_reconnect_delay)
                continue
            self._outage_ended()
            return connection

    def _release(self, connection: pymysql.connections.Connection) -> None:
        with self._lock:
            if not self._closed:
                self._idle.append(connection)
                return
        self._discard(connection)

    def _lost(self, connection: pymysql.connections.Connection, error: BaseException) -> None:
        with self._lock:
            made_after = self._made_after.get(connection)
        self._discard(connection)
        if made_after == self._outages:
            self._outage_began(error)

    def _outage_began(self, error: BaseException) -> None:
        with self._lock:
            if self._outage_since is not None:
                return
            self._outage_since = time.monotonic()
            self._outages += 1
            # A restart has killed the idle connections too: the next requests connect anew
            # rather than each discover a dead one.
            idle, self._idle = list(self._idle), collections.deque()
        for connection in idle:
            self._discard(connection)
        self._log("warn", "MySQL connection lost: {reason}; reconnecting", reason=_one_line(error))

    def _outage_ended(self) -> None:
        with self._lock:
            since, self._outage_since = self._outage_since, None
        if since is not None:
            self._log(
                "info",
                "MySQL connection restored after {seconds:.1f} s",
                seconds=time.monotonic() - since,
            )

    def _run(self, body: Body[T]) -> T:
        lost_connections = deadlocks = 0
        while True:
            try:
                return self._run_once(body)
            except _ConnectionLost as lost:
                if not lost.retryable:
                    raise OutcomeUnknown(
                        f"MySQL connection lost during COMMIT ({lost}): the change may or may"
                        " not have been saved"
                    ) from None
                # The first loss may be an idle connection that died; the second was new.
                lost_connections += 1
                if lost_connections == 2:
                    raise DatabaseUnavailable(f"MySQL connection lost: {lost}") from None
            except pymysql.err.OperationalError as error:
                if not _is_deadlock(error) or deadlocks == DEADLOCK_RETRIES:
                    raise
                deadlocks += 1

    def _run_once(self, body: Body[T]) -> T:
        connection = self._acquire()
        committing = False
        session = None
        try:
            connection.begin()
            session = Session(connection.cursor())
            result = body(session)
            committing = True
            connection.commit()
        except Exception as error:
            if _is_lost(error):
                self._lost(connection, error)
                # Before COMMIT nothing was committed; a transaction that only read may run again.
                wrote = session is not None and session.wrote
                raise _ConnectionLost(error, retryable=not (committing and wrote)) from None
            self._roll_back(connection)
            raise
        self._release(connection)
        return result

    def _roll_back(self, connection: pymysql.connections.Connection) -> None:
        try:
            connection.rollback()
        except Exception:
            # The request's own error is what its caller needs; a connection that cannot roll
            # back is of no further use.
            self._discard(connection)
            return
        self._release(connection)
