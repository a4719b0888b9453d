"""Storage that recovers: SQLite waits out another process's lock, PostgreSQL reconnects.

Issue 8, item 3. A PostgreSQL restart cannot be done to the shared test cluster, so the tests
terminate the server processes of their own database, which is what the clients of a restart see.
"""

import os
import sqlite3

from twisted.internet import reactor
from twisted.logger import formatEvent, globalLogPublisher
from twisted.trial.unittest import TestCase

from mim_twisted.storage.sqlite import SQLiteDatabase
from tests.storage_contract import ALICE, credentials


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


class SQLiteBusyTests(TestCase):
    async def open(self) -> SQLiteDatabase:
        self.path = os.path.join(os.path.abspath(self.mktemp()), "mim.sqlite3")
        database = SQLiteDatabase(self.path, busy_timeout=0.05, busy_retry_delays=(0.05, 0.1))
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
        reactor.callLater(0.1, holder.execute, "COMMIT")
        await database.accounts.create_account(*ALICE, credentials("1"))
        self.assertTrue(await database.accounts.account_exists(*ALICE))
        self.assertTrue(log.starting("SQLite: database is locked; trying again in 0.05 s"))

    async def test_a_lock_held_too_long_fails_the_write(self) -> None:
        database = await self.open()
        self.lock()
        with self.assertRaises(sqlite3.OperationalError):
            await database.accounts.create_account(*ALICE, credentials("1"))
        self.assertFalse(await database.accounts.account_exists(*ALICE))
