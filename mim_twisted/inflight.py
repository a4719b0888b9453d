"""Work under way that a clean stop waits for: a set of Deferreds and a way to wait for none."""

from twisted.internet import defer


class InFlight:
    """The Deferreds being tracked until they fire; `idle()` fires once none is left."""

    def __init__(self) -> None:
        self._running: set[defer.Deferred] = set()
        self._idle_waiters: list[defer.Deferred] = []

    def __len__(self) -> int:
        return len(self._running)

    def track(self, work: defer.Deferred) -> defer.Deferred:
        """Track ``work`` until it fires; returns it, its result untouched."""
        if not work.called:
            self._running.add(work)
            work.addBoth(self._finished, work)
        return work

    def _finished(self, result: object, work: defer.Deferred) -> object:
        self._running.discard(work)
        if not self._running:
            waiters, self._idle_waiters = self._idle_waiters, []
            for waiter in waiters:
                waiter.callback(None)
        return result

    def idle(self) -> defer.Deferred:
        """Fires (with None) once no tracked work is left."""
        if not self._running:
            return defer.succeed(None)
        waiter: defer.Deferred = defer.Deferred(self._idle_waiters.remove)
        self._idle_waiters.append(waiter)
        return waiter
