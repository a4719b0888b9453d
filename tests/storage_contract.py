"""The behaviour every storage backend owes: one mixin per store, run by one small TestCase per
backend."""

import dataclasses
from datetime import UTC, datetime, timedelta, timezone

from twisted.internet.defer import Deferred, gatherResults
from zope.interface.verify import verifyObject

from mim_twisted.storage import migrations
from mim_twisted.storage.interfaces import (
    AccountExists,
    AccountNotFound,
    IAccountStore,
    IDatabase,
    IOfflineStore,
    IRosterStore,
    OfflineMessage,
    RosterItem,
)


def credentials(tag: str) -> dict[str, str]:
    """Distinct stand-ins for serialised SCRAM keys; the store treats them as opaque text."""
    return {"SCRAM-SHA-1": f"sha1-{tag}", "SCRAM-SHA-256": f"sha256-{tag}"}


class StorageContract:
    """The base of the contracts, mixed into a trial TestCase that provides
    ``open_empty_database``.

    ``open_empty_database()`` returns a Deferred firing with an IDatabase holding no data, closed
    by the TestCase's cleanups; setUp migrates it.
    """

    def open_empty_database(self) -> Deferred[IDatabase]:
        raise NotImplementedError

    async def setUp(self) -> None:
        self.database = await self.open_empty_database()
        await self.database.migrate()
        self.accounts = self.database.accounts
        self.rosters = self.database.rosters
        self.offline = self.database.offline

    async def register(self, *accounts: tuple[str, str]) -> None:
        for domain, username in accounts:
            await self.accounts.create_account(domain, username, credentials(username))


class AccountStoreContract(StorageContract):
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


ALICE = ("example.org", "alice")
BOB = ("example.org", "bob")
ALICE_ELSEWHERE = ("example.com", "alice")
NOBODY = ("example.org", "nobody")


class RosterStoreContract(StorageContract):
    def test_roster_store_provides_interface(self) -> None:
        self.assertTrue(verifyObject(IRosterStore, self.rosters))

    async def test_empty_roster_is_version_0(self) -> None:
        await self.register(ALICE)
        self.assertEqual(await self.rosters.get_roster(*ALICE), (0, []))
        self.assertIsNone(await self.rosters.get_item(*ALICE, "bob@example.com"))

    async def test_roster_of_unknown_account_is_empty(self) -> None:
        self.assertEqual(await self.rosters.get_roster(*NOBODY), (0, []))
        self.assertIsNone(await self.rosters.get_item(*NOBODY, "bob@example.com"))

    async def test_put_and_get_item(self) -> None:
        await self.register(ALICE)
        item = RosterItem(
            jid="bob@example.com",
            name="Bob",
            groups=("Friends",),
            subscription="to",
            ask=True,
            approved=True,
        )
        self.assertEqual(await self.rosters.put_item(*ALICE, item), 1)
        self.assertEqual(await self.rosters.get_item(*ALICE, "bob@example.com"), item)
        self.assertEqual(await self.rosters.get_roster(*ALICE), (1, [item]))

    async def test_item_with_defaults_round_trips(self) -> None:
        await self.register(ALICE)
        item = RosterItem(jid="bob@example.com")
        await self.rosters.put_item(*ALICE, item)
        self.assertEqual(await self.rosters.get_item(*ALICE, "bob@example.com"), item)

    async def test_every_subscription_state_round_trips(self) -> None:
        await self.register(ALICE)
        items = [
            RosterItem(jid=f"{state}@example.com", subscription=state)
            for state in ("both", "from", "none", "to")
        ]
        for item in items:
            await self.rosters.put_item(*ALICE, item)
        self.assertEqual(await self.rosters.get_roster(*ALICE), (4, items))

    async def test_put_replaces_the_item_with_the_same_jid(self) -> None:
        await self.register(ALICE)
        await self.rosters.put_item(
            *ALICE, RosterItem(jid="bob@example.com", name="Bob", groups=("Old",), ask=True)
        )
        replaced = RosterItem(jid="bob@example.com", name="Robert", subscription="both")
        self.assertEqual(await self.rosters.put_item(*ALICE, replaced), 2)
        self.assertEqual(await self.rosters.get_roster(*ALICE), (2, [replaced]))

    async def test_every_put_increments_the_version(self) -> None:
        await self.register(ALICE)
        versions = [
            await self.rosters.put_item(*ALICE, RosterItem(jid=jid))
            for jid in ("a@example.com", "b@example.com", "a@example.com")
        ]
        self.assertEqual(versions, [1, 2, 3])
        version, items = await self.rosters.get_roster(*ALICE)
        self.assertEqual(version, 3)
        self.assertEqual([item.jid for item in items], ["a@example.com", "b@example.com"])

    async def test_remove_item(self) -> None:
        await self.register(ALICE)
        await self.rosters.put_item(*ALICE, RosterItem(jid="a@example.com", groups=("G",)))
        await self.rosters.put_item(*ALICE, RosterItem(jid="b@example.com"))
        self.assertEqual(await self.rosters.remove_item(*ALICE, "a@example.com"), 3)
        self.assertIsNone(await self.rosters.get_item(*ALICE, "a@example.com"))
        self.assertEqual(
            await self.rosters.get_roster(*ALICE), (3, [RosterItem(jid="b@example.com")])
        )

    async def test_removing_an_absent_item_keeps_the_version(self) -> None:
        # RFC 6121 §2.6: the version changes when the roster does, and this changes nothing.
        await self.register(ALICE)
        self.assertEqual(await self.rosters.remove_item(*ALICE, "a@example.com"), 0)
        await self.rosters.put_item(*ALICE, RosterItem(jid="a@example.com"))
        self.assertEqual(await self.rosters.remove_item(*ALICE, "b@example.com"), 1)
        self.assertEqual(await self.rosters.remove_item(*ALICE, "a@example.com"), 2)
        self.assertEqual(await self.rosters.remove_item(*ALICE, "a@example.com"), 2)
        self.assertEqual(await self.rosters.get_roster(*ALICE), (2, []))

    async def test_groups_come_back_sorted_without_duplicates(self) -> None:
        await self.register(ALICE)
        item = RosterItem(jid="bob@example.com", groups=("Work", "Ärger", "Friends", "Work"))
        await self.rosters.put_item(*ALICE, item)
        stored = await self.rosters.get_item(*ALICE, "bob@example.com")
        self.assertEqual(stored.groups, ("Friends", "Work", "Ärger"))

    async def test_replacing_an_item_replaces_its_groups(self) -> None:
        await self.register(ALICE)
        for groups in [("A", "B"), ("C",), ()]:
            await self.rosters.put_item(*ALICE, RosterItem(jid="bob@example.com", groups=groups))
            stored = await self.rosters.get_item(*ALICE, "bob@example.com")
            self.assertEqual(stored.groups, groups)

    async def test_unicode_jids_names_and_groups(self) -> None:
        await self.register(("bücher.example", "日本語"))
        item = RosterItem(
            jid="jürgen@bücher.example",
            # Placeholder characters in values must reach the database as they are.
            name="Jürgen 🎉 100% ? %s",
            groups=("Друзья", "家族"),
        )
        await self.rosters.put_item("bücher.example", "日本語", item)
        self.assertEqual(await self.rosters.get_roster("bücher.example", "日本語"), (1, [item]))

    async def test_pending_in_item_round_trips_and_is_listed(self) -> None:
        await self.register(ALICE)
        stanza = (
            "<presence xmlns='jabber:client' from='bob@example.com' to='alice@example.org'"
            " type='subscribe'><status>It's \"me\" — Bob\n&amp; friends 🎉</status></presence>"
        )
        item = RosterItem(
            jid="bob@example.com", pending_in=True, pending_in_stanza=stanza, in_roster=False
        )
        await self.rosters.put_item(*ALICE, item)
        self.assertEqual(await self.rosters.get_item(*ALICE, "bob@example.com"), item)
        # The store is not where items outside the roster are hidden: the IM core does that.
        self.assertEqual(await self.rosters.get_roster(*ALICE), (1, [item]))

    async def test_items_sorted_by_jid_code_point(self) -> None:
        await self.register(ALICE)
        # Chosen so that a locale collation (which ignores "-" and sorts "é" near "e") disagrees.
        jids = ["zoë@example.com", "émile@example.com", "ab@example.com", "a-c@example.com"]
        for jid in jids:
            await self.rosters.put_item(*ALICE, RosterItem(jid=jid))
        _, items = await self.rosters.get_roster(*ALICE)
        self.assertEqual(
            [item.jid for item in items],
            ["a-c@example.com", "ab@example.com", "zoë@example.com", "émile@example.com"],
        )

    async def test_rosters_are_per_account(self) -> None:
        await self.register(ALICE, BOB, ALICE_ELSEWHERE)
        item = RosterItem(jid="carol@example.com", groups=("G",))
        await self.rosters.put_item(*ALICE, item)
        await self.rosters.put_item(*ALICE, RosterItem(jid="dave@example.com"))
        self.assertEqual(await self.rosters.put_item(*BOB, item), 1)
        self.assertEqual(await self.rosters.get_roster(*ALICE_ELSEWHERE), (0, []))
        self.assertIsNone(await self.rosters.get_item(*ALICE_ELSEWHERE, "carol@example.com"))
        await self.rosters.remove_item(*BOB, "carol@example.com")
        self.assertEqual(await self.rosters.get_item(*ALICE, "carol@example.com"), item)
        self.assertEqual((await self.rosters.get_roster(*ALICE))[0], 2)

    async def test_unknown_account_has_no_roster_to_change(self) -> None:
        await self.assertFailure(
            self.rosters.put_item(*NOBODY, RosterItem(jid="bob@example.com")), AccountNotFound
        )
        await self.assertFailure(
            self.rosters.remove_item(*NOBODY, "bob@example.com"), AccountNotFound
        )
        self.assertEqual(await self.rosters.get_roster(*NOBODY), (0, []))

    async def test_removing_the_account_removes_its_roster(self) -> None:
        await self.register(ALICE, BOB)
        item = RosterItem(jid="carol@example.com", groups=("A", "B"), pending_in=True)
        await self.rosters.put_item(*ALICE, item)
        await self.rosters.put_item(*BOB, item)
        await self.accounts.remove_account(*ALICE)
        self.assertEqual(await self.rosters.get_roster(*ALICE), (0, []))
        await self.register(ALICE)
        self.assertEqual(await self.rosters.get_roster(*ALICE), (0, []))
        self.assertIsNone(await self.rosters.get_item(*ALICE, "carol@example.com"))
        self.assertEqual(await self.rosters.get_roster(*BOB), (1, [item]))

    async def test_concurrent_changes_get_one_version_each(self) -> None:
        await self.register(ALICE)
        jids = [f"contact{n}@example.com" for n in range(10)]
        versions = await gatherResults(
            [self.rosters.put_item(*ALICE, RosterItem(jid=jid)) for jid in jids]
        )
        self.assertEqual(sorted(versions), list(range(1, 11)))
        version, items = await self.rosters.get_roster(*ALICE)
        self.assertEqual((version, len(items)), (10, 10))


def message(n: int) -> OfflineMessage:
    return OfflineMessage(
        sender=f"bob@example.com/res{n}",
        stanza=f"<message xmlns='jabber:client' to='alice@example.org'><body>{n}</body></message>",
        stored_at=datetime(2026, 3, 1, 12, 0, n, 123456, tzinfo=UTC),
    )


class OfflineStoreContract(StorageContract):
    def test_offline_store_provides_interface(self) -> None:
        self.assertTrue(verifyObject(IOfflineStore, self.offline))

    async def test_store_then_pop_all_oldest_first(self) -> None:
        await self.register(ALICE)
        # Stored out of time order: the order is the order of storing.
        messages = [message(3), message(1), message(2)]
        for stored in messages:
            self.assertTrue(await self.offline.store(*ALICE, stored, 10))
        self.assertEqual(await self.offline.count(*ALICE), 3)
        self.assertEqual(await self.offline.pop_all(*ALICE), messages)

    async def test_pop_all_empties_the_store(self) -> None:
        await self.register(ALICE)
        await self.offline.store(*ALICE, message(1), 10)
        await self.offline.pop_all(*ALICE)
        self.assertEqual(await self.offline.count(*ALICE), 0)
        self.assertEqual(await self.offline.pop_all(*ALICE), [])

    async def test_nothing_stored(self) -> None:
        await self.register(ALICE)
        self.assertEqual(await self.offline.count(*ALICE), 0)
        self.assertEqual(await self.offline.pop_all(*ALICE), [])
        self.assertEqual(await self.offline.count(*NOBODY), 0)
        self.assertEqual(await self.offline.pop_all(*NOBODY), [])

    async def test_store_refuses_at_the_limit(self) -> None:
        await self.register(ALICE)
        self.assertEqual(
            [await self.offline.store(*ALICE, message(n), 2) for n in range(3)],
            [True, True, False],
        )
        self.assertEqual(await self.offline.count(*ALICE), 2)
        self.assertEqual(await self.offline.pop_all(*ALICE), [message(0), message(1)])
        # Emptied, the store takes messages again.
        self.assertTrue(await self.offline.store(*ALICE, message(2), 2))

    async def test_limit_0_stores_nothing(self) -> None:
        await self.register(ALICE)
        self.assertFalse(await self.offline.store(*ALICE, message(1), 0))
        self.assertEqual(await self.offline.count(*ALICE), 0)

    async def test_stored_at_comes_back_in_utc(self) -> None:
        await self.register(ALICE)
        paris = timezone(timedelta(hours=2))
        stored_at = datetime(2026, 6, 1, 14, 30, 15, 654321, tzinfo=paris)
        await self.offline.store(*ALICE, dataclasses.replace(message(1), stored_at=stored_at), 10)
        (popped,) = await self.offline.pop_all(*ALICE)
        self.assertEqual(popped.stored_at, stored_at)
        self.assertEqual(popped.stored_at.tzinfo, UTC)
        self.assertEqual(popped.stored_at, datetime(2026, 6, 1, 12, 30, 15, 654321, tzinfo=UTC))

    async def test_stanza_round_trips(self) -> None:
        await self.register(ALICE)
        stored = OfflineMessage(
            sender="jürgen@bücher.example/🎉",
            stanza=(
                "<message xmlns='jabber:client' from='jürgen@bücher.example/🎉'>"
                '<body>It\'s "100% ?"\n&lt;日本語&gt;' + "x" * 60000 + "</body></message>"
            ),
            stored_at=datetime(2026, 1, 1, tzinfo=UTC),
        )
        await self.offline.store(*ALICE, stored, 10)
        self.assertEqual(await self.offline.pop_all(*ALICE), [stored])

    async def test_messages_and_limits_are_per_account(self) -> None:
        await self.register(ALICE, BOB, ALICE_ELSEWHERE)
        self.assertTrue(await self.offline.store(*ALICE, message(1), 1))
        self.assertTrue(await self.offline.store(*BOB, message(2), 1))
        self.assertTrue(await self.offline.store(*ALICE_ELSEWHERE, message(3), 1))
        self.assertFalse(await self.offline.store(*ALICE, message(4), 1))
        self.assertEqual(await self.offline.pop_all(*BOB), [message(2)])
        self.assertEqual(await self.offline.count(*ALICE), 1)
        self.assertEqual(await self.offline.pop_all(*ALICE_ELSEWHERE), [message(3)])
        self.assertEqual(await self.offline.pop_all(*ALICE), [message(1)])

    async def test_store_for_unknown_account(self) -> None:
        await self.assertFailure(self.offline.store(*NOBODY, message(1), 10), AccountNotFound)
        self.assertEqual(await self.offline.count(*NOBODY), 0)

    async def test_removing_the_account_removes_its_messages(self) -> None:
        await self.register(ALICE, BOB)
        await self.offline.store(*ALICE, message(1), 10)
        await self.offline.store(*BOB, message(2), 10)
        await self.accounts.remove_account(*ALICE)
        self.assertEqual(await self.offline.count(*ALICE), 0)
        await self.register(ALICE)
        self.assertEqual(await self.offline.pop_all(*ALICE), [])
        self.assertEqual(await self.offline.pop_all(*BOB), [message(2)])

    async def test_concurrent_stores_respect_the_limit(self) -> None:
        await self.register(ALICE)
        results = await gatherResults(
            [self.offline.store(*ALICE, message(n), 4) for n in range(10)]
        )
        self.assertEqual(sorted(results), [False] * 6 + [True] * 4)
        self.assertEqual(await self.offline.count(*ALICE), 4)
