"""The STARTTLS write path: one flush per reactor turn for all connections, and ciphertext
straight to the socket unless something is waiting before it (then Twisted buffers it)."""

import socket

from OpenSSL import crypto
from twisted.internet import abstract, defer, error, protocol, reactor, ssl
from twisted.internet.task import Clock
from twisted.internet.testing import MemoryReactor, StringTransport
from twisted.python import failure
from twisted.trial import unittest

from mim_twisted.xmpp.tlswrite import (
    MAX_BUFFERED,
    TurnWrites,
    _DirectCiphertext,
    _TurnAggregator,
    speed_up,
)
from tests.certfactory import self_signed


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


class _Server(protocol.Protocol):
    """STARTTLS at once, sped up; then writes `chunks` over several reactor turns (more than
    the sockets hold, so that some of it waits in Twisted's buffer) and closes cleanly."""

    def __init__(self, options: ssl.CertificateOptions, chunks: list[bytes]) -> None:
        self.options = options
        self.chunks = chunks
        self.sped_up = False

    def connectionMade(self) -> None:
        # Small socket buffers: most writes are partial or wait behind others.
        self.transport.getHandle().setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
        self.transport.startTLS(self.options)
        self.sped_up = speed_up(self.transport, TurnWrites(reactor))
        self.write_some(0)

    def write_some(self, start: int) -> None:
        for chunk in self.chunks[start : start + 50]:
            self.transport.write(chunk)
        if start + 50 < len(self.chunks):
            reactor.callLater(0, self.write_some, start + 50)
        else:
            self.transport.loseConnection()


class _Client(protocol.Protocol):
    """Reads nothing for a while (so that the server's socket fills), then everything."""

    def __init__(self) -> None:
        self.received: list[bytes] = []
        self.lost: defer.Deferred = defer.Deferred()

    def connectionMade(self) -> None:
        self.transport.getHandle().setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        self.transport.startTLS(ssl.CertificateOptions())
        self.transport.pauseProducing()
        reactor.callLater(0.3, self.transport.resumeProducing)

    def dataReceived(self, data: bytes) -> None:
        self.received.append(data)

    def connectionLost(self, reason: failure.Failure = protocol.connectionDone) -> None:
        self.lost.callback(reason.value)


class OverSocketsTests(unittest.TestCase):
    async def test_everything_arrives_in_order_before_the_clean_close(self) -> None:
        issued = self_signed("localhost")
        options = ssl.CertificateOptions(
            privateKey=crypto.PKey.from_cryptography_key(issued.key),
            certificate=crypto.X509.from_cryptography(issued.certificate),
        )
        chunks = [b"%06d" % n + b"x" * (3000 + n % 5000) for n in range(400)]
        server = _Server(options, chunks)
        port = reactor.listenTCP(
            0, protocol.Factory.forProtocol(lambda: server), interface="127.0.0.1"
        )
        self.addCleanup(port.stopListening)
        client = _Client()
        connecting = protocol.ClientCreator(reactor, lambda: client)
        await connecting.connectTCP("127.0.0.1", port.getHost().port)
        reason = await client.lost
        self.assertTrue(server.sped_up)
        self.assertEqual(b"".join(client.received), b"".join(chunks))
        # Not ConnectionLost: the close_notify came after the data.
        self.assertIsInstance(reason, error.ConnectionDone)
