"""The event pusher's RabbitMQ publisher: a Twisted service on pika's Twisted adapter.

`publish` never waits: an event goes into the bounded `EventBuffer` and is sent when a channel
is up. One loop keeps one AMQP connection, reconnecting with back-off (Twisted's
`backoffPolicy`); each new connection declares the exchanges and (with `confirms`) turns on
publisher confirms before any event is sent on it. With confirms an event leaves the buffer
when the broker acks it; a nack or a lost connection sends it again, so an event can arrive
twice but is never lost while the buffer has room. Without confirms an event leaves the buffer
once written to the connection, as in MongooseIM.

(`ClientService` would reconnect for us, but a connection lost while it is being prepared, or
closed after preparing it failed, trips its state machine.)
"""

import random
import socket
from collections import deque
from collections.abc import Callable
from typing import Any

import pika
import pika.exceptions
import pika.spec
from pika.adapters.twisted_connection import TwistedChannel, TwistedProtocolConnection
from twisted.application import internet, service
from twisted.internet import defer, endpoints, error, protocol, ssl, task
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from mim_twisted.config import BrokerConfig, RabbitConfig
from mim_twisted.events.amqp import publish_frames, short_string
from mim_twisted.events.buffer import EventBuffer
from mim_twisted.events.formats import HOOK_PRIORITY, Event, EventSource
from mim_twisted.extensions import IMimExtension, ServerRegistry

log = Logger()

# Events handed to the broker and not yet confirmed, at most: a broker that stops reading
# holds this many, the rest wait in the buffer (and are dropped from there, oldest first).
MAX_IN_FLIGHT = 1000

# Seconds that stopping waits for the broker to confirm what the buffer still holds.
STOP_FLUSH_TIMEOUT = 2.0

# Seconds that a TCP connection to the broker may take.
CONNECT_TIMEOUT = 10


def in_flight_window(limit: int) -> int:
    # At most half the buffer, so that a full buffer still has pending events to drop
    # oldest-first rather than refusing the newest.
    return max(1, min(MAX_IN_FLIGHT, limit // 2))


class _BrokerConnection(TwistedProtocolConnection):
    """A pika connection whose `lost` fires (with None) when the TCP connection goes."""

    def __init__(self, link: "BrokerLink", parameters: pika.ConnectionParameters):
        super().__init__(parameters, custom_reactor=link.reactor)
        self.link = link
        self.lost: defer.Deferred = defer.Deferred()

    def makeConnection(self, transport: Any) -> None:
        super().makeConnection(_BatchedWrites(transport, self.link.reactor))

    def connectionLost(self, reason: Failure = protocol.connectionDone) -> None:
        # The link first: nothing more is sent on the channel that closes.
        self.link.connection_lost(self, reason)
        super().connectionLost(reason)
        if not self.lost.called:  # cancelled when the service stopped waiting on it
            self.lost.callback(None)


class _BatchedWrites:
    """A transport whose writes of one reactor turn go out together.

    pika writes each frame on its own, three per event (method, header, body); gathered, a
    burst of events costs one write instead of three per event."""

    def __init__(self, transport: Any, reactor: Any) -> None:
        self._transport = transport
        self._reactor = reactor
        self._pending: list[bytes] = []

    def write(self, data: bytes) -> None:
        if not self._pending:
            self._reactor.callLater(0, self._flush)
        self._pending.append(data)

    def _flush(self) -> None:
        pending, self._pending = self._pending, []
        if pending and self._transport.connected:
            self._transport.writeSequence(pending)

    def loseConnection(self) -> None:
        self._flush()
        self._transport.loseConnection()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._transport, name)


class _Deliveries:
    """One channel's publishing state: the raw pika channel under the Twisted wrapper, where its
    frames are written, and the event behind each delivery tag not yet confirmed.

    pika's TwistedChannel makes a Deferred per publish and looks through every unconfirmed
    delivery at each ack, and pika's basic_publish marshals generically; the hot path writes
    the frames itself (mim_twisted.events.amqp) and tracks the delivery tags."""

    def __init__(self, channel: Any, write: Callable[[bytes], None]) -> None:
        self.channel = channel  # a pika.channel.Channel
        self.write = write
        self.last_tag = 0  # delivery tags count the channel's publishes from 1
        self.unconfirmed: deque[tuple[int, int]] = deque()  # (delivery tag, event sequence)

    def settled(self, tag: int, multiple: bool) -> list[int]:
        """The sequences of the events that an ack or nack of `tag` settles."""
        unconfirmed = self.unconfirmed
        if multiple:
            sequences = []
            while unconfirmed and unconfirmed[0][0] <= tag:
                sequences.append(unconfirmed.popleft()[1])
            return sequences
        for index, (unconfirmed_tag, sequence) in enumerate(unconfirmed):
            if unconfirmed_tag == tag:
                del unconfirmed[index]
                return [sequence]
        return []


class _BrokerFactory(protocol.Factory):
    noisy = False

    def __init__(self, link: "BrokerLink") -> None:
        self.link = link

    def buildProtocol(self, addr: Any) -> _BrokerConnection:
        return _BrokerConnection(self.link, self.link.connection_parameters())


@implementer(IMimExtension)
class RabbitEventPusher:
    """The event pusher as a built-in extension: installed like any third party's (its hooks
    and its child service through the ServerRegistry), but configured by [event_pusher.rabbit],
    MongooseIM's option names, checked with the rest of the config file."""

    name = "event_pusher_rabbit"

    def __init__(self, reactor: Any) -> None:
        self.reactor = reactor
        self.publisher: RabbitPublisher | None = None

    def install(self, server: ServerRegistry, settings: RabbitConfig) -> None:
        publisher = RabbitPublisher(settings, self.reactor)
        for name, handler in EventSource(settings, publisher.publish).handlers():
            server.add_hook(name, handler, HOOK_PRIORITY)
        server.add_child_service(publisher)
        self.publisher = publisher


class BrokerLink(service.Service):
    """One AMQP connection to RabbitMQ kept up by a service: connected at start, made again
    with back-off whenever it is lost, closed cleanly at stop. What is done with it is the
    subclass's: `_prepare` (declarations on the new connection, before it is used), `_ready`
    (it is usable), `_lost` (it is gone)."""

    # Who speaks in the log, and what happens to the work while the broker is away.
    label = "RabbitMQ"
    meanwhile = "retrying"

    def __init__(
        self,
        settings: BrokerConfig,
        reactor: Any,
        *,
        connection_name: str | None = None,
        retry_policy: Any = None,
    ) -> None:
        self.settings = settings
        self.reactor = reactor
        # Shown by `rabbitmqctl list_connections name client_properties`.
        self.connection_name = connection_name or f"mim-twisted@{socket.gethostname()}"
        self.retry_policy = retry_policy or internet.backoffPolicy(
            initialDelay=0.2, maxDelay=10.0, factor=2.0, jitter=lambda: random.uniform(0, 0.1)
        )
        self.connection: _BrokerConnection | None = None
        self._connecting: defer.Deferred | None = None

    def connection_parameters(self) -> pika.ConnectionParameters:
        settings = self.settings
        # host and port are the endpoint's; pika's would be ignored by its Twisted adapter.
        return pika.ConnectionParameters(
            virtual_host=settings.virtual_host,
            credentials=pika.PlainCredentials(settings.username, settings.password),
            client_properties={"connection_name": self.connection_name},
        )

    def endpoint(self) -> Any:
        settings = self.settings
        tcp = endpoints.HostnameEndpoint(
            self.reactor, settings.host, settings.port, timeout=CONNECT_TIMEOUT
        )
        if not settings.tls:
            return tcp
        return endpoints.wrapClientTLS(ssl.optionsForClientTLS(settings.host), tcp)

    def startService(self) -> None:
        super().startService()
        self._connecting = defer.ensureDeferred(self._stay_connected())
        self._connecting.addErrback(lambda failure: failure.trap(defer.CancelledError))

    async def _stay_connected(self) -> None:
        failures = 0
        while self.running:
            connection = None
            try:
                connection = await self.endpoint().connect(_BrokerFactory(self))
                await connection.ready
                await self._prepare(connection)
            except defer.CancelledError:
                raise
            except Exception as problem:
                failures += 1
                self._not_ready(problem, connection, failures)
                await task.deferLater(self.reactor, self.retry_policy(failures), lambda: None)
                continue
            failures = 0
            self.connection = connection
            self._ready()
            await connection.lost

    async def _prepare(self, connection: _BrokerConnection) -> None:
        """Declare what the link uses on a new connection; fail to have it made again."""
        raise NotImplementedError

    def _ready(self) -> None:
        """The connection prepared is `self.connection`, to be used from now on."""

    def _lost(self, reason: Failure) -> None:
        """The connection that was ready is gone (`self.connection` is None again)."""

    def _not_ready(
        self, problem: Exception, connection: _BrokerConnection | None, failures: int
    ) -> None:
        # The first failure in a row, then every tenth: an outage is not a log flood.
        if failures == 1 or failures % 10 == 0:
            if isinstance(problem, pika.exceptions.AMQPConnectionError):
                reason = "the broker closed the connection (username, password, virtual_host?)"
            else:
                reason = str(problem) or type(problem).__name__
            log.warn(
                "{label}: RabbitMQ at {host}:{port} not usable (attempt {attempt}):"
                " {reason}; {meanwhile}",
                label=self.label,
                host=self.settings.host,
                port=self.settings.port,
                attempt=failures,
                reason=reason,
                meanwhile=self.meanwhile,
            )
        if connection is not None:
            _disconnect(connection)

    def connection_lost(self, connection: _BrokerConnection, reason: Failure) -> None:
        if connection is not self.connection:
            return  # one that never became ready: _not_ready said why
        self.connection = None
        self._lost(reason)

    async def _close(self) -> None:
        """Stop reconnecting and close the connection, cleanly if the broker answers."""
        if self._connecting is not None:
            self._connecting.cancel()
            self._connecting = None
        connection = self.connection
        if connection is not None and connection.is_open:
            # A clean AMQP close, rather than a cut the broker would log as unexpected.
            connection.close()
            lost = connection.lost.addTimeout(STOP_FLUSH_TIMEOUT, self.reactor)
            await lost.addErrback(lambda _: _disconnect(connection))


class RabbitPublisher(BrokerLink):
    """Publishes events to RabbitMQ; `buffer` holds them and counts what happens to them."""

    name = "event-pusher-rabbit"
    label = "Event pusher"
    meanwhile = "events are buffered meanwhile"

    def __init__(
        self,
        settings: RabbitConfig,
        reactor: Any,
        *,
        connection_name: str | None = None,
        retry_policy: Any = None,
    ) -> None:
        super().__init__(
            settings, reactor, connection_name=connection_name, retry_policy=retry_policy
        )
        limit = settings.max_buffered_events
        self.buffer: EventBuffer[Event] = EventBuffer(limit, in_flight_window(limit))
        self.channel: TwistedChannel | None = None
        self._deliveries: _Deliveries | None = None
        self._send_scheduled = False
        self._exchange_names: dict[str, bytes] = {}  # as AMQP shortstrs

    # -- the XMPP side ---------------------------------------------------------------------

    def publish(self, event: Event) -> None:
        """Buffer an event and send what may be sent; never waits, never fails."""
        if self.buffer.add(event) and self.buffer.burst_dropped == 1:
            log.warn(
                "Event pusher: the buffer is full ({limit} events, broker {state}): dropping"
                " the oldest events until it has room",
                limit=self.buffer.limit,
                state="connected" if self.channel is not None else "unreachable",
            )
        if self.channel is not None and not self._send_scheduled:
            # Once at the end of the reactor turn for all the events of the turn: the broker
            # gets them together and confirms them together (one ack for many).
            self._send_scheduled = True
            self.reactor.callLater(0, self._send)

    # -- the broker side -------------------------------------------------------------------

    async def _prepare(self, connection: _BrokerConnection) -> None:
        channel = await connection.channel()
        settings = self.settings
        for exchange in (
            settings.presence_exchange,
            settings.chat_msg_exchange,
            settings.groupchat_msg_exchange,
        ):
            await channel.exchange_declare(exchange=exchange.name, exchange_type=exchange.type)
        # A channel closed by the broker (an error of ours) takes the connection with it, so
        # that a new one is made.
        channel.on_closed.addBoth(lambda _: _disconnect(connection))
        # Through the same transport as pika's own frames, so they keep their order.
        deliveries = _Deliveries(channel._channel, connection.transport.write)
        if settings.confirms:
            selected: defer.Deferred = defer.Deferred()
            deliveries.channel.confirm_delivery(
                lambda frame: self._settled(deliveries, frame), selected.callback
            )
            connection.lost.addCallback(_fail_unless_called, selected)
            await selected
        self.channel = channel
        self._deliveries = deliveries

    def _ready(self) -> None:
        log.info(
            "Event pusher: connected to RabbitMQ at {host}:{port}, {count} events to send",
            host=self.settings.host,
            port=self.settings.port,
            count=len(self.buffer),
        )
        self._send()

    def _lost(self, reason: Failure) -> None:
        self.channel = None
        self._deliveries = None
        self.buffer.retry_all()
        if self.running:
            log.warn(
                "Event pusher: lost the connection to RabbitMQ ({reason}); {count} events"
                " held until it is back",
                reason=reason.getErrorMessage(),
                count=len(self.buffer),
            )

    def _send(self) -> None:
        self._send_scheduled = False
        deliveries = self._deliveries
        if deliveries is None:
            return
        channel = deliveries.channel
        number = channel.channel_number
        write = deliveries.write
        exchanges = self._exchange_names
        buffer = self.buffer
        confirms = self.settings.confirms
        sent = False
        while channel.is_open:
            taken = buffer.take()
            if taken is None:
                break
            sequence, event = taken
            exchange = exchanges.get(event.exchange)
            if exchange is None:
                exchange = exchanges[event.exchange] = short_string(event.exchange)
            write(publish_frames(number, exchange, short_string(event.routing_key), event.body))
            if confirms:
                deliveries.last_tag += 1
                deliveries.unconfirmed.append((deliveries.last_tag, sequence))
            else:
                buffer.confirm(sequence)
                sent = True
        if sent:
            self._burst_over()

    def _settled(self, deliveries: _Deliveries, frame: Any) -> None:
        """An ack (the broker has the events) or a nack (it could not take them: they are
        sent again)."""
        if deliveries is not self._deliveries:
            return  # a channel gone since: its events are pending again
        method = frame.method
        settle = (
            self.buffer.retry if isinstance(method, pika.spec.Basic.Nack) else self.buffer.confirm
        )
        for sequence in deliveries.settled(method.delivery_tag, method.multiple):
            settle(sequence)
        self._burst_over()
        self._send()

    def _burst_over(self) -> None:
        dropped = self.buffer.end_burst()
        if dropped:
            log.warn(
                "Event pusher: {dropped} events dropped while the buffer was full"
                " ({total} since start)",
                dropped=dropped,
                total=self.buffer.dropped,
            )

    async def _flush(self) -> None:
        waited = 0.0
        while self.channel is not None and len(self.buffer) and waited < STOP_FLUSH_TIMEOUT:
            await task.deferLater(self.reactor, 0.05, lambda: None)
            waited += 0.05

    async def _stop(self) -> None:
        await self._flush()
        await self._close()
        if len(self.buffer):
            log.warn(
                "Event pusher: stopped with {count} events not confirmed by RabbitMQ",
                count=len(self.buffer),
            )

    def stopService(self) -> defer.Deferred:
        super().stopService()
        return defer.ensureDeferred(self._stop())


def _fail_unless_called(_: object, waiting: defer.Deferred) -> None:
    # The connection went before the broker answered: no answer will come.
    if not waiting.called:
        waiting.errback(error.ConnectionLost("the connection went during its set-up"))


def _disconnect(connection: _BrokerConnection) -> None:
    if connection.transport is not None:
        connection.transport.abortConnection()
