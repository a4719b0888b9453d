"""The stored credentials of accounts that logged in lately, kept in memory in front of the
account store, so that a login does not read the database.

`CredentialCache` is an IAccountStore: `get_credentials` of an account it holds is answered from
memory, everything else goes to the store. It holds what the store answered for an existing
account (an unknown account is asked about every time), for at most `max_age` seconds and for
at most `max_accounts` accounts (the oldest go first).

A password must take effect at once, so every change this server cannot miss drops the account:
the changes of this process go through the cache (in-band registration: a new password or a
removed account), each dropping it when it starts and again when the store has answered; mimctl,
another process writing the database itself, tells the running server through the admin
socket's `kick` (`mimctl passwd` and `unregister` end the account's sessions), which drops it
too (`forget`). A read under way when anything is dropped is not kept, since it may carry what
was there before. Only one process may hold such a cache: another server node changing a
password is not seen, so a cluster does not use it (see `tap.build_im_core`), and neither does
a server without its admin socket, which mimctl could not tell. `max_age` bounds how long a
change written to the database by anything else goes unseen.
"""

import itertools
from collections.abc import Callable, Mapping

from twisted.internet.defer import Deferred, succeed
from twisted.internet.interfaces import IReactorTime
from twisted.python.failure import Failure
from zope.interface import implementer

from mim_twisted.bounded import put_newest
from mim_twisted.storage.interfaces import IAccountStore

MAX_ACCOUNTS = 100_000
MAX_AGE = 600.0  # seconds

_Key = tuple[str, str]  # (domain, username)


@implementer(IAccountStore)
class CredentialCache:
    """An IAccountStore holding the credentials of the accounts that logged in lately (see the
    module docstring)."""

    def __init__(
        self,
        store: IAccountStore,
        clock: IReactorTime,
        *,
        max_accounts: int = MAX_ACCOUNTS,
        max_age: float = MAX_AGE,
    ) -> None:
        self.store = store
        self.clock = clock
        self.max_accounts = max_accounts
        self.max_age = max_age
        # (domain, username) -> (credentials, when read), oldest first.
        self._held: dict[_Key, tuple[Mapping[str, str], float]] = {}
        # Moves on whenever an account is dropped: a read begun before is not kept.
        self._generation = itertools.count()
        self._current = next(self._generation)

    def get_credentials(self, domain: str, username: str) -> Deferred:
        key = (domain, username)
        held = self._held.get(key)
        now = self.clock.seconds()
        if held is not None:
            credentials, read_at = held
            if now - read_at < self.max_age:
                return succeed(dict(credentials))
            del self._held[key]
        generation = self._current

        def done(result: Mapping[str, str] | None | Failure) -> object:
            if isinstance(result, Mapping) and generation == self._current:
                put_newest(self._held, key, (dict(result), now), self.max_accounts)
            return result

        return self.store.get_credentials(domain, username).addBoth(done)

    def forget(self, domain: str, username: str) -> None:
        """The account's credentials may have changed (or the account is gone): read them
        from the store next time."""
        self._held.pop((domain, username), None)
        self._current = next(self._generation)

    def create_account(
        self, domain: str, username: str, credentials: Mapping[str, str]
    ) -> Deferred:
        return self._change(domain, username, self.store.create_account, credentials)

    def set_credentials(
        self, domain: str, username: str, credentials: Mapping[str, str]
    ) -> Deferred:
        return self._change(domain, username, self.store.set_credentials, credentials)

    def remove_account(self, domain: str, username: str) -> Deferred:
        return self._change(domain, username, self.store.remove_account)

    def account_exists(self, domain: str, username: str) -> Deferred:
        return self.store.account_exists(domain, username)

    def list_accounts(self, domain: str) -> Deferred:
        return self.store.list_accounts(domain)

    def _change(
        self, domain: str, username: str, write: Callable[..., Deferred], *args: object
    ) -> Deferred:
        self.forget(domain, username)

        def done(result: object) -> object:
            self.forget(domain, username)
            return result

        return write(domain, username, *args).addBoth(done)
