"""The cluster bus: messages between the nodes of a cluster over RabbitMQ.

Two exchanges per cluster (named by `cluster.name`, so that clusters sharing a virtual host stay
apart). `mim.cluster.<name>.nodes` is a direct exchange keyed by node name, each node reading
its own queue: what one node has for another (stanzas for its sessions).
`mim.cluster.<name>.events` is a fanout exchange every node reads: what all must know
(sessions up and down, heartbeats, caches to drop). A node's queue waits for it through a lost
connection for twice `node_timeout`: long enough for the others, once they take it for dead,
to take what waits there (`drain`); then the broker deletes it, so nothing piles up for a node
that is gone. Its events queue goes with its connection.

A message is a kind and a JSON payload; `on(kind, handler)` subscribes to a kind, whichever
exchange it comes on, and a node does not hear its own broadcasts. While the broker is away,
messages wait in a bounded buffer; one that finds it full is refused at once (`send`'s
`undeliverable` is called) rather than pushing out an older one, so the caller can answer it
(RFC 6121: stored offline or <service-unavailable/>).
"""

import json
from collections import deque
from collections.abc import Callable
from typing import Any, NamedTuple

import pika.exceptions
from twisted.internet import defer
from twisted.logger import Logger
from twisted.python.failure import Failure

from mim_twisted.config import ClusterConfig
from mim_twisted.events.amqp import publish_frames, short_string
from mim_twisted.events.broker import BrokerConnection, BrokerLink, disconnect

log = Logger()


def nodes_exchange(cluster: str) -> str:
    return f"mim.cluster.{cluster}.nodes"


def events_exchange(cluster: str) -> str:
    return f"mim.cluster.{cluster}.events"


def node_queue(cluster: str, node: str) -> str:
    return f"mim.{cluster}.node.{node}"


# AMQP's reply code for a declaration that differs from the existing entity's.
PRECONDITION_FAILED = 406

# `handler(node, payload)`: the node it came from and the payload as sent.
Handler = Callable[[str, Any], None]

# The kind of a message carrying several broadcasts: its payload is their [kind, payload]s.
BATCH = "batch"


class _Outgoing(NamedTuple):
    exchange: bytes  # AMQP shortstrs
    routing_key: bytes
    body: bytes
    undeliverable: Callable[[], None] | None


def encode(node: str, kind: str, payload: Any) -> bytes:
    return json.dumps([kind, node, payload], separators=(",", ":")).encode("utf-8")


def decode(body: bytes) -> tuple[str, str, Any]:
    """(kind, node, payload) of a message; ValueError if it is not one of ours."""
    message = json.loads(body)
    if not (isinstance(message, list) and len(message) == 3):
        raise ValueError("not a cluster message")
    kind, node, payload = message
    if not (isinstance(kind, str) and isinstance(node, str)):
        raise ValueError("not a cluster message")
    return kind, node, payload


class ClusterBus(BrokerLink):
    """This node's end of the bus; `connected` while messages go out at once."""

    name = "cluster-bus"
    label = "Cluster"
    meanwhile = "messages for other nodes are held meanwhile"

    def __init__(self, settings: ClusterConfig, reactor: Any, *, retry_policy: Any = None):
        super().__init__(
            settings.rabbit,
            reactor,
            connection_name=f"mim-twisted cluster node {settings.node}",
            retry_policy=retry_policy,
        )
        self.node = settings.node
        self.node_timeout = settings.node_timeout
        self.max_buffered = settings.max_buffered_messages
        self._handlers: dict[str, list[Handler]] = {}
        self._held: deque[_Outgoing] = deque()
        self._write: Callable[[bytes], None] | None = None
        self._channel_number = 0
        self.cluster = settings.name
        self._nodes_exchange = short_string(nodes_exchange(self.cluster))
        self._events_exchange = short_string(events_exchange(self.cluster))
        self._node_keys: dict[str, bytes] = {}
        # Called without arguments each time the bus is (again) connected, or lost.
        self.connected_listeners: list[Callable[[], None]] = []
        self.lost_listeners: list[Callable[[], None]] = []
        # The broadcasts of this reactor turn, sent together at its end (see broadcast).
        self._broadcasts: list[list[Any]] = []
        self._broadcasting: Any = None

    @property
    def connected(self) -> bool:
        return self._write is not None

    @property
    def waiting(self) -> int:
        """Messages held until the broker is back."""
        return len(self._held)

    # -- the node's side -------------------------------------------------------------------

    def on(self, kind: str, handler: Handler) -> None:
        """Call `handler(node, payload)` for each message of `kind` from another node."""
        self._handlers.setdefault(kind, []).append(handler)

    def broadcast(self, kind: str, payload: Any) -> None:
        """To every other node (JSON-serialisable `payload`).

        The broadcasts of one reactor turn go as one message at its end (a burst of logins
        announces many sessions a turn, and each message costs every node a few frames to
        read), or at once before a message to one node, so that the node's messages keep
        their order."""
        if not self._broadcasts:
            self._broadcasting = self.reactor.callLater(0, self._send_broadcasts)
        self._broadcasts.append([kind, payload])

    def _send_broadcasts(self) -> None:
        if self._broadcasting is not None and self._broadcasting.active():
            self._broadcasting.cancel()
        self._broadcasting = None
        broadcasts, self._broadcasts = self._broadcasts, []
        if not broadcasts:
            return
        if len(broadcasts) == 1:
            [(kind, payload)] = broadcasts
            body = encode(self.node, kind, payload)
        else:
            body = encode(self.node, BATCH, broadcasts)
        self._publish(_Outgoing(self._events_exchange, b"\x00", body, None))

    def send(
        self,
        node: str,
        kind: str,
        payload: Any,
        undeliverable: Callable[[], None] | None = None,
    ) -> None:
        """To one node; `undeliverable()` is called if the buffer has no room for it."""
        self._send_broadcasts()
        key = self._node_keys.get(node)
        if key is None:
            key = self._node_keys[node] = short_string(node)
        self._publish(
            _Outgoing(self._nodes_exchange, key, encode(self.node, kind, payload), undeliverable)
        )

    def _publish(self, message: _Outgoing) -> None:
        write = self._write
        if write is not None:
            write(
                publish_frames(
                    self._channel_number, message.exchange, message.routing_key, message.body
                )
            )
            return
        if len(self._held) < self.max_buffered:
            self._held.append(message)
            return
        if message.undeliverable is not None:
            message.undeliverable()
        else:
            log.warn("Cluster: the buffer for other nodes is full; a cluster event is dropped")

    def _received(self, channel: Any, method: Any, properties: Any, body: bytes) -> None:
        try:
            kind, node, payload = decode(body)
        except ValueError:
            log.warn("Cluster: a message that is not a cluster message was dropped")
            return
        if node == self.node:
            return  # its own broadcast
        if kind != BATCH:
            self._dispatch(node, kind, payload)
            return
        for each_kind, each_payload in payload:
            self._dispatch(node, each_kind, each_payload)

    def _dispatch(self, node: str, kind: str, payload: Any) -> None:
        for handler in self._handlers.get(kind, ()):
            try:
                handler(node, payload)
            except Exception:
                log.failure("Cluster: handling a {kind} message from {node}", kind=kind, node=node)

    # -- the broker side -------------------------------------------------------------------

    async def _prepare(self, connection: BrokerConnection) -> None:
        channel = await connection.channel()
        nodes, events = nodes_exchange(self.cluster), events_exchange(self.cluster)
        await channel.exchange_declare(exchange=nodes, exchange_type="direct")
        await channel.exchange_declare(exchange=events, exchange_type="fanout")
        # A channel closed by the broker (an error of ours) takes the connection with it, so
        # that a new one is made.
        channel.on_closed.addBoth(lambda _: disconnect(connection))
        raw = channel._channel
        # The node's queue outlives a lost connection for as long as the node is not yet
        # taken for dead, so what other nodes send meanwhile waits for it, and as long again
        # for the others to drain it once they have taken it for dead (a heartbeat interval
        # late at most); the broker deletes it once it has been unused for that long. Events
        # missed while away are not needed: the session table is read again on reconnection.
        own_queue = node_queue(self.cluster, self.node)
        await self._declare_node_queue(connection, own_queue)
        events_queue = f"mim.{self.cluster}.events.{self.node}"
        await channel.queue_declare(queue=events_queue, exclusive=True, auto_delete=True)
        for queue, exchange, key in ((own_queue, nodes, self.node), (events_queue, events, "")):
            await channel.queue_bind(queue=queue, exchange=exchange, routing_key=key)
            consuming: defer.Deferred = defer.Deferred()
            # pika's own channel: a callback per message, no Deferred queue in between.
            raw.basic_consume(queue, self._received, auto_ack=True, callback=consuming.callback)
            await consuming
        self._channel_number = raw.channel_number
        # Through the same transport as pika's own frames, so they keep their order.
        self._write = connection.transport.write

    async def _declare_node_queue(self, connection: BrokerConnection, queue: str) -> None:
        """Declare the node's own queue, making it again if it is there with other arguments.

        Arguments of a queue cannot change: a node started again with another `node_timeout`
        would have its declaration refused (PRECONDITION_FAILED) for as long as the queue
        lives, which, consumed by no one, is until it expires. What waits in it was for the
        node's previous run, whose sessions are gone."""
        expires = {"x-expires": int(2 * self.node_timeout * 1000)}
        # Channels of their own: a refused declaration closes the channel it was made on.
        channel = await connection.channel()
        try:
            await channel.queue_declare(queue=queue, arguments=expires)
        except pika.exceptions.ChannelClosedByBroker as e:
            if e.reply_code != PRECONDITION_FAILED:
                raise
            log.warn(
                "Cluster: queue {queue} was declared with other arguments ({reason}); it is"
                " deleted and made again",
                queue=queue,
                reason=e.reply_text,
            )
            channel = await connection.channel()
            await channel.queue_delete(queue=queue)
            await channel.queue_declare(queue=queue, arguments=expires)
        channel.close()

    def _ready(self) -> None:
        held, self._held = self._held, deque()
        log.info(
            "Cluster: node {node} connected to RabbitMQ at {host}:{port}, {count} messages to send",
            node=self.node,
            host=self.settings.host,
            port=self.settings.port,
            count=len(held),
        )
        for message in held:
            self._publish(message)
        for listener in self.connected_listeners:
            listener()

    def _lost(self, reason: Failure) -> None:
        self._write = None
        if self.running:
            log.warn(
                "Cluster: node {node} lost the connection to RabbitMQ ({reason}); messages"
                " for other nodes are held until it is back",
                node=self.node,
                reason=reason.getErrorMessage(),
            )
            for listener in self.lost_listeners:
                listener()

    async def drain(self, node: str) -> list[tuple[str, Any]]:
        """Take what waits in the queue of `node`, a node taken for dead: the (kind, payload)
        of each message, oldest first. Nothing while this node's own connection is down or
        once the queue is gone; a message taken here is taken by no other node."""
        connection = self.connection
        if connection is None or not self.connected:
            return []
        # A channel of its own: the broker closes it if the queue has gone (404), which must
        # not take the channel the node consumes on with it.
        channel = await connection.channel()
        taken = []
        try:
            while True:
                message = await channel.basic_get(node_queue(self.cluster, node), auto_ack=True)
                if message is None:
                    break
                try:
                    kind, _, payload = decode(message.body)
                except ValueError:
                    continue
                taken.append((kind, payload))
        except pika.exceptions.ChannelClosedByBroker:
            return taken  # the queue has expired, or was never there
        channel.close()
        return taken

    def stopService(self) -> defer.Deferred:
        self._send_broadcasts()  # the last turn's ("stopped"), before the connection closes
        super().stopService()
        return defer.ensureDeferred(self._close())
