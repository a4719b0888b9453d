"""What the SQLite and PostgreSQL backends share: their statements, transactions and stores.

Each statement is written once, with ``?`` placeholders and PostgreSQL's row locks (``FOR_UPDATE``);
each backend adapts the text to its database: postgres.py writes the placeholders as ``%s``, and
sqlite.py drops the row locks, which SQLite does without (see FOR_UPDATE). SQLite must be 3.35 or
later, for RETURNING.

A transaction is a generator that yields ``(statement, parameters)`` and is sent back the rows of
each statement (``[]`` for one that returns none); what it returns is the result. A backend's
``Run`` function executes one in a single database transaction, rolled back if it raises, and
returns a Deferred firing with its result: the logic is written once, while SQLite runs it with
blocking calls on adbapi's thread and PostgreSQL on the reactor.
"""

import functools
from collections import defaultdict
from collections.abc import Callable, Generator, Mapping
from datetime import UTC, datetime
from typing import Any, Concatenate, ParamSpec, TypeVar

from twisted.internet.defer import Deferred
from zope.interface import implementer

from mim_twisted.storage.interfaces import (
    CREDENTIAL_MECHANISMS,
    AccountExists,
    AccountNotFound,
    IAccountStore,
    IOfflineStore,
    IRosterStore,
    OfflineMessage,
    RosterItem,
)

T = TypeVar("T")
P = ParamSpec("P")

Transaction = Generator[tuple[str, tuple], list[tuple], T]
Run = Callable[[Transaction[Any]], Deferred[Any]]

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
DELETE_OFFLINE_MESSAGES = (
    "DELETE FROM offline_messages WHERE server = ? AND username = ?"
    " RETURNING id, sender, stanza, stored_at"
)


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
        return self._run(method(self, *args, **kwargs))

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
        # The account's roster and offline messages go with it: ON DELETE CASCADE.
        if not (yield DELETE_ACCOUNT, (domain, username)):
            raise AccountNotFound(f"{username}@{domain}")

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


@implementer(IRosterStore)
class SQLRosterStore(_SQLStore):
    """The roster version is the account's ``users.roster_version``.

    Every change updates or locks that row first, so that in PostgreSQL concurrent changes to one
    roster are applied, and numbered, one after the other.
    """

    @transaction
    def get_roster(self, domain: str, username: str) -> Transaction[tuple[int, list[RosterItem]]]:
        # The version is read first: in PostgreSQL each statement sees what was committed before
        # it began, so the items may be newer than the version, never older, and a client that
        # caches them under this version misses no change.
        rows = yield SELECT_ROSTER_VERSION, (domain, username)
        version = rows[0][0] if rows else 0
        return version, _roster_items((yield SELECT_ROSTER_ITEMS, (domain, username)))

    @transaction
    def get_item(self, domain: str, username: str, jid: str) -> Transaction[RosterItem | None]:
        items = _roster_items((yield SELECT_ROSTER_ITEM, (domain, username, jid)))
        return items[0] if items else None

    @transaction
    def put_item(self, domain: str, username: str, item: RosterItem) -> Transaction[int]:
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
