"""The behaviour every storage backend owes: one mixin per store, run by one small TestCase per
backend."""

import dataclasses
from datetime import UTC, datetime, timedelta, timezone

from twisted.internet.defer import Deferred, DeferredList, gatherResults
from zope.interface.verify import verifyObject

from mim_twisted.storage import migrations
from mim_twisted.storage.interfaces import (
    AccountExists,
    AccountNotFound,
    IAccountStore,
    IBlockListStore,
    IDatabase,
    ILastActivityStore,
    IOfflineStore,
    IPrivateStore,
    IPubSubStore,
    IRosterStore,
    IVCardStore,
    LastActivity,
    NodeExists,
    NodeNotFound,
    OfflineMessage,
    PubSubItem,
    PubSubSubscription,
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
        self.pubsub = self.database.pubsub
        self.last_activity = self.database.last_activity
        self.block_lists = self.database.block_lists
        self.private = self.database.private
        self.vcards = self.database.vcards

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

    async def test_four_byte_characters_round_trip(self) -> None:
        # Outside the BMP: MySQL's "utf8" (3 bytes a character) would refuse or mangle them.
        await self.accounts.create_account("example.org", "𝄞mily😀", credentials("🔑"))
        self.assertEqual(
            await self.accounts.get_credentials("example.org", "𝄞mily😀"), credentials("🔑")
        )
        self.assertFalse(await self.accounts.account_exists("example.org", "𝄞mily😁"))
        self.assertEqual(await self.accounts.list_accounts("example.org"), ["𝄞mily😀"])

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

    async def test_four_byte_characters_round_trip(self) -> None:
        await self.register(ALICE)
        contact = RosterItem(jid="😀@example.com", name="Grinning 😀", groups=("🎉", "家族"))
        await self.rosters.put_item(*ALICE, contact)
        self.assertEqual(
            await self.rosters.get_item(*ALICE, "😀@example.com"),
            dataclasses.replace(contact, groups=("家族", "🎉")),
        )
        self.assertIsNone(await self.rosters.get_item(*ALICE, "😁@example.com"))

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

    async def test_replace_item_compares_and_swaps(self) -> None:
        await self.register(ALICE)
        jid = "a@example.com"
        first = RosterItem(jid=jid, groups=("B", "A"), subscription="to")
        self.assertEqual(await self.rosters.replace_item(*ALICE, jid, None, first), 1)
        stored = await self.rosters.get_item(*ALICE, jid)
        # Another item is stored than the one expected: nothing changes.
        second = dataclasses.replace(first, subscription="both")
        self.assertIsNone(await self.rosters.replace_item(*ALICE, jid, None, second))
        stale = dataclasses.replace(first, ask=True)
        self.assertIsNone(await self.rosters.replace_item(*ALICE, jid, stale, second))
        self.assertEqual(await self.rosters.get_roster(*ALICE), (1, [stored]))
        # The groups compare as the set they are stored as.
        self.assertEqual(await self.rosters.replace_item(*ALICE, jid, first, second), 2)
        self.assertEqual((await self.rosters.get_item(*ALICE, jid)).subscription, "both")
        self.assertEqual(await self.rosters.replace_item(*ALICE, jid, second, None), 3)
        self.assertIsNone(await self.rosters.get_item(*ALICE, jid))
        # Removing what is not there changes nothing, nor the version.
        self.assertEqual(await self.rosters.replace_item(*ALICE, jid, None, None), 3)
        await self.assertFailure(
            self.rosters.replace_item(*NOBODY, jid, None, first), AccountNotFound
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

    async def test_four_byte_characters_round_trip(self) -> None:
        await self.register(ALICE)
        sent = dataclasses.replace(
            message(1), sender="😀@example.com/𝄞", stanza="<message><body>🎉</body></message>"
        )
        await self.offline.store(*ALICE, sent, 10)
        self.assertEqual(await self.offline.pop_all(*ALICE), [sent])

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

    async def test_count_all_counts_every_user(self) -> None:
        self.assertEqual(await self.offline.count_all(), 0)
        await self.register(ALICE, BOB)
        await self.offline.store(*ALICE, message(1), 10)
        await self.offline.store(*ALICE, message(2), 10)
        await self.offline.store(*BOB, message(3), 10)
        self.assertEqual(await self.offline.count_all(), 3)
        await self.offline.pop_all(*ALICE)
        self.assertEqual(await self.offline.count_all(), 1)

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


BOOKMARKS = "storage:bookmarks"
BOOKMARKS_XML = (
    "<storage xmlns='storage:bookmarks'><conference jid='café@muc.example.org' name='☕'/>"
    "</storage>"
)
PREFS = "exodus:prefs"
PREFS_XML = "<exodus xmlns='exodus:prefs'><defaultnick>Hamlet</defaultnick></exodus>"


class PrivateStoreContract(StorageContract):
    def test_private_store_provides_interface(self) -> None:
        self.assertTrue(verifyObject(IPrivateStore, self.private))

    async def test_set_then_get_by_namespace(self) -> None:
        await self.register(ALICE)
        fragments = {BOOKMARKS: BOOKMARKS_XML, PREFS: PREFS_XML}
        self.assertTrue(await self.private.set_fragments(*ALICE, fragments, 10000))
        self.assertEqual(await self.private.get_fragments(*ALICE, [BOOKMARKS, PREFS]), fragments)
        self.assertEqual(await self.private.get_fragments(*ALICE, [PREFS]), {PREFS: PREFS_XML})

    async def test_nothing_stored(self) -> None:
        await self.register(ALICE)
        self.assertEqual(await self.private.get_fragments(*ALICE, [BOOKMARKS]), {})
        self.assertEqual(await self.private.get_fragments(*NOBODY, [BOOKMARKS]), {})

    async def test_set_replaces_only_its_namespaces(self) -> None:
        await self.register(ALICE)
        await self.private.set_fragments(
            *ALICE, {BOOKMARKS: BOOKMARKS_XML, PREFS: PREFS_XML}, 10000
        )
        empty = "<storage xmlns='storage:bookmarks'/>"
        await self.private.set_fragments(*ALICE, {BOOKMARKS: empty}, 10000)
        self.assertEqual(
            await self.private.get_fragments(*ALICE, [BOOKMARKS, PREFS]),
            {BOOKMARKS: empty, PREFS: PREFS_XML},
        )

    async def test_fragments_are_per_account(self) -> None:
        await self.register(ALICE, ALICE_ELSEWHERE)
        await self.private.set_fragments(*ALICE, {PREFS: PREFS_XML}, 10000)
        self.assertEqual(await self.private.get_fragments(*ALICE_ELSEWHERE, [PREFS]), {})

    async def test_limit_counts_the_bytes_of_all_namespaces(self) -> None:
        await self.register(ALICE)
        size = len(BOOKMARKS_XML.encode("utf-8"))  # "é" and "☕" take more than one byte each
        self.assertTrue(await self.private.set_fragments(*ALICE, {BOOKMARKS: BOOKMARKS_XML}, size))
        # Replacing a namespace counts its new size only.
        self.assertTrue(await self.private.set_fragments(*ALICE, {BOOKMARKS: BOOKMARKS_XML}, size))
        self.assertFalse(await self.private.set_fragments(*ALICE, {PREFS: PREFS_XML}, size))
        self.assertEqual(await self.private.get_fragments(*ALICE, [PREFS]), {})
        # Nothing of a refused set is stored, not even what would fit.
        two = {BOOKMARKS: "<storage xmlns='storage:bookmarks'/>", PREFS: PREFS_XML * 3}
        self.assertFalse(await self.private.set_fragments(*ALICE, two, size))
        self.assertEqual(
            await self.private.get_fragments(*ALICE, [BOOKMARKS]), {BOOKMARKS: BOOKMARKS_XML}
        )

    async def test_set_for_unknown_account(self) -> None:
        await self.assertFailure(
            self.private.set_fragments(*NOBODY, {PREFS: PREFS_XML}, 10000), AccountNotFound
        )

    async def test_removing_the_account_removes_its_fragments(self) -> None:
        await self.register(ALICE)
        await self.private.set_fragments(*ALICE, {PREFS: PREFS_XML}, 10000)
        await self.accounts.remove_account(*ALICE)
        await self.register(ALICE)
        self.assertEqual(await self.private.get_fragments(*ALICE, [PREFS]), {})

    async def test_concurrent_sets_respect_the_limit(self) -> None:
        await self.register(ALICE)
        fragment = "<x xmlns='urn:example'/>"
        limit = len(fragment) * 4
        results = await gatherResults(
            [
                self.private.set_fragments(*ALICE, {f"urn:example:{n}": fragment}, limit)
                for n in range(10)
            ]
        )
        self.assertEqual(sorted(results), [False] * 6 + [True] * 4)


VCARD = "<vCard xmlns='vcard-temp'><FN>Zoë 🎉</FN><NICKNAME>zoe</NICKNAME></vCard>"


class VCardStoreContract(StorageContract):
    def test_vcard_store_provides_interface(self) -> None:
        self.assertTrue(verifyObject(IVCardStore, self.vcards))

    async def test_set_then_get(self) -> None:
        await self.register(ALICE)
        self.assertIsNone(await self.vcards.get_vcard(*ALICE))
        await self.vcards.set_vcard(*ALICE, VCARD)
        self.assertEqual(await self.vcards.get_vcard(*ALICE), VCARD)

    async def test_set_replaces_the_vcard(self) -> None:
        await self.register(ALICE)
        await self.vcards.set_vcard(*ALICE, VCARD)
        await self.vcards.set_vcard(*ALICE, "<vCard xmlns='vcard-temp'/>")
        self.assertEqual(await self.vcards.get_vcard(*ALICE), "<vCard xmlns='vcard-temp'/>")

    async def test_large_vcard_round_trips(self) -> None:
        await self.register(ALICE)
        photo = "iVBORw0KGgo" * 20000  # a 220 kB BINVAL
        vcard = f"<vCard xmlns='vcard-temp'><PHOTO><BINVAL>{photo}</BINVAL></PHOTO></vCard>"
        await self.vcards.set_vcard(*ALICE, vcard)
        self.assertEqual(await self.vcards.get_vcard(*ALICE), vcard)

    async def test_vcards_are_per_account(self) -> None:
        await self.register(ALICE, ALICE_ELSEWHERE, BOB)
        await self.vcards.set_vcard(*ALICE, VCARD)
        self.assertIsNone(await self.vcards.get_vcard(*ALICE_ELSEWHERE))
        self.assertIsNone(await self.vcards.get_vcard(*BOB))

    async def test_unknown_account(self) -> None:
        self.assertIsNone(await self.vcards.get_vcard(*NOBODY))
        await self.assertFailure(self.vcards.set_vcard(*NOBODY, VCARD), AccountNotFound)

    async def test_removing_the_account_removes_its_vcard(self) -> None:
        await self.register(ALICE)
        await self.vcards.set_vcard(*ALICE, VCARD)
        await self.accounts.remove_account(*ALICE)
        await self.register(ALICE)
        self.assertIsNone(await self.vcards.get_vcard(*ALICE))


# A PubSub service and a PEP service (the owner's bare JID), which may both have a node "news".
SERVICE = "pubsub.example.org"
PEP = "alice@example.org"
OWNER = "owner@example.org"
CONFIG = {
    "pubsub#title": "Jürgen's 🎉 100% ? %s",
    "pubsub#max_items": 10,
    "pubsub#persist_items": True,
    "pubsub#deliver_payloads": False,
    "pubsub#roster_groups_allowed": ["Friends", "家族"],
    "pubsub#children": [],
}


def item(n: int, publisher: str = "alice@example.org/desk") -> PubSubItem:
    return PubSubItem(
        item_id=f"item{n}", payload=f"<entry xmlns='urn:example'>{n}</entry>", publisher=publisher
    )


def subscription(jid: str, subid: str, state: str = "subscribed", **options) -> PubSubSubscription:
    return PubSubSubscription(jid=jid, subid=subid, state=state, options=options)


class LastActivityStoreContract(StorageContract):
    def test_last_activity_store_provides_interface(self) -> None:
        self.assertTrue(verifyObject(ILastActivityStore, self.last_activity))

    async def test_set_replaces_and_get_reads(self) -> None:
        await self.register(ALICE, BOB)
        self.assertIsNone(await self.last_activity.get_last_activity(*ALICE))
        await self.last_activity.set_last_activity(*ALICE, LastActivity(1_700_000_000, "Gone"))
        await self.last_activity.set_last_activity(*ALICE, LastActivity(1_800_000_000, ""))
        await self.last_activity.set_last_activity(*BOB, LastActivity(5, "Zzz \u263e"))
        self.assertEqual(
            await self.last_activity.get_last_activity(*ALICE), LastActivity(1_800_000_000, "")
        )
        self.assertEqual(
            await self.last_activity.get_last_activity(*BOB), LastActivity(5, "Zzz \u263e")
        )

    async def test_nothing_kept_for_an_unknown_account(self) -> None:
        await self.last_activity.set_last_activity(*NOBODY, LastActivity(1, "x"))
        self.assertIsNone(await self.last_activity.get_last_activity(*NOBODY))

    async def test_removed_with_the_account(self) -> None:
        await self.register(ALICE)
        await self.last_activity.set_last_activity(*ALICE, LastActivity(1, "x"))
        await self.accounts.remove_account(*ALICE)
        await self.register(ALICE)
        self.assertIsNone(await self.last_activity.get_last_activity(*ALICE))


class BlockListStoreContract(StorageContract):
    def test_block_list_store_provides_interface(self) -> None:
        self.assertTrue(verifyObject(IBlockListStore, self.block_lists))

    async def test_block_reports_what_was_new(self) -> None:
        await self.register(ALICE, BOB)
        self.assertEqual(await self.block_lists.get_block_list(*ALICE), [])
        added = await self.block_lists.block(*ALICE, ["eve@example.com", "example.net"])
        self.assertEqual(added, ["eve@example.com", "example.net"])
        added = await self.block_lists.block(
            *ALICE, ["example.net", "mallory@example.com/phone", "mallory@example.com/phone"]
        )
        self.assertEqual(added, ["mallory@example.com/phone"])
        self.assertEqual(
            await self.block_lists.get_block_list(*ALICE),
            ["eve@example.com", "example.net", "mallory@example.com/phone"],
        )
        self.assertEqual(await self.block_lists.get_block_list(*BOB), [])

    async def test_unblock_reports_what_was_blocked(self) -> None:
        await self.register(ALICE, BOB)
        await self.block_lists.block(*ALICE, ["a@example.com", "b@example.com", "c@example.com"])
        await self.block_lists.block(*BOB, ["a@example.com"])
        removed = await self.block_lists.unblock(*ALICE, ["c@example.com", "a@example.com", "x"])
        self.assertEqual(removed, ["a@example.com", "c@example.com"])
        self.assertEqual(await self.block_lists.get_block_list(*ALICE), ["b@example.com"])
        self.assertEqual(await self.block_lists.get_block_list(*BOB), ["a@example.com"])

    async def test_unblock_all(self) -> None:
        await self.register(ALICE, BOB)
        await self.block_lists.block(*ALICE, ["b@example.com", "a@example.com"])
        await self.block_lists.block(*BOB, ["a@example.com"])
        self.assertEqual(
            await self.block_lists.unblock_all(*ALICE), ["a@example.com", "b@example.com"]
        )
        self.assertEqual(await self.block_lists.unblock_all(*ALICE), [])
        self.assertEqual(await self.block_lists.get_block_list(*ALICE), [])
        self.assertEqual(await self.block_lists.get_block_list(*BOB), ["a@example.com"])

    async def test_unknown_account(self) -> None:
        await self.assertFailure(
            self.block_lists.block(*NOBODY, ["a@example.com"]), AccountNotFound
        )
        self.assertEqual(await self.block_lists.get_block_list(*NOBODY), [])
        self.assertEqual(await self.block_lists.unblock(*NOBODY, ["a@example.com"]), [])
        self.assertEqual(await self.block_lists.unblock_all(*NOBODY), [])

    async def test_removed_with_the_account(self) -> None:
        await self.register(ALICE)
        await self.block_lists.block(*ALICE, ["a@example.com"])
        await self.accounts.remove_account(*ALICE)
        await self.register(ALICE)
        self.assertEqual(await self.block_lists.get_block_list(*ALICE), [])


class PubSubStoreContract(StorageContract):
    def test_pubsub_store_provides_interface(self) -> None:
        self.assertTrue(verifyObject(IPubSubStore, self.pubsub))

    async def ids(self, service: str = SERVICE, name: str = "news", **query) -> list[str]:
        """The item ids of get_items(service, name, **query), newest first."""
        return [i.item_id for i in await self.pubsub.get_items(service, name, **query)]

    async def publish(self, *numbers: int, max_items: int | None = None) -> None:
        for n in numbers:
            await self.pubsub.publish_item(SERVICE, "news", item(n), max_items)

    # Nodes

    async def test_create_and_get_node(self) -> None:
        before = datetime.now(UTC)
        await self.pubsub.create_node(SERVICE, "news", CONFIG, OWNER)
        node = await self.pubsub.get_node(SERVICE, "news")
        self.assertEqual((node.service, node.name, node.config), (SERVICE, "news", CONFIG))
        self.assertEqual(node.created_at.tzinfo, UTC)
        self.assertTrue(before <= node.created_at <= datetime.now(UTC))
        self.assertEqual(await self.pubsub.get_affiliations(SERVICE, "news"), {OWNER: "owner"})

    async def test_removing_the_account_removes_its_pep_nodes(self) -> None:
        await self.register(ALICE, BOB)
        alice, bob = (f"{user}@{domain}" for domain, user in (ALICE, BOB))
        for owner in (alice, bob):
            await self.pubsub.create_node(owner, "urn:xmpp:omemo:2:devices", {}, owner)
            await self.pubsub.publish_item(owner, "urn:xmpp:omemo:2:devices", item(1), 1)
        await self.pubsub.create_node(SERVICE, "news", {}, alice)
        await self.accounts.remove_account(*ALICE)
        self.assertEqual(await self.pubsub.list_nodes(alice), [])
        self.assertEqual(await self.pubsub.get_items(alice, "urn:xmpp:omemo:2:devices"), [])
        self.assertEqual(len(await self.pubsub.list_nodes(bob)), 1)
        self.assertEqual(len(await self.pubsub.list_nodes(SERVICE)), 1)

    async def test_get_unknown_node(self) -> None:
        self.assertIsNone(await self.pubsub.get_node(SERVICE, "news"))

    async def test_config_is_copied_in_and_out(self) -> None:
        config = {"pubsub#roster_groups_allowed": ["A"]}
        await self.pubsub.create_node(SERVICE, "news", config, OWNER)
        config["pubsub#roster_groups_allowed"].append("B")
        node = await self.pubsub.get_node(SERVICE, "news")
        node.config["pubsub#roster_groups_allowed"].append("C")
        node = await self.pubsub.get_node(SERVICE, "news")
        self.assertEqual(node.config, {"pubsub#roster_groups_allowed": ["A"]})

    async def test_list_nodes_sorted_by_code_point_per_service(self) -> None:
        # Chosen so that a locale collation (which ignores "-" and sorts "é" near "e") disagrees.
        for name in ["zoë", "émile", "ab", "a-c"]:
            await self.pubsub.create_node(SERVICE, name, {"n": name}, OWNER)
        await self.pubsub.create_node(PEP, "elsewhere", {}, PEP)
        nodes = await self.pubsub.list_nodes(SERVICE)
        self.assertEqual([node.name for node in nodes], ["a-c", "ab", "zoë", "émile"])
        self.assertEqual([node.config for node in nodes], [{"n": n.name} for n in nodes])
        self.assertEqual({node.service for node in nodes}, {SERVICE})
        self.assertEqual(await self.pubsub.list_nodes("pubsub.example.com"), [])

    async def test_set_node_config_replaces_it(self) -> None:
        await self.pubsub.create_node(SERVICE, "news", CONFIG, OWNER)
        created_at = (await self.pubsub.get_node(SERVICE, "news")).created_at
        await self.pubsub.set_node_config(SERVICE, "news", {"pubsub#max_items": 1})
        node = await self.pubsub.get_node(SERVICE, "news")
        self.assertEqual((node.config, node.created_at), ({"pubsub#max_items": 1}, created_at))

    async def test_create_existing_node_fails_and_keeps_the_first(self) -> None:
        await self.pubsub.create_node(SERVICE, "news", CONFIG, OWNER)
        await self.assertFailure(
            self.pubsub.create_node(SERVICE, "news", {}, "other@example.org"), NodeExists
        )
        self.assertEqual((await self.pubsub.get_node(SERVICE, "news")).config, CONFIG)
        self.assertEqual(await self.pubsub.get_affiliations(SERVICE, "news"), {OWNER: "owner"})

    async def test_four_byte_characters_round_trip(self) -> None:
        await self.pubsub.create_node(SERVICE, "🎉news", CONFIG, "😀@example.org")
        published = PubSubItem(
            item_id="𝄞1", payload="<entry xmlns='urn:example'>🎉 𝄞</entry>", publisher="😀@x/📱"
        )
        await self.pubsub.publish_item(SERVICE, "🎉news", published, 10)
        (stored,) = await self.pubsub.get_items(SERVICE, "🎉news", item_ids=["𝄞1"])
        self.assertEqual(
            (stored.item_id, stored.payload, stored.publisher),
            (published.item_id, published.payload, published.publisher),
        )
        self.assertEqual(
            await self.pubsub.affiliations_of(SERVICE, "😀@example.org"), {"🎉news": "owner"}
        )
        self.assertIsNone(await self.pubsub.get_node(SERVICE, "🎊news"))

    async def test_concurrent_creations_of_a_node_one_wins(self) -> None:
        owners = [f"owner{n}@example.org" for n in range(5)]
        results = await DeferredList(
            [self.pubsub.create_node(SERVICE, "news", {}, owner) for owner in owners],
            consumeErrors=True,
        )
        self.assertEqual(sum(1 for succeeded, _ in results if succeeded), 1)
        for succeeded, result in results:
            if not succeeded:
                result.trap(NodeExists)
        (winner,) = (await self.pubsub.get_affiliations(SERVICE, "news")).keys()
        self.assertIn(winner, owners)

    async def test_delete_node_deletes_everything_on_it(self) -> None:
        await self.pubsub.create_node(SERVICE, "news", CONFIG, OWNER)
        await self.pubsub.create_node(SERVICE, "other", {}, OWNER)
        for name in ("news", "other"):
            await self.pubsub.set_affiliation(SERVICE, name, "bob@example.org", "publisher")
            await self.pubsub.add_subscription(SERVICE, name, subscription("bob@example.org", "1"))
            await self.pubsub.publish_item(SERVICE, name, item(1), None)
        await self.pubsub.delete_node(SERVICE, "news")
        self.assertIsNone(await self.pubsub.get_node(SERVICE, "news"))
        self.assertEqual(await self.pubsub.affiliations_of(SERVICE, OWNER), {"other": "owner"})
        self.assertEqual(
            [name for name, _ in await self.pubsub.subscriptions_of(SERVICE, "bob@example.org")],
            ["other"],
        )
        # A node created again under the name starts with nothing of the old one.
        await self.pubsub.create_node(SERVICE, "news", {}, "new@example.org")
        self.assertEqual(
            await self.pubsub.get_affiliations(SERVICE, "news"), {"new@example.org": "owner"}
        )
        self.assertEqual(await self.pubsub.get_subscriptions(SERVICE, "news"), [])
        self.assertEqual(await self.ids(), [])
        self.assertEqual(await self.ids(name="other"), ["item1"])

    async def test_writes_to_an_unknown_node_fail(self) -> None:
        await self.pubsub.create_node(SERVICE, "news", {}, OWNER)
        await self.pubsub.create_node(PEP, "other", {}, PEP)
        writes = [
            lambda: self.pubsub.set_node_config(SERVICE, "other", {}),
            lambda: self.pubsub.delete_node(SERVICE, "other"),
            lambda: self.pubsub.set_affiliation(SERVICE, "other", "bob@example.org", "member"),
            lambda: self.pubsub.set_affiliation(SERVICE, "other", "bob@example.org", "none"),
            lambda: self.pubsub.add_subscription(SERVICE, "other", subscription("b@x", "1")),
            lambda: self.pubsub.update_subscription(SERVICE, "other", subscription("b@x", "1")),
            lambda: self.pubsub.publish_item(SERVICE, "other", item(1), 10),
            lambda: self.pubsub.publish_items(SERVICE, "other", [item(1)], 10),
            lambda: self.pubsub.publish_items(SERVICE, "other", [], 10),
            lambda: self.pubsub.purge_items(SERVICE, "other"),
        ]
        for write in writes:
            await self.assertFailure(write(), NodeNotFound)
        self.assertEqual([n.name for n in await self.pubsub.list_nodes(SERVICE)], ["news"])

    async def test_reads_of_an_unknown_node_find_nothing(self) -> None:
        self.assertEqual(await self.pubsub.get_affiliations(SERVICE, "news"), {})
        self.assertEqual(await self.pubsub.get_subscriptions(SERVICE, "news"), [])
        self.assertEqual(await self.pubsub.get_items(SERVICE, "news"), [])
        self.assertEqual(await self.pubsub.get_items(SERVICE, "news", 1, ["item1"]), [])
        self.assertFalse(await self.pubsub.retract_item(SERVICE, "news", "item1"))
        self.assertFalse(await self.pubsub.remove_subscription(SERVICE, "news", "b@x", "1"))

    # Affiliations

    async def test_set_replace_and_remove_affiliations(self) -> None:
        await self.pubsub.create_node(SERVICE, "news", {}, OWNER)
        await self.pubsub.set_affiliation(SERVICE, "news", "bob@example.org", "publisher")
        await self.pubsub.set_affiliation(SERVICE, "news", "eve@example.org", "outcast")
        await self.pubsub.set_affiliation(SERVICE, "news", "bob@example.org", "member")
        self.assertEqual(
            await self.pubsub.get_affiliations(SERVICE, "news"),
            {OWNER: "owner", "bob@example.org": "member", "eve@example.org": "outcast"},
        )
        await self.pubsub.set_affiliation(SERVICE, "news", "bob@example.org", "none")
        # "none" for a JID without an affiliation is no error.
        await self.pubsub.set_affiliation(SERVICE, "news", "carol@example.org", "none")
        self.assertEqual(
            await self.pubsub.get_affiliations(SERVICE, "news"),
            {OWNER: "owner", "eve@example.org": "outcast"},
        )

    async def test_every_affiliation_round_trips(self) -> None:
        await self.pubsub.create_node(SERVICE, "news", {}, OWNER)
        affiliations = {
            f"{a}@example.org": a for a in ("owner", "publisher", "publish-only", "member")
        } | {"outcast@example.org": "outcast"}
        for jid, affiliation in affiliations.items():
            await self.pubsub.set_affiliation(SERVICE, "news", jid, affiliation)
        self.assertEqual(
            await self.pubsub.get_affiliations(SERVICE, "news"),
            affiliations | {OWNER: "owner"},
        )

    async def test_unknown_affiliation_is_refused(self) -> None:
        await self.pubsub.create_node(SERVICE, "news", {}, OWNER)
        await self.assertFailure(
            self.pubsub.set_affiliation(SERVICE, "news", "bob@example.org", "admin"), ValueError
        )
        self.assertEqual(await self.pubsub.get_affiliations(SERVICE, "news"), {OWNER: "owner"})

    async def test_affiliations_of_a_jid_across_nodes(self) -> None:
        bob = "bob@example.org"
        for name in ("a", "b", "c"):
            await self.pubsub.create_node(SERVICE, name, {}, OWNER)
        await self.pubsub.create_node(PEP, "a", {}, PEP)
        await self.pubsub.set_affiliation(SERVICE, "a", bob, "publisher")
        await self.pubsub.set_affiliation(SERVICE, "c", bob, "outcast")
        await self.pubsub.set_affiliation(PEP, "a", bob, "member")
        self.assertEqual(
            await self.pubsub.affiliations_of(SERVICE, bob), {"a": "publisher", "c": "outcast"}
        )
        self.assertEqual(await self.pubsub.affiliations_of(PEP, bob), {"a": "member"})
        self.assertEqual(
            await self.pubsub.affiliations_of(SERVICE, OWNER), {n: "owner" for n in "abc"}
        )
        self.assertEqual(await self.pubsub.affiliations_of(SERVICE, "carol@example.org"), {})

    # Subscriptions

    async def test_subscriptions_in_subscription_order(self) -> None:
        await self.pubsub.create_node(SERVICE, "news", {}, OWNER)
        subscriptions = [
            subscription("zed@example.org", "s1"),
            subscription("bob@example.org/phone", "s2", "pending"),
            subscription("amy@example.org", "s3", "unconfigured", **{"pubsub#digest": True}),
            subscription("bob@example.org/phone", "s0"),  # a second one of the same JID
        ]
        for added in subscriptions:
            await self.pubsub.add_subscription(SERVICE, "news", added)
        self.assertEqual(await self.pubsub.get_subscriptions(SERVICE, "news"), subscriptions)
        # Removed and added again, it is the newest.
        self.assertTrue(
            await self.pubsub.remove_subscription(SERVICE, "news", "zed@example.org", "s1")
        )
        await self.pubsub.add_subscription(SERVICE, "news", subscriptions[0])
        self.assertEqual(
            await self.pubsub.get_subscriptions(SERVICE, "news"),
            subscriptions[1:] + subscriptions[:1],
        )

    async def test_options_round_trip(self) -> None:
        await self.pubsub.create_node(SERVICE, "news", {}, OWNER)

        def options() -> dict:
            return {
                "pubsub#deliver": False,
                "pubsub#digest_frequency": 86400000,
                "pubsub#show-values": ["away", "chat"],
                "pubsub#subscription_type": "items",
                "x": "ünïcode 🎉 100% ?",
            }

        added = PubSubSubscription("bob@example.org", "s1", "subscribed", options())
        await self.pubsub.add_subscription(SERVICE, "news", added)
        # What the store keeps is a copy.
        added.options["pubsub#show-values"].append("dnd")
        (stored,) = await self.pubsub.get_subscriptions(SERVICE, "news")
        self.assertEqual(stored.options, options())

    async def test_update_subscription_keeps_its_place(self) -> None:
        await self.pubsub.create_node(SERVICE, "news", {}, OWNER)
        first = subscription("bob@example.org", "s1", "pending")
        second = subscription("bob@example.org", "s2")
        await self.pubsub.add_subscription(SERVICE, "news", first)
        await self.pubsub.add_subscription(SERVICE, "news", second)
        updated = subscription("bob@example.org", "s1", "subscribed", **{"pubsub#deliver": True})
        self.assertTrue(await self.pubsub.update_subscription(SERVICE, "news", updated))
        self.assertEqual(await self.pubsub.get_subscriptions(SERVICE, "news"), [updated, second])
        # An update of no subscription changes nothing.
        missing = subscription("bob@example.org", "s3")
        self.assertFalse(await self.pubsub.update_subscription(SERVICE, "news", missing))
        self.assertEqual(await self.pubsub.get_subscriptions(SERVICE, "news"), [updated, second])

    async def test_adding_an_existing_subscription_replaces_it_in_place(self) -> None:
        await self.pubsub.create_node(SERVICE, "news", {}, OWNER)
        await self.pubsub.add_subscription(SERVICE, "news", subscription("a@example.org", "1"))
        await self.pubsub.add_subscription(SERVICE, "news", subscription("b@example.org", "1"))
        again = subscription("a@example.org", "1", "pending", x=1)
        await self.pubsub.add_subscription(SERVICE, "news", again)
        self.assertEqual(
            await self.pubsub.get_subscriptions(SERVICE, "news"),
            [again, subscription("b@example.org", "1")],
        )

    async def test_remove_subscription(self) -> None:
        await self.pubsub.create_node(SERVICE, "news", {}, OWNER)
        kept = subscription("bob@example.org", "s2")
        await self.pubsub.add_subscription(SERVICE, "news", subscription("bob@example.org", "s1"))
        await self.pubsub.add_subscription(SERVICE, "news", kept)
        self.assertTrue(
            await self.pubsub.remove_subscription(SERVICE, "news", "bob@example.org", "s1")
        )
        self.assertFalse(
            await self.pubsub.remove_subscription(SERVICE, "news", "bob@example.org", "s1")
        )
        self.assertFalse(
            await self.pubsub.remove_subscription(SERVICE, "news", "bob@example.org/x", "s2")
        )
        self.assertEqual(await self.pubsub.get_subscriptions(SERVICE, "news"), [kept])

    async def test_unknown_subscription_state_is_refused(self) -> None:
        await self.pubsub.create_node(SERVICE, "news", {}, OWNER)
        await self.assertFailure(
            self.pubsub.add_subscription(SERVICE, "news", subscription("b@x", "1", "none")),
            ValueError,
        )
        self.assertEqual(await self.pubsub.get_subscriptions(SERVICE, "news"), [])

    async def test_subscriptions_of_bare_and_full_jids(self) -> None:
        for name in ("b", "a"):
            await self.pubsub.create_node(SERVICE, name, {}, OWNER)
        await self.pubsub.create_node(PEP, "a", {}, PEP)
        added = {
            ("a", "bob@example.org/phone"): subscription("bob@example.org/phone", "1"),
            ("a", "bob@example.org"): subscription("bob@example.org", "2", "pending"),
            ("b", "bob@example.org/desk/home"): subscription("bob@example.org/desk/home", "3"),
            ("b", "bob@example.org/phone"): subscription("bob@example.org/phone", "4"),
            # Not bob's: a JID that bob's is a prefix of, and one that LIKE 'b_b%' would match.
            ("a", "bob@example.org.evil/x"): subscription("bob@example.org.evil/x", "5"),
            ("a", "bib@example.org/phone"): subscription("bib@example.org/phone", "6"),
        }
        for (name, _), added_subscription in added.items():
            await self.pubsub.add_subscription(SERVICE, name, added_subscription)
        await self.pubsub.add_subscription(PEP, "a", subscription("bob@example.org", "7"))

        def expected(*keys: tuple[str, str]) -> list[tuple[str, PubSubSubscription]]:
            return [(name, added[name, jid]) for name, jid in keys]

        self.assertEqual(
            await self.pubsub.subscriptions_of(SERVICE, "bob@example.org"),
            expected(
                ("a", "bob@example.org/phone"),
                ("a", "bob@example.org"),
                ("b", "bob@example.org/desk/home"),
                ("b", "bob@example.org/phone"),
            ),
        )
        self.assertEqual(
            await self.pubsub.subscriptions_of(SERVICE, "bob@example.org/phone"),
            expected(("a", "bob@example.org/phone"), ("b", "bob@example.org/phone")),
        )
        self.assertEqual(await self.pubsub.subscriptions_of(SERVICE, "bob@example.org/desk"), [])
        self.assertEqual(await self.pubsub.subscriptions_of(PEP, "bob@example.org/phone"), [])
        self.assertEqual(
            await self.pubsub.subscriptions_of(PEP, "bob@example.org"),
            [("a", subscription("bob@example.org", "7"))],
        )

    # Items

    async def test_publish_new_item(self) -> None:
        await self.pubsub.create_node(SERVICE, "news", {}, OWNER)
        before = datetime.now(UTC)
        await self.publish(1)
        after = datetime.now(UTC)
        (stored,) = await self.pubsub.get_items(SERVICE, "news")
        self.assertEqual(dataclasses.replace(stored, created_at=None, modified_at=None), item(1))
        self.assertEqual(stored.created_at, stored.modified_at)
        self.assertEqual(stored.modified_at.tzinfo, UTC)
        self.assertTrue(before <= stored.modified_at <= after)

    async def test_publish_ignores_the_given_times(self) -> None:
        await self.pubsub.create_node(SERVICE, "news", {}, OWNER)
        long_ago = datetime(2001, 1, 1, tzinfo=UTC)
        given = dataclasses.replace(item(1), created_at=long_ago, modified_at=long_ago)
        await self.pubsub.publish_item(SERVICE, "news", given, None)
        (stored,) = await self.pubsub.get_items(SERVICE, "news")
        self.assertGreater(stored.created_at, long_ago)

    async def test_publish_replaces_an_item_by_id(self) -> None:
        await self.pubsub.create_node(SERVICE, "news", {}, OWNER)
        await self.publish(1, 2)
        (old,) = await self.pubsub.get_items(SERVICE, "news", item_ids=["item1"])
        replacement = PubSubItem("item1", "<entry xmlns='urn:example'>new</entry>", "bob@x/r")
        await self.pubsub.publish_item(SERVICE, "news", replacement, None)
        new, second = await self.pubsub.get_items(SERVICE, "news")
        self.assertEqual((new.item_id, second.item_id), ("item1", "item2"))
        self.assertEqual((new.payload, new.publisher), (replacement.payload, "bob@x/r"))
        self.assertEqual(new.created_at, old.created_at)
        self.assertGreater(new.modified_at, old.modified_at)
        self.assertGreater(new.modified_at, second.modified_at)

    async def test_each_publication_is_newer_than_the_last(self) -> None:
        # Published faster than a clock may tick: the times still give one order.
        await self.pubsub.create_node(SERVICE, "news", {}, OWNER)
        await self.publish(*range(20), 3, 7)
        items = await self.pubsub.get_items(SERVICE, "news")
        self.assertEqual([i.item_id for i in items[:3]], ["item7", "item3", "item19"])
        times = [i.modified_at for i in items]
        self.assertEqual(times, sorted(set(times), reverse=True))

    async def test_publish_trims_to_max_items(self) -> None:
        await self.pubsub.create_node(SERVICE, "news", {}, OWNER)
        await self.publish(1, 2, 3, max_items=3)
        await self.publish(4, max_items=3)
        self.assertEqual(await self.ids(), ["item4", "item3", "item2"])
        # A replaced item is the newest: the oldest goes.
        await self.publish(2, 5, max_items=3)
        self.assertEqual(await self.ids(), ["item5", "item2", "item4"])
        # A lower limit trims more than one.
        await self.publish(6, max_items=1)
        self.assertEqual(await self.ids(), ["item6"])
        # With one item kept, publishing its id again replaces it.
        (first,) = await self.pubsub.get_items(SERVICE, "news")
        await self.publish(6, max_items=1)
        (again,) = await self.pubsub.get_items(SERVICE, "news")
        self.assertEqual(again.item_id, "item6")
        self.assertGreater(again.modified_at, first.modified_at)

    async def test_publish_without_max_items_keeps_every_item(self) -> None:
        await self.pubsub.create_node(SERVICE, "news", {}, OWNER)
        await self.publish(*range(15))
        self.assertEqual(await self.ids(), [f"item{n}" for n in reversed(range(15))])

    async def test_publish_items_as_one_publication_after_another(self) -> None:
        await self.pubsub.create_node(SERVICE, "news", {}, OWNER)
        await self.publish(1, 2)
        (old,) = await self.pubsub.get_items(SERVICE, "news", item_ids=["item1"])
        before = datetime.now(UTC)
        # item1 replaced (keeping its created_at), item5 given twice: the later one stays.
        replacement = PubSubItem("item5", "<entry xmlns='urn:example'>again</entry>", "bob@x/r")
        batch = [item(3), item(1), item(5), item(4), replacement]
        await self.pubsub.publish_items(SERVICE, "news", batch, None)
        after = datetime.now(UTC)
        items = await self.pubsub.get_items(SERVICE, "news")
        self.assertEqual([i.item_id for i in items], ["item5", "item4", "item1", "item3", "item2"])
        self.assertEqual((items[0].payload, items[0].publisher), (replacement.payload, "bob@x/r"))
        times = [i.modified_at for i in items]
        self.assertEqual(times, sorted(set(times), reverse=True))
        self.assertTrue(all(before <= t <= after for t in times[:4]))
        self.assertEqual(items[2].created_at, old.created_at)
        self.assertEqual(items[1].created_at, items[1].modified_at)
        await self.publish(6)
        self.assertEqual(await self.ids(max_items=1), ["item6"])

    async def test_publish_items_trims_once_to_max_items(self) -> None:
        await self.pubsub.create_node(SERVICE, "news", {}, OWNER)
        await self.publish(1, 2, max_items=3)
        await self.pubsub.publish_items(SERVICE, "news", [item(n) for n in (3, 4, 1)], 3)
        self.assertEqual(await self.ids(), ["item1", "item4", "item3"])
        await self.pubsub.publish_items(SERVICE, "news", [item(7), item(8)], 1)
        self.assertEqual(await self.ids(), ["item8"])
        await self.pubsub.publish_items(SERVICE, "news", [item(9), item(8)], 1)
        self.assertEqual(await self.ids(), ["item8"])
        await self.pubsub.publish_items(SERVICE, "news", [], 1)
        self.assertEqual(await self.ids(), ["item8"])

    async def test_get_items_limit_and_ids(self) -> None:
        await self.pubsub.create_node(SERVICE, "news", {}, OWNER)
        await self.publish(*range(6))
        self.assertEqual(await self.ids(max_items=2), ["item5", "item4"])
        self.assertEqual(await self.ids(max_items=0), [])
        self.assertEqual(await self.ids(max_items=100), [f"item{n}" for n in range(5, -1, -1)])
        self.assertEqual(
            await self.ids(item_ids=["item1", "missing", "item4", "item1"]), ["item4", "item1"]
        )
        self.assertEqual(
            await self.ids(item_ids=["item1", "item3", "item5"], max_items=2), ["item5", "item3"]
        )
        self.assertEqual(await self.ids(item_ids=["missing"]), [])
        self.assertEqual(await self.ids(item_ids=[]), [])
        many = [f"item{n}" for n in range(100)]
        self.assertEqual(await self.ids(item_ids=many), [f"item{n}" for n in range(5, -1, -1)])

    async def test_retract_item(self) -> None:
        await self.pubsub.create_node(SERVICE, "news", {}, OWNER)
        await self.publish(1, 2)
        self.assertTrue(await self.pubsub.retract_item(SERVICE, "news", "item1"))
        self.assertFalse(await self.pubsub.retract_item(SERVICE, "news", "item1"))
        self.assertFalse(await self.pubsub.retract_item(SERVICE, "news", "missing"))
        self.assertEqual(await self.ids(), ["item2"])

    async def test_purge_items(self) -> None:
        await self.pubsub.create_node(SERVICE, "news", {}, OWNER)
        await self.pubsub.create_node(SERVICE, "other", {}, OWNER)
        await self.publish(1, 2)
        await self.pubsub.publish_item(SERVICE, "other", item(3), None)
        await self.pubsub.purge_items(SERVICE, "news")
        await self.pubsub.purge_items(SERVICE, "news")
        self.assertEqual(await self.ids(), [])
        self.assertEqual(await self.ids(name="other"), ["item3"])
        self.assertIsNotNone(await self.pubsub.get_node(SERVICE, "news"))

    async def test_unicode_and_large_payloads(self) -> None:
        await self.pubsub.create_node(SERVICE, "news", {}, OWNER)
        payload = (
            "<entry xmlns='urn:example'>It's \"100% ?\" %s\n&lt;日本語&gt; 🎉"
            + "x" * 60000
            + "</entry>"
        )
        published = PubSubItem("ïtem 🎉 %s ?", payload, "jürgen@bücher.example/🎉")
        await self.pubsub.publish_item(SERVICE, "news", published, 1)
        (stored,) = await self.pubsub.get_items(SERVICE, "news", 1, ["ïtem 🎉 %s ?"])
        self.assertEqual(dataclasses.replace(stored, created_at=None, modified_at=None), published)
        self.assertEqual(await self.pubsub.get_items(SERVICE, "news", 1, ["ïtem 🎉 %s"]), [])

    async def test_unicode_services_and_node_names(self) -> None:
        await self.pubsub.create_node(
            "jürgen@bücher.example", "urn:日本語:🎉 %s ?", {}, "jürgen@bücher.example"
        )
        node = await self.pubsub.get_node("jürgen@bücher.example", "urn:日本語:🎉 %s ?")
        self.assertEqual(node.name, "urn:日本語:🎉 %s ?")

    async def test_services_with_the_same_node_name_are_apart(self) -> None:
        # The PubSub host and a PEP user each have a node "news".
        await self.pubsub.create_node(SERVICE, "news", {"on": "service"}, OWNER)
        await self.pubsub.create_node(PEP, "news", {"on": "pep"}, PEP)
        await self.pubsub.publish_item(SERVICE, "news", item(1), None)
        await self.pubsub.publish_item(PEP, "news", item(2), None)
        await self.pubsub.set_affiliation(PEP, "news", "bob@example.org", "member")
        await self.pubsub.add_subscription(PEP, "news", subscription("bob@example.org", "s"))
        self.assertEqual((await self.pubsub.get_node(PEP, "news")).config, {"on": "pep"})
        self.assertEqual(await self.ids(SERVICE), ["item1"])
        self.assertEqual(await self.ids(PEP), ["item2"])
        self.assertEqual(await self.pubsub.get_affiliations(SERVICE, "news"), {OWNER: "owner"})
        self.assertEqual(await self.pubsub.get_subscriptions(SERVICE, "news"), [])
        self.assertFalse(await self.pubsub.retract_item(SERVICE, "news", "item2"))
        await self.pubsub.purge_items(SERVICE, "news")
        self.assertEqual(await self.ids(PEP), ["item2"])
        await self.pubsub.delete_node(PEP, "news")
        self.assertEqual((await self.pubsub.get_node(SERVICE, "news")).config, {"on": "service"})
        await self.pubsub.publish_item(SERVICE, "news", item(3), None)
        self.assertEqual(await self.ids(SERVICE), ["item3"])
