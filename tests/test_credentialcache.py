"""The credentials cache in front of the account store: the store contract still holds through
it, an account's credentials are read from the store once, a change written through it or told
to it (`forget`) is seen at once, a read overtaken by a change is not kept, and what is held is
bounded in age and number. Where the server uses it: one process with its admin socket."""

from twisted.internet.defer import Deferred, succeed
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase, TestCase

from mim_twisted.auth.credentialcache import CredentialCache
from mim_twisted.config import load_config
from mim_twisted.storage.interfaces import IDatabase
from mim_twisted.storage.memory import MemoryDatabase
from mim_twisted.tap import build_im_core
from tests.imsupport import HeldStore
from tests.storage_contract import AccountStoreContract

OLD = {"SCRAM-SHA-1": "old"}
NEW = {"SCRAM-SHA-1": "new"}


class CachedStoreContractTests(AccountStoreContract, TestCase):
    def open_empty_database(self) -> Deferred[IDatabase]:
        database = MemoryDatabase()
        database.accounts = CredentialCache(database.accounts, Clock())
        return succeed(database)


class CredentialCacheTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.database = MemoryDatabase()
        self.accounts = self.database.accounts
        self.successResultOf(self.accounts.create_account("localhost", "alice", OLD))
        self.store = HeldStore(self.accounts, answers_only=True)
        self.clock = Clock()
        self.cache = CredentialCache(self.store, self.clock, max_accounts=2, max_age=60)

    def read(self, username: str = "alice") -> object:
        reading = self.cache.get_credentials("localhost", username)
        self.store.release_all()
        return self.successResultOf(reading)

    def test_read_from_the_store_once(self) -> None:
        self.assertEqual(self.read(), OLD)
        self.assertEqual(
            self.successResultOf(self.cache.get_credentials("localhost", "alice")), OLD
        )
        self.assertEqual(self.store.calls(), [])

    def test_an_unknown_account_is_asked_about_every_time(self) -> None:
        self.assertIsNone(self.read("bob"))
        self.cache.get_credentials("localhost", "bob")
        self.assertEqual(self.store.calls(), ["get_credentials"])

    def test_a_change_through_the_cache_is_seen_at_once(self) -> None:
        self.read()
        self.cache.set_credentials("localhost", "alice", NEW)
        self.store.release_all()
        self.assertEqual(self.read(), NEW)
        self.cache.remove_account("localhost", "alice")
        self.store.release_all()
        self.assertIsNone(self.read())

    def test_forget_a_change_made_elsewhere(self) -> None:
        self.read()
        self.successResultOf(self.accounts.set_credentials("localhost", "alice", NEW))
        self.cache.forget("localhost", "alice")
        self.assertEqual(self.read(), NEW)

    def test_a_read_overtaken_by_a_change_is_not_kept(self) -> None:
        reading = self.cache.get_credentials("localhost", "alice")  # the store answers OLD
        self.successResultOf(self.accounts.set_credentials("localhost", "alice", NEW))
        self.cache.forget("localhost", "alice")
        self.store.release_all()
        self.assertEqual(self.successResultOf(reading), OLD)
        self.assertEqual(self.read(), NEW)

    def test_a_write_through_the_cache_drops_what_was_read_meanwhile(self) -> None:
        self.read()
        writing = self.cache.set_credentials("localhost", "alice", NEW)
        reading = self.cache.get_credentials("localhost", "alice")
        self.store.release()  # the write's answer, before the read's
        self.successResultOf(writing)
        self.store.release_all()
        self.successResultOf(reading)
        self.assertEqual(self.read(), NEW)

    def test_held_for_max_age_only(self) -> None:
        self.read()
        self.clock.advance(59)
        self.cache.get_credentials("localhost", "alice")
        self.assertEqual(self.store.calls(), [])
        self.clock.advance(1)
        self.cache.get_credentials("localhost", "alice")
        self.assertEqual(self.store.calls(), ["get_credentials"])

    def test_the_oldest_go_first(self) -> None:
        for username in ("bob", "carol"):
            self.successResultOf(self.accounts.create_account("localhost", username, OLD))
        self.read("alice")
        self.read("bob")
        self.read("carol")
        self.cache.get_credentials("localhost", "carol")
        self.cache.get_credentials("localhost", "bob")
        self.assertEqual(self.store.calls(), [])
        self.cache.get_credentials("localhost", "alice")
        self.assertEqual(self.store.calls(), ["get_credentials"])


class WhereItIsUsedTests(SynchronousTestCase):
    def core_accounts(self, extra: str) -> object:
        path = self.mktemp()
        with open(path, "w") as f:
            f.write(f'[server]\ndomains = ["localhost"]\n{extra}')
        return build_im_core(load_config(path), MemoryDatabase(), Clock()).accounts

    def test_one_process_with_its_admin_socket(self) -> None:
        self.assertIsInstance(self.core_accounts(""), CredentialCache)

    def test_not_without_the_admin_socket_nor_in_a_cluster(self) -> None:
        for extra in (
            "[admin]\nenabled = false\n",
            ('[storage]\nbackend = "postgresql"\n[cluster]\nenabled = true\nname = "c"\n'),
        ):
            self.assertFalse(isinstance(self.core_accounts(extra), CredentialCache), extra)
