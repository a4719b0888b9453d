"""The roster cache in front of the roster store: the store contract still holds through it, an
online account's roster is read from the store once, changes written through it are seen at
once, a read overtaken by a change is not kept, and an account's roster is forgotten when its
last session ends."""

import dataclasses

from twisted.internet.defer import Deferred, succeed
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase, TestCase

from mim_twisted.config import load_config
from mim_twisted.im.rostercache import RosterCache
from mim_twisted.im.sessions import SessionManager
from mim_twisted.storage.interfaces import IDatabase, RosterItem
from mim_twisted.storage.memory import MemoryDatabase
from mim_twisted.tap import build_im_core
from tests.imsupport import FakeSession, HeldStore
from tests.storage_contract import RosterStoreContract


class EveryoneOnline:
    """Sessions for every account: the cache keeps every roster it reads."""

    def sessions_of(self, account: object) -> list[object]:
        return [object()]


class CachedStoreContractTests(RosterStoreContract, TestCase):
    def open_empty_database(self) -> Deferred[IDatabase]:
        database = MemoryDatabase()
        database.rosters = RosterCache(database.rosters, EveryoneOnline())
        return succeed(database)


BOB = RosterItem("bob@localhost", subscription="both")
CAROL = RosterItem("carol@localhost", subscription="from")


class RosterCacheTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.database = MemoryDatabase()
        self.successResultOf(self.database.accounts.create_account("localhost", "alice", {}))
        self.successResultOf(self.database.rosters.put_item("localhost", "alice", BOB))
        self.store = HeldStore(self.database.rosters, answers_only=True)
        self.sessions = SessionManager()
        self.cache = RosterCache(self.store, self.sessions)
        self.phone = FakeSession("alice@localhost/phone")
        self.sessions.bind(self.phone)

    def read(self) -> tuple[int, list[RosterItem]]:
        reading = self.cache.get_roster("localhost", "alice")
        self.store.release_all()
        return self.successResultOf(reading)

    def test_an_online_account_roster_is_read_once(self) -> None:
        self.assertEqual(self.read(), (1, [BOB]))
        self.assertEqual(
            self.successResultOf(self.cache.get_roster("localhost", "alice")), (1, [BOB])
        )
        self.assertEqual(
            self.successResultOf(self.cache.get_item("localhost", "alice", "bob@localhost")), BOB
        )
        self.assertEqual(self.store.calls(), [])

    def test_changes_through_it_are_seen(self) -> None:
        self.read()
        writing = self.cache.put_item("localhost", "alice", CAROL)
        self.store.release_all()
        self.assertEqual(self.successResultOf(writing), 2)
        self.assertEqual(self.read(), (2, [BOB, CAROL]))
        removing = self.cache.remove_item("localhost", "alice", "bob@localhost")
        self.store.release_all()
        self.successResultOf(removing)
        self.assertEqual(self.read(), (3, [CAROL]))

    def test_a_read_overtaken_by_a_change_is_not_kept(self) -> None:
        reading = self.cache.get_roster("localhost", "alice")  # answered with the old roster
        writing = self.cache.put_item("localhost", "alice", CAROL)
        self.store.release_all()
        self.assertEqual(self.successResultOf(reading), (1, [BOB]))
        self.successResultOf(writing)
        self.assertEqual(self.read(), (2, [BOB, CAROL]))

    def test_a_read_begun_during_a_change_is_not_kept(self) -> None:
        writing = self.cache.put_item("localhost", "alice", CAROL)
        reading = self.cache.get_roster("localhost", "alice")
        self.store.release()
        self.successResultOf(writing)
        self.store.release()
        self.successResultOf(reading)
        self.cache.get_roster("localhost", "alice")
        self.assertEqual(self.store.calls(), ["get_roster"])

    def test_kept_only_while_the_account_has_sessions(self) -> None:
        self.read()
        watch = FakeSession("alice@localhost/watch")
        self.sessions.bind(watch)
        self.sessions.unbind(self.phone)
        self.cache.session_ended(self.phone)
        self.successResultOf(self.cache.get_roster("localhost", "alice"))  # the watch is on
        self.sessions.unbind(watch)
        self.cache.session_ended(watch)
        self.assertEqual(self.read(), (1, [BOB]))
        self.cache.get_roster("localhost", "alice")
        self.assertEqual(self.store.calls(), ["get_roster"])  # nobody online: not kept


class WiringTests(SynchronousTestCase):
    def test_the_core_reads_rosters_through_it_unless_in_a_cluster(self) -> None:
        config = load_config(None)
        database = MemoryDatabase()
        core = build_im_core(config, database, Clock())
        self.assertIsInstance(core.roster.rosters, RosterCache)
        self.assertIs(core.presence.rosters, core.roster.rosters)
        # Another node may change the rosters of this node's users.
        clustered = dataclasses.replace(
            config,
            storage=dataclasses.replace(config.storage, backend="postgresql"),
            cluster=dataclasses.replace(config.cluster, enabled=True),
        )
        core = build_im_core(clustered, database, Clock())
        self.assertIs(core.roster.rosters, database.rosters)
