"""A lock per key, for read-modify-write sequences that wait on the database in between.

The roster layer and the presence layer both read a roster item, wait for the store, and write
the item back; one `KeyedLock`, keyed by the owner's bare JID, makes those sequences run one after
the other for each account while different accounts go on side by side. A key's lock exists only
while it is held or waited for, so the table stays as small as the work under way.

Rule for callers: hold one key at a time. Code that changes two accounts (a subscription changes
the sender's roster and then the recipient's) releases the first key before taking the second,
so no two holders can ever wait on each other.
"""

from collections import deque
from collections.abc import Hashable
from types import TracebackType

from twisted.internet import defer


class _Entry:
    __slots__ = ("held", "waiting", "handing_over")

    def __init__(self) -> None:
        self.held = True
        self.waiting: deque[defer.Deferred] = deque()
        self.handing_over = False


class KeyedLock:
    """Mutual exclusion per key, first come first served, in the style of `DeferredLock`.

    Usage, in a coroutine::

        async with locks.hold(owner.userhost()):
            item = await store.get_item(...)
            await store.put_item(..., changed(item))
    """

    def __init__(self) -> None:
        self._entries: dict[Hashable, _Entry] = {}

    def __len__(self) -> int:
        """The number of keys held or waited for now."""
        return len(self._entries)

    def locked(self, key: Hashable) -> bool:
        return key in self._entries

    def acquire(self, key: Hashable) -> defer.Deferred:
        """A Deferred firing (with None) once the caller holds the key's lock.

        Cancelling the Deferred before it fires gives up the place in the queue.
        """
        entry = self._entries.get(key)
        if entry is None:
            self._entries[key] = _Entry()
            return defer.succeed(None)
        if not entry.held:
            # Released inside a hand-over that has not reached the next waiter yet: the lock is
            # free, but the waiters came first.
            if not entry.waiting:
                entry.held = True
                return defer.succeed(None)

        def give_up(waiter: defer.Deferred) -> None:
            entry.waiting.remove(waiter)

        waiter: defer.Deferred = defer.Deferred(give_up)
        entry.waiting.append(waiter)
        return waiter

    def release(self, key: Hashable) -> None:
        """Give the key's lock to its next waiter, or forget the key if nobody waits."""
        entry = self._entries.get(key)
        if entry is None or not entry.held:
            raise RuntimeError(f"release of {key!r}, which is not held")
        entry.held = False
        if entry.handing_over:
            return  # a waiter released at once: the loop below, further up the stack, goes on
        # A loop rather than a chain of callbacks: waiters that finish without waiting release
        # inside `callback`, and a thousand of them must not nest a thousand stack frames.
        entry.handing_over = True
        try:
            while not entry.held and entry.waiting:
                entry.held = True
                entry.waiting.popleft().callback(None)
        finally:
            entry.handing_over = False
        if not entry.held and not entry.waiting:
            del self._entries[key]

    def hold(self, key: Hashable) -> "_Holding":
        """An asynchronous context manager holding the key's lock for its block."""
        return _Holding(self, key)


class _Holding:
    __slots__ = ("locks", "key")

    def __init__(self, locks: KeyedLock, key: Hashable) -> None:
        self.locks = locks
        self.key = key

    def __aenter__(self) -> defer.Deferred:
        return self.locks.acquire(self.key)

    async def __aexit__(
        self,
        kind: type[BaseException] | None,
        value: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.locks.release(self.key)
