"""What the SQLite and PostgreSQL backends share: their statements, transactions and stores.

Each statement is written once, with ``?`` placeholders and PostgreSQL's row locks (``FOR_UPDATE``);
each backend adapts the text to its database: postgres.py writes the placeholders as ``%s``, and
sqlite.py drops the row locks, which SQLite does without (see FOR_UPDATE). SQLite must be 3.35 or
later, for RETURNING.

A transaction is a generator that yields ``(statement, parameters)`` and is sent back the rows of
each statement (``[]`` for one that returns none); what it returns is the result. It may yield a
``Batch`` of statements instead, whose rows but the last one's it does not need; a
``Batch(..., last=True)`` ends the transaction (nothing follows it and it is sent back no rows),
so that PostgreSQL commits in the same round trip. A backend's
``Run`` function is given a function that makes the transaction, and executes it in a single
database transaction, rolled back if it raises, and returns a Deferred firing with its result: the
logic is written once, while SQLite runs it with blocking calls on adbapi's thread and PostgreSQL
on the reactor. A backend makes the transaction anew when it retries it after a lost connection or
a busy database.
"""

import functools
import json
from collections import defaultdict
from collections.abc import Callable, Generator, Iterable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Concatenate, ParamSpec, TypeVar

from twisted.internet.defer import Deferred
from zope.interface import implementer

from mim_twisted.storage.interfaces import (
    CREDENTIAL_MECHANISMS,
    AccountExists,
    AccountNotFound,
    IAccountStore,
    IBlockListStore,
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
    PubSubNode,
    PubSubSubscription,
    RosterItem,
    check_affiliation,
    check_subscription_state,
    fragment_size,
    next_modified_at,
    same_roster_item,
)

T = TypeVar("T")
P = ParamSpec("P")


@dataclass(frozen=True)
class Batch:
    """Statements a transaction yields together, run one after the other, of which it is sent
    back the last one's rows: PostgreSQL takes them in one round trip, the other backends run
    them in turn. Each statement still sees what the ones before it did. With ``last`` the
    transaction yields nothing after it and needs no rows back: PostgreSQL's COMMIT goes in the
    same round trip."""

    steps: tuple[tuple[str, tuple], ...]
    last: bool

    def __init__(self, *steps: tuple[str, tuple], last: bool = False) -> None:
        object.__setattr__(self, "steps", steps)
        object.__setattr__(self, "last", last)


Step = tuple[str, tuple] | Batch
Transaction = Generator[Step, list[tuple], T]


def steps(step: Step) -> tuple[tuple[str, tuple], ...]:
    """The ``(statement, parameters)`` of what a transaction yielded, in order."""
    return step.steps if isinstance(step, Batch) else (step,)


TransactionFactory = Callable[[], Transaction[T]]
# run(make_transaction, alone=False); ``alone``: the transaction is one statement (``statement``).
Run = Callable[..., Deferred[Any]]

# Appended to a SELECT of users rows, it locks them until the transaction ends, so that concurrent
# transactions on one account's data run one after the other. PostgreSQL runs transactions
# concurrently and needs it; SQLite has no row locks and no need of them, as the backend's single
# connection runs one transaction at a time.
FOR_UPDATE = " FOR UPDATE"

INSERT_ACCOUNT = (
    "INSERT INTO users (server, username, scram_sha1, scram_sha256) VALUES (?, ?, ?, ?)"
    " ON CONFLICT DO NOTHING RETURNING 1"
)
SELECT_CREDENTIALS = "SELECT scram_sha1, scram_sha256 FROM users WHERE server = ? AND username = ?"
UPDATE_CREDENTIALS = (
    "UPDATE users SET scram_sha1 = ?, scram_sha256 = ?"
    " WHERE server = ? AND username = ? RETURNING 1"
)
DELETE_ACCOUNT = "DELETE FROM users WHERE server = ? AND username = ? RETURNING 1"
# PEP nodes are keyed by their owner's bare JID, with no foreign key to the account.
DELETE_SERVICE_NODES = "DELETE FROM pubsub_nodes WHERE service = ?"
SELECT_NODE_NAMES = "SELECT name FROM pubsub_nodes WHERE service = ?"
SELECT_ACCOUNT = "SELECT 1 FROM users WHERE server = ? AND username = ?"
LOCK_ACCOUNT = SELECT_ACCOUNT + FOR_UPDATE
SELECT_USERNAMES = "SELECT username FROM users WHERE server = ?"

SELECT_ROSTER_VERSION = "SELECT roster_version FROM users WHERE server = ? AND username = ?"
LOCK_ROSTER_VERSION = SELECT_ROSTER_VERSION + FOR_UPDATE
INCREMENT_ROSTER_VERSION = (
    "UPDATE users SET roster_version = roster_version + 1"
    " WHERE server = ? AND username = ? RETURNING roster_version"
)
# One row per group of an item, and one with a NULL group for an item without groups.
SELECT_ROSTER_ITEMS = (
    "SELECT i.jid, i.name, i.subscription, i.ask, i.pending_in, i.pending_in_stanza, i.approved,"
    " i.in_roster, g.grp"
    " FROM roster_items AS i LEFT JOIN roster_groups AS g"
    " ON g.server = i.server AND g.username = i.username AND g.jid = i.jid"
    " WHERE i.server = ? AND i.username = ?"
)
SELECT_ROSTER_ITEM = SELECT_ROSTER_ITEMS + " AND i.jid = ?"
# The version and the items in one statement, so from one snapshot: the account's row, with a
# NULL item when it has none.
SELECT_ROSTER = (
    "SELECT u.roster_version, i.jid, i.name, i.subscription, i.ask, i.pending_in,"
    " i.pending_in_stanza, i.approved, i.in_roster, g.grp"
    " FROM users AS u LEFT JOIN roster_items AS i"
    " ON i.server = u.server AND i.username = u.username"
    " LEFT JOIN roster_groups AS g"
    " ON g.server = i.server AND g.username = i.username AND g.jid = i.jid"
    " WHERE u.server = ? AND u.username = ?"
)
INSERT_ROSTER_ITEM = (
    "INSERT INTO roster_items (server, username, jid, name, subscription, ask, pending_in,"
    " pending_in_stanza, approved, in_roster) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"
)
INSERT_ROSTER_GROUP = "INSERT INTO roster_groups (server, username, jid, grp) VALUES (?, ?, ?, ?)"
DELETE_ROSTER_ITEM = (
    "DELETE FROM roster_items WHERE server = ? AND username = ? AND jid = ? RETURNING 1"
)

INSERT_OFFLINE_MESSAGE = (
    "INSERT INTO offline_messages (server, username, sender, stanza, stored_at)"
    " VALUES (?, ?, ?, ?, ?)"
)
COUNT_OFFLINE_MESSAGES = "SELECT count(*) FROM offline_messages WHERE server = ? AND username = ?"
COUNT_ALL_OFFLINE_MESSAGES = "SELECT count(*) FROM offline_messages"
ANY_OFFLINE_MESSAGE = "SELECT 1 FROM offline_messages WHERE server = ? AND username = ? LIMIT 1"
DELETE_OFFLINE_MESSAGES = (
    "DELETE FROM offline_messages WHERE server = ? AND username = ?"
    " RETURNING id, sender, stanza, stored_at"
)

# Only for an existing account, whose row it locks (FOR UPDATE, as LOCK_ACCOUNT does): one
# statement, so one round trip on PostgreSQL.
UPSERT_LAST_ACTIVITY = (
    "INSERT INTO last_activity (server, username, logged_out_at, status)"
    " SELECT server, username, ?, ? FROM users WHERE server = ? AND username = ?"
    + FOR_UPDATE
    + " ON CONFLICT (server, username)"
    " DO UPDATE SET logged_out_at = excluded.logged_out_at, status = excluded.status"
)
SELECT_LAST_ACTIVITY = (
    "SELECT logged_out_at, status FROM last_activity WHERE server = ? AND username = ?"
)

SELECT_BLOCKED = "SELECT jid FROM block_list WHERE server = ? AND username = ?"
INSERT_BLOCKED = (
    "INSERT INTO block_list (server, username, jid) VALUES (?, ?, ?)"
    " ON CONFLICT DO NOTHING RETURNING jid"
)
DELETE_BLOCKED = (
    "DELETE FROM block_list WHERE server = ? AND username = ? AND jid = ? RETURNING jid"
)
DELETE_ALL_BLOCKED = "DELETE FROM block_list WHERE server = ? AND username = ? RETURNING jid"

SELECT_PRIVATE_SIZES = (
    "SELECT namespace, size FROM private_storage WHERE server = ? AND username = ?"
)
SELECT_PRIVATE_FRAGMENT = (
    "SELECT fragment FROM private_storage WHERE server = ? AND username = ? AND namespace = ?"
)
UPSERT_PRIVATE_FRAGMENT = (
    "INSERT INTO private_storage (server, username, namespace, fragment, size)"
    " VALUES (?, ?, ?, ?, ?) ON CONFLICT (server, username, namespace)"
    " DO UPDATE SET fragment = excluded.fragment, size = excluded.size"
)

SELECT_VCARD = "SELECT vcard FROM vcards WHERE server = ? AND username = ?"
UPSERT_VCARD = (
    "INSERT INTO vcards (server, username, vcard) VALUES (?, ?, ?)"
    " ON CONFLICT (server, username) DO UPDATE SET vcard = excluded.vcard"
)

INSERT_NODE = (
    "INSERT INTO pubsub_nodes (service, name, config, created_at) VALUES (?, ?, ?, ?)"
    " ON CONFLICT DO NOTHING RETURNING id"
)
SELECT_NODE = "SELECT config, created_at FROM pubsub_nodes WHERE service = ? AND name = ?"
SELECT_NODES = "SELECT name, config, created_at FROM pubsub_nodes WHERE service = ?"
LOCK_NODE = "SELECT id FROM pubsub_nodes WHERE service = ? AND name = ?" + FOR_UPDATE
NODE_ID = "(SELECT id FROM pubsub_nodes WHERE service = ? AND name = ?)"
UPDATE_NODE_CONFIG = "UPDATE pubsub_nodes SET config = ? WHERE service = ? AND name = ? RETURNING 1"
DELETE_NODE = "DELETE FROM pubsub_nodes WHERE service = ? AND name = ? RETURNING 1"

SELECT_AFFILIATIONS = (
    "SELECT a.jid, a.affiliation FROM pubsub_affiliations AS a"
    " JOIN pubsub_nodes AS n ON n.id = a.node_id WHERE n.service = ? AND n.name = ?"
)
SELECT_AFFILIATIONS_OF = (
    "SELECT n.name, a.affiliation FROM pubsub_affiliations AS a"
    " JOIN pubsub_nodes AS n ON n.id = a.node_id WHERE a.jid = ? AND n.service = ?"
)
UPSERT_AFFILIATION = (
    "INSERT INTO pubsub_affiliations (node_id, jid, affiliation) VALUES (?, ?, ?)"
    " ON CONFLICT (node_id, jid) DO UPDATE SET affiliation = excluded.affiliation"
)
DELETE_AFFILIATION = "DELETE FROM pubsub_affiliations WHERE node_id = ? AND jid = ?"

SELECT_SUBSCRIPTIONS = (
    "SELECT s.jid, s.subid, s.state, s.options FROM pubsub_subscriptions AS s"
    " JOIN pubsub_nodes AS n ON n.id = s.node_id WHERE n.service = ? AND n.name = ?"
    " ORDER BY s.seq"
)
# Both by the (jid_bare, jid) index: a bare JID's own subscriptions and its full JIDs', or one
# full JID's.
SELECT_SUBSCRIPTIONS_OF_BARE = (
    "SELECT n.name, s.jid, s.subid, s.state, s.options FROM pubsub_subscriptions AS s"
    " JOIN pubsub_nodes AS n ON n.id = s.node_id WHERE s.jid_bare = ? AND n.service = ?"
    " ORDER BY s.seq"
)
SELECT_SUBSCRIPTIONS_OF_FULL = (
    "SELECT n.name, s.jid, s.subid, s.state, s.options FROM pubsub_subscriptions AS s"
    " JOIN pubsub_nodes AS n ON n.id = s.node_id"
    " WHERE s.jid_bare = ? AND s.jid = ? AND n.service = ? ORDER BY s.seq"
)
UPSERT_SUBSCRIPTION = (
    "INSERT INTO pubsub_subscriptions (node_id, jid, jid_bare, subid, state, options)"
    " VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT (node_id, jid, subid)"
    " DO UPDATE SET state = excluded.state, options = excluded.options"
)
UPDATE_SUBSCRIPTION = (
    "UPDATE pubsub_subscriptions SET state = ?, options = ?"
    " WHERE node_id = ? AND jid = ? AND subid = ? RETURNING 1"
)
DELETE_SUBSCRIPTION = (
    f"DELETE FROM pubsub_subscriptions WHERE node_id = {NODE_ID} AND jid = ? AND subid = ?"
    " RETURNING 1"
)

# After LOCK_NODE in one batch: a statement of its own, so that under READ COMMITTED it reads
# the items as they are once the lock is held (a publication that held it before is committed).
NODE_AND_NEWEST_MODIFIED_AT = (
    "SELECT n.id, (SELECT max(i.modified_at) FROM pubsub_items AS i WHERE i.node_id = n.id)"
    " FROM pubsub_nodes AS n WHERE n.service = ? AND n.name = ?"
)
UPSERT_ITEM = (
    "INSERT INTO pubsub_items (node_id, item_id, payload, publisher, created_at, modified_at)"
    " VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT (node_id, item_id) DO UPDATE SET"
    " payload = excluded.payload, publisher = excluded.publisher,"
    " modified_at = excluded.modified_at"
)
TRIM_ITEMS = (
    "DELETE FROM pubsub_items WHERE node_id = ? AND item_id NOT IN"
    " (SELECT item_id FROM pubsub_items WHERE node_id = ? ORDER BY modified_at DESC LIMIT ?)"
)
# TRIM_ITEMS for max_items 1 (PEP's default): the item just written is the newest.
TRIM_ITEMS_BUT = "DELETE FROM pubsub_items WHERE node_id = ? AND item_id <> ?"
SELECT_ITEMS = (
    "SELECT i.item_id, i.payload, i.publisher, i.created_at, i.modified_at"
    " FROM pubsub_items AS i JOIN pubsub_nodes AS n ON n.id = i.node_id"
    " WHERE n.service = ? AND n.name = ?"
)
NEWEST_FIRST = " ORDER BY i.modified_at DESC"
DELETE_ITEM = f"DELETE FROM pubsub_items WHERE node_id = {NODE_ID} AND item_id = ? RETURNING 1"
DELETE_ITEMS = "DELETE FROM pubsub_items WHERE node_id = ?"


class _SQLStore:
    """A store whose methods are transactions (see ``transaction``), executed by ``run``."""

    def __init__(self, run: Run) -> None:
        self._run = run


S = TypeVar("S", bound=_SQLStore)


def transaction(
    method: Callable[Concatenate[S, P], Transaction[T]],
) -> Callable[Concatenate[S, P], Deferred[T]]:
    """Make a store's generator method a method that runs it as one transaction."""

    @functools.wraps(method)
    def run(self: S, *args: P.args, **kwargs: P.kwargs) -> Deferred[T]:
        return self._run(functools.partial(method, self, *args, **kwargs))

    return run


def statement(
    method: Callable[Concatenate[S, P], Transaction[T]],
) -> Callable[Concatenate[S, P], Deferred[T]]:
    """As ``transaction``, for a transaction of one statement: a backend may send it alone,
    committed as it ends (PostgreSQL: one round trip, without BEGIN and COMMIT)."""

    @functools.wraps(method)
    def run(self: S, *args: P.args, **kwargs: P.kwargs) -> Deferred[T]:
        return self._run(functools.partial(method, self, *args, **kwargs), alone=True)

    return run


@implementer(IAccountStore)
class SQLAccountStore(_SQLStore):
    @transaction
    def create_account(
        self, domain: str, username: str, credentials: Mapping[str, str]
    ) -> Transaction[None]:
        secrets = (credentials[m] for m in CREDENTIAL_MECHANISMS)
        if not (yield INSERT_ACCOUNT, (domain, username, *secrets)):
            raise AccountExists(f"{username}@{domain}")

    @transaction
    def get_credentials(self, domain: str, username: str) -> Transaction[dict[str, str] | None]:
        rows = yield SELECT_CREDENTIALS, (domain, username)
        return dict(zip(CREDENTIAL_MECHANISMS, rows[0], strict=True)) if rows else None

    @transaction
    def set_credentials(
        self, domain: str, username: str, credentials: Mapping[str, str]
    ) -> Transaction[None]:
        secrets = (credentials[m] for m in CREDENTIAL_MECHANISMS)
        if not (yield UPDATE_CREDENTIALS, (*secrets, domain, username)):
            raise AccountNotFound(f"{username}@{domain}")

    @transaction
    def remove_account(self, domain: str, username: str) -> Transaction[None]:
        # The account's roster and offline messages go with it: ON DELETE CASCADE; its PEP
        # nodes (with their items, affiliations and subscriptions) are deleted here.
        if not (yield DELETE_ACCOUNT, (domain, username)):
            raise AccountNotFound(f"{username}@{domain}")
        service = f"{username}@{domain}"
        names = yield SELECT_NODE_NAMES, (service,)
        if names:
            # In name order, as a PostgreSQL transaction of several publications locks them
            # (postgres.py): the delete alone takes them in the order of its scan, and the two
            # would wait for each other.
            yield Batch(*((LOCK_NODE, (service, name)) for (name,) in sorted(names)))
        yield DELETE_SERVICE_NODES, (service,)

    @transaction
    def account_exists(self, domain: str, username: str) -> Transaction[bool]:
        return bool((yield SELECT_ACCOUNT, (domain, username)))

    @transaction
    def list_accounts(self, domain: str) -> Transaction[list[str]]:
        # Sorted here, not by ORDER BY, whose order depends on the database's collation.
        rows = yield SELECT_USERNAMES, (domain,)
        return sorted(username for (username,) in rows)


def _roster_items(rows: list[tuple]) -> list[RosterItem]:
    """The items in rows of SELECT_ROSTER_ITEMS, sorted by jid."""
    columns = {}
    groups = defaultdict(list)
    for jid, *item, group in rows:
        columns[jid] = item
        if group is not None:
            groups[jid].append(group)
    return [
        RosterItem(
            jid=jid,
            name=name,
            groups=tuple(sorted(groups[jid])),
            subscription=subscription,
            # SQLite has no boolean type and gives 0 or 1.
            ask=bool(ask),
            pending_in=bool(pending_in),
            pending_in_stanza=pending_in_stanza,
            approved=bool(approved),
            in_roster=bool(in_roster),
        )
        # Sorted here, not by ORDER BY, whose order depends on the database's collation.
        for jid, (name, subscription, ask, pending_in, pending_in_stanza, approved, in_roster) in (
            sorted(columns.items())
        )
    ]


def _increment_roster_version(domain: str, username: str) -> Transaction[int]:
    rows = yield INCREMENT_ROSTER_VERSION, (domain, username)
    if not rows:
        raise AccountNotFound(f"{username}@{domain}")
    return rows[0][0]


def _write_roster_item(domain: str, username: str, item: RosterItem) -> Transaction[int]:
    version = yield from _increment_roster_version(domain, username)
    # Replacing the item replaces its groups: they are deleted with it (ON DELETE CASCADE).
    yield DELETE_ROSTER_ITEM, (domain, username, item.jid)
    row = (
        domain,
        username,
        item.jid,
        item.name,
        item.subscription,
        item.ask,
        item.pending_in,
        item.pending_in_stanza,
        item.approved,
        item.in_roster,
    )
    yield INSERT_ROSTER_ITEM, row
    for group in set(item.groups):
        yield INSERT_ROSTER_GROUP, (domain, username, item.jid, group)
    return version


@implementer(IRosterStore)
class SQLRosterStore(_SQLStore):
    """The roster version is the account's ``users.roster_version``.

    Every change updates or locks that row first, so that in PostgreSQL concurrent changes to one
    roster are applied, and numbered, one after the other.
    """

    @transaction
    def get_roster(self, domain: str, username: str) -> Transaction[tuple[int, list[RosterItem]]]:
        # One statement: the items are those of the version, which a client caches them under.
        rows = yield SELECT_ROSTER, (domain, username)
        version = rows[0][0] if rows else 0
        return version, _roster_items([row[1:] for row in rows if row[1] is not None])

    @transaction
    def get_item(self, domain: str, username: str, jid: str) -> Transaction[RosterItem | None]:
        items = _roster_items((yield SELECT_ROSTER_ITEM, (domain, username, jid)))
        return items[0] if items else None

    @transaction
    def put_item(self, domain: str, username: str, item: RosterItem) -> Transaction[int]:
        return (yield from _write_roster_item(domain, username, item))

    @transaction
    def replace_item(
        self,
        domain: str,
        username: str,
        jid: str,
        expected: RosterItem | None,
        item: RosterItem | None,
    ) -> Transaction[int | None]:
        rows = yield LOCK_ROSTER_VERSION, (domain, username)
        if not rows:
            raise AccountNotFound(f"{username}@{domain}")
        stored = _roster_items((yield SELECT_ROSTER_ITEM, (domain, username, jid)))
        if not same_roster_item(stored[0] if stored else None, expected):
            return None
        if item is not None:
            return (yield from _write_roster_item(domain, username, item))
        if not stored:
            return rows[0][0]  # nothing to remove, so the version stays
        yield DELETE_ROSTER_ITEM, (domain, username, jid)
        return (yield from _increment_roster_version(domain, username))

    @transaction
    def remove_item(self, domain: str, username: str, jid: str) -> Transaction[int]:
        rows = yield LOCK_ROSTER_VERSION, (domain, username)
        if not rows:
            raise AccountNotFound(f"{username}@{domain}")
        if not (yield DELETE_ROSTER_ITEM, (domain, username, jid)):
            return rows[0][0]  # nothing changed, so neither does the version
        return (yield from _increment_roster_version(domain, username))


def _utc_text(moment: datetime) -> str:
    # Text, as SQLite has no time type: SQLite keeps it as it is (its date functions read it) and
    # PostgreSQL parses it into its TIMESTAMPTZ, so both store the instant with its microseconds.
    return moment.astimezone(UTC).isoformat(sep=" ", timespec="microseconds")


def _utc_datetime(stored: datetime | str) -> datetime:
    # psycopg2 gives a datetime in the session's time zone, SQLite the text of _utc_text.
    moment = datetime.fromisoformat(stored) if isinstance(stored, str) else stored
    return moment.astimezone(UTC)


@implementer(IOfflineStore)
class SQLOfflineStore(_SQLStore):
    @transaction
    def store(
        self, domain: str, username: str, message: OfflineMessage, limit: int
    ) -> Transaction[bool]:
        # Under the lock, concurrent stores for one user count one after the other: none passes
        # the limit.
        if not (yield LOCK_ACCOUNT, (domain, username)):
            raise AccountNotFound(f"{username}@{domain}")
        rows = yield COUNT_OFFLINE_MESSAGES, (domain, username)
        if rows[0][0] >= limit:
            return False
        row = (domain, username, message.sender, message.stanza, _utc_text(message.stored_at))
        yield INSERT_OFFLINE_MESSAGE, row
        return True

    @transaction
    def pop_all(self, domain: str, username: str) -> Transaction[list[OfflineMessage]]:
        # Most logins find none: a read, without the lock and the DELETE (on PostgreSQL no
        # transaction at all). A store not yet committed is as one that comes just after.
        if not (yield ANY_OFFLINE_MESSAGE, (domain, username)):
            return []
        # Under the lock, a store waiting for it counts after the messages are gone.
        yield LOCK_ACCOUNT, (domain, username)
        rows = yield DELETE_OFFLINE_MESSAGES, (domain, username)
        # RETURNING gives the rows in no particular order; the ids grow with each message.
        return [
            OfflineMessage(sender=sender, stanza=stanza, stored_at=_utc_datetime(stored_at))
            for _, sender, stanza, stored_at in sorted(rows, key=lambda row: row[0])
        ]

    @transaction
    def count(self, domain: str, username: str) -> Transaction[int]:
        rows = yield COUNT_OFFLINE_MESSAGES, (domain, username)
        return rows[0][0]

    @transaction
    def count_all(self) -> Transaction[int]:
        rows = yield COUNT_ALL_OFFLINE_MESSAGES, ()
        return rows[0][0]


@implementer(ILastActivityStore)
class SQLLastActivityStore(_SQLStore):
    @statement
    def set_last_activity(
        self, domain: str, username: str, activity: LastActivity
    ) -> Transaction[None]:
        yield UPSERT_LAST_ACTIVITY, (activity.logged_out_at, activity.status, domain, username)

    @transaction
    def get_last_activity(self, domain: str, username: str) -> Transaction[LastActivity | None]:
        rows = yield SELECT_LAST_ACTIVITY, (domain, username)
        return LastActivity(int(rows[0][0]), rows[0][1]) if rows else None


@implementer(IBlockListStore)
class SQLBlockListStore(_SQLStore):
    # Sorted here, not by ORDER BY, whose order depends on the database's collation.

    @transaction
    def get_block_list(self, domain: str, username: str) -> Transaction[list[str]]:
        rows = yield SELECT_BLOCKED, (domain, username)
        return sorted(jid for (jid,) in rows)

    @transaction
    def block(self, domain: str, username: str, jids: Iterable[str]) -> Transaction[list[str]]:
        if not (yield LOCK_ACCOUNT, (domain, username)):
            raise AccountNotFound(f"{username}@{domain}")
        added = []
        for jid in sorted(set(jids)):
            if (yield INSERT_BLOCKED, (domain, username, jid)):
                added.append(jid)
        return added

    @transaction
    def unblock(self, domain: str, username: str, jids: Iterable[str]) -> Transaction[list[str]]:
        removed = []
        for jid in sorted(set(jids)):
            if (yield DELETE_BLOCKED, (domain, username, jid)):
                removed.append(jid)
        return removed

    @transaction
    def unblock_all(self, domain: str, username: str) -> Transaction[list[str]]:
        rows = yield DELETE_ALL_BLOCKED, (domain, username)
        return sorted(jid for (jid,) in rows)


@implementer(IPrivateStore)
class SQLPrivateStore(_SQLStore):
    @transaction
    def get_fragments(
        self, domain: str, username: str, namespaces: Iterable[str]
    ) -> Transaction[dict[str, str]]:
        fragments = {}
        for namespace in namespaces:
            rows = yield SELECT_PRIVATE_FRAGMENT, (domain, username, namespace)
            if rows:
                fragments[namespace] = rows[0][0]
        return fragments

    @transaction
    def set_fragments(
        self, domain: str, username: str, fragments: Mapping[str, str], limit: int
    ) -> Transaction[bool]:
        # Under the account's lock, concurrent stores add up one after the other: none passes
        # the limit.
        if not (yield LOCK_ACCOUNT, (domain, username)):
            raise AccountNotFound(f"{username}@{domain}")
        sizes = dict((yield SELECT_PRIVATE_SIZES, (domain, username)))
        sizes.update((namespace, fragment_size(text)) for namespace, text in fragments.items())
        if sum(sizes.values()) > limit:
            return False
        for namespace, text in fragments.items():
            row = (domain, username, namespace, text, sizes[namespace])
            yield UPSERT_PRIVATE_FRAGMENT, row
        return True


@implementer(IVCardStore)
class SQLVCardStore(_SQLStore):
    @transaction
    def get_vcard(self, domain: str, username: str) -> Transaction[str | None]:
        rows = yield SELECT_VCARD, (domain, username)
        return rows[0][0] if rows else None

    @transaction
    def set_vcard(self, domain: str, username: str, vcard: str) -> Transaction[None]:
        # Locked, so that a removal of the account cannot slip in before the insert.
        if not (yield LOCK_ACCOUNT, (domain, username)):
            raise AccountNotFound(f"{username}@{domain}")
        yield UPSERT_VCARD, (domain, username, vcard)


def _bare(jid: str) -> str:
    # A domainpart or localpart never contains "/": the first one starts the resource.
    return jid.partition("/")[0]


def _placeholders(count: int) -> str:
    """``count`` placeholders for an IN list, rounded up to a power of two (the caller repeats
    a value to fill them): a few statement texts serve every count, which keeps the drivers'
    statement caches and postgres.py's translation cache small."""
    return ", ".join("?" * (1 << (count - 1).bit_length()))


def _subscription(jid: str, subid: str, state: str, options: str) -> PubSubSubscription:
    return PubSubSubscription(jid=jid, subid=subid, state=state, options=json.loads(options))


def _lock_node(service: str, name: str) -> Transaction[int]:
    """The node's id, its row locked; NodeNotFound if there is no such node."""
    rows = yield LOCK_NODE, (service, name)
    if not rows:
        raise NodeNotFound(f"{service} {name}")
    return rows[0][0]


@implementer(IPubSubStore)
class SQLPubSubStore(_SQLStore):
    """Writes to a node first lock its row (LOCK_NODE): in PostgreSQL concurrent writes to one
    node then run one after the other, so that trimming and the growth of modified_at see every
    earlier publication, and a write that follows a delete_node finds the node gone
    (NodeNotFound) rather than violating a foreign key."""

    @transaction
    def create_node(
        self, service: str, name: str, config: Mapping[str, Any], owner: str
    ) -> Transaction[None]:
        # ON CONFLICT, not a check first: of concurrent creations exactly one inserts.
        now = _utc_text(datetime.now(UTC))
        rows = yield INSERT_NODE, (service, name, json.dumps(config), now)
        if not rows:
            raise NodeExists(f"{service} {name}")
        yield UPSERT_AFFILIATION, (rows[0][0], owner, "owner")

    @transaction
    def get_node(self, service: str, name: str) -> Transaction[PubSubNode | None]:
        rows = yield SELECT_NODE, (service, name)
        if not rows:
            return None
        ((config, created_at),) = rows
        return PubSubNode(service, name, json.loads(config), _utc_datetime(created_at))

    @transaction
    def list_nodes(self, service: str) -> Transaction[list[PubSubNode]]:
        rows = yield SELECT_NODES, (service,)
        # Sorted here, not by ORDER BY, whose order depends on the database's collation.
        return [
            PubSubNode(service, name, json.loads(config), _utc_datetime(created_at))
            for name, config, created_at in sorted(rows)
        ]

    @transaction
    def set_node_config(
        self, service: str, name: str, config: Mapping[str, Any]
    ) -> Transaction[None]:
        if not (yield UPDATE_NODE_CONFIG, (json.dumps(config), service, name)):
            raise NodeNotFound(f"{service} {name}")

    @transaction
    def delete_node(self, service: str, name: str) -> Transaction[None]:
        # Items, affiliations and subscriptions go with it: ON DELETE CASCADE.
        if not (yield DELETE_NODE, (service, name)):
            raise NodeNotFound(f"{service} {name}")

    @transaction
    def get_affiliations(self, service: str, name: str) -> Transaction[dict[str, str]]:
        return dict((yield SELECT_AFFILIATIONS, (service, name)))

    @transaction
    def set_affiliation(
        self, service: str, name: str, jid: str, affiliation: str
    ) -> Transaction[None]:
        check_affiliation(affiliation)
        node_id = yield from _lock_node(service, name)
        if affiliation == "none":
            yield DELETE_AFFILIATION, (node_id, jid)
        else:
            yield UPSERT_AFFILIATION, (node_id, jid, affiliation)

    @transaction
    def affiliations_of(self, service: str, jid: str) -> Transaction[dict[str, str]]:
        return dict(sorted((yield SELECT_AFFILIATIONS_OF, (jid, service))))

    @transaction
    def get_subscriptions(self, service: str, name: str) -> Transaction[list[PubSubSubscription]]:
        rows = yield SELECT_SUBSCRIPTIONS, (service, name)
        return [_subscription(*row) for row in rows]

    @transaction
    def subscriptions_of(
        self, service: str, jid: str
    ) -> Transaction[list[tuple[str, PubSubSubscription]]]:
        if "/" in jid:
            rows = yield SELECT_SUBSCRIPTIONS_OF_FULL, (_bare(jid), jid, service)
        else:
            rows = yield SELECT_SUBSCRIPTIONS_OF_BARE, (jid, service)
        # By node name here (a stable sort keeps each node's seq order), not by ORDER BY, whose
        # order depends on the database's collation.
        return sorted(
            ((name, _subscription(*subscription)) for name, *subscription in rows),
            key=lambda pair: pair[0],
        )

    @transaction
    def add_subscription(
        self, service: str, name: str, subscription: PubSubSubscription
    ) -> Transaction[None]:
        check_subscription_state(subscription.state)
        node_id = yield from _lock_node(service, name)
        row = (
            node_id,
            subscription.jid,
            _bare(subscription.jid),
            subscription.subid,
            subscription.state,
            json.dumps(subscription.options),
        )
        yield UPSERT_SUBSCRIPTION, row

    @transaction
    def update_subscription(
        self, service: str, name: str, subscription: PubSubSubscription
    ) -> Transaction[bool]:
        check_subscription_state(subscription.state)
        node_id = yield from _lock_node(service, name)
        options = json.dumps(subscription.options)
        row = (subscription.state, options, node_id, subscription.jid, subscription.subid)
        return bool((yield UPDATE_SUBSCRIPTION, row))

    @transaction
    def remove_subscription(
        self, service: str, name: str, jid: str, subid: str
    ) -> Transaction[bool]:
        return bool((yield DELETE_SUBSCRIPTION, (service, name, jid, subid)))

    def publish_item(
        self, service: str, name: str, item: PubSubItem, max_items: int | None
    ) -> Deferred[None]:
        return self.publish_items(service, name, [item], max_items)

    @transaction
    def publish_items(
        self, service: str, name: str, items: Iterable[PubSubItem], max_items: int | None
    ) -> Transaction[None]:
        # Two round trips on PostgreSQL for any number of items: BEGIN and one node lock, then
        # the upserts, one trim and COMMIT.
        items = list(items)
        rows = yield Batch(
            (LOCK_NODE, (service, name)), (NODE_AND_NEWEST_MODIFIED_AT, (service, name))
        )
        if not rows:
            raise NodeNotFound(f"{service} {name}")
        ((node_id, newest),) = rows
        if not items:
            return
        now = datetime.now(UTC)
        modified_at = None if newest is None else _utc_datetime(newest)
        upserts = []
        for item in items:
            # Each a microsecond after the one before at least: their order is the given one.
            modified_at = next_modified_at(now, modified_at)
            stamp = _utc_text(modified_at)
            upserts.append(
                (UPSERT_ITEM, (node_id, item.item_id, item.payload, item.publisher, stamp, stamp))
            )
        if max_items == 1:
            upserts.append((TRIM_ITEMS_BUT, (node_id, items[-1].item_id)))
        elif max_items is not None:
            upserts.append((TRIM_ITEMS, (node_id, node_id, max_items)))
        yield Batch(*upserts, last=True)

    @transaction
    def get_items(
        self,
        service: str,
        name: str,
        max_items: int | None = None,
        item_ids: Iterable[str] | None = None,
    ) -> Transaction[list[PubSubItem]]:
        statement, parameters = SELECT_ITEMS, (service, name)
        if item_ids is not None:
            ids = list(item_ids)
            if not ids:
                return []
            placeholders = _placeholders(len(ids))
            ids += ids[-1:] * (placeholders.count("?") - len(ids))
            statement += f" AND i.item_id IN ({placeholders})"
            parameters += tuple(ids)
        statement += NEWEST_FIRST
        if max_items is not None:
            statement += " LIMIT ?"
            parameters += (max_items,)
        rows = yield statement, parameters
        return [
            PubSubItem(
                item_id=item_id,
                payload=payload,
                publisher=publisher,
                created_at=_utc_datetime(created_at),
                modified_at=_utc_datetime(modified_at),
            )
            for item_id, payload, publisher, created_at, modified_at in rows
        ]

    @transaction
    def retract_item(self, service: str, name: str, item_id: str) -> Transaction[bool]:
        return bool((yield DELETE_ITEM, (service, name, item_id)))

    @transaction
    def purge_items(self, service: str, name: str) -> Transaction[None]:
        node_id = yield from _lock_node(service, name)
        yield DELETE_ITEMS, (node_id,)


class SQLStores:
    """Every store of a SQL database, each running its transactions through the backend's
    ``run``: one list for the three backends, so that a new store is added once. A backend
    with a store of its own names its class (``pubsub_store``)."""

    pubsub_store: type[SQLPubSubStore] = SQLPubSubStore

    def __init__(self, run: Run) -> None:
        self.accounts = SQLAccountStore(run)
        self.rosters = SQLRosterStore(run)
        self.offline = SQLOfflineStore(run)
        self.pubsub = self.pubsub_store(run)
        self.last_activity = SQLLastActivityStore(run)
        self.block_lists = SQLBlockListStore(run)
        self.private = SQLPrivateStore(run)
        self.vcards = SQLVCardStore(run)
