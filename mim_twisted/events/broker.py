"""One AMQP connection to RabbitMQ kept up: pika's Twisted adapter under a Twisted service.

`BrokerLink` connects at start, makes the connection again with back-off (Twisted's
`backoffPolicy`) whenever it is lost, and closes it cleanly at stop; what is done with it is a
subclass's. The event pusher's publisher process (mim_twisted.events.publisher) and the cluster
bus (mim_twisted.cluster.bus) are the two.

(`ClientService` would reconnect for us, but a connection lost while it is being prepared, or
closed after preparing it failed, trips its state machine.)
"""

import random
import socket
from typing import Any

import pika
import pika.exceptions
from pika.adapters.twisted_connection import TwistedProtocolConnection
from twisted.application import internet, service
from twisted.internet import defer, endpoints, error, protocol, ssl, task
from twisted.logger import Logger
from twisted.python.failure import Failure

from mim_twisted.config import BrokerConfig

log = Logger()

# Seconds that a TCP connection to the broker may take.
CONNECT_TIMEOUT = 10

# Seconds that a stop waits for the AMQP connection to close cleanly.
CLOSE_TIMEOUT = 2.0

# What pika raises when the broker refused the login.
LOGIN_REFUSED = (
    pika.exceptions.ProbableAuthenticationError,
    pika.exceptions.AuthenticationError,
    pika.exceptions.ProbableAccessDeniedError,
)


class BrokerConnection(TwistedProtocolConnection):
    """A pika connection that says when its TCP connection has gone (`when_lost`)."""

    def __init__(self, link: "BrokerLink", parameters: pika.ConnectionParameters):
        super().__init__(parameters, custom_reactor=link.reactor)
        self.link = link
        self.lost_reason: Failure | None = None
        self._lost_waiters: list[defer.Deferred] = []

    def when_lost(self) -> defer.Deferred:
        """A Deferred of its own, fired with None once the TCP connection has gone (at once if
        it has): cancelling one, as a stop does to what waits on it, leaves the others be."""
        waiting: defer.Deferred = defer.Deferred()
        if self.lost_reason is not None:
            waiting.callback(None)
        else:
            self._lost_waiters.append(waiting)
        return waiting

    def makeConnection(self, transport: Any) -> None:
        super().makeConnection(_BatchedWrites(transport, self.link.reactor))

    def connectionLost(self, reason: Failure = protocol.connectionDone) -> None:
        self.lost_reason = reason
        # The link first: nothing more is sent on the channel that closes.
        self.link.connection_lost(self, reason)
        super().connectionLost(reason)
        waiters, self._lost_waiters = self._lost_waiters, []
        for waiting in waiters:
            if not waiting.called:  # cancelled: its waiter has stopped waiting
                waiting.callback(None)


class _BatchedWrites:
    """A transport whose writes of one reactor turn go out together.

    pika writes each frame on its own, three per message (method, header, body); gathered, a
    burst of messages costs one write instead of three per message."""

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


class _BrokerFactory(protocol.Factory):
    noisy = False

    def __init__(self, link: "BrokerLink") -> None:
        self.link = link

    def buildProtocol(self, addr: Any) -> BrokerConnection:
        return BrokerConnection(self.link, self.link.connection_parameters())


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
        self.connection: BrokerConnection | None = None
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
            await connection.when_lost()

    async def _prepare(self, connection: BrokerConnection) -> None:
        """Declare what the link uses on a new connection; fail to have it made again."""
        raise NotImplementedError

    def _ready(self) -> None:
        """The connection prepared is `self.connection`, to be used from now on."""

    def _lost(self, reason: Failure) -> None:
        """The connection that was ready is gone (`self.connection` is None again)."""

    def _not_ready(
        self, problem: Exception, connection: BrokerConnection | None, failures: int
    ) -> None:
        # The first failure in a row, then every tenth: an outage is not a log flood.
        if failures == 1 or failures % 10 == 0:
            cut = connection.lost_reason if connection is not None else None
            if isinstance(problem, LOGIN_REFUSED):
                reason = "the broker refused the login (username, password, virtual_host?)"
            elif cut is not None and not cut.check(error.ConnectionDone):
                reason = cut.getErrorMessage()  # e.g. the TLS handshake's
            elif isinstance(problem, pika.exceptions.AMQPConnectionError):
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
            disconnect(connection)

    def connection_lost(self, connection: BrokerConnection, reason: Failure) -> None:
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
            lost = connection.when_lost().addTimeout(CLOSE_TIMEOUT, self.reactor)
            await lost.addErrback(lambda _: disconnect(connection))


def fail_unless_called(_: object, waiting: defer.Deferred) -> None:
    """For `connection.when_lost()`: the connection went before the broker answered, so no answer
    will come to what `waiting` waits for."""
    if not waiting.called:
        waiting.errback(error.ConnectionLost("the connection went during its set-up"))


def disconnect(connection: BrokerConnection) -> None:
    if connection.transport is not None:
        connection.transport.abortConnection()
