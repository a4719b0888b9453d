"""The STARTTLS write path: one flush per reactor turn for all connections, and ciphertext
straight to the socket unless something is waiting before it (then Twisted buffers it)."""

from twisted.internet import abstract, error
from twisted.internet.task import Clock
from twisted.internet.testing import MemoryReactor, StringTransport
from twisted.trial import unittest

from mim_twisted.xmpp.tlswrite import (
    MAX_BUFFERED,
    TurnWrites,
    _DirectCiphertext,
    _TurnAggregator,
    speed_up,
)


class TurnWritesTests(unittest.TestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.turns = TurnWrites(self.clock)
        self.written: list[tuple[str, bytes]] = []

    def aggregator(self, name: str) -> _TurnAggregator:
        return _TurnAggregator(lambda data: self.written.append((name, data)), self.turns)

    def test_one_call_per_turn_flushes_every_connection_once(self) -> None:
        first, second = self.aggregator("first"), self.aggregator("second")
        first.write(b"<a/>")
        second.write(b"<b/>")
        first.write(b"<c/>")
        self.assertEqual(len(self.clock.getDelayedCalls()), 1)
        self.assertEqual(self.written, [])
        self.clock.advance(0)
        self.assertEqual(self.written, [("first", b"<a/><c/>"), ("second", b"<b/>")])
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_a_large_buffer_is_flushed_at_once(self) -> None:
        aggregator = self.aggregator("big")
        aggregator.write(b"x" * MAX_BUFFERED)
        aggregator.write(b"y")
        self.assertEqual(self.written, [("big", b"x" * MAX_BUFFERED + b"y")])
        aggregator.write(b"z")
        self.clock.advance(0)
        self.assertEqual(self.written[1:], [("big", b"z")])

    def test_close_writes_what_is_held_and_leaves_the_turn(self) -> None:
        closed, other = self.aggregator("closed"), self.aggregator("other")
        closed.write(b"<bye/>")
        other.write(b"<hi/>")
        closed.close()
        self.assertEqual(self.written, [("closed", b"<bye/>")])
        self.clock.advance(0)
        self.assertEqual(self.written[1:], [("other", b"<hi/>")])

    def test_a_failing_connection_does_not_hold_back_the_others(self) -> None:
        def fail(data: bytes) -> None:
            raise RuntimeError("boom")

        _TurnAggregator(fail, self.turns).write(b"<a/>")
        self.aggregator("fine").write(b"<b/>")
        self.clock.advance(0)
        self.assertEqual(self.written, [("fine", b"<b/>")])
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)

    def test_mutable_data_is_copied(self) -> None:
        data = bytearray(b"<a/>")
        self.aggregator("copy").write(data)
        data[:] = b"<b/>"
        self.clock.advance(0)
        self.assertEqual(self.written, [("copy", b"<a/>")])


class FakeConnection(abstract.FileDescriptor):
    """A TCP connection whose socket takes `accept` bytes per send (None: it is lost)."""

    def __init__(self) -> None:
        self.reactor_ = MemoryReactor()
        super().__init__(reactor=self.reactor_)
        self.connected = True
        self._aborting = False  # tcp.Connection's
        self.accept: int | None = 1_000_000
        self.sent: list[bytes] = []

    def writeSomeData(self, data: bytes) -> int | Exception:
        if self.accept is None:
            return error.ConnectionLost()
        taken = bytes(data[: self.accept])
        self.sent.append(taken)
        return len(taken)

    def buffered(self) -> bytes:
        return bytes(self.dataBuffer[self.offset :]) + b"".join(self._tempDataBuffer)


class DirectCiphertextTests(unittest.TestCase):
    def setUp(self) -> None:
        self.connection = FakeConnection()
        self.direct = _DirectCiphertext(abstract.FileDescriptor, self.connection)

    def test_sent_at_once_when_nothing_waits(self) -> None:
        self.direct.write(b"record")
        self.assertEqual(self.connection.sent, [b"record"])
        self.assertEqual(self.connection.buffered(), b"")
        self.assertNotIn(self.connection, self.connection.reactor_.getWriters())

    def test_what_the_socket_does_not_take_is_buffered(self) -> None:
        self.connection.accept = 2
        self.direct.write(b"record")
        self.assertEqual(self.connection.sent, [b"re"])
        self.assertEqual(self.connection.buffered(), b"cord")
        self.assertIn(self.connection, self.connection.reactor_.getWriters())

    def test_buffered_behind_what_waits_keeping_the_order(self) -> None:
        self.connection.accept = 0
        self.direct.write(b"first")
        self.connection.accept = 100
        self.direct.write(b"second")
        self.assertEqual(self.connection.sent, [b""])
        self.assertEqual(self.connection.buffered(), b"firstsecond")

    def test_a_lost_connection_leaves_it_to_twisted(self) -> None:
        self.connection.accept = None
        self.direct.write(b"record")
        self.assertEqual(self.connection.buffered(), b"record")

    def test_nothing_is_sent_once_aborted(self) -> None:
        # abortConnection drops what is buffered; the socket stays open until the next turn.
        self.connection._aborting = True
        self.direct.write(b"record")
        self.assertEqual(self.connection.sent, [])

    def test_nothing_is_sent_directly_while_disconnecting(self) -> None:
        self.connection.disconnecting = True
        self.direct.write(b"record")
        self.assertEqual(self.connection.sent, [])


class SpeedUpTests(unittest.TestCase):
    def test_other_transports_are_left_alone(self) -> None:
        transport = StringTransport()
        self.assertFalse(speed_up(transport, TurnWrites(Clock())))
