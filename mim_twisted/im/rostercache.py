"""The rosters of the accounts with sessions here, kept in memory in front of the roster store.

An online account's roster is read on every presence it broadcasts and on every PEP event it
publishes (who among its contacts is told); from the database that is two statements each time.
`RosterCache` is an IRosterStore that answers `get_roster` and `get_item` from memory for an
account whose roster it holds and passes the rest to the store. A roster read is kept only while
the account has sessions here and is dropped when the last one ends (`session_ended`, on the
SESSION_ENDED hook), so memory follows the accounts online.

Every roster change of the server goes through it (the roster protocol, presence subscriptions):
a change drops what is held of its account when it starts and again when the store has answered,
and a read that overlaps a change, begun before it or while it is under way, is not kept, since
it may carry what was there before; the next read asks the store again. Another process writing
the same rosters (a second server node) is not seen: this is a cache of one process, like the
caps cache. An account removed while it has sessions here has them ended, which forgets it.
"""

import itertools
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass

from twisted.internet.defer import Deferred, succeed
from twisted.python.failure import Failure
from zope.interface import implementer

from mim_twisted.im.sessions import Session, SessionManager
from mim_twisted.storage.interfaces import IRosterStore, RosterItem
from mim_twisted.xmpp.jids import parse_jid

_Key = tuple[str, str]  # (domain, username)


@dataclass(frozen=True)
class _Roster:
    version: int
    items: tuple[RosterItem, ...]  # RosterItems are frozen: shared with the callers
    by_jid: dict[str, RosterItem]


@implementer(IRosterStore)
class RosterCache:
    """An IRosterStore holding the rosters of the accounts in use (see the module docstring)."""

    def __init__(self, store: IRosterStore, sessions: SessionManager) -> None:
        self.store = store
        self.sessions = sessions
        self._held: dict[_Key, _Roster] = {}
        # The latest read of each account that may still be kept, by token.
        self._reading: dict[_Key, int] = {}
        self._writing: Counter[_Key] = Counter()
        self._tokens = itertools.count()

    def get_roster(self, domain: str, username: str) -> Deferred:
        held = self._held.get((domain, username))
        if held is not None:
            return succeed((held.version, list(held.items)))
        return self._read((domain, username))

    def held_items(self, domain: str, username: str) -> tuple[RosterItem, ...] | None:
        """The account's roster items if held, without reading the store; None otherwise."""
        held = self._held.get((domain, username))
        return None if held is None else held.items

    def get_item(self, domain: str, username: str, jid: str) -> Deferred:
        held = self._held.get((domain, username))
        if held is not None:
            return succeed(held.by_jid.get(jid))
        return self.store.get_item(domain, username, jid)

    def put_item(self, domain: str, username: str, item: RosterItem) -> Deferred:
        return self._write((domain, username), self.store.put_item, item)

    def remove_item(self, domain: str, username: str, jid: str) -> Deferred:
        return self._write((domain, username), self.store.remove_item, jid)

    def replace_item(
        self,
        domain: str,
        username: str,
        jid: str,
        expected: RosterItem | None,
        item: RosterItem | None,
    ) -> Deferred:
        return self._write((domain, username), self.store.replace_item, jid, expected, item)

    def session_ended(self, session: Session) -> None:
        """Once an account's last session has ended, its roster is read again when next
        needed."""
        account = session.jid.userhostJID()
        if not self.sessions.sessions_of(account):
            self._drop((account.host, account.user))

    def _in_use(self, key: _Key) -> bool:
        domain, username = key
        return bool(self.sessions.sessions_of(parse_jid(f"{username}@{domain}")))

    def _read(self, key: _Key) -> Deferred:
        reading = self.store.get_roster(*key)
        if self._writing[key]:
            return reading  # may be from before the change: not kept
        token = self._reading[key] = next(self._tokens)

        def done(result: tuple[int, list[RosterItem]] | Failure) -> object:
            if self._reading.get(key) == token:
                del self._reading[key]
                if not isinstance(result, Failure) and self._in_use(key):
                    version, items = result
                    self._held[key] = _Roster(
                        version, tuple(items), {item.jid: item for item in items}
                    )
            return result

        return reading.addBoth(done)

    def _write(self, key: _Key, write: Callable[..., Deferred], *args: object) -> Deferred:
        self._writing[key] += 1
        self._drop(key)

        def done(result: object) -> object:
            self._writing[key] -= 1
            if not self._writing[key]:
                del self._writing[key]
            self._drop(key)
            return result

        return write(*key, *args).addBoth(done)

    def _drop(self, key: _Key) -> None:
        self._held.pop(key, None)
        self._reading.pop(key, None)
