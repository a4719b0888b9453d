"""Storage that recovers: SQLite waits out another process's lock, PostgreSQL and MySQL
reconnect.

Issue 8, item 3. A restart cannot be done to the shared test servers, so the tests terminate the
server processes (PostgreSQL) or connections (MySQL's KILL) of their own database, which is what
the clients of a restart see.
"""

import os
import sqlite3
import threading
import time
from collections.abc import Callable

import psycopg2
import pymysql
from psycopg2.extensions import make_dsn, parse_dsn
from twisted.internet import reactor, task
from twisted.internet.defer import gatherResults
from twisted.logger import formatEvent, globalLogPublisher
from twisted.protocols import portforward
from twisted.trial.unittest import TestCase

from mim_twisted.storage import mysqlpool
from mim_twisted.storage.interfaces import StorageUnavailable
from mim_twisted.storage.mysql import MySQLDatabase
from mim_twisted.storage.pgpool import ConnectionPool, DatabaseUnavailable, OutcomeUnknown, Session
from mim_twisted.storage.postgres import PostgresDatabase
from mim_twisted.storage.sqlite import SQLiteDatabase
from tests import mysqlsupport, pgsupport
from tests.storage_contract import ALICE, credentials, message


class LogCapture:
    """The formatted messages logged while a test runs."""

    def __init__(self, test: TestCase) -> None:
        self.messages: list[str] = []
        globalLogPublisher.addObserver(self._observe)
        test.addCleanup(globalLogPublisher.removeObserver, self._observe)

    def _observe(self, event: dict) -> None:
        self.messages.append(formatEvent(event))

    def starting(self, prefix: str) -> list[str]:
        return [message for message in self.messages if message.startswith(prefix)]


async def until(condition: Callable[[], object], timeout: float = 5.0) -> None:
    """Wait until ``condition()`` is true, checking every 10 ms."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError("condition not met in time")
        await task.deferLater(reactor, 0.01)


class SQLiteBusyTests(TestCase):
    async def open(self) -> SQLiteDatabase:
        self.path = os.path.join(os.path.abspath(self.mktemp()), "mim.sqlite3")
        database = SQLiteDatabase(self.path, busy_timeout=0.05, busy_retry_delays=(0.05, 0.1, 0.2))
        self.addCleanup(database.close)
        await database.migrate()
        return database

    def lock(self) -> sqlite3.Connection:
        """Another process's connection holding the write lock, as mimctl's does while it writes."""
        holder = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
        self.addCleanup(holder.close)
        holder.execute("BEGIN IMMEDIATE")
        return holder

    async def test_a_write_waits_for_the_lock(self) -> None:
        log = LogCapture(self)
        database = await self.open()
        holder = self.lock()
        creating = database.accounts.create_account(*ALICE, credentials("1"))
        await until(lambda: log.starting("SQLite: database is locked; trying again in 0.05 s"))
        holder.execute("COMMIT")
        await creating
        self.assertTrue(await database.accounts.account_exists(*ALICE))

    async def test_a_lock_held_too_long_fails_the_write(self) -> None:
        database = await self.open()
        self.lock()
        with self.assertRaises(StorageUnavailable) as raised:
            await database.accounts.create_account(*ALICE, credentials("1"))
        self.assertIsInstance(raised.exception, sqlite3.OperationalError)
        self.assertEqual(str(raised.exception), "SQLite: database is locked, still after 3 retries")
        self.assertFalse(await database.accounts.account_exists(*ALICE))


class DatabaseProxy:
    """A TCP relay to a database server on a loopback port, which a test takes down and brings
    back."""

    def __init__(self, test: TestCase, host: str, port: int) -> None:
        self.relays: set[portforward.ProxyServer] = set()
        relays = self.relays

        class Relay(portforward.ProxyServer):
            def connectionMade(self) -> None:
                relays.add(self)
                super().connectionMade()

            def connectionLost(self, reason: object) -> None:
                relays.discard(self)
                super().connectionLost(reason)

        self.factory = portforward.ProxyFactory(host, port)
        self.factory.protocol = Relay
        self.listening = reactor.listenTCP(0, self.factory, interface="127.0.0.1")
        self.port = self.listening.getHost().port
        test.addCleanup(self.take_down)

    async def take_down(self) -> None:
        """Refuse new connections and cut the relayed ones, as a stopped server does."""
        if self.listening is not None:
            await self.listening.stopListening()
            self.listening = None
        for relay in list(self.relays):
            relay.transport.abortConnection()
            if relay.peer is not None:
                relay.peer.transport.abortConnection()
        while self.relays:
            await task.deferLater(reactor, 0.01)

    def bring_back(self) -> None:
        self.listening = reactor.listenTCP(self.port, self.factory, interface="127.0.0.1")


class PostgresProxy(DatabaseProxy):
    def __init__(self, test: TestCase, dsn: str) -> None:
        parameters = parse_dsn(dsn)
        host, port = parameters.get("host", "127.0.0.1"), int(parameters.get("port", 5432))
        super().__init__(test, host, port)
        self.dsn = make_dsn(dsn, host="127.0.0.1", port=self.port)


class PostgresRecoveryTests(TestCase):
    async def open(self, pool_size: int = 2, dsn: str | None = None) -> PostgresDatabase:
        if dsn is None:
            dsn = self.dsn = pgsupport.create_temp_database(self)
        database = PostgresDatabase(
            dsn,
            pool_size,
            reconnect_delay=0.05,
            max_reconnect_delay=0.2,
            connect_timeout=2,
            outage_wait=0.3,
        )
        self.addCleanup(database.close)
        await database.start()
        await database.migrate()
        return database

    async def open_behind_proxy(self) -> tuple[PostgresProxy, PostgresDatabase]:
        """A database reached through a PostgresProxy, with ALICE registered."""
        proxy = PostgresProxy(self, pgsupport.create_temp_database(self))
        database = await self.open(dsn=proxy.dsn)
        await database.accounts.create_account(*ALICE, credentials("1"))
        return proxy, database

    async def open_pool(self) -> ConnectionPool:
        """A pool of one connection, alone on its database."""
        self.dsn = pgsupport.create_temp_database(self)
        pool = ConnectionPool(self.dsn, 1, reconnect_delay=0.05)
        self.addCleanup(pool.close)
        return await pool.start()

    def assertOneOutage(self, log: LogCapture) -> None:
        self.assertEqual(len(log.starting("PostgreSQL connection lost: ")), 1, log.messages)
        self.assertEqual(len(log.starting("PostgreSQL connection restored after ")), 1)

    async def test_a_read_on_dead_connections_is_retried(self) -> None:
        # Terminated while the reactor does not run: the pool learns that its connections are
        # dead only by using them, and the read runs again until it gets a new one.
        log = LogCapture(self)
        database = await self.open()
        await database.accounts.create_account(*ALICE, credentials("1"))
        self.assertEqual(pgsupport.terminate_backends(self.dsn), 2)
        self.assertTrue(await database.accounts.account_exists(*ALICE))
        await until(lambda: log.starting("PostgreSQL connection restored"))
        self.assertOneOutage(log)
        self.assertEqual(await database.accounts.list_accounts(ALICE[0]), [ALICE[1]])

    async def test_idle_connections_are_replaced_before_the_next_request(self) -> None:
        log = LogCapture(self)
        database = await self.open(pool_size=3)
        pgsupport.terminate_backends(self.dsn)
        await until(lambda: log.starting("PostgreSQL connection restored"))
        self.assertOneOutage(log)
        await database.accounts.create_account(*ALICE, credentials("1"))
        self.assertTrue(await database.accounts.account_exists(*ALICE))

    async def test_a_write_in_flight_is_run_again_once(self) -> None:
        # The write waits for a row lock that another client holds when its connection dies:
        # nothing was committed, so it runs again, and is stored once.
        database = await self.open(pool_size=1)
        await database.accounts.create_account(*ALICE, credentials("1"))
        holder = psycopg2.connect(self.dsn)
        self.addCleanup(holder.close)
        with holder.cursor() as cursor:
            cursor.execute("SELECT pg_backend_pid()")
            [(holder_pid,)] = cursor.fetchall()
            cursor.execute(
                "SELECT 1 FROM users WHERE server = %s AND username = %s FOR UPDATE", ALICE
            )
        storing = database.offline.store(*ALICE, message(1), 10)
        await until(lambda: self.waiting_for_lock() == 1)
        pgsupport.terminate_backends(self.dsn, sparing=(holder_pid,))
        holder.rollback()
        await storing
        self.assertEqual(await database.offline.count(*ALICE), 1)

    def waiting_for_lock(self) -> int:
        with psycopg2.connect(self.dsn) as watcher, watcher.cursor() as cursor:
            cursor.execute(
                "SELECT count(*) FROM pg_stat_activity"
                " WHERE datname = current_database() AND wait_event_type = 'Lock'"
            )
            return cursor.fetchone()[0]

    async def test_a_write_that_lost_its_connection_at_commit_is_reported_not_repeated(
        self,
    ) -> None:
        log = LogCapture(self)
        pool = await self.open_pool()
        runs = []

        async def insert_then_lose_the_connection(session: Session) -> None:
            runs.append(1)
            await session.execute("CREATE TABLE done (x int)")
            # Dead before COMMIT is sent: the pool cannot know that the server did not commit.
            pgsupport.terminate_backends(self.dsn)

        with self.assertRaises(OutcomeUnknown):
            await pool.run(insert_then_lose_the_connection)
        self.assertEqual(runs, [1])
        self.assertEqual(await pool.run(self.table_exists), False)
        await until(lambda: log.starting("PostgreSQL connection restored"))
        self.assertOneOutage(log)

    async def test_a_write_that_lost_its_connection_with_commit_sent_is_reported(self) -> None:
        log = LogCapture(self)
        pool = await self.open_pool()
        runs = []

        async def create_and_commit(session: Session) -> None:
            runs.append(1)
            # COMMIT goes in the same message, after the sleep during which the server dies.
            await session.execute("CREATE TABLE done (x int); SELECT pg_sleep(10)", commit=True)

        creating = pool.run(create_and_commit)
        await until(lambda: self.sleeping() == 1)
        pgsupport.terminate_backends(self.dsn)
        with self.assertRaises(OutcomeUnknown):
            await creating
        self.assertEqual(runs, [1])
        self.assertEqual(await pool.run(self.table_exists), False)
        await until(lambda: log.starting("PostgreSQL connection restored"))

    def sleeping(self) -> int:
        with psycopg2.connect(self.dsn) as watcher, watcher.cursor() as cursor:
            cursor.execute(
                "SELECT count(*) FROM pg_stat_activity"
                " WHERE datname = current_database() AND wait_event = 'PgSleep'"
            )
            return cursor.fetchone()[0]

    async def table_exists(self, session: Session) -> bool:
        rows = await session.execute("SELECT to_regclass('done') IS NOT NULL")
        return rows[0][0]

    async def test_a_read_that_lost_its_connection_at_commit_runs_again(self) -> None:
        pool = await self.open_pool()
        runs = []

        async def read_then_lose_the_connection(session: Session) -> bool:
            runs.append(1)
            exists = await self.table_exists(session)
            if len(runs) == 1:
                pgsupport.terminate_backends(self.dsn)
            return exists

        self.assertEqual(await pool.run(read_then_lose_the_connection), False)
        self.assertEqual(runs, [1, 1])

    async def test_requests_fail_soon_while_unreachable_and_work_when_it_is_back(self) -> None:
        log = LogCapture(self)
        proxy, database = await self.open_behind_proxy()
        await proxy.take_down()
        for _ in range(3):
            started = time.monotonic()
            with self.assertRaises(DatabaseUnavailable) as raised:
                await database.accounts.account_exists(*ALICE)
            # After waiting outage_wait for a connection.
            self.assertTrue(0.25 < time.monotonic() - started < 1, time.monotonic() - started)
            self.assertEqual(
                str(raised.exception).split(" Is the server")[0],
                "PostgreSQL is unreachable: Connection refused",
            )
            self.assertIsInstance(raised.exception, StorageUnavailable)
        proxy.bring_back()
        # The back-off tops at 0.2 s here.
        await until(lambda: log.starting("PostgreSQL connection restored"), timeout=2)
        self.assertTrue(await database.accounts.account_exists(*ALICE))
        self.assertOneOutage(log)
        [restored] = log.starting("PostgreSQL connection restored")
        self.assertRegex(restored, r"^PostgreSQL connection restored after \d+\.\d s$")

    async def test_a_request_waits_out_a_short_outage(self) -> None:
        log = LogCapture(self)
        proxy, database = await self.open_behind_proxy()
        await proxy.take_down()
        asking = database.accounts.account_exists(*ALICE)
        await task.deferLater(reactor, 0.1)
        proxy.bring_back()
        self.assertTrue(await asking)
        await until(lambda: log.starting("PostgreSQL connection restored"))
        self.assertOneOutage(log)

    async def test_start_fails_while_unreachable(self) -> None:
        proxy = PostgresProxy(self, pgsupport.create_temp_database(self))
        await proxy.take_down()
        database = PostgresDatabase(proxy.dsn, 2)
        with self.assertRaises(psycopg2.OperationalError):
            await database.start()


class MySQLRecoveryTests(TestCase):
    async def open(self, pool_size: int = 2, **options: object) -> MySQLDatabase:
        self.options = mysqlsupport.create_temp_database(self)
        database = MySQLDatabase(
            {**self.options, **options},
            pool_size,
            reconnect_delay=0.05,
            max_reconnect_delay=0.2,
            connect_timeout=2,
            outage_wait=0.3,
        )
        self.addCleanup(database.close)
        await database.start()
        await database.migrate()
        await database.accounts.create_account(*ALICE, credentials("1"))
        return database

    async def open_behind_proxy(self) -> tuple[DatabaseProxy, MySQLDatabase]:
        """A database reached through a DatabaseProxy, with ALICE registered."""
        server = mysqlsupport.server_options()
        proxy = DatabaseProxy(self, server["host"], server["port"])
        database = await self.open(host="127.0.0.1", port=proxy.port)
        return proxy, database

    async def open_pool(self) -> mysqlpool.ConnectionPool:
        """A pool of one connection, alone on its database, which has a table ``done``."""
        self.options = mysqlsupport.create_temp_database(self)
        pool = mysqlpool.ConnectionPool(self.options, 1, reconnect_delay=0.05)
        self.addCleanup(pool.close)
        await pool.start()
        await pool.run(lambda session: session.execute("CREATE TABLE done (x int)"))
        return pool

    def assertOneOutage(self, log: LogCapture) -> None:
        self.assertEqual(len(log.starting("MySQL connection lost: ")), 1, log.messages)
        self.assertEqual(len(log.starting("MySQL connection restored after ")), 1)

    async def test_a_read_on_dead_connections_is_retried(self) -> None:
        log = LogCapture(self)
        database = await self.open()
        # Two transactions that meet in their threads, so that both connections are open (two
        # plain requests at once may take turns on one on a busy machine).
        both_open = threading.Barrier(2, timeout=5)
        await gatherResults([database._pool.run(lambda _: both_open.wait()) for _ in range(2)])
        self.assertEqual(mysqlsupport.terminate_connections(self.options), 2)
        self.assertEqual(
            await gatherResults([database.accounts.account_exists(*ALICE) for _ in range(2)]),
            [True, True],
        )
        await until(lambda: log.starting("MySQL connection restored"))
        self.assertOneOutage(log)
        self.assertEqual(await database.accounts.list_accounts(ALICE[0]), [ALICE[1]])

    async def test_a_write_in_flight_is_run_again_once(self) -> None:
        # The write waits for a row lock that another client holds when its connection dies:
        # nothing was committed, so it runs again, and is stored once.
        database = await self.open(pool_size=1)
        holder = mysqlsupport.connect(database=self.options["database"], autocommit=False)
        self.addCleanup(holder.close)
        with holder.cursor() as cursor:
            cursor.execute("BEGIN")
            cursor.execute(
                "SELECT 1 FROM users WHERE server = %s AND username = %s FOR UPDATE", ALICE
            )
        storing = database.offline.store(*ALICE, message(1), 10)
        await until(lambda: self.waiting_for_lock() == 1)
        mysqlsupport.terminate_connections(self.options, sparing=(holder.thread_id(),))
        holder.rollback()
        await storing
        self.assertEqual(await database.offline.count(*ALICE), 1)

    def waiting_for_lock(self) -> int:
        watcher = mysqlsupport.connect()
        try:
            with watcher.cursor() as cursor:
                cursor.execute(
                    "SELECT count(*) FROM information_schema.innodb_trx"
                    " WHERE trx_state = 'LOCK WAIT'"
                )
                return cursor.fetchone()[0]
        finally:
            watcher.close()

    async def test_a_write_that_lost_its_connection_at_commit_is_reported_not_repeated(
        self,
    ) -> None:
        log = LogCapture(self)
        pool = await self.open_pool()
        runs = []

        def insert_then_lose_the_connection(session: mysqlpool.Session) -> None:
            runs.append(1)
            session.execute("INSERT INTO done (x) VALUES (1)")
            # Dead before COMMIT is sent: the pool cannot know that the server did not commit.
            mysqlsupport.terminate_connections(self.options)

        with self.assertRaises(mysqlpool.OutcomeUnknown) as raised:
            await pool.run(insert_then_lose_the_connection)
        self.assertIsInstance(raised.exception, StorageUnavailable)
        self.assertEqual(runs, [1])
        self.assertEqual(await pool.run(self.count_done), 0)
        self.assertOneOutage(log)

    def count_done(self, session: mysqlpool.Session) -> int:
        return session.execute("SELECT count(*) FROM done")[0][0]

    async def test_a_read_that_lost_its_connection_at_commit_runs_again(self) -> None:
        pool = await self.open_pool()
        runs = []

        def read_then_lose_the_connection(session: mysqlpool.Session) -> int:
            runs.append(1)
            count = self.count_done(session)
            if len(runs) == 1:
                mysqlsupport.terminate_connections(self.options)
            return count

        self.assertEqual(await pool.run(read_then_lose_the_connection), 0)
        self.assertEqual(runs, [1, 1])

    async def test_requests_fail_soon_while_unreachable_and_work_when_it_is_back(self) -> None:
        log = LogCapture(self)
        proxy, database = await self.open_behind_proxy()
        await proxy.take_down()
        for _ in range(3):
            started = time.monotonic()
            with self.assertRaises(mysqlpool.DatabaseUnavailable) as raised:
                await database.accounts.account_exists(*ALICE)
            # After trying to connect for outage_wait.
            self.assertTrue(0.1 < time.monotonic() - started < 1, time.monotonic() - started)
            self.assertRegex(
                str(raised.exception), r"^MySQL is unreachable: Can't connect to MySQL server"
            )
            self.assertIsInstance(raised.exception, StorageUnavailable)
        proxy.bring_back()
        self.assertTrue(await database.accounts.account_exists(*ALICE))
        self.assertOneOutage(log)
        [restored] = log.starting("MySQL connection restored")
        self.assertRegex(restored, r"^MySQL connection restored after \d+\.\d s$")

    async def test_a_request_waits_out_a_short_outage(self) -> None:
        log = LogCapture(self)
        proxy, database = await self.open_behind_proxy()
        await proxy.take_down()
        asking = database.accounts.account_exists(*ALICE)
        await task.deferLater(reactor, 0.1)
        proxy.bring_back()
        self.assertTrue(await asking)
        self.assertOneOutage(log)

    async def test_start_fails_while_unreachable(self) -> None:
        server = mysqlsupport.server_options()
        proxy = DatabaseProxy(self, server["host"], server["port"])
        await proxy.take_down()
        database = MySQLDatabase({**server, "host": "127.0.0.1", "port": proxy.port}, 2)
        with self.assertRaises(pymysql.err.OperationalError) as raised:
            await database.start()
        self.assertRegex(
            str(raised.exception), r"^Can't connect to MySQL server .* \(error 2003\)$"
        )
