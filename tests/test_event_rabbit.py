"""The RabbitMQ publisher's bookkeeping without a broker: acks, nacks, the window, batching.

tests/e2e/test_event_pusher.py runs it against the local RabbitMQ.
"""

from types import SimpleNamespace

import pika.spec
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.logger import LogLevel, formatEvent, globalLogPublisher
from twisted.trial import unittest
from zope.interface.verify import verifyObject

from mim_twisted import hooks
from mim_twisted.config import load_config
from mim_twisted.events.formats import HOOK_PRIORITY, Event
from mim_twisted.events.rabbit import (
    RabbitEventPusher,
    RabbitPublisher,
    _BatchedWrites,
    _Deliveries,
    in_flight_window,
)
from mim_twisted.extensions import IMimExtension, ServerRegistry
from tests.test_config import write
from tests.test_event_amqp import decode_all


class FakeChannel:
    """What the publisher uses of pika's Channel, and the bodies of the frames written for it."""

    channel_number = 1

    def __init__(self) -> None:
        self.is_open = True
        self.published: list[bytes] = []

    def write(self, frames: bytes) -> None:
        [_, _, body] = decode_all(frames)
        self.published.append(body.fragment)


def ack(tag: int, multiple: bool = False) -> SimpleNamespace:
    return SimpleNamespace(method=pika.spec.Basic.Ack(delivery_tag=tag, multiple=multiple))


def nack(tag: int, multiple: bool = False) -> SimpleNamespace:
    return SimpleNamespace(method=pika.spec.Basic.Nack(delivery_tag=tag, multiple=multiple))


class PublisherTests(unittest.TestCase):
    def setUp(self) -> None:
        config = load_config(write(self, "[event_pusher.rabbit]\nmax_buffered_events = 6\n"))
        self.clock = Clock()
        self.publisher = RabbitPublisher(config.event_pusher.rabbit, self.clock)
        self.channel = FakeChannel()
        self.deliveries = _Deliveries(self.channel, self.channel.write)
        # As once a connection is prepared.
        self.publisher.channel = object()
        self.publisher._deliveries = self.deliveries

    def publish(self, *bodies: bytes) -> None:
        before = list(self.channel.published)
        for body in bodies:
            self.publisher.publish(Event("chat_msg", "a@localhost.chat_msg_sent", body))
        # The events of one reactor turn go out together, at its end.
        self.assertEqual(self.channel.published, before)
        self.clock.advance(0)

    def test_acks_free_the_window_in_order(self) -> None:
        self.publish(b"1", b"2", b"3", b"4")
        self.assertEqual(self.channel.published, [b"1", b"2", b"3"])  # window: half of 6
        self.publisher._settled(self.deliveries, ack(2, multiple=True))
        self.assertEqual(self.channel.published, [b"1", b"2", b"3", b"4"])
        self.publisher._settled(self.deliveries, ack(4))
        self.publisher._settled(self.deliveries, ack(3))  # single acks in any order
        buffer = self.publisher.buffer
        self.assertEqual((len(buffer), buffer.confirmed, buffer.published), (0, 4, 4))

    def test_a_nacked_event_is_sent_again(self) -> None:
        self.publish(b"1", b"2")
        self.publisher._settled(self.deliveries, nack(1))
        self.assertEqual(self.channel.published, [b"1", b"2", b"1"])
        self.publisher._settled(self.deliveries, ack(3, multiple=True))
        self.assertEqual(len(self.publisher.buffer), 0)

    def test_acks_of_a_channel_gone_are_ignored(self) -> None:
        self.publish(b"1")
        self.publisher.connection_lost(self.publisher.connection, None)  # the connection goes
        self.assertIsNone(self.publisher.channel)
        self.publisher._settled(self.deliveries, ack(1))
        self.assertEqual((len(self.publisher.buffer), self.publisher.buffer.confirmed), (1, 0))

    def test_a_full_buffer_counts_its_drops(self) -> None:
        self.publish(*[str(n).encode() for n in range(10)])
        buffer = self.publisher.buffer
        self.assertEqual((len(buffer), buffer.dropped), (6, 4))
        self.publisher._settled(self.deliveries, ack(3, multiple=True))
        # The oldest pending ones went: 3, 4, 5 and 6; 7, 8 and 9 follow the first three.
        self.assertEqual(self.channel.published[3:], [b"7", b"8", b"9"])
        self.assertEqual(buffer.burst_dropped, 0)  # the burst is over, and was logged

    def test_a_burst_of_drops_is_logged_once_when_it_starts_and_once_when_it_ends(self) -> None:
        logged: list[dict] = []
        globalLogPublisher.addObserver(logged.append)
        self.addCleanup(globalLogPublisher.removeObserver, logged.append)
        self.publish(*[str(n).encode() for n in range(20)])
        self.publisher._settled(self.deliveries, ack(3, multiple=True))
        self.publish(b"later")  # room again: no new burst
        warnings = [formatEvent(e) for e in logged if e.get("log_level") == LogLevel.warn]
        self.assertEqual(len(warnings), 2, warnings)
        self.assertIn("the buffer is full (6 events, broker connected)", warnings[0])
        self.assertIn("14 events dropped while the buffer was full (14 since start)", warnings[1])


class PieceTests(unittest.TestCase):
    def test_window(self) -> None:
        self.assertEqual([in_flight_window(n) for n in (1, 2, 500, 100000)], [1, 1, 250, 1000])

    def test_writes_of_one_turn_go_out_together(self) -> None:
        clock = Clock()
        transport = StringTransport()
        batched = _BatchedWrites(transport, clock)
        batched.write(b"method")
        batched.write(b"header")
        self.assertEqual(transport.value(), b"")
        clock.advance(0)
        self.assertEqual(transport.value(), b"methodheader")
        batched.write(b"body")
        batched.loseConnection()  # written before the connection closes
        self.assertEqual(transport.value(), b"methodheaderbody")
        self.assertTrue(transport.disconnecting)


class BuiltInExtensionTests(unittest.TestCase):
    def test_installs_its_hooks_and_its_service_like_any_extension(self) -> None:
        extension = RabbitEventPusher(Clock())
        verifyObject(IMimExtension, extension)
        registry = ServerRegistry()
        extension.install(registry, load_config(None).event_pusher.rabbit)
        self.assertEqual(registry.extension_services, [extension.publisher])
        self.assertEqual(
            sorted((name, priority) for name, _, priority in registry.hook_handlers),
            sorted(
                (name, HOOK_PRIORITY)
                for name in (
                    hooks.USER_AVAILABLE,
                    hooks.USER_UNAVAILABLE,
                    hooks.MESSAGE_SENT,
                    hooks.MESSAGE_DELIVERED,
                )
            ),
        )
