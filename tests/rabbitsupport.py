"""The local RabbitMQ for tests: a consumer on an exclusive queue, and a TCP relay to cut.

Both run on the test's reactor. `Consumer` binds one exclusive, auto-deleted queue per test to
the exchanges it is given and collects what arrives. `BrokerRelay` listens on a loopback port
and forwards to the broker; a test can pause it (the broker seems blocked: nothing is read or
written), cut its connections and refuse new ones (the broker seems gone), and restore it.
"""

import json
import socket
import uuid
from typing import Any

from twisted.internet import defer, protocol, reactor, task

from tests.ci import unavailable

BROKER = ("127.0.0.1", 5672)
TIMEOUT = 20.0


def require_broker() -> None:
    try:
        socket.create_connection(BROKER, timeout=2).close()
    except OSError:
        unavailable(
            f"RabbitMQ does not answer on {BROKER[0]}:{BROKER[1]}",
            "start rabbitmq-server (guest/guest)",
        )


def unique(prefix: str) -> str:
    """A name no other test run uses (tests on one machine share the broker)."""
    return f"{prefix}-{uuid.uuid4().hex[:10]}"


class Delivery:
    def __init__(self, exchange: str, routing_key: str, body: bytes) -> None:
        self.exchange = exchange
        self.routing_key = routing_key
        self.body = body

    @property
    def json(self) -> Any:
        return json.loads(self.body)

    def __repr__(self) -> str:
        return f"Delivery({self.exchange!r}, {self.routing_key!r}, {self.body!r})"


class Consumer:
    """An exclusive queue bound to exchanges; `deliveries` in the order they arrived."""

    def __init__(self) -> None:
        self.deliveries: list[Delivery] = []
        self.connection: Any = None
        self.channel: Any = None
        self.queue = ""
        self._declared: list[str] = []

    async def start(self) -> "Consumer":
        from pika import ConnectionParameters, PlainCredentials
        from pika.adapters.twisted_connection import TwistedProtocolConnection

        creator = protocol.ClientCreator(
            reactor,
            TwistedProtocolConnection,
            ConnectionParameters(credentials=PlainCredentials("guest", "guest")),
        )
        self.connection = await creator.connectTCP(*BROKER)
        await self.connection.ready
        self.channel = await self.connection.channel()
        frame = await self.channel.queue_declare(queue="", exclusive=True, auto_delete=True)
        self.queue = frame.method.queue
        return self

    async def bind(self, exchange: str, routing_key: str = "#", exchange_type: str = "topic"):
        """Bind the queue (declaring the exchange, deleted again by `stop`)."""
        await self.channel.exchange_declare(exchange=exchange, exchange_type=exchange_type)
        self._declared.append(exchange)
        await self.channel.queue_bind(queue=self.queue, exchange=exchange, routing_key=routing_key)

    async def consume(self) -> None:
        queue, _ = await self.channel.basic_consume(queue=self.queue, auto_ack=True)
        self._consuming = defer.ensureDeferred(self._read(queue))

    async def _read(self, queue: Any) -> None:
        while True:
            try:
                _, method, _, body = await queue.get()
            except Exception:
                return  # the channel closed
            self.deliveries.append(Delivery(method.exchange, method.routing_key, body))

    async def wait_for(self, count: int, timeout: float = TIMEOUT) -> list[Delivery]:
        """At least `count` deliveries; fails the test after `timeout` seconds."""
        waited = 0.0
        while len(self.deliveries) < count:
            if waited >= timeout:
                raise AssertionError(
                    f"{len(self.deliveries)} deliveries, {count} expected: {self.deliveries[-5:]}"
                )
            await task.deferLater(reactor, 0.02, lambda: None)
            waited += 0.02
        return self.deliveries

    async def quiet(self, seconds: float = 0.3) -> list[Delivery]:
        """The deliveries once none has arrived for `seconds`."""
        seen = -1
        while seen != len(self.deliveries):
            seen = len(self.deliveries)
            await task.deferLater(reactor, seconds, lambda: None)
        return self.deliveries

    async def stop(self) -> None:
        if self.channel is None:
            return
        for exchange in self._declared:
            await self.channel.exchange_delete(exchange=exchange)
        closed = self.connection.close()
        if closed is not None:
            await closed


class _Forward(protocol.Protocol):
    """One side of a relayed connection; writes what it reads to the other side."""

    def __init__(self, relay: "BrokerRelay") -> None:
        self.relay = relay
        self.peer: _Forward | None = None
        self.held: list[bytes] = []

    def dataReceived(self, data: bytes) -> None:
        if self.peer is None or self.peer.transport is None:
            self.held.append(data)
        else:
            self.peer.transport.write(data)

    def connectionLost(self, reason: Any = None) -> None:
        self.relay.sides.discard(self)
        if self.peer is not None and self.peer.transport is not None:
            self.peer.transport.loseConnection()


class _ClientSide(_Forward):
    def connectionMade(self) -> None:
        relay = self.relay
        if relay.refusing:
            self.transport.abortConnection()
            return
        relay.sides.add(self)
        relay.accepted += 1
        if relay.paused:
            self.transport.pauseProducing()
        creator = protocol.ClientCreator(reactor, _Forward, relay)
        creator.connectTCP(*BROKER).addCallbacks(self._connected, self._failed)

    def _connected(self, broker_side: _Forward) -> None:
        if self.transport is None or not self.transport.connected:
            broker_side.transport.loseConnection()
            return
        self.relay.sides.add(broker_side)
        self.peer, broker_side.peer = broker_side, self
        if self.relay.paused:
            broker_side.transport.pauseProducing()
        for data in self.held:
            broker_side.transport.write(data)
        self.held = []

    def _failed(self, failure: Any) -> None:
        self.transport.loseConnection()


class BrokerRelay(protocol.Factory):
    """A loopback port in front of the broker; `port` is where the pusher should connect.

    With `tls` (Twisted server TLS options) it is a TLS port that the relay terminates: AMQPS
    in front of the broker's plain AMQP, whose configuration stays as it is."""

    def __init__(self, tls: Any = None) -> None:
        self.sides: set[_Forward] = set()
        self.paused = False
        self.refusing = False
        self.accepted = 0
        if tls is None:
            self.listening = reactor.listenTCP(0, self, interface="127.0.0.1")
        else:
            self.listening = reactor.listenSSL(0, self, tls, interface="127.0.0.1")
        self.port = self.listening.getHost().port

    def buildProtocol(self, addr: Any) -> _ClientSide:
        return _ClientSide(self)

    def pause(self) -> None:
        """Stop reading both ways: the broker neither hears nor answers."""
        self.paused = True
        for side in self.sides:
            side.transport.pauseProducing()

    def resume(self) -> None:
        self.paused = False
        for side in self.sides:
            side.transport.resumeProducing()

    def cut(self, *, refuse: bool = True) -> None:
        """Drop every relayed connection; with `refuse`, new ones too until `restore`."""
        self.refusing = refuse
        for side in list(self.sides):
            side.transport.abortConnection()

    def restore(self) -> None:
        self.refusing = False

    async def close(self) -> None:
        self.cut()
        await self.listening.stopListening()
