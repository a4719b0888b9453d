"""The storage backends against their contract, and the schema migrations on real databases."""

import dataclasses
import os
import sqlite3
from importlib.resources.abc import Traversable
from pathlib import Path

import psycopg2
import pymysql
from psycopg2.errors import LockNotAvailable
from psycopg2.extensions import make_dsn
from twisted.internet import reactor
from twisted.internet.defer import Deferred, gatherResults, succeed
from twisted.internet.task import Clock, deferLater
from twisted.trial.unittest import SynchronousTestCase, TestCase
from txpostgres import txpostgres

from mim_twisted.storage import open_database, sql
from mim_twisted.storage.interfaces import (
    IDatabase,
    NodeNotFound,
    RosterItem,
    SchemaOutdated,
    SchemaTooNew,
    StorageUnavailable,
)
from mim_twisted.storage.memory import MemoryDatabase
from mim_twisted.storage.migrations import (
    SCHEMA_DIR,
    Step,
    newest_version,
    plan,
    split_statements,
)
from mim_twisted.storage.mysql import MySQLDatabase, mysql_statement
from mim_twisted.storage.postgres import PostgresDatabase
from mim_twisted.storage.sqlite import SQLiteDatabase
from tests import mysqlsupport, pgsupport
from tests.storage_contract import (
    ALICE,
    OWNER,
    SERVICE,
    AccountStoreContract,
    BlockListStoreContract,
    LastActivityStoreContract,
    OfflineStoreContract,
    PrivateStoreContract,
    PubSubStoreContract,
    RosterStoreContract,
    VCardStoreContract,
    credentials,
    item,
    message,
)

BACKENDS = ("sqlite", "postgresql", "mysql")


class MemoryStorageTests(
    AccountStoreContract,
    RosterStoreContract,
    OfflineStoreContract,
    PubSubStoreContract,
    LastActivityStoreContract,
    BlockListStoreContract,
    PrivateStoreContract,
    VCardStoreContract,
    TestCase,
):
    def open_empty_database(self) -> Deferred[IDatabase]:
        return succeed(MemoryDatabase())


class SQLiteStorageTests(
    AccountStoreContract,
    RosterStoreContract,
    OfflineStoreContract,
    PubSubStoreContract,
    LastActivityStoreContract,
    BlockListStoreContract,
    PrivateStoreContract,
    VCardStoreContract,
    TestCase,
):
    def open_empty_database(self) -> Deferred[IDatabase]:
        # In a directory that does not exist yet: the database creates it.
        database = SQLiteDatabase(os.path.join(self.mktemp(), "data", "mim.sqlite3"))
        self.addCleanup(database.close)
        return succeed(database)


class PostgresStorageTests(
    AccountStoreContract,
    RosterStoreContract,
    OfflineStoreContract,
    PubSubStoreContract,
    LastActivityStoreContract,
    BlockListStoreContract,
    PrivateStoreContract,
    VCardStoreContract,
    TestCase,
):
    def open_empty_database(self) -> Deferred[IDatabase]:
        self.dsn = pgsupport.create_temp_database(self)
        database = PostgresDatabase(self.dsn, pool_size=2)
        self.addCleanup(database.close)
        return database.start()

    async def test_changes_to_an_account_data_wait_for_its_row(self) -> None:
        # What keeps concurrent changes from racing (the offline limit, the roster version): each
        # takes the account's row lock, so while another transaction holds it, they wait, here
        # until their lock_timeout.
        await self.register(ALICE)
        # Something to pop: popping nothing takes no lock.
        await self.offline.store(*ALICE, message(0), 10)
        holder = psycopg2.connect(self.dsn)
        self.addCleanup(holder.close)
        with holder.cursor() as cursor:
            cursor.execute(
                "SELECT 1 FROM users WHERE server = %s AND username = %s FOR UPDATE", ALICE
            )
        impatient = PostgresDatabase(make_dsn(self.dsn, options="-c lock_timeout=100"), 1)
        self.addCleanup(impatient.close)
        await impatient.start()
        changes = [
            lambda: impatient.offline.store(*ALICE, message(1), 10),
            lambda: impatient.offline.pop_all(*ALICE),
            lambda: impatient.rosters.put_item(*ALICE, RosterItem(jid="bob@example.com")),
            lambda: impatient.rosters.remove_item(*ALICE, "bob@example.com"),
        ]
        for change in changes:
            await self.assertFailure(change(), LockNotAvailable)

    def record_statements(self) -> list[str]:
        """The statements the database sends from now on, as sent."""
        sent: list[str] = []
        execute = txpostgres.Cursor.execute

        def recording(cursor: txpostgres.Cursor, query: str, params: object = None) -> Deferred:
            sent.append(query)
            return execute(cursor, query, params)

        self.patch(txpostgres.Cursor, "execute", recording)
        return sent

    async def test_a_login_reads_are_a_round_trip_each(self) -> None:
        await self.register(ALICE)
        sent = self.record_statements()
        await self.accounts.get_credentials(*ALICE)
        await self.rosters.get_roster(*ALICE)
        self.assertEqual(
            sent,
            [
                "SELECT scram_sha1, scram_sha256 FROM users WHERE server = %s AND username = %s",
                sql.SELECT_ROSTER.replace("?", "%s"),
            ],
        )

    async def test_popping_nothing_is_one_read(self) -> None:
        await self.register(ALICE)
        await self.offline.store(*ALICE, message(1), 10)
        sent = self.record_statements()
        self.assertEqual(len(await self.offline.pop_all(*ALICE)), 1)
        self.assertEqual(sent[0], sql.ANY_OFFLINE_MESSAGE.replace("?", "%s"))
        self.assertTrue(sent[1].startswith("BEGIN; SELECT 1 FROM users"))
        self.assertEqual(sent[-1], "COMMIT")
        self.assertEqual(await self.offline.count(*ALICE), 0)
        del sent[:]
        # Nothing stored: nothing locked, nothing deleted.
        self.assertEqual(await self.offline.pop_all(*ALICE), [])
        self.assertEqual(sent, [sql.ANY_OFFLINE_MESSAGE.replace("?", "%s")])

    async def test_concurrent_publishes_keep_max_items(self) -> None:
        # Over several connections, so that the transactions overlap: without the node's row
        # lock, each would trim by what it saw before the others committed.
        database = PostgresDatabase(self.dsn, pool_size=4)
        self.addCleanup(database.close)
        await database.start()
        await database.pubsub.create_node(SERVICE, "news", {}, OWNER)
        for _ in range(5):
            await gatherResults(
                [database.pubsub.publish_item(SERVICE, "news", item(n), 2) for n in range(12)]
            )
            items = await database.pubsub.get_items(SERVICE, "news")
            self.assertEqual(len(items), 2)
            self.assertGreater(items[0].modified_at, items[1].modified_at)
        # PEP's max_items 1 trims by another statement.
        await gatherResults(
            [database.pubsub.publish_item(SERVICE, "news", item(n), 1) for n in range(12)]
        )
        self.assertEqual(len(await database.pubsub.get_items(SERVICE, "news")), 1)

    async def test_a_publication_is_one_round_trip(self) -> None:
        await self.pubsub.create_node(SERVICE, "news", {}, OWNER)
        sent = self.record_statements()
        await self.pubsub.publish_item(SERVICE, "news", item(1), 1)
        await self.pubsub.publish_items(SERVICE, "news", [item(2), item(3)], 10)
        self.assertEqual(len(sent), 2)
        self.assertTrue(all(s.startswith("BEGIN; ") and s.endswith("; COMMIT") for s in sent))

    async def test_publications_of_one_turn_are_one_round_trip(self) -> None:
        # Several nodes' publications made in one reactor turn (several worker queues at once)
        # are stored in one transaction, their node locks taken in (service, node) order.
        nodes = [("pep.example.org", "b"), ("pep.example.org", "a"), (SERVICE, "news")]
        for service, name in nodes:
            await self.pubsub.create_node(service, name, {}, OWNER)
        sent: list[tuple[str, tuple]] = []
        execute = txpostgres.Cursor.execute

        def recording(cursor: txpostgres.Cursor, query: str, params: tuple = ()) -> Deferred:
            sent.append((query, params))
            return execute(cursor, query, params)

        self.patch(txpostgres.Cursor, "execute", recording)
        await gatherResults(
            [
                self.pubsub.publish_items(service, name, [item(n), item(10 + n)], 1)
                for n, (service, name) in enumerate(nodes)
            ]
        )
        self.assertEqual(len(sent), 1)
        query, params = sent[0]
        self.assertEqual(query.count("FOR UPDATE"), 3)
        # Each node's lock, trim and its two items' writes: 2 + 2 * 6 + 3 parameters.
        locked = [params[17 * n : 17 * n + 2] for n in range(3)]
        self.assertEqual(locked, sorted(nodes))
        for n, (service, name) in enumerate(nodes):
            stored = await self.pubsub.get_items(service, name)
            self.assertEqual([i.item_id for i in stored], [f"item{10 + n}"])

    def test_publications_are_collected_on_the_pools_reactor(self) -> None:
        clock = Clock()
        database = PostgresDatabase(self.dsn, pool_size=1, reactor=clock)
        self.assertIs(database.pubsub.clock, clock)

    async def test_a_failing_publication_of_a_turn_fails_alone(self) -> None:
        # One node of the turn is gone: its publication fails as it would alone, the others
        # are stored (each again in its own transaction).
        await self.pubsub.create_node(SERVICE, "news", {}, OWNER)
        await self.pubsub.create_node(SERVICE, "sports", {}, OWNER)
        refused = dataclasses.replace(item(3), publisher=None)
        outcomes = [
            self.pubsub.publish_items(SERVICE, "news", [item(1)], 10),
            self.pubsub.publish_items(SERVICE, "gone", [item(2)], 10),
            self.pubsub.publish_items(SERVICE, "sports", [refused], 10),
            self.pubsub.publish_items(SERVICE, "sports", [item(4)], 10),
        ]
        await outcomes[0]
        await self.assertFailure(outcomes[1], NodeNotFound)
        await self.assertFailure(outcomes[2], psycopg2.errors.NotNullViolation)
        await outcomes[3]
        self.assertEqual(
            [i.item_id for i in await self.pubsub.get_items(SERVICE, "news")], ["item1"]
        )
        sports = await self.pubsub.get_items(SERVICE, "sports")
        self.assertEqual([i.item_id for i in sports], ["item4"])

    async def test_publications_of_one_turn_to_an_unavailable_database(self) -> None:
        # The database is away: each publication fails with that, without being tried again
        # alone.
        await self.pubsub.create_node(SERVICE, "news", {}, OWNER)
        await self.pubsub.create_node(SERVICE, "sports", {}, OWNER)
        database = PostgresDatabase(self.dsn, pool_size=1)
        await database.start()
        database.close()
        sent = self.record_statements()
        for publishing in [
            database.pubsub.publish_items(SERVICE, "news", [item(1)], 10),
            database.pubsub.publish_items(SERVICE, "sports", [item(2)], 10),
        ]:
            await self.assertFailure(publishing, StorageUnavailable)
        self.assertEqual(sent, [])

    async def test_an_account_removed_while_a_turn_publishes_to_two_of_its_nodes(self) -> None:
        # The turn's transaction locks the nodes in name order: "a", then "b". The removal
        # deletes them in the order it finds them ("b" first, the older row), so unless it
        # locks them in name order first, each waits for the other (a deadlock, one aborted).
        await self.register(ALICE)
        service = "alice@example.org"
        await self.pubsub.create_node(service, "b", {}, OWNER)
        await self.pubsub.create_node(service, "a", {}, OWNER)
        await self.pubsub.publish_item(service, "a", item(1), 10)
        holder = psycopg2.connect(self.dsn)
        self.addCleanup(holder.close)
        with holder.cursor() as cursor:
            # Keeps the turn's transaction waiting with "a" locked, before it locks "b".
            cursor.execute("SELECT 1 FROM pubsub_items WHERE item_id = 'item1' FOR UPDATE")
        remover = PostgresDatabase(self.dsn, pool_size=1)
        self.addCleanup(remover.close)
        await remover.start()
        publishing = [
            self.pubsub.publish_items(service, "a", [item(1)], 10),
            self.pubsub.publish_items(service, "b", [item(2)], 10),
        ]
        await deferLater(reactor, 0.2, lambda: None)
        removing = remover.accounts.remove_account(*ALICE)
        await deferLater(reactor, 0.2, lambda: None)
        holder.commit()
        await removing
        await gatherResults(publishing)
        self.assertEqual(await self.pubsub.list_nodes(service), [])

    async def test_concurrent_replacements_of_one_roster_item(self) -> None:
        # Two nodes of a cluster (two pools) change one item from the same read: the roster is
        # locked while each compares, so exactly one of them writes.
        await self.register(("localhost", "alice"))
        other = PostgresDatabase(self.dsn, pool_size=2)
        self.addCleanup(other.close)
        await other.start()
        jid = "bob@localhost"
        read = RosterItem(jid=jid, subscription="from")
        await self.rosters.put_item("localhost", "alice", read)
        outcomes = await gatherResults(
            [
                rosters.replace_item(
                    "localhost",
                    "alice",
                    jid,
                    read,
                    dataclasses.replace(read, subscription=subscription),
                )
                for rosters, subscription in ((self.rosters, "both"), (other.rosters, "none"))
                for _ in range(5)
            ]
        )
        self.assertEqual(sum(outcome is not None for outcome in outcomes), 1)

    async def test_a_publication_waiting_for_a_node_deleted_meanwhile(self) -> None:
        await self.pubsub.create_node(SERVICE, "news", {}, OWNER)
        holder = psycopg2.connect(self.dsn)
        self.addCleanup(holder.close)
        cursor = holder.cursor()
        cursor.execute(
            "DELETE FROM pubsub_nodes WHERE service = %s AND name = %s", (SERVICE, "news")
        )
        publishing = self.pubsub.publish_items(SERVICE, "news", [item(1), item(2)], 1)
        await deferLater(reactor, 0.2, lambda: None)  # waiting for the node's row
        self.assertFalse(publishing.called)
        holder.commit()
        await self.assertFailure(publishing, NodeNotFound)

    async def test_concurrent_publishers_on_one_node(self) -> None:
        # Two pools, each publication its own transaction: they wait for each other on the
        # node's row, so every stamp is after every earlier one, and trimming sees them all.
        await self.pubsub.create_node(SERVICE, "news", {}, OWNER)
        other = PostgresDatabase(self.dsn, pool_size=2)
        self.addCleanup(other.close)
        await other.start()
        # The newest item stamped ahead of the clock (a clock set back): later ones follow it.
        holder = psycopg2.connect(self.dsn)
        self.addCleanup(holder.close)
        await self.pubsub.publish_item(SERVICE, "news", item(0), 3)
        with holder, holder.cursor() as cursor:
            cursor.execute("UPDATE pubsub_items SET modified_at = now() + interval '1 hour'")
        publications = [
            (self.pubsub if n % 2 else other.pubsub).publish_items(
                SERVICE, "news", [item(n), item(100 + n)], 3
            )
            for n in range(1, 21)
        ]
        await gatherResults(publications)
        items = await self.pubsub.get_items(SERVICE, "news")
        self.assertEqual(len(items), 3)
        times = [i.modified_at for i in items]
        self.assertEqual(times, sorted(set(times), reverse=True))
        # The last publication's two items, in their order, and the one before its second.
        newest, second, third = (i.item_id for i in items)
        self.assertEqual(int(second[4:]) + 100, int(newest[4:]))
        self.assertGreaterEqual(int(third[4:]), 100)

    async def test_a_refused_item_is_not_a_missing_node(self) -> None:
        # A missing node is told by its NULL node_id; another column's NULL is the error it is.
        await self.pubsub.create_node(SERVICE, "news", {}, OWNER)
        bad = dataclasses.replace(item(1), publisher=None)
        await self.assertFailure(
            self.pubsub.publish_item(SERVICE, "news", bad, 1), psycopg2.errors.NotNullViolation
        )
        self.assertEqual(await self.pubsub.get_items(SERVICE, "news"), [])

    async def test_writes_to_a_node_wait_for_its_row(self) -> None:
        # What keeps concurrent writes to a node from racing (trimming, the order of
        # modified_at): each takes the node's row lock, so while another transaction holds it,
        # they wait, here until their lock_timeout.
        await self.pubsub.create_node(SERVICE, "news", {}, OWNER)
        holder = psycopg2.connect(self.dsn)
        self.addCleanup(holder.close)
        with holder.cursor() as cursor:
            cursor.execute(
                "SELECT 1 FROM pubsub_nodes WHERE service = %s AND name = %s FOR UPDATE",
                (SERVICE, "news"),
            )
        impatient = PostgresDatabase(make_dsn(self.dsn, options="-c lock_timeout=100"), 1)
        self.addCleanup(impatient.close)
        await impatient.start()
        writes = [
            lambda: impatient.pubsub.publish_item(SERVICE, "news", item(1), 10),
            lambda: impatient.pubsub.purge_items(SERVICE, "news"),
            lambda: impatient.pubsub.set_affiliation(SERVICE, "news", "bob@example.org", "member"),
        ]
        for write in writes:
            await self.assertFailure(write(), LockNotAvailable)


class MySQLStorageTests(
    AccountStoreContract,
    RosterStoreContract,
    OfflineStoreContract,
    PubSubStoreContract,
    LastActivityStoreContract,
    BlockListStoreContract,
    PrivateStoreContract,
    VCardStoreContract,
    TestCase,
):
    def open_empty_database(self) -> Deferred[IDatabase]:
        self.options = mysqlsupport.create_temp_database(self)
        return self.open(pool_size=2)

    def open(self, pool_size: int, **options: object) -> Deferred[MySQLDatabase]:
        database = MySQLDatabase({**self.options, **options}, pool_size)
        self.addCleanup(database.close)
        return database.start()

    def hold_row_lock(self, statement: str, parameters: tuple) -> None:
        """Take a row lock with a connection of the test's own, held until the test ends."""
        holder = mysqlsupport.connect(database=self.options["database"], autocommit=False)
        self.addCleanup(holder.close)
        with holder.cursor() as cursor:
            cursor.execute("BEGIN")
            cursor.execute(statement, parameters)

    async def test_changes_to_an_account_data_wait_for_its_row(self) -> None:
        # What keeps concurrent changes from racing (the offline limit, the roster version): each
        # takes the account's row lock, so while another transaction holds it, they wait, here
        # not at all (innodb_lock_wait_timeout 0).
        await self.register(ALICE)
        # Something to pop: popping nothing takes no lock.
        await self.offline.store(*ALICE, message(0), 10)
        self.hold_row_lock(
            "SELECT 1 FROM users WHERE server = %s AND username = %s FOR UPDATE", ALICE
        )
        impatient = await self.open(1, init_command="SET innodb_lock_wait_timeout = 0")
        changes = [
            lambda: impatient.offline.store(*ALICE, message(1), 10),
            lambda: impatient.offline.pop_all(*ALICE),
            lambda: impatient.rosters.put_item(*ALICE, RosterItem(jid="bob@example.com")),
            lambda: impatient.rosters.remove_item(*ALICE, "bob@example.com"),
        ]
        for change in changes:
            error = await self.assertFailure(change(), pymysql.err.OperationalError)
            self.assertEqual(error.args[0], pymysql.constants.ER.LOCK_WAIT_TIMEOUT)

    async def test_concurrent_publishes_keep_max_items(self) -> None:
        # Over several connections, so that the transactions overlap: without the node's row
        # lock, each would trim by what it saw before the others committed.
        database = await self.open(pool_size=4)
        await database.pubsub.create_node(SERVICE, "news", {}, OWNER)
        for _ in range(5):
            await gatherResults(
                [database.pubsub.publish_item(SERVICE, "news", item(n), 2) for n in range(12)]
            )
            items = await database.pubsub.get_items(SERVICE, "news")
            self.assertEqual(len(items), 2)
            self.assertGreater(items[0].modified_at, items[1].modified_at)
        # PEP's max_items 1 trims by another statement.
        await gatherResults(
            [database.pubsub.publish_item(SERVICE, "news", item(n), 1) for n in range(12)]
        )
        self.assertEqual(len(await database.pubsub.get_items(SERVICE, "news")), 1)

    async def test_writes_to_a_node_wait_for_its_row(self) -> None:
        # What keeps concurrent writes to a node from racing (trimming, the order of
        # modified_at): each takes the node's row lock, so while another transaction holds it,
        # they wait, here not at all.
        await self.pubsub.create_node(SERVICE, "news", {}, OWNER)
        self.hold_row_lock(
            "SELECT 1 FROM pubsub_nodes WHERE service = %s AND name = %s FOR UPDATE",
            (SERVICE, "news"),
        )
        impatient = await self.open(1, init_command="SET innodb_lock_wait_timeout = 0")
        writes = [
            lambda: impatient.pubsub.publish_item(SERVICE, "news", item(1), 10),
            lambda: impatient.pubsub.purge_items(SERVICE, "news"),
            lambda: impatient.pubsub.set_affiliation(SERVICE, "news", "bob@example.org", "member"),
        ]
        for write in writes:
            error = await self.assertFailure(write(), pymysql.err.OperationalError)
            self.assertEqual(error.args[0], pymysql.constants.ER.LOCK_WAIT_TIMEOUT)

    async def test_tables_are_innodb_in_utf8mb4_binary(self) -> None:
        await self.register(ALICE)
        connection = mysqlsupport.connect(database=self.options["database"])
        self.addCleanup(connection.close)
        with connection.cursor() as cursor:
            cursor.execute(
                "SELECT DISTINCT engine, table_collation FROM information_schema.tables"
                " WHERE table_schema = DATABASE()"
            )
            self.assertEqual(cursor.fetchall(), (("InnoDB", "utf8mb4_bin"),))
            cursor.execute(
                "SELECT DISTINCT character_set_name FROM information_schema.columns"
                " WHERE table_schema = DATABASE() AND character_set_name IS NOT NULL"
            )
            self.assertEqual(set(cursor.fetchall()), {("utf8mb4",), ("ascii",)})


class MySQLStatementTests(SynchronousTestCase):
    """sql.py's statements in MySQL's dialect (mim_twisted/storage/mysql.py)."""

    def test_every_statement_of_sql_py_translates(self) -> None:
        statements = [
            value
            for name, value in vars(sql).items()
            if name.isupper()
            and isinstance(value, str)
            and value.lstrip().startswith(("SELECT", "INSERT", "UPDATE", "DELETE"))
        ]
        self.assertGreater(len(statements), 30)
        for statement in statements:
            translated = mysql_statement(statement)
            if translated.run is None:
                self.assertNotIn("?", translated.text)
                self.assertNotIn("RETURNING", translated.text)
                self.assertNotIn("ON CONFLICT", translated.text)

    def test_upsert_becomes_on_duplicate_key_update(self) -> None:
        self.assertEqual(
            mysql_statement(sql.UPSERT_AFFILIATION).text,
            "INSERT INTO pubsub_affiliations (node_id, jid, affiliation) VALUES (%s, %s, %s)"
            " ON DUPLICATE KEY UPDATE affiliation = VALUES(affiliation)",
        )

    def test_insert_or_nothing_returning_id(self) -> None:
        translated = mysql_statement(sql.INSERT_NODE)
        self.assertEqual(
            translated.text,
            "INSERT INTO pubsub_nodes (service, name, config, created_at) VALUES (%s, %s, %s, %s)",
        )
        self.assertTrue(translated.no_row_on_duplicate)

    def test_insert_returning_inserted_values(self) -> None:
        translated = mysql_statement(
            "INSERT INTO t (a, b) VALUES (?, ?) ON CONFLICT DO NOTHING RETURNING b, 1"
        )
        self.assertEqual(translated.text, "INSERT INTO t (a, b) VALUES (%s, %s)")
        self.assertEqual(translated.rows(None, [], ("x", "y")), [("y", 1)])

    def test_update_returning_1_counts_matched_rows(self) -> None:
        translated = mysql_statement("UPDATE t SET a = ? WHERE b = ? RETURNING 1")
        self.assertEqual(translated.text, "UPDATE t SET a = %s WHERE b = %s")

        class Cursor:
            rowcount = 2

        self.assertEqual(translated.rows(Cursor(), [], ("x", "y")), [(1,), (1,)])

    def test_delete_returning_columns_reads_them_first(self) -> None:
        statements = []

        class Session:
            def execute(self, statement: str, parameters: tuple) -> list[tuple]:
                statements.append((statement, parameters))
                return [("a@example.org",)] if statement.startswith("SELECT") else []

        translated = mysql_statement("DELETE FROM t WHERE s = ? AND u = ? RETURNING jid")
        self.assertEqual(translated.run(Session(), ("x", "y")), [("a@example.org",)])
        self.assertEqual(
            statements,
            [
                ("SELECT jid FROM t WHERE s = %s AND u = %s FOR UPDATE", ("x", "y")),
                ("DELETE FROM t WHERE s = %s AND u = %s", ("x", "y")),
            ],
        )

    def test_literal_percent_is_not_a_placeholder(self) -> None:
        self.assertEqual(
            mysql_statement("SELECT 1 FROM t WHERE a LIKE '5%' AND b = ?").text,
            "SELECT 1 FROM t WHERE a LIKE '5%%' AND b = %s",
        )

    def test_untranslatable_returning_is_refused(self) -> None:
        self.assertRaises(
            NotImplementedError, mysql_statement, "UPDATE t SET a = a + 1 RETURNING a"
        )


def write_schema_dir(path: str, upgrades: dict[int, str]) -> Path:
    """A schema directory at ``path``: the packaged schema with ``upgrades`` (version: SQL, the
    same for every backend) as upgrade scripts and, as the convention wants, in the full schema."""
    schema_dir = Path(path)
    for backend in BACKENDS:
        full_schema = (SCHEMA_DIR / f"{backend}.sql").read_text(encoding="utf-8")
        (schema_dir / "upgrades" / backend).mkdir(parents=True)
        for version, script in sorted(upgrades.items()):
            (schema_dir / "upgrades" / backend / f"{version:03d}.sql").write_text(script)
            full_schema += "\n" + script
        (schema_dir / f"{backend}.sql").write_text(full_schema)
    return schema_dir


# Upgrades beyond the packaged schema, so that these tests outlive its next version.
CURRENT = newest_version()
MOTD_UPGRADES = {
    CURRENT + 1: "CREATE TABLE motd (id INTEGER PRIMARY KEY, body TEXT NOT NULL);",
    # Runs only after the first has created the table.
    CURRENT + 2: "ALTER TABLE motd ADD COLUMN author TEXT;",
}


# The tables each packaged upgrade script adds: a database at version 1 gets them all.
PACKAGED_UPGRADE_TABLES = {
    2: ["last_activity"],
    3: ["block_list"],
    4: ["private_storage"],
    5: ["vcards"],
    6: ["cluster_sessions"],
}


class StatementSplittingTests(SynchronousTestCase):
    def test_splits_at_semicolons_and_drops_comments(self) -> None:
        script = "-- header\nCREATE TABLE a (x INTEGER); /* between */ CREATE TABLE b (y TEXT);\n"
        self.assertEqual(
            split_statements(script), ["CREATE TABLE a (x INTEGER)", "CREATE TABLE b (y TEXT)"]
        )

    def test_semicolons_inside_quotes_do_not_split(self) -> None:
        script = "INSERT INTO t VALUES ('a;b', 'it''s; ok'); SELECT \"odd;name\" FROM t"
        self.assertEqual(
            split_statements(script),
            ["INSERT INTO t VALUES ('a;b', 'it''s; ok')", 'SELECT "odd;name" FROM t'],
        )

    def test_dollar_quoted_body_is_one_statement(self) -> None:
        body = "CREATE FUNCTION f() RETURNS int AS $body$ SELECT 1; $body$ LANGUAGE sql"
        self.assertEqual(split_statements(body + "; SELECT 2;"), [body, "SELECT 2"])

    def test_comment_markers_inside_strings_are_text(self) -> None:
        self.assertEqual(split_statements("SELECT '--x', '/*y*/';"), ["SELECT '--x', '/*y*/'"])

    def test_only_comments_is_no_statement(self) -> None:
        self.assertEqual(split_statements("-- nothing ;\n/* here; */\n"), [])


class PlanTests(SynchronousTestCase):
    def test_packaged_upgrade_scripts_match_across_backends(self) -> None:
        def script_names(backend: str) -> set[str]:
            directory = SCHEMA_DIR / "upgrades" / backend
            return {entry.name for entry in directory.iterdir()} if directory.is_dir() else set()

        self.assertEqual(script_names("sqlite"), script_names("postgresql"))
        self.assertEqual(script_names("sqlite"), script_names("mysql"))

    def test_newest_version_is_the_highest_upgrade_script(self) -> None:
        schema_dir = write_schema_dir(self.mktemp(), MOTD_UPGRADES)
        (schema_dir / "upgrades" / "README.md").write_text("not a script")
        (schema_dir / "upgrades" / "sqlite" / "notes.txt").write_text("not a script")
        self.assertEqual(newest_version(schema_dir), CURRENT + 2)

    def test_newest_version_without_upgrades_is_1(self) -> None:
        self.assertEqual(newest_version(Path(self.mktemp())), 1)

    def test_empty_database_gets_the_full_schema(self) -> None:
        schema_dir = write_schema_dir(self.mktemp(), MOTD_UPGRADES)
        (step,) = plan(0, "sqlite", schema_dir)
        self.assertEqual(step.version, CURRENT + 2)
        self.assertIn(split_statements(MOTD_UPGRADES[CURRENT + 2])[0], step.statements)

    def test_outdated_database_gets_the_upgrades_in_order(self) -> None:
        schema_dir = write_schema_dir(self.mktemp(), MOTD_UPGRADES)
        self.assertEqual(
            plan(CURRENT, "postgresql", schema_dir),
            [
                Step(CURRENT + 1, split_statements(MOTD_UPGRADES[CURRENT + 1])),
                Step(CURRENT + 2, split_statements(MOTD_UPGRADES[CURRENT + 2])),
            ],
        )
        self.assertEqual(
            plan(CURRENT + 1, "postgresql", schema_dir),
            [Step(CURRENT + 2, ["ALTER TABLE motd ADD COLUMN author TEXT"])],
        )
        self.assertEqual(plan(CURRENT + 2, "postgresql", schema_dir), [])

    def test_database_newer_than_code_is_refused(self) -> None:
        schema_dir = write_schema_dir(self.mktemp(), MOTD_UPGRADES)
        error = self.assertRaises(SchemaTooNew, plan, CURRENT + 3, "sqlite", schema_dir)
        self.assertIn(f"version {CURRENT + 3}", str(error))

    def test_missing_upgrade_script_is_an_error(self) -> None:
        schema_dir = write_schema_dir(self.mktemp(), MOTD_UPGRADES)
        (schema_dir / "upgrades" / "sqlite" / f"{CURRENT + 1:03d}.sql").unlink()
        self.assertRaises(FileNotFoundError, plan, CURRENT, "sqlite", schema_dir)


class SQLMigrationTests:
    """Migrations run on a real database; mixed into a TestCase per SQL backend, whose setUp
    makes the test's one database (empty) and which provides:

    ``backend``, the name open_database knows it by, and ``location``, the keyword arguments of
    open_database that lead to the database; ``driver_error``, the driver's base exception;
    ``open_at(schema_dir)``, the database opened with schema files from ``schema_dir`` and closed
    by cleanups; ``query(sql, parameters)``, rows read with a connection of the test's own;
    ``columns(table)``, the column names of ``table``, [] if there is no such table.
    """

    backend: str
    location: dict[str, object]
    driver_error: type[Exception]
    # The type of a text column that a key may cover (MySQL indexes no TEXT).
    key_text = "TEXT"

    def open_at(self, schema_dir: Traversable) -> Deferred[IDatabase]:
        raise NotImplementedError

    def query(self, sql: str, parameters: tuple = ()) -> list[tuple]:
        raise NotImplementedError

    def columns(self, table: str) -> list[str]:
        raise NotImplementedError

    def execute(self, *statements: str) -> None:
        """Run statements in one transaction with a connection of the test's own."""
        raise NotImplementedError

    def open_with_factory(self, auto_migrate: bool) -> Deferred[IDatabase]:
        def close_at_cleanup(database: IDatabase) -> IDatabase:
            self.addCleanup(database.close)
            return database

        d = open_database(self.backend, auto_migrate=auto_migrate, **self.location)
        return d.addCallback(close_at_cleanup)

    async def open_migrated_to_current(self) -> IDatabase:
        database = await self.open_at(SCHEMA_DIR)
        self.assertEqual(await database.migrate(), CURRENT)
        await database.accounts.create_account("example.org", "alice", credentials("a"))
        return database

    async def test_empty_database_is_at_version_0(self) -> None:
        database = await self.open_at(SCHEMA_DIR)
        self.assertEqual(await database.schema_version(), 0)

    async def test_migrate_creates_the_full_schema(self) -> None:
        database = await self.open_at(SCHEMA_DIR)
        self.assertEqual(await database.migrate(), CURRENT)
        self.assertEqual(
            self.columns("users"),
            ["server", "username", "scram_sha1", "scram_sha256", "roster_version", "created_at"],
        )
        self.assertEqual(
            self.columns("roster_items"),
            [
                "server",
                "username",
                "jid",
                "name",
                "subscription",
                "ask",
                "pending_in",
                "pending_in_stanza",
                "approved",
                "in_roster",
            ],
        )
        self.assertEqual(self.columns("roster_groups"), ["server", "username", "jid", "grp"])
        self.assertEqual(
            self.columns("offline_messages"),
            ["id", "server", "username", "sender", "stanza", "stored_at"],
        )
        self.assertEqual(
            self.columns("pubsub_nodes"), ["id", "service", "name", "config", "created_at"]
        )
        self.assertEqual(
            self.columns("pubsub_items"),
            ["node_id", "item_id", "payload", "publisher", "created_at", "modified_at"],
        )
        self.assertEqual(self.columns("pubsub_affiliations"), ["node_id", "jid", "affiliation"])
        self.assertEqual(
            self.columns("pubsub_subscriptions"),
            ["seq", "node_id", "jid", "jid_bare", "subid", "state", "options"],
        )
        self.assertEqual(
            self.columns("last_activity"), ["server", "username", "logged_out_at", "status"]
        )
        self.assertEqual(self.columns("block_list"), ["server", "username", "jid"])
        self.assertEqual(
            self.columns("private_storage"),
            ["server", "username", "namespace", "fragment", "size"],
        )
        self.assertEqual(self.columns("vcards"), ["server", "username", "vcard"])

    async def test_upgrade_scripts_run_in_order_and_keep_data(self) -> None:
        await self.open_migrated_to_current()
        upgraded = await self.open_at(write_schema_dir(self.mktemp(), MOTD_UPGRADES))
        self.assertEqual(await upgraded.schema_version(), CURRENT)
        self.assertEqual(await upgraded.migrate(), CURRENT + 2)
        self.assertEqual(await upgraded.schema_version(), CURRENT + 2)
        self.assertEqual(self.columns("motd"), ["id", "body", "author"])
        self.assertTrue(await upgraded.accounts.account_exists("example.org", "alice"))

    async def test_packaged_upgrades_from_version_1(self) -> None:
        await self.open_migrated_to_current()
        tables = [
            table
            for version in sorted(PACKAGED_UPGRADE_TABLES)
            for table in PACKAGED_UPGRADE_TABLES[version]
        ]
        created = {table: self.columns(table) for table in tables}
        # Back to version 1, as a database made before the first upgrade.
        self.execute(
            *(f"DROP TABLE {table}" for table in reversed(tables)),
            "UPDATE schema_version SET version = 1",
        )
        database = await self.open_at(SCHEMA_DIR)
        self.assertEqual(await database.migrate(), CURRENT)
        self.assertEqual({table: self.columns(table) for table in tables}, created)
        self.assertTrue(await database.accounts.account_exists("example.org", "alice"))

    async def test_failing_upgrade_leaves_the_database_as_it_was(self) -> None:
        await self.open_migrated_to_current()
        broken = {CURRENT + 1: MOTD_UPGRADES[CURRENT + 1] + "\nSELECT * FROM no_such_table;"}
        upgraded = await self.open_at(write_schema_dir(self.mktemp(), broken))
        await self.assertFailure(upgraded.migrate(), self.driver_error)
        self.assertEqual(await upgraded.schema_version(), CURRENT)
        self.assertEqual(self.columns("motd"), [])

    async def test_database_newer_than_code_is_refused(self) -> None:
        newer = await self.open_at(write_schema_dir(self.mktemp(), MOTD_UPGRADES))
        self.assertEqual(await newer.migrate(), CURRENT + 2)
        current = await self.open_at(SCHEMA_DIR)
        await self.assertFailure(current.migrate(), SchemaTooNew)
        await self.assertFailure(self.open_with_factory(auto_migrate=True), SchemaTooNew)
        self.assertEqual(await current.schema_version(), CURRENT + 2)

    async def test_foreign_keys_cascade_from_users(self) -> None:
        database = await self.open_migrated_to_current()
        notes = {
            CURRENT + 1: f"CREATE TABLE notes (server {self.key_text} NOT NULL,"
            f" username {self.key_text} NOT NULL, body TEXT,"
            " FOREIGN KEY (server, username) REFERENCES users (server, username)"
            " ON DELETE CASCADE);"
            " INSERT INTO notes (server, username, body) SELECT server, username, 'hi' FROM users;"
        }
        upgraded = await self.open_at(write_schema_dir(self.mktemp(), notes))
        await upgraded.migrate()
        await database.accounts.remove_account("example.org", "alice")
        self.assertEqual(self.query("SELECT count(*) FROM notes"), [(0,)])

    async def test_open_database_refuses_outdated_schema_without_auto_migrate(self) -> None:
        error = await self.assertFailure(self.open_with_factory(auto_migrate=False), SchemaOutdated)
        self.assertIn("mimctl migrate", str(error))
        self.assertEqual(self.columns("users"), [])

    async def test_open_database_migrates_with_auto_migrate(self) -> None:
        database = await self.open_with_factory(auto_migrate=True)
        self.assertEqual(await database.schema_version(), CURRENT)
        reopened = await self.open_with_factory(auto_migrate=False)
        self.assertEqual(await reopened.schema_version(), CURRENT)


class SQLiteMigrationTests(SQLMigrationTests, TestCase):
    backend = "sqlite"
    driver_error = sqlite3.Error

    def setUp(self) -> None:
        self.path = os.path.join(self.mktemp(), "mim.sqlite3")
        self.location = {"sqlite_path": self.path}

    def open_at(self, schema_dir: Traversable) -> Deferred[IDatabase]:
        database = SQLiteDatabase(self.path, schema_dir=schema_dir)
        self.addCleanup(database.close)
        return succeed(database)

    def query(self, sql: str, parameters: tuple = ()) -> list[tuple]:
        connection = sqlite3.connect(self.path)
        try:
            return connection.execute(sql, parameters).fetchall()
        finally:
            connection.close()

    def columns(self, table: str) -> list[str]:
        return [name for (name,) in self.query("SELECT name FROM pragma_table_info(?)", (table,))]

    def execute(self, *statements: str) -> None:
        connection = sqlite3.connect(self.path)
        try:
            with connection:
                for statement in statements:
                    connection.execute(statement)
        finally:
            connection.close()

    def test_sqlite_without_returning_is_refused(self) -> None:
        self.patch(sqlite3, "sqlite_version_info", (3, 34, 1))
        self.patch(sqlite3, "sqlite_version", "3.34.1")
        error = self.assertRaises(RuntimeError, SQLiteDatabase, self.path)
        self.assertIn("SQLite 3.34.1 is too old", str(error))

    async def test_file_is_in_wal_mode(self) -> None:
        await self.open_with_factory(auto_migrate=True)
        self.assertEqual(self.query("PRAGMA journal_mode"), [("wal",)])


class PostgresMigrationTests(SQLMigrationTests, TestCase):
    backend = "postgresql"
    driver_error = psycopg2.Error

    def setUp(self) -> None:
        self.dsn = pgsupport.create_temp_database(self)
        self.location = {"postgresql_dsn": self.dsn}

    def open_at(self, schema_dir: Traversable) -> Deferred[IDatabase]:
        database = PostgresDatabase(self.dsn, pool_size=1, schema_dir=schema_dir)
        self.addCleanup(database.close)
        return database.start()

    def query(self, sql: str, parameters: tuple = ()) -> list[tuple]:
        connection = psycopg2.connect(self.dsn)
        try:
            with connection.cursor() as cursor:
                cursor.execute(sql, parameters)
                return cursor.fetchall()
        finally:
            connection.close()

    def columns(self, table: str) -> list[str]:
        rows = self.query(
            "SELECT column_name FROM information_schema.columns"
            " WHERE table_schema = current_schema() AND table_name = %s ORDER BY ordinal_position",
            (table,),
        )
        return [name for (name,) in rows]

    def execute(self, *statements: str) -> None:
        connection = psycopg2.connect(self.dsn)
        try:
            with connection, connection.cursor() as cursor:
                for statement in statements:
                    cursor.execute(statement)
        finally:
            connection.close()


class MySQLMigrationTests(SQLMigrationTests, TestCase):
    backend = "mysql"
    driver_error = pymysql.err.MySQLError
    key_text = "VARCHAR(255)"

    def setUp(self) -> None:
        self.options = mysqlsupport.create_temp_database(self)
        self.location = {"mysql_options": self.options}

    def open_at(self, schema_dir: Traversable) -> Deferred[IDatabase]:
        database = MySQLDatabase(self.options, pool_size=1, schema_dir=schema_dir)
        self.addCleanup(database.close)
        return database.start()

    def query(self, sql: str, parameters: tuple = ()) -> list[tuple]:
        connection = mysqlsupport.connect(database=self.options["database"])
        try:
            with connection.cursor() as cursor:
                cursor.execute(sql, parameters)
                return list(cursor.fetchall())
        finally:
            connection.close()

    def columns(self, table: str) -> list[str]:
        rows = self.query(
            "SELECT column_name FROM information_schema.columns"
            " WHERE table_schema = DATABASE() AND table_name = %s ORDER BY ordinal_position",
            (table,),
        )
        return [name for (name,) in rows]

    def execute(self, *statements: str) -> None:
        connection = mysqlsupport.connect(database=self.options["database"], autocommit=False)
        try:
            with connection.cursor() as cursor:
                for statement in statements:
                    cursor.execute(statement)
            connection.commit()
        finally:
            connection.close()

    async def test_failing_upgrade_leaves_the_database_as_it_was(self) -> None:
        # MySQL commits each CREATE TABLE at once: the version stays, the table stays too.
        await self.open_migrated_to_current()
        broken = {CURRENT + 1: MOTD_UPGRADES[CURRENT + 1] + "\nSELECT * FROM no_such_table;"}
        upgraded = await self.open_at(write_schema_dir(self.mktemp(), broken))
        await self.assertFailure(upgraded.migrate(), self.driver_error)
        self.assertEqual(await upgraded.schema_version(), CURRENT)
        self.assertEqual(self.columns("motd"), ["id", "body"])

    async def test_concurrent_migrations_run_once(self) -> None:
        first, second = await self.open_at(SCHEMA_DIR), await self.open_at(SCHEMA_DIR)
        self.assertEqual(await gatherResults([first.migrate(), second.migrate()]), [CURRENT] * 2)


class OpenDatabaseTests(TestCase):
    async def test_memory_database_is_born_current(self) -> None:
        database = await open_database("memory", auto_migrate=False)
        self.assertIsInstance(database, MemoryDatabase)
        self.assertEqual(await database.schema_version(), CURRENT)

    async def test_unknown_backend(self) -> None:
        error = await self.assertFailure(open_database("oracle", auto_migrate=True), ValueError)
        self.assertIn("'oracle'", str(error))

    async def test_backend_without_its_location(self) -> None:
        await self.assertFailure(open_database("sqlite", auto_migrate=True), ValueError)
        await self.assertFailure(open_database("postgresql", auto_migrate=True), ValueError)
        await self.assertFailure(open_database("mysql", auto_migrate=True), ValueError)

    async def test_unreachable_postgresql_fails_without_leaking_connections(self) -> None:
        # Port 1 refuses at once; trial reports a connection left in the reactor as an error.
        dsn = "host=127.0.0.1 port=1 user=root dbname=postgres connect_timeout=2"
        opening = open_database("postgresql", postgresql_dsn=dsn, pool_size=2, auto_migrate=True)
        await self.assertFailure(opening, psycopg2.OperationalError)

    async def test_unreachable_mysql_fails_without_leaking_threads(self) -> None:
        # Port 1 refuses at once; the pool's threads are stopped again.
        options = {"host": "127.0.0.1", "port": 1, "user": "root"}
        opening = open_database("mysql", mysql_options=options, pool_size=2, auto_migrate=True)
        await self.assertFailure(opening, pymysql.err.OperationalError)
