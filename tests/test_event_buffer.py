"""The event pusher's buffer: order, confirms, re-sends, the window and exact drop counts."""

from twisted.trial import unittest

from mim_twisted.events.buffer import EventBuffer


def take_all(buffer: EventBuffer[str]) -> list[tuple[int, str]]:
    sequences, events = buffer.take_batch()
    return list(zip(sequences, events, strict=True))


class EventBufferTests(unittest.TestCase):
    def test_events_go_in_order_and_leave_when_confirmed(self) -> None:
        buffer: EventBuffer[str] = EventBuffer(limit=10, window=10)
        for event in "abc":
            self.assertFalse(buffer.add(event))
        taken = take_all(buffer)
        self.assertEqual([event for _, event in taken], ["a", "b", "c"])
        self.assertEqual((len(buffer), buffer.in_flight, buffer.published), (3, 3, 3))
        buffer.confirm(sequence for sequence, _ in taken)
        self.assertEqual((len(buffer), buffer.confirmed), (0, 3))

    def test_the_window_bounds_events_in_flight(self) -> None:
        buffer: EventBuffer[int] = EventBuffer(limit=10, window=2)
        for event in range(5):
            buffer.add(event)
        self.assertEqual([event for _, event in take_all(buffer)], [0, 1])
        buffer.confirm([0])
        self.assertEqual([event for _, event in take_all(buffer)], [2])

    def test_a_retried_event_goes_back_to_its_place(self) -> None:
        buffer: EventBuffer[str] = EventBuffer(limit=10, window=2)
        for event in "abcd":
            buffer.add(event)
        (first, _), (second, _) = take_all(buffer)
        buffer.confirm([first])
        buffer.retry([second])  # a nack for "b"
        self.assertEqual([event for _, event in take_all(buffer)], ["b", "c"])
        self.assertEqual(buffer.published, 4)  # "b" was handed over twice

    def test_a_lost_connection_resends_everything_in_flight_in_order(self) -> None:
        buffer: EventBuffer[int] = EventBuffer(limit=100, window=10)
        for event in range(20):
            buffer.add(event)
        take_all(buffer)
        buffer.retry_all()
        buffer.retry_all()  # twice changes nothing
        self.assertEqual([event for _, event in take_all(buffer)], list(range(10)))
        self.assertEqual((len(buffer), buffer.published), (20, 20))

    def test_a_confirm_after_a_retry_is_ignored(self) -> None:
        buffer: EventBuffer[str] = EventBuffer(limit=10, window=10)
        buffer.add("a")
        [(sequence, _)] = take_all(buffer)
        buffer.retry_all()
        buffer.confirm([sequence])
        self.assertEqual((len(buffer), buffer.confirmed), (1, 0))

    def test_a_full_buffer_drops_the_oldest_pending_event_and_counts_it(self) -> None:
        buffer: EventBuffer[int] = EventBuffer(limit=4, window=2)
        for event in range(4):
            buffer.add(event)
        take_all(buffer)  # 0 and 1 in flight
        self.assertTrue(buffer.add(4))
        self.assertTrue(buffer.add(5))
        self.assertEqual((buffer.dropped, buffer.burst_dropped, len(buffer)), (2, 2, 4))
        buffer.retry_all()
        self.assertEqual([event for _, event in take_all(buffer)], [0, 1])
        buffer.confirm([0, 1])
        self.assertEqual([event for _, event in take_all(buffer)], [4, 5])

    def test_with_everything_in_flight_the_new_event_is_dropped(self) -> None:
        buffer: EventBuffer[int] = EventBuffer(limit=2, window=2)
        buffer.add(0)
        buffer.add(1)
        take_all(buffer)
        self.assertTrue(buffer.add(2))
        self.assertEqual((buffer.dropped, len(buffer)), (1, 2))
        self.assertEqual(take_all(buffer), [])

    def test_a_burst_ends_once_there_is_room(self) -> None:
        buffer: EventBuffer[int] = EventBuffer(limit=2, window=1)
        for event in range(5):
            buffer.add(event)
        self.assertEqual(buffer.end_burst(), 0)  # still full: the burst goes on
        [(sequence, _)] = take_all(buffer)
        buffer.confirm([sequence])
        self.assertEqual(buffer.end_burst(), 3)
        self.assertEqual((buffer.end_burst(), buffer.dropped), (0, 3))

    def test_events_in_flight_go_back_among_pending_ones_put_back_before(self) -> None:
        buffer: EventBuffer[int] = EventBuffer(limit=100, window=4)
        for event in range(8):
            buffer.add(event)
        take_all(buffer)  # 0-3
        buffer.retry([1])  # a nack
        take_all(buffer)  # 1 again, then nothing: 4 in flight
        buffer.retry([2, 0])
        buffer.retry_all()
        self.assertEqual([event for _, event in take_all(buffer)], [0, 1, 2, 3])

    def test_an_event_once_handed_over_is_never_the_one_dropped(self) -> None:
        # It may have reached the broker unconfirmed: dropped, it could still arrive, and the
        # drop counter would not say exactly what consumers miss.
        buffer: EventBuffer[int] = EventBuffer(limit=6, window=3)
        for event in range(3):
            buffer.add(event)
        take_all(buffer)  # 0, 1 and 2 in flight
        buffer.retry_all()  # the connection went
        for event in range(3, 10):
            buffer.add(event)
        self.assertEqual((buffer.dropped, len(buffer)), (4, 6))
        self.assertEqual([event for _, event in take_all(buffer)], [0, 1, 2])
        buffer.confirm([0, 1, 2])
        self.assertEqual([event for _, event in take_all(buffer)], [7, 8, 9])

    def test_limits_hold_at_least_one_event(self) -> None:
        self.assertRaises(ValueError, EventBuffer, 0, 1)
        self.assertRaises(ValueError, EventBuffer, 1, 0)
