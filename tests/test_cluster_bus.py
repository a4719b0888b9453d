"""The cluster bus on the local RabbitMQ: one node's messages reach another, broadcasts reach
every other node but not the sender, and what waits while the broker is away is bounded."""

import dataclasses

import pika
from twisted.internet import defer, reactor, task
from twisted.trial import unittest

from mim_twisted.cluster.bus import ClusterBus, decode, encode, node_queue
from mim_twisted.config import load_config
from tests.rabbitsupport import BrokerRelay, require_broker, unique


def cluster_settings(
    node: str, port: int = 5672, max_buffered: int = 10000, cluster_name: str = "mim"
):
    cluster = load_config(None).cluster
    return dataclasses.replace(
        cluster,
        enabled=True,
        name=cluster_name,
        node=node,
        rabbit=dataclasses.replace(cluster.rabbit, port=port),
        max_buffered_messages=max_buffered,
    )


async def until(condition, timeout: float = 10.0) -> None:
    waited = 0.0
    while not condition():
        if waited > timeout:
            raise AssertionError("timed out")
        await task.deferLater(reactor, 0.02, lambda: None)
        waited += 0.02


class EncodingTests(unittest.TestCase):
    def test_round_trip(self) -> None:
        self.assertEqual(decode(encode("n1", "up", {"a": [1]})), ("up", "n1", {"a": [1]}))

    def test_foreign_bodies_are_refused(self) -> None:
        for body in (b"{}", b"[1, 2, 3]", b"not json"):
            self.assertRaises(ValueError, decode, body)


class BufferTests(unittest.TestCase):
    def test_a_full_buffer_refuses_the_newest_and_says_so(self) -> None:
        bus = ClusterBus(cluster_settings("n1", max_buffered=2), reactor)
        refused = []
        for number in range(3):
            bus.send("n2", "stanzas", number, lambda number=number: refused.append(number))
        self.assertEqual(refused, [2])
        self.assertFalse(bus.connected)


class BroadcastTurnTests(unittest.TestCase):
    def setUp(self) -> None:
        self.clock = task.Clock()
        self.bus = ClusterBus(cluster_settings("n1"), self.clock)  # not connected: held

    def bodies(self) -> list[tuple[str, str, object]]:
        return [decode(message.body) for message in self.bus._held]

    def test_the_broadcasts_of_a_turn_are_one_message(self) -> None:
        self.bus.broadcast("session", ["a@localhost/r", None, None, None])
        self.bus.broadcast("unbound", "b@localhost/r")
        self.assertEqual(self.bodies(), [])
        self.clock.advance(0)
        self.assertEqual(
            self.bodies(),
            [("batch", "n1", [["session", ["a@localhost/r", None, None, None]],
                              ["unbound", "b@localhost/r"]])],
        )  # fmt: skip
        self.bus.broadcast("heartbeat", None)
        self.clock.advance(0)
        self.assertEqual(self.bodies()[1:], [("heartbeat", "n1", None)])

    def test_a_message_to_one_node_goes_after_the_broadcasts_before_it(self) -> None:
        self.bus.broadcast("session", "first")
        self.bus.send("n2", "replace", "a@localhost/r")
        self.clock.advance(0)
        self.assertEqual(
            self.bodies(), [("session", "n1", "first"), ("replace", "n1", "a@localhost/r")]
        )

    def test_a_batch_is_handled_in_order(self) -> None:
        heard = []
        for kind in ("session", "unbound"):
            self.bus.on(kind, lambda node, payload, kind=kind: heard.append((kind, node, payload)))
        body = encode("n2", "batch", [["session", 1], ["unbound", 2], ["session", 3]])
        self.bus._received(None, None, None, body)
        self.assertEqual(heard, [("session", "n2", 1), ("unbound", "n2", 2), ("session", "n2", 3)])


class BrokerTests(unittest.TestCase):
    def setUp(self) -> None:
        require_broker()
        self.cluster_name = unique("cluster")

    def start(
        self,
        node: str,
        port: int = 5672,
        cluster_name: str | None = None,
        node_timeout: float | None = None,
    ) -> ClusterBus:
        settings = cluster_settings(node, port, cluster_name=cluster_name or self.cluster_name)
        if node_timeout is not None:
            settings = dataclasses.replace(
                settings, node_timeout=node_timeout, heartbeat_interval=node_timeout / 3
            )
        bus = ClusterBus(settings, reactor, retry_policy=lambda attempt: 0.1)
        bus.startService()
        self.addCleanup(bus.stopService)
        return bus

    @defer.inlineCallbacks
    def test_send_broadcast_and_on(self):
        one, two, three = (self.start(unique(name)) for name in ("a", "b", "c"))
        heard: list[tuple[str, str, object]] = []
        for bus in (one, two, three):
            bus.on("ping", lambda node, payload, bus=bus: heard.append((bus.node, node, payload)))
        yield defer.ensureDeferred(
            until(lambda: one.connected and two.connected and three.connected)
        )
        one.send(two.node, "ping", {"direct": True})
        one.broadcast("ping", "all")
        yield defer.ensureDeferred(until(lambda: len(heard) == 3))
        self.assertEqual(
            sorted(heard, key=repr),
            sorted(
                [
                    (two.node, one.node, {"direct": True}),
                    (two.node, one.node, "all"),
                    (three.node, one.node, "all"),
                ],
                key=repr,
            ),
        )

    @defer.inlineCallbacks
    def test_held_while_the_broker_is_away_and_sent_when_back(self):
        relay = BrokerRelay()
        self.addCleanup(lambda: defer.ensureDeferred(relay.close()))
        sender = self.start(unique("s"), relay.port)
        receiver = self.start(unique("r"))
        heard = []
        receiver.on("ping", lambda node, payload: heard.append(payload))
        yield defer.ensureDeferred(until(lambda: sender.connected and receiver.connected))
        lost = []
        sender.lost_listeners.append(lambda: lost.append(True))
        relay.cut()
        yield defer.ensureDeferred(until(lambda: not sender.connected))
        self.assertEqual(lost, [True])
        sender.send(receiver.node, "ping", 1)
        relay.restore()
        yield defer.ensureDeferred(until(lambda: heard == [1]))

    @defer.inlineCallbacks
    def test_clusters_on_one_virtual_host_do_not_hear_each_other(self):
        # Staging beside production on one broker: same node names, different cluster names.
        ours, theirs = self.start("n1"), self.start("n1", cluster_name=unique("other"))
        our_peer, their_peer = self.start("n2"), self.start("n2", cluster_name=theirs.cluster)
        heard: list[tuple[str, object]] = []
        for bus in (ours, theirs, our_peer, their_peer):
            bus.on("ping", lambda node, payload, bus=bus: heard.append((bus.cluster, payload)))
        yield defer.ensureDeferred(
            until(
                lambda: all(bus.connected for bus in (ours, theirs, our_peer, their_peer)),
                timeout=60,
            )
        )
        theirs.broadcast("ping", "theirs, to all")
        theirs.send("n2", "ping", "theirs, to n2")
        ours.broadcast("ping", "ours, to all")
        yield defer.ensureDeferred(until(lambda: len(heard) == 3))
        yield task.deferLater(reactor, 0.2, lambda: None)
        self.assertEqual(
            sorted(heard),
            sorted(
                [
                    (theirs.cluster, "theirs, to all"),
                    (theirs.cluster, "theirs, to n2"),
                    (ours.cluster, "ours, to all"),
                ]
            ),
        )

    @defer.inlineCallbacks
    def test_a_node_queue_left_with_another_expiry_is_made_again(self):
        # A node restarted with another node_timeout (or after an upgrade that changed it)
        # finds its queue declared with other arguments: the broker refuses the declaration
        # (PRECONDITION_FAILED) until the queue is made again.
        node = unique("n")
        queue = node_queue(self.cluster_name, node)
        connection = pika.BlockingConnection(pika.ConnectionParameters("127.0.0.1"))
        self.addCleanup(connection.close)
        channel = connection.channel()
        channel.queue_declare(queue, arguments={"x-expires": 3_600_000})
        self.addCleanup(channel.queue_delete, queue)
        bus = self.start(node, node_timeout=10.0)
        other = self.start(unique("o"))
        heard = []
        bus.on("ping", lambda node, payload: heard.append(payload))
        yield defer.ensureDeferred(until(lambda: bus.connected and other.connected))
        other.send(node, "ping", 1)
        yield defer.ensureDeferred(until(lambda: heard == [1]))
        declared = channel.queue_declare(queue, passive=True)
        self.assertEqual(declared.method.consumer_count, 1)
