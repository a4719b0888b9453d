"""The behaviour every storage backend owes: one mixin, run by one small TestCase per backend."""

from twisted.internet.defer import Deferred
from zope.interface.verify import verifyObject

from mim_twisted.storage import migrations
from mim_twisted.storage.interfaces import (
    AccountExists,
    AccountNotFound,
    IAccountStore,
    IDatabase,
)


def credentials(tag: str) -> dict[str, str]:
    """Distinct stand-ins for serialised SCRAM keys; the store treats them as opaque text."""
    return {"SCRAM-SHA-1": f"sha1-{tag}", "SCRAM-SHA-256": f"sha256-{tag}"}


class AccountStoreContract:
    """Mixed into a trial TestCase that provides ``open_empty_database``.

    ``open_empty_database()`` returns a Deferred firing with an IDatabase holding no data, closed
    by the TestCase's cleanups; setUp migrates it.
    """

    def open_empty_database(self) -> Deferred[IDatabase]:
        raise NotImplementedError

    async def setUp(self) -> None:
        self.database = await self.open_empty_database()
        await self.database.migrate()
        self.accounts = self.database.accounts

    def test_provides_interfaces(self) -> None:
        self.assertTrue(verifyObject(IDatabase, self.database))
        self.assertTrue(verifyObject(IAccountStore, self.accounts))

    async def test_create_and_get_credentials(self) -> None:
        await self.accounts.create_account("example.org", "alice", credentials("a"))
        self.assertEqual(
            await self.accounts.get_credentials("example.org", "alice"), credentials("a")
        )

    async def test_get_credentials_of_unknown_account(self) -> None:
        self.assertIsNone(await self.accounts.get_credentials("example.org", "nobody"))

    async def test_account_exists(self) -> None:
        await self.accounts.create_account("example.org", "alice", credentials("a"))
        self.assertTrue(await self.accounts.account_exists("example.org", "alice"))
        self.assertFalse(await self.accounts.account_exists("example.org", "bob"))
        self.assertFalse(await self.accounts.account_exists("example.com", "alice"))

    async def test_create_duplicate_fails_and_keeps_the_first(self) -> None:
        await self.accounts.create_account("example.org", "alice", credentials("a"))
        await self.assertFailure(
            self.accounts.create_account("example.org", "alice", credentials("b")), AccountExists
        )
        self.assertEqual(
            await self.accounts.get_credentials("example.org", "alice"), credentials("a")
        )

    async def test_same_username_on_two_domains(self) -> None:
        await self.accounts.create_account("example.org", "alice", credentials("org"))
        await self.accounts.create_account("example.com", "alice", credentials("com"))
        self.assertEqual(
            await self.accounts.get_credentials("example.com", "alice"), credentials("com")
        )
        await self.accounts.remove_account("example.org", "alice")
        self.assertTrue(await self.accounts.account_exists("example.com", "alice"))

    async def test_list_accounts_sorted_by_code_point(self) -> None:
        # Chosen so that a locale collation (which ignores "-" and sorts "é" near "e") disagrees.
        usernames = ["zoë", "émile", "ab", "a-c", "bob"]
        for username in usernames:
            await self.accounts.create_account("example.org", username, credentials(username))
        self.assertEqual(
            await self.accounts.list_accounts("example.org"), ["a-c", "ab", "bob", "zoë", "émile"]
        )

    async def test_list_accounts_per_domain(self) -> None:
        await self.accounts.create_account("example.org", "alice", credentials("a"))
        await self.accounts.create_account("example.com", "bob", credentials("b"))
        self.assertEqual(await self.accounts.list_accounts("example.org"), ["alice"])
        self.assertEqual(await self.accounts.list_accounts("example.com"), ["bob"])
        self.assertEqual(await self.accounts.list_accounts("example.net"), [])

    async def test_set_credentials(self) -> None:
        await self.accounts.create_account("example.org", "alice", credentials("old"))
        await self.accounts.set_credentials("example.org", "alice", credentials("new"))
        self.assertEqual(
            await self.accounts.get_credentials("example.org", "alice"), credentials("new")
        )

    async def test_set_credentials_of_unknown_account(self) -> None:
        await self.assertFailure(
            self.accounts.set_credentials("example.org", "nobody", credentials("x")),
            AccountNotFound,
        )
        self.assertFalse(await self.accounts.account_exists("example.org", "nobody"))

    async def test_remove_account(self) -> None:
        await self.accounts.create_account("example.org", "alice", credentials("a"))
        await self.accounts.remove_account("example.org", "alice")
        self.assertFalse(await self.accounts.account_exists("example.org", "alice"))
        self.assertIsNone(await self.accounts.get_credentials("example.org", "alice"))
        self.assertEqual(await self.accounts.list_accounts("example.org"), [])
        # The name is free again.
        await self.accounts.create_account("example.org", "alice", credentials("again"))

    async def test_remove_unknown_account(self) -> None:
        await self.assertFailure(
            self.accounts.remove_account("example.org", "nobody"), AccountNotFound
        )

    async def test_unicode_usernames_and_domains(self) -> None:
        for domain, username in [("example.org", "jürgen"), ("bücher.example", "日本語")]:
            await self.accounts.create_account(domain, username, credentials(username))
            self.assertTrue(await self.accounts.account_exists(domain, username))
            self.assertEqual(
                await self.accounts.get_credentials(domain, username), credentials(username)
            )
            self.assertEqual(await self.accounts.list_accounts(domain), [username])

    async def test_schema_version_after_migrate_is_newest(self) -> None:
        self.assertEqual(await self.database.schema_version(), migrations.newest_version())

    async def test_migrate_again_changes_nothing(self) -> None:
        await self.accounts.create_account("example.org", "alice", credentials("a"))
        self.assertEqual(await self.database.migrate(), migrations.newest_version())
        self.assertEqual(await self.database.schema_version(), migrations.newest_version())
        self.assertEqual(
            await self.accounts.get_credentials("example.org", "alice"), credentials("a")
        )
