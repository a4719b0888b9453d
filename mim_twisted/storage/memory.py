"""Storage in dictionaries, for tests: the behaviour of the SQL backends without a database."""

from collections.abc import Mapping

from twisted.internet.defer import Deferred, fail, succeed
from zope.interface import implementer

from mim_twisted.storage import migrations
from mim_twisted.storage.interfaces import (
    AccountExists,
    AccountNotFound,
    IAccountStore,
    IDatabase,
)


@implementer(IAccountStore)
class MemoryAccountStore:
    def __init__(self) -> None:
        # Copies go in and out, so a caller mutating a mapping cannot change what is stored.
        self._credentials: dict[tuple[str, str], dict[str, str]] = {}

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
        return succeed(None)

    def account_exists(self, domain: str, username: str) -> Deferred[bool]:
        return succeed((domain, username) in self._credentials)

    def list_accounts(self, domain: str) -> Deferred[list[str]]:
        return succeed(sorted(user for server, user in self._credentials if server == domain))


@implementer(IDatabase)
class MemoryDatabase:
    """A database that is born at the newest schema version, so migrating it changes nothing."""

    def __init__(self) -> None:
        self.accounts = MemoryAccountStore()

    def schema_version(self) -> Deferred[int]:
        return succeed(migrations.newest_version())

    def migrate(self) -> Deferred[int]:
        return succeed(migrations.newest_version())

    def close(self) -> Deferred[None]:
        return succeed(None)
