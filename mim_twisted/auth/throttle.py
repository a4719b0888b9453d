"""Failed-login budgets per address and per account: password guessing across connections.

The stream layer already delays each failure on a connection and closes it after a few; a
guesser simply opens new connections. These budgets remember failures across connections:

- Per address. Each address may fail ``address_failures`` times in a burst; the budget refills
  continuously, in full over ``window`` seconds. While it is spent, every password attempt from
  that address is refused with temporary-auth-failure, before any password is checked. IPv6
  addresses count per /64, the smallest network a host is usually given, so that one host
  cannot walk through its own addresses. A peer with no IP address (a UNIX socket's client)
  has no address budget: its clients are all alike, and one guesser would lock out the rest.
- Per account. Each account may see ``account_failures`` failures (from anywhere) in a burst,
  refilled the same way. While that budget is spent, the account is under attack, and an
  address that has itself failed on this account within the last ``window`` seconds is refused
  for it. An address that has not failed on the account is never refused by this rule.

Why the per-account budget refuses only (account, address) pairs that failed, rather than the
account as a whole: a budget that blocked the account everywhere would let anyone lock its
holder out for as long as they keep guessing. This way the holder, logging in from an address
that has not been guessing, always gets in; the holder who mistyped during an attack, from the
same address, waits at most ``window`` seconds. A guesser spread over many addresses gets the
account budget, then one guess per address and window, instead of a full address budget per
address. The address budget bounds what one address tries across all accounts.

A refused attempt is not counted: it reveals nothing, so it is no guess. Its answer must not
depend on the password either, or the refusal would be an oracle: the negotiation refuses a
correct password exactly as a wrong one.

Memory is bounded: each table keeps at most ``max_tracked`` entries, dropping the one that
failed least recently, and entries are dropped once their failures have drained away. An
attacker who sprays usernames or addresses can push old entries out of the tables, but only
at the pace its own address budget allows.

Pure logic: the caller passes the time, so tests drive it with any clock.
"""

import functools
import ipaddress
from collections import OrderedDict
from collections.abc import Hashable
from dataclasses import dataclass

# Entries per table: ~100 bytes each, so a few tens of MB at most for all three.
DEFAULT_MAX_TRACKED = 100_000


@dataclass(frozen=True)
class FailureBudgetSettings:
    """``auth.address_failure_budget``, ``auth.account_failure_budget`` (0: that budget is
    off) and ``auth.failure_window`` (seconds)."""

    address_failures: int = 20
    account_failures: int = 10
    window: float = 600.0
    max_tracked: int = DEFAULT_MAX_TRACKED


# Each login asks at least twice (before the attempt and once its outcome is known); parsing the
# address is most of the budget's cost.
@functools.lru_cache(maxsize=4096)
def address_key(host: str) -> str:
    """What an address is counted as: IPv4 as it is, IPv6 by its /64 (IPv4-mapped as IPv4)."""
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return host
    if isinstance(address, ipaddress.IPv6Address):
        if address.ipv4_mapped is not None:
            return str(address.ipv4_mapped)
        return str(ipaddress.IPv6Network((address, 64), strict=False))
    return str(address)


class DrainingCounts:
    """Recent failures per key: each failure adds one, and ``capacity`` drain away every
    ``window`` seconds. A key's budget is spent while another failure would exceed
    ``capacity``."""

    def __init__(self, capacity: int, window: float, max_keys: int) -> None:
        self.capacity = capacity
        self._drain_rate = capacity / window
        self._max_keys = max_keys
        # key -> [failures, time of the last update], least recently failed first.
        self._counts: OrderedDict[Hashable, list[float]] = OrderedDict()

    def __len__(self) -> int:
        return len(self._counts)

    def failures(self, key: Hashable, now: float) -> float:
        """The failures of ``key`` not yet drained at ``now``."""
        entry = self._counts.get(key)
        if entry is None:
            return 0.0
        count = max(0.0, entry[0] - (now - entry[1]) * self._drain_rate)
        if count == 0.0:
            del self._counts[key]
        return count

    def spent(self, key: Hashable, now: float) -> bool:
        return self.capacity > 0 and self.failures(key, now) + 1 > self.capacity

    def add_failure(self, key: Hashable, now: float) -> None:
        if self.capacity <= 0:
            return
        count = self.failures(key, now) + 1
        self._counts[key] = [count, now]
        self._counts.move_to_end(key)
        if len(self._counts) > self._max_keys:
            self._counts.popitem(last=False)


class AuthFailureBudget:
    """The failure budgets of one server, shared by all its listeners. ``address`` is the
    peer's IP address (None for a peer with none, which only the account budget limits; such
    peers count as one address for it); ``account`` the bare JID tried (None when the attempt
    never named a valid one)."""

    def __init__(self, settings: FailureBudgetSettings = FailureBudgetSettings()) -> None:
        self.settings = settings
        self._addresses = DrainingCounts(
            settings.address_failures, settings.window, settings.max_tracked
        )
        self._accounts = DrainingCounts(
            settings.account_failures, settings.window, settings.max_tracked
        )
        # (account, address key) -> time of its last failure, oldest first.
        self._pairs: OrderedDict[tuple[str, str | None], float] = OrderedDict()

    def refusal(self, address: str | None, account: str | None, now: float) -> str | None:
        """Why an attempt from ``address`` on ``account`` is refused at ``now``; None when it
        may go on. Called before the attempt (``account`` may be unknown yet) and again once
        its outcome is known."""
        where = None if address is None else address_key(address)
        if where is not None and self._addresses.spent(where, now):
            return "too many failed logins from this address"
        if account is not None and self._accounts.spent(account, now):
            last_failure = self._pairs.get((account, where))
            if last_failure is not None and now - last_failure < self.settings.window:
                return "too many failed logins on this account, this address among them"
        return None

    def record_failure(self, address: str | None, account: str | None, now: float) -> None:
        """A wrong password (or an unknown account) from ``address``."""
        where = None if address is None else address_key(address)
        if where is not None:
            self._addresses.add_failure(where, now)
        if account is None or self._accounts.capacity <= 0:
            return
        self._accounts.add_failure(account, now)
        pair = (account, where)
        self._pairs[pair] = now
        self._pairs.move_to_end(pair)
        # Pairs are kept in failure order: those older than the window are of no more use.
        while self._pairs:
            oldest_pair, oldest_time = next(iter(self._pairs.items()))
            if (
                now - oldest_time < self.settings.window
                and len(self._pairs) <= self.settings.max_tracked
            ):
                break
            del self._pairs[oldest_pair]
