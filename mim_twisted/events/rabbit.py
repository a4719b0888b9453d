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
from typing import Any

import pika
import pika.exceptions
from pika.adapters.twisted_connection import TwistedChannel, TwistedProtocolConnection
from twisted.application import internet, service
from twisted.internet import defer, endpoints, protocol, ssl, task
from twisted.logger import Logger
from twisted.python.failure import Failure

from mim_twisted import hooks
from mim_twisted.config import RabbitConfig
from mim_twisted.events.buffer import EventBuffer
from mim_twisted.events.formats import Event, EventSource

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

    def __init__(self, publisher: "RabbitPublisher", parameters: pika.ConnectionParameters):
        super().__init__(parameters, custom_reactor=publisher.reactor)
        self.publisher = publisher
        self.lost: defer.Deferred = defer.Deferred()

    def connectionLost(self, reason: Failure = protocol.connectionDone) -> None:
        # The publisher first: closing the channel fails the deliveries in flight, which must
        # not be sent again on it.
        self.publisher.connection_lost(self, reason)
        super().connectionLost(reason)
        self.lost.callback(None)


class _BrokerFactory(protocol.Factory):
    noisy = False

    def __init__(self, publisher: "RabbitPublisher") -> None:
        self.publisher = publisher

    def buildProtocol(self, addr: Any) -> _BrokerConnection:
        return _BrokerConnection(self.publisher, self.publisher.connection_parameters())


class RabbitPublisher(service.Service):
    """Publishes events to RabbitMQ; `buffer` holds them and counts what happens to them."""

    name = "event-pusher-rabbit"

    def __init__(
        self,
        settings: RabbitConfig,
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
        limit = settings.max_buffered_events
        self.buffer: EventBuffer[Event] = EventBuffer(limit, in_flight_window(limit))
        self.connection: _BrokerConnection | None = None
        self.channel: TwistedChannel | None = None
        self._connecting: defer.Deferred | None = None

    # -- the XMPP side ---------------------------------------------------------------------

    def install(self, hooks_table: hooks.Hooks) -> None:
        """Publish the events of the server's hooks."""
        EventSource(self.settings, self.publish).install(hooks_table)

    def publish(self, event: Event) -> None:
        """Buffer an event and send what may be sent; never waits, never fails."""
        if self.buffer.add(event) and self.buffer.burst_dropped == 1:
            log.warn(
                "Event pusher: the buffer is full ({limit} events, broker {state}): dropping"
                " the oldest events until it has room",
                limit=self.buffer.limit,
                state="connected" if self.channel is not None else "unreachable",
            )
        if self.channel is not None:
            self._send()

    # -- the broker side -------------------------------------------------------------------

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
                await self._prepare(connection)
            except defer.CancelledError:
                raise
            except Exception as error:
                failures += 1
                self._not_ready(error, connection, failures)
                await task.deferLater(self.reactor, self.retry_policy(failures), lambda: None)
                continue
            failures = 0
            self._ready()
            await connection.lost

    async def _prepare(self, connection: _BrokerConnection) -> None:
        await connection.ready
        channel = await connection.channel()
        settings = self.settings
        for exchange in (
            settings.presence_exchange,
            settings.chat_msg_exchange,
            settings.groupchat_msg_exchange,
        ):
            await channel.exchange_declare(exchange=exchange.name, exchange_type=exchange.type)
        if settings.confirms:
            await channel.confirm_delivery()
        # A channel closed by the broker (an error of ours) takes the connection with it, so
        # that a new one is made.
        channel.on_closed.addBoth(lambda _: _disconnect(connection))
        self.connection = connection
        self.channel = channel

    def _ready(self) -> None:
        log.info(
            "Event pusher: connected to RabbitMQ at {host}:{port}, {count} events to send",
            host=self.settings.host,
            port=self.settings.port,
            count=len(self.buffer),
        )
        self._send()

    def _not_ready(
        self, error: Exception, connection: _BrokerConnection | None, failures: int
    ) -> None:
        # The first failure in a row, then every tenth: an outage is not a log flood.
        if failures == 1 or failures % 10 == 0:
            if isinstance(error, pika.exceptions.AMQPConnectionError):
                reason = "the broker closed the connection (username, password, virtual_host?)"
            else:
                reason = str(error) or type(error).__name__
            log.warn(
                "Event pusher: RabbitMQ at {host}:{port} not usable (attempt {attempt}):"
                " {reason}; events are buffered meanwhile",
                host=self.settings.host,
                port=self.settings.port,
                attempt=failures,
                reason=reason,
            )
        if connection is not None:
            _disconnect(connection)

    def connection_lost(self, connection: _BrokerConnection, reason: Failure) -> None:
        if connection is not self.connection:
            return  # one that never became ready: _not_ready said why
        self.connection = None
        self.channel = None
        self.buffer.retry_all()
        if self.running:
            log.warn(
                "Event pusher: lost the connection to RabbitMQ ({reason}); {count} events"
                " held until it is back",
                reason=reason.getErrorMessage(),
                count=len(self.buffer),
            )

    def _send(self) -> None:
        channel = self.channel
        buffer = self.buffer
        confirms = self.settings.confirms
        while channel is self.channel and channel is not None and channel.is_open:
            taken = buffer.take()
            if taken is None:
                break
            sequence, event = taken
            sending = channel.basic_publish(event.exchange, event.routing_key, event.body)
            if confirms:
                sending.addCallbacks(self._confirmed, self._refused, (sequence,), None, (sequence,))
            else:
                buffer.confirm(sequence)
                self._burst_over()

    def _confirmed(self, _: object, sequence: int) -> None:
        self.buffer.confirm(sequence)
        self._burst_over()
        self._send()

    def _refused(self, failure: Failure, sequence: int) -> None:
        # A nack (the broker could not take it) or a closed channel: send it again, on this
        # channel if it is still open, else on the next connection's.
        self.buffer.retry(sequence)
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
        if self._connecting is not None:
            self._connecting.cancel()
            self._connecting = None
        connection = self.connection
        if connection is not None and connection.is_open:
            # A clean AMQP close, rather than a cut the broker would log as unexpected.
            connection.close()
            lost = connection.lost.addTimeout(STOP_FLUSH_TIMEOUT, self.reactor)
            await lost.addErrback(lambda _: _disconnect(connection))
        if len(self.buffer):
            log.warn(
                "Event pusher: stopped with {count} events not confirmed by RabbitMQ",
                count=len(self.buffer),
            )

    def stopService(self) -> defer.Deferred:
        super().stopService()
        return defer.ensureDeferred(self._stop())


def _disconnect(connection: _BrokerConnection) -> None:
    if connection.transport is not None:
        connection.transport.abortConnection()
