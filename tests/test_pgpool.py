"""The PostgreSQL pool's transactions begun lazily: the plain reads a body starts with run on
their own, BEGIN goes with its first write or row lock, COMMIT only after one, or with the body's
last statement; and a statement that is a transaction by itself, sent alone."""

import psycopg2.errors
from twisted.trial.unittest import TestCase

from mim_twisted.storage.pgpool import ConnectionPool, Session
from tests import pgsupport

# Whether the statement runs in a transaction of its own: one begun by an earlier round trip
# started before this statement did.
OWN_TRANSACTION = (
    "SELECT xact_start = query_start FROM pg_stat_activity WHERE pid = pg_backend_pid()"
)


class PoolTestCase(TestCase):
    async def open_pool(self) -> ConnectionPool:
        """A pool of one connection to a new database with an empty table t (`self.dsn`)."""
        self.dsn = pgsupport.create_temp_database(self)
        pool = await self.connect(self.dsn)
        await pool.run(lambda session: session.execute("CREATE TABLE t (x int)"))
        return pool

    async def connect(self, dsn: str) -> ConnectionPool:
        pool = ConnectionPool(dsn, 1)
        self.addCleanup(pool.close)
        await pool.start()
        return pool

    async def own_transaction(self, session: Session) -> bool:
        return (await session.execute(OWN_TRANSACTION))[0][0]

    async def count(self, pool: ConnectionPool) -> int:
        return (await pool.run(lambda session: session.execute("SELECT count(*) FROM t")))[0][0]


class LazyBeginTests(PoolTestCase):
    async def test_leading_plain_reads_run_outside_the_transaction(self) -> None:
        pool = await self.open_pool()

        async def body(session: Session) -> list[bool]:
            seen = [await self.own_transaction(session), await self.own_transaction(session)]
            await session.execute("INSERT INTO t VALUES (%s)", (1,))
            seen.append(await self.own_transaction(session))
            return seen

        self.assertEqual(await pool.run(body, lazy_begin=True), [True, True, False])
        self.assertEqual(await self.count(pool), 1)

    async def test_without_lazy_begin_every_statement_is_in_the_transaction(self) -> None:
        pool = await self.open_pool()
        self.assertFalse(await pool.run(self.own_transaction))

    async def test_a_row_lock_begins_the_transaction(self) -> None:
        pool = await self.open_pool()

        async def body(session: Session) -> bool:
            await session.execute("SELECT x FROM t FOR UPDATE")
            return await self.own_transaction(session)

        self.assertFalse(await pool.run(body, lazy_begin=True))

    async def test_a_failure_after_the_first_write_rolls_everything_back(self) -> None:
        pool = await self.open_pool()

        async def body(session: Session) -> None:
            await session.execute("SELECT 1")
            await session.execute("INSERT INTO t VALUES (%s)", (1,))
            await session.execute("INSERT INTO t VALUES (%s)", (2,))
            raise ValueError("refused")

        with self.assertRaises(ValueError):
            await pool.run(body, lazy_begin=True)
        self.assertEqual(await self.count(pool), 0)

    async def test_a_failed_plain_read_leaves_the_connection_usable(self) -> None:
        pool = await self.open_pool()

        async def body(session: Session) -> None:
            await session.execute("SELECT x FROM missing")

        with self.assertRaises(psycopg2.errors.UndefinedTable):
            await pool.run(body, lazy_begin=True)
        self.assertTrue(await pool.run(self.own_transaction, lazy_begin=True))
        self.assertEqual(await self.count(pool), 0)

    async def test_the_last_statement_may_carry_the_commit(self) -> None:
        pool = await self.open_pool()

        async def body(session: Session) -> list[tuple]:
            await session.execute("INSERT INTO t VALUES (%s)", (1,))
            rows = await session.execute("INSERT INTO t VALUES (%s) RETURNING x", (2,), commit=True)
            self.assertTrue(session.committed)
            with self.assertRaises(RuntimeError):
                await session.execute("SELECT 1")
            return rows

        self.assertEqual(await pool.run(body, lazy_begin=True), [])
        self.assertEqual(await self.count(pool), 2)
        # The connection is out of the transaction: the next body begins its own.
        self.assertTrue(await pool.run(self.own_transaction, lazy_begin=True))

    async def test_a_failure_of_the_last_statement_rolls_everything_back(self) -> None:
        pool = await self.open_pool()

        async def body(session: Session) -> None:
            await session.execute("INSERT INTO t VALUES (%s)", (1,))
            await session.execute("INSERT INTO missing VALUES (%s)", (2,), commit=True)

        with self.assertRaises(psycopg2.errors.UndefinedTable):
            await pool.run(body, lazy_begin=True)
        self.assertEqual(await self.count(pool), 0)
        self.assertTrue(await pool.run(self.own_transaction, lazy_begin=True))

    async def test_a_plain_read_with_commit_begins_nothing(self) -> None:
        pool = await self.open_pool()

        async def body(session: Session) -> bool:
            rows = await session.execute(OWN_TRANSACTION, commit=True)
            self.assertFalse(session.begun)
            return rows[0][0]

        self.assertTrue(await pool.run(body, lazy_begin=True))


class AloneTests(PoolTestCase):
    """A statement that is a transaction by itself: sent without BEGIN and COMMIT."""

    async def test_a_write_alone_commits_as_it_ends(self) -> None:
        pool = await self.open_pool()

        async def body(session: Session) -> list[tuple]:
            return await session.execute(
                f"INSERT INTO t VALUES (%s) RETURNING ({OWN_TRANSACTION})", (1,)
            )

        self.assertEqual(await pool.run(body, alone=True), [(True,)])
        # Seen from another connection: committed, with no COMMIT sent.
        self.assertEqual(await self.count(await self.connect(self.dsn)), 1)

    async def test_a_body_alone_has_one_statement(self) -> None:
        pool = await self.open_pool()

        async def body(session: Session) -> None:
            await session.execute("INSERT INTO t VALUES (%s)", (1,))
            await session.execute("INSERT INTO t VALUES (%s)", (2,))

        with self.assertRaises(RuntimeError):
            await pool.run(body, alone=True)
        self.assertEqual(await self.count(pool), 1)

    async def test_a_failed_statement_alone_leaves_the_connection_usable(self) -> None:
        pool = await self.open_pool()

        async def body(session: Session) -> None:
            await session.execute("INSERT INTO missing VALUES (1)")

        with self.assertRaises(psycopg2.errors.UndefinedTable):
            await pool.run(body, alone=True)
        self.assertTrue(await pool.run(self.own_transaction, lazy_begin=True))
