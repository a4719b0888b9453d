"""The bounded buffer of events on their way to the broker, and the pusher's counters.

Pure bookkeeping, no I/O. An event is *pending* until it is handed to the broker, then *in
flight* until the broker confirms it; a nack or a lost connection puts it back among the
pending ones, in its original place. At most `window` events are in flight, so that a broker
that stops reading holds a bounded number. The buffer holds at most `limit` events in all; a
new event that finds it full pushes out the oldest pending one (the new event itself when every
event held is in flight), and each of these drops is counted. A burst of drops starts with the
first drop and ends when the buffer has room again, so that it can be logged once.
"""

from bisect import bisect_left
from collections import deque
from operator import itemgetter
from typing import Generic, TypeVar

EventT = TypeVar("EventT")

_sequence = itemgetter(0)


class EventBuffer(Generic[EventT]):
    def __init__(self, limit: int, window: int) -> None:
        if limit < 1 or window < 1:
            raise ValueError("the limit and the window hold at least one event")
        self.limit = limit
        self.window = window
        # (sequence number, event), oldest first; sequence numbers order events as they came.
        self._pending: deque[tuple[int, EventT]] = deque()
        self._in_flight: dict[int, EventT] = {}
        self._next_sequence = 0
        # Counters for the metrics: handed to the broker (re-sends included), confirmed by it,
        # dropped because the buffer was full.
        self.published = 0
        self.confirmed = 0
        self.dropped = 0
        # Drops in the burst under way (0: none under way).
        self.burst_dropped = 0

    def __len__(self) -> int:
        return len(self._pending) + len(self._in_flight)

    @property
    def in_flight(self) -> int:
        return len(self._in_flight)

    @property
    def full(self) -> bool:
        return len(self) >= self.limit

    def add(self, event: EventT) -> bool:
        """Hold a new event; True if that dropped one (the oldest pending, or this one)."""
        sequence = self._next_sequence
        self._next_sequence += 1
        if not self.full:
            self._pending.append((sequence, event))
            return False
        if self._pending:
            self._pending.popleft()
            self._pending.append((sequence, event))
        self.dropped += 1
        self.burst_dropped += 1
        return True

    def take(self) -> tuple[int, EventT] | None:
        """The next event to hand to the broker, now in flight; None if none may go now."""
        if not self._pending or len(self._in_flight) >= self.window:
            return None
        sequence, event = self._pending.popleft()
        self._in_flight[sequence] = event
        self.published += 1
        return sequence, event

    def confirm(self, sequence: int) -> None:
        """The broker has the event: it leaves the buffer."""
        if self._in_flight.pop(sequence, None) is not None:
            self.confirmed += 1

    def retry(self, sequence: int) -> None:
        """The broker refused the event or the connection went: it is pending again, in order.

        An event already confirmed or put back is left alone."""
        event = self._in_flight.pop(sequence, None)
        if event is None:
            return
        index = bisect_left(self._pending, sequence, key=_sequence)
        self._pending.insert(index, (sequence, event))

    def retry_all(self) -> None:
        """The connection went: every event in flight is pending again."""
        for sequence in sorted(self._in_flight):
            self.retry(sequence)

    def end_burst(self) -> int:
        """Once there is room again: the number of events the burst dropped (0: no burst)."""
        if self.full or not self.burst_dropped:
            return 0
        dropped, self.burst_dropped = self.burst_dropped, 0
        return dropped
