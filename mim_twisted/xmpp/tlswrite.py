"""Cheaper writes to client sockets: the one place that reaches into Twisted's TCP buffer and
its TLS layer (`send_or_buffer` also serves the plain-TCP writes of negotiation, see c2s.py).

Twisted's `BufferingTLSTransport` collects a connection's writes and encrypts them at the end of
the reactor turn, which costs a `callLater(0)` per connection per turn; the ciphertext then goes
into the TCP transport's buffer, and the reactor watches the socket for writability and unwatches
it after the flush (two `epoll_ctl` calls and a reactor pass per write). A PEP publication is
written to a dozen connections in one turn, each paying that overhead.

`speed_up(transport, turns)`, called right after `startTLS`, changes two things on that
connection, leaving everything else (handshake, renegotiation, close_notify, producers,
connection loss) to Twisted:

- the writes are collected as before but flushed by one `TurnWrites` call per reactor turn for
  all connections (`_TurnAggregator` takes the place of Twisted's `_AggregateSmallWrites`, with
  the same `write`/`flush`/`close` that `BufferingTLSTransport` calls);
- the ciphertext goes straight to the socket when the TCP transport holds nothing unsent, and
  whatever the socket does not take is buffered by Twisted as before (`_DirectCiphertext` takes
  the place of the `_BypassTLS` through which the TLS layer writes to the TCP transport).

Twisted internals used: `tcp.Connection.protocol` (the TLS layer after startTLS),
`BufferingTLSTransport._aggregator` and its instance attribute `write`,
`TLSMemoryBIOProtocol.transport` (a `twisted.internet._newtls._BypassTLS`, with its
`_connection` and `_base`), and `tcp.Connection`'s buffer and state (`dataBuffer`, `offset`,
`_tempDataLen`, `_writeDisconnected`, `_aborting`). If the connection is not laid out as
expected, nothing is changed.
"""

from collections.abc import Callable

from twisted.internet import abstract, tcp
from twisted.internet._newtls import _BypassTLS
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.logger import Logger
from twisted.protocols.tls import BufferingTLSTransport

log = Logger()

# Flush a connection's writes before the turn ends once this many bytes are waiting (Twisted's
# _AggregateSmallWrites.MAX_BUFFER_SIZE).
MAX_BUFFERED = 64_000


class TurnWrites:
    """Flushes, once per reactor turn, the TLS connections written to in that turn."""

    def __init__(self, clock: IReactorTime) -> None:
        self._clock = clock
        self._pending: dict[_TurnAggregator, None] = {}  # in the order first written to
        self._call: IDelayedCall | None = None

    def add(self, aggregator: "_TurnAggregator") -> None:
        self._pending[aggregator] = None
        if self._call is None:
            self._call = self._clock.callLater(0, self._flush)

    def discard(self, aggregator: "_TurnAggregator") -> None:
        self._pending.pop(aggregator, None)

    def _flush(self) -> None:
        self._call = None
        pending, self._pending = self._pending, {}
        for aggregator in pending:
            try:
                aggregator.flush()
            except Exception:
                # One connection's failure must not hold back the others' writes.
                log.failure("flushing a TLS connection's writes")


class _TurnAggregator:
    """A connection's writes of this turn, encrypted and sent when `TurnWrites` flushes."""

    def __init__(self, write: Callable[[bytes], object], turns: TurnWrites) -> None:
        self._write = write
        self._turns = turns
        self._buffer: list[bytes] = []
        self._size = 0

    def write(self, data: bytes) -> None:
        if not self._buffer:
            self._turns.add(self)
        # A copy of a mutable buffer, which its writer may reuse (as Twisted's aggregator does).
        self._buffer.append(data if type(data) is bytes else bytes(data))
        self._size += len(data)
        if self._size > MAX_BUFFERED:
            self.flush()

    def flush(self) -> None:
        if self._buffer:
            data = b"".join(self._buffer)
            self._buffer = []
            self._size = 0
            self._write(data)

    def close(self) -> None:
        self._turns.discard(self)
        self.flush()


class _DirectCiphertext(_BypassTLS):
    """The TLS layer's way to the TCP connection: straight to the socket when nothing is
    waiting before it, through Twisted's buffer otherwise, so that the bytes keep their order."""

    def write(self, data: bytes) -> None:
        send_or_buffer(self._connection, data)


def send_or_buffer(connection: tcp.Connection, data: bytes) -> None:
    """Write to a TCP connection's socket at once what it takes if nothing waits to be written
    before it, and leave the rest to Twisted's buffer (and the reactor's watch for
    writability), without going through a TLS layer started on the connection."""
    if nothing_buffered(connection):
        written = connection.writeSomeData(data)
        if not isinstance(written, int):
            written = 0  # the connection is lost: the buffered write finds that out
        if written == len(data):
            return
        data = data[written:]
    abstract.FileDescriptor.write(connection, data)


def nothing_buffered(transport: tcp.Connection) -> bool:
    """Whether a TCP transport has nothing waiting to be written and is open for writing (what
    Twisted's FileDescriptor.write checks, and its buffers). Not once aborted: the socket stays
    open until the next turn, and whatever is written meanwhile must be dropped, as Twisted's
    buffer drops it, not sent."""
    return (
        transport.connected
        and not transport._aborting
        and not transport.disconnecting
        and not transport._writeDisconnected
        and not transport._tempDataLen
        and transport.offset == len(transport.dataBuffer)
    )


def speed_up(transport: object, turns: TurnWrites) -> bool:
    """Give a TCP connection on which `startTLS` was just called the cheaper write path;
    whether it was given."""
    if not isinstance(transport, tcp.Connection):
        return False
    tls = transport.protocol
    bypass = getattr(tls, "transport", None)
    if type(tls) is not BufferingTLSTransport or type(bypass) is not _BypassTLS:
        return False
    if bypass._connection is not transport or bypass._base is not abstract.FileDescriptor:
        return False
    aggregator = _TurnAggregator(super(BufferingTLSTransport, tls).write, turns)
    tls._aggregator.close()  # writes what it holds (nothing, right after startTLS)
    tls._aggregator = aggregator
    tls.write = aggregator.write
    tls.transport = _DirectCiphertext(abstract.FileDescriptor, transport)
    return True
