"""The bounded buffer of events on their way to the broker, and the pusher's counters.

Pure bookkeeping, no I/O. An event is *pending* until it is handed to the broker, then *in
flight* until the broker confirms it; a nack or a lost connection puts it back, to be *sent
again* in its original place. At most `window` events are in flight or to be sent again, so that
a broker that stops reading holds a bounded number. The buffer holds at most `limit` events in
all; a new event that finds it full pushes out the oldest one never handed to the broker (the
new event itself when every other event held has been), and each of these drops is counted. An
event that was handed over may have reached the broker unconfirmed, so it is never the one
dropped: every event counted as dropped is one the broker never saw. A burst of drops starts
with the first drop and ends when the buffer has room again, so that it can be logged once.

Events go out in the order they came, so every event ever handed over is older than every
pending one: those to send again always go first.
"""

from bisect import insort
from collections import deque
from collections.abc import Iterable
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
        # Sequence numbers order events as they came. The pending events are the newest ones,
        # consecutive: the first has `_next_sequence - len(_pending)`, so that a buffered event
        # costs no (number, event) pair until it is handed over.
        self._pending: deque[EventT] = deque()
        self._resend: list[tuple[int, EventT]] = []
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
        return len(self._pending) + len(self._resend) + len(self._in_flight)

    @property
    def in_flight(self) -> int:
        return len(self._in_flight)

    @property
    def full(self) -> bool:
        return len(self) >= self.limit

    def add(self, event: EventT) -> bool:
        """Hold a new event; True if that dropped one (the oldest never sent, or this one)."""
        pending = self._pending
        # `full`, inline: this runs for every event.
        if len(pending) + len(self._resend) + len(self._in_flight) < self.limit:
            pending.append(event)
            self._next_sequence += 1
            return False
        if pending:
            pending.popleft()
            pending.append(event)
            self._next_sequence += 1
        self.dropped += 1
        self.burst_dropped += 1
        return True

    def take_batch(self) -> tuple[list[int], list[EventT]]:
        """The events to hand to the broker now (as many as the window allows), oldest first,
        now in flight: their sequence numbers and the events."""
        room = self.window - len(self._in_flight)
        sequences: list[int] = []
        events: list[EventT] = []
        in_flight = self._in_flight
        resend = self._resend
        if resend and room > 0:
            again, self._resend = resend[:room], resend[room:]
            for sequence, event in again:
                in_flight[sequence] = event
                sequences.append(sequence)
                events.append(event)
            room -= len(again)
        pending = self._pending
        count = min(room, len(pending))
        if count > 0:
            first = self._next_sequence - len(pending)
            taken = range(first, first + count)
            pop = pending.popleft
            fresh = [pop() for _ in taken]
            in_flight.update(zip(taken, fresh, strict=True))
            sequences.extend(taken)
            events.extend(fresh)
        self.published += len(sequences)
        return sequences, events

    def confirm(self, sequences: Iterable[int]) -> None:
        """The broker has these events: they leave the buffer."""
        pop = self._in_flight.pop
        confirmed = 0
        for sequence in sequences:
            if pop(sequence, None) is not None:
                confirmed += 1
        self.confirmed += confirmed

    def retry(self, sequences: Iterable[int]) -> None:
        """The broker refused these events or the connection went: they are sent again, in
        order. An event already confirmed or put back is left alone."""
        for sequence in sequences:
            event = self._in_flight.pop(sequence, None)
            if event is not None:
                insort(self._resend, (sequence, event), key=_sequence)

    def retry_all(self) -> None:
        """The connection went: every event in flight is sent again."""
        if self._in_flight:
            self._resend = sorted([*self._resend, *self._in_flight.items()], key=_sequence)
            self._in_flight.clear()

    def end_burst(self) -> int:
        """Once there is room again: the number of events the burst dropped (0: no burst)."""
        if self.full or not self.burst_dropped:
            return 0
        dropped, self.burst_dropped = self.burst_dropped, 0
        return dropped
