"""Storage in dictionaries, for tests: the behaviour of the SQL backends without a database."""

from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from datetime import UTC
from typing import Any

from twisted.internet.defer import Deferred, fail, succeed
from zope.interface import implementer

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


@implementer(IAccountStore)
class MemoryAccountStore:
    def __init__(self) -> None:
        # Copies go in and out, so a caller mutating a mapping cannot change what is stored.
        self._credentials: dict[tuple[str, str], dict[str, str]] = {}
        # Other stores' data, keyed like _credentials and removed with the account, as ON DELETE
        # CASCADE removes it in SQL.
        self._dependent_data: list[dict[tuple[str, str], Any]] = []

    def is_registered(self, domain: str, username: str) -> bool:
        """Whether the account exists, for the other stores: they keep data only for accounts."""
        return (domain, username) in self._credentials

    def remove_with_account(self, data: dict[tuple[str, str], Any]) -> None:
        """Have the entries of ``data`` removed with the account they are keyed by."""
        self._dependent_data.append(data)

    def create_account(
        self, domain: str, username: str, credentials: Mapping[str, str]
    ) -> Deferred[None]:
        if (domain, username) in self._credentials:
            return fail(AccountExists(f"{username}@{domain}"))
        self._credentials[domain, username] = dict(credentials)
        return succeed(None)

    def get_credentials(self, domain: str, username: str) -> Deferred[dict[str, str] | None]:
        credentials = self._credentials.get((domain, username))
        return succeed(None if credentials is None else dict(credentials))

    def set_credentials(
        self, domain: str, username: str, credentials: Mapping[str, str]
    ) -> Deferred[None]:
        if (domain, username) not in self._credentials:
            return fail(AccountNotFound(f"{username}@{domain}"))
        self._credentials[domain, username] = dict(credentials)
        return succeed(None)

    def remove_account(self, domain: str, username: str) -> Deferred[None]:
        if self._credentials.pop((domain, username), None) is None:
            return fail(AccountNotFound(f"{username}@{domain}"))
        for data in self._dependent_data:
            data.pop((domain, username), None)
        return succeed(None)

    def account_exists(self, domain: str, username: str) -> Deferred[bool]:
        return succeed((domain, username) in self._credentials)

    def list_accounts(self, domain: str) -> Deferred[list[str]]:
        return succeed(sorted(user for server, user in self._credentials if server == domain))


@dataclass
class _Roster:
    version: int = 0
    items: dict[str, RosterItem] = field(default_factory=dict)


@implementer(IRosterStore)
class MemoryRosterStore:
    def __init__(self, accounts: MemoryAccountStore) -> None:
        self._accounts = accounts
        self._rosters: dict[tuple[str, str], _Roster] = {}
        accounts.remove_with_account(self._rosters)

    def get_roster(self, domain: str, username: str) -> Deferred[tuple[int, list[RosterItem]]]:
        roster = self._rosters.get((domain, username), _Roster())
        return succeed((roster.version, [roster.items[jid] for jid in sorted(roster.items)]))

    def get_item(self, domain: str, username: str, jid: str) -> Deferred[RosterItem | None]:
        roster = self._rosters.get((domain, username), _Roster())
        return succeed(roster.items.get(jid))

    def put_item(self, domain: str, username: str, item: RosterItem) -> Deferred[int]:
        if not self._accounts.is_registered(domain, username):
            return fail(AccountNotFound(f"{username}@{domain}"))
        roster = self._rosters.setdefault((domain, username), _Roster())
        roster.items[item.jid] = replace(item, groups=tuple(sorted(set(item.groups))))
        roster.version += 1
        return succeed(roster.version)

    def remove_item(self, domain: str, username: str, jid: str) -> Deferred[int]:
        if not self._accounts.is_registered(domain, username):
            return fail(AccountNotFound(f"{username}@{domain}"))
        roster = self._rosters.setdefault((domain, username), _Roster())
        if roster.items.pop(jid, None) is not None:
            roster.version += 1
        return succeed(roster.version)


@implementer(IOfflineStore)
class MemoryOfflineStore:
    def __init__(self, accounts: MemoryAccountStore) -> None:
        self._accounts = accounts
        self._messages: dict[tuple[str, str], list[OfflineMessage]] = {}
        accounts.remove_with_account(self._messages)

    def store(
        self, domain: str, username: str, message: OfflineMessage, limit: int
    ) -> Deferred[bool]:
        if not self._accounts.is_registered(domain, username):
            return fail(AccountNotFound(f"{username}@{domain}"))
        messages = self._messages.setdefault((domain, username), [])
        if len(messages) >= limit:
            return succeed(False)
        messages.append(replace(message, stored_at=message.stored_at.astimezone(UTC)))
        return succeed(True)

    def pop_all(self, domain: str, username: str) -> Deferred[list[OfflineMessage]]:
        return succeed(self._messages.pop((domain, username), []))

    def count(self, domain: str, username: str) -> Deferred[int]:
        return succeed(len(self._messages.get((domain, username), [])))


@implementer(IDatabase)
class MemoryDatabase:
    """A database that is born at the newest schema version, so migrating it changes nothing."""

    def __init__(self) -> None:
        self.accounts = MemoryAccountStore()
        self.rosters = MemoryRosterStore(self.accounts)
        self.offline = MemoryOfflineStore(self.accounts)

    def schema_version(self) -> Deferred[int]:
        return succeed(migrations.newest_version())

    def migrate(self) -> Deferred[int]:
        return succeed(migrations.newest_version())

    def close(self) -> Deferred[None]:
        return succeed(None)
