"""The event pusher without a broker or a process: batches, acks, nacks, the window, restarts.

tests/e2e/test_event_pusher.py runs it against the local RabbitMQ.
"""

from array import array
from types import SimpleNamespace

import pika.spec
from twisted.internet.error import ConnectionLost
from twisted.internet.task import Clock
from twisted.logger import LogLevel, formatEvent, globalLogPublisher
from twisted.python.failure import Failure
from twisted.trial import unittest
from zope.interface.verify import verifyObject

from mim_twisted import hooks
from mim_twisted.config import load_config
from mim_twisted.events import pipe
from mim_twisted.events.formats import HOOK_PRIORITY
from mim_twisted.events.publisher import EventLink, Unconfirmed
from mim_twisted.events.rabbit import (
    BATCH_INTERVAL,
    PublisherProcess,
    RabbitEventPusher,
    RabbitPublisher,
    in_flight_window,
)
from mim_twisted.extensions import IMimExtension, ServerRegistry
from tests.test_config import write
from tests.test_event_amqp import decode_all


def sequences(*numbers: int) -> array:
    return array(pipe.SEQUENCES, numbers)


class FakeProcessTransport:
    """What the publisher writes to its process, as the batches the process reads."""

    def __init__(self) -> None:
        self.batches: list[tuple[int, list[int], list[bytes]]] = []

    def writeSequence(self, pieces: list[bytes]) -> None:
        [(kind, payload)] = pipe.MessageReader().feed(b"".join(pieces))
        assert kind == pipe.BATCH
        epoch, numbers, events = pipe.read_batch(payload)
        self.batches.append((epoch, list(numbers), [body for _, _, body in events]))

    @property
    def published(self) -> list[bytes]:
        return [body for _, _, bodies in self.batches for body in bodies]


class PublisherTests(unittest.TestCase):
    def setUp(self) -> None:
        config = load_config(write(self, "[event_pusher.rabbit]\nmax_buffered_events = 6\n"))
        self.clock = Clock()
        self.publisher = RabbitPublisher(config.event_pusher.rabbit, self.clock)
        self.publisher.running = True
        # As once the process is started and its connection is ready.
        self.process = PublisherProcess(self.publisher)
        self.transport = self.process.transport = FakeProcessTransport()
        self.publisher.process = self.process
        self.publisher.ready(self.process, 1)

    def publish(self, *bodies: bytes) -> None:
        before = list(self.transport.published)
        for body in bodies:
            self.publisher.publish(("chat_msg", "a@localhost.chat_msg_sent", body))
        # The events of a few milliseconds go out together.
        self.assertEqual(self.transport.published, before)
        self.clock.advance(BATCH_INTERVAL)

    def test_events_go_in_batches_and_acks_free_the_window_in_order(self) -> None:
        self.publish(b"1", b"2", b"3", b"4")
        self.assertEqual(self.transport.batches, [(1, [0, 1, 2], [b"1", b"2", b"3"])])
        self.publisher.acked(sequences(0, 1))
        self.clock.advance(BATCH_INTERVAL)
        self.assertEqual(self.transport.batches[1:], [(1, [3], [b"4"])])
        self.publisher.acked(sequences(3, 2))
        self.clock.advance(BATCH_INTERVAL)
        buffer = self.publisher.buffer
        self.assertEqual((len(buffer), buffer.confirmed, buffer.published), (0, 4, 4))

    def test_a_nacked_event_is_sent_again(self) -> None:
        self.publish(b"1", b"2")
        self.publisher.nacked(sequences(0))
        self.clock.advance(BATCH_INTERVAL)
        self.assertEqual(self.transport.published, [b"1", b"2", b"1"])
        self.publisher.acked(sequences(0, 1))
        self.clock.advance(BATCH_INTERVAL)
        self.assertEqual(len(self.publisher.buffer), 0)

    def test_a_lost_connection_sends_everything_again_on_the_next_one(self) -> None:
        self.publish(b"1", b"2")
        self.publisher.lost(self.process, 1, "cut")
        self.assertFalse(self.publisher.connected)
        self.publish(b"3")  # held: no connection
        self.assertEqual(len(self.transport.batches), 1)
        self.publisher.acked(sequences(0))  # a late ack of the connection gone: ignored
        self.clock.advance(BATCH_INTERVAL)
        self.publisher.ready(self.process, 2)
        self.assertEqual(self.transport.batches[1], (2, [0, 1, 2], [b"1", b"2", b"3"]))

    def test_a_lost_of_an_older_connection_is_ignored(self) -> None:
        self.publisher.lost(self.process, 1, "cut")
        self.publisher.ready(self.process, 2)
        self.publisher.lost(self.process, 1, "late")
        self.assertTrue(self.publisher.connected)

    def test_the_process_that_ended_is_started_again_with_back_off(self) -> None:
        started: list[PublisherProcess] = []
        self.publisher._start_process = lambda: started.append(self.publisher.process)
        self.publish(b"1")
        self.publisher.process_ended(self.process, Failure(RuntimeError("killed")))
        self.assertEqual((self.publisher.process, self.publisher.connected), (None, False))
        buffer = self.publisher.buffer
        self.assertEqual((len(buffer), buffer.in_flight), (1, 0))  # held, to be sent again
        self.clock.advance(0.1)
        self.assertEqual(started, [])
        self.clock.advance(1)
        self.assertEqual(started, [None])

    def test_a_full_buffer_counts_its_drops(self) -> None:
        self.publish(*[str(n).encode() for n in range(10)])
        buffer = self.publisher.buffer
        self.assertEqual((len(buffer), buffer.dropped), (6, 4))
        # The oldest went (0 to 3: none was handed over yet); 4, 5 and 6 go, then the rest.
        self.assertEqual(self.transport.published, [b"4", b"5", b"6"])
        self.publisher.acked(sequences(4, 5, 6))
        self.clock.advance(BATCH_INTERVAL)
        self.assertEqual(self.transport.published[3:], [b"7", b"8", b"9"])
        self.assertEqual(buffer.burst_dropped, 0)  # the burst is over, and was logged

    def test_a_burst_of_drops_is_logged_once_when_it_starts_and_once_when_it_ends(self) -> None:
        logged: list[dict] = []
        globalLogPublisher.addObserver(logged.append)
        self.addCleanup(globalLogPublisher.removeObserver, logged.append)
        self.publish(*[str(n).encode() for n in range(20)])
        self.publisher.acked(sequences(14, 15, 16))
        self.clock.advance(BATCH_INTERVAL)
        self.publish(b"later")  # room again: no new burst
        warnings = [formatEvent(e) for e in logged if e.get("log_level") == LogLevel.warn]
        self.assertEqual(len(warnings), 2, warnings)
        self.assertIn("the buffer is full (6 events, broker connected)", warnings[0])
        self.assertIn("14 events dropped while the buffer was full (14 since start)", warnings[1])

    def test_the_process_log_lines_and_errors_come_into_the_log(self) -> None:
        logged: list[dict] = []
        globalLogPublisher.addObserver(logged.append)
        self.addCleanup(globalLogPublisher.removeObserver, logged.append)
        self.process.outReceived(pipe.log_message("warn", "Event pusher: RabbitMQ not usable"))
        self.process.errReceived(b"Traceback (most\nrecent")
        self.process.errReceived(b" call last)\n")
        lines = [(e["log_level"], formatEvent(e)) for e in logged]
        self.assertEqual(
            lines,
            [
                (LogLevel.warn, "Event pusher: RabbitMQ not usable"),
                (LogLevel.warn, "Event pusher: publisher process: Traceback (most"),
                (LogLevel.warn, "Event pusher: publisher process: recent call last)"),
            ],
        )


def ack(tag: int, multiple: bool = False) -> SimpleNamespace:
    return SimpleNamespace(method=pika.spec.Basic.Ack(delivery_tag=tag, multiple=multiple))


def nack(tag: int, multiple: bool = False) -> SimpleNamespace:
    return SimpleNamespace(method=pika.spec.Basic.Nack(delivery_tag=tag, multiple=multiple))


class PublisherProcessTests(unittest.TestCase):
    """The process's side: batches written as they came, acks and nacks as sequence numbers."""

    def setUp(self) -> None:
        self.reports: list[tuple[bytes, bytes]] = []
        settings = {
            "broker": {
                "host": "h",
                "port": 1,
                "virtual_host": "/",
                "username": "guest",
                "password": "guest",
                "tls": False,
            },
            "confirms": True,
            "connection_name": "test",
            "exchanges": [],
        }
        self.clock = Clock()
        self.link = EventLink(settings, self.clock, self.report)
        self.written: list[bytes] = []
        self.link.connection = SimpleNamespace(transport=SimpleNamespace(write=self.written.append))
        self.link.unconfirmed = Unconfirmed()
        self.link.epoch = 3

    def report(self, data: bytes) -> None:
        self.reports += pipe.MessageReader().feed(data)

    def batch(self, epoch: int, numbers: list[int]) -> None:
        events = [("chat_msg", "a@localhost.chat_msg_sent", f"<{n}>".encode()) for n in numbers]
        self.link.batch(b"".join(pipe.batch_message(epoch, sequences(*numbers), events))[5:])

    def bodies(self) -> list[list[bytes]]:
        """The bodies of the basic.publish frames of each write to the broker."""
        return [[frame.fragment for frame in decode_all(data)[2::3]] for data in self.written]

    def settled(self) -> list[tuple[bytes, list[int]]]:
        self.clock.advance(0)  # reported once per reactor turn
        return [(kind, list(pipe.read_sequences(payload))) for kind, payload in self.reports]

    def test_batches_of_the_connection_up_are_written_whole(self) -> None:
        self.batch(3, [10, 11])
        self.batch(2, [12])  # meant for a connection gone: the XMPP process sends it again
        self.batch(3, [13])
        self.assertEqual(self.bodies(), [[b"<10>", b"<11>"], [b"<13>"]])
        [method, _, _] = decode_all(self.written[1])
        self.assertEqual(method.channel_number, 1)
        self.assertEqual(method.method.exchange, "chat_msg")
        self.assertEqual(method.method.routing_key, "a@localhost.chat_msg_sent")

    def test_acks_and_nacks_become_sequence_numbers(self) -> None:
        self.batch(3, [10, 11, 12])
        self.batch(3, [20, 21])
        unconfirmed = self.link.unconfirmed
        self.link._settled(unconfirmed, nack(2))
        self.link._settled(unconfirmed, ack(4, multiple=True))
        self.link._settled(unconfirmed, ack(5))
        self.link._settled(unconfirmed, ack(5))  # twice: nothing
        # Those of one reactor turn together.
        self.assertEqual(self.settled(), [(pipe.ACKED, [10, 12, 20, 21]), (pipe.NACKED, [11])])
        self.assertEqual(len(unconfirmed.batches), 0)

    def test_acks_read_before_the_connection_went_are_reported_before_it(self) -> None:
        self.batch(3, [10, 11])
        self.link._settled(self.link.unconfirmed, ack(1))
        connection = self.link.connection
        self.link.connection_lost(connection, Failure(ConnectionLost("cut")))
        self.assertEqual([kind for kind, _ in self.reports], [pipe.ACKED, pipe.LOST])
        self.assertEqual(pipe.read_sequences(self.reports[0][1]).tolist(), [10])

    def test_without_confirms_written_is_acknowledged(self) -> None:
        self.link.confirms = False
        self.batch(3, [1, 2])
        self.assertEqual(self.settled(), [(pipe.ACKED, [1, 2])])


class PipeTests(unittest.TestCase):
    def test_messages_cut_anywhere_come_out_whole(self) -> None:
        data = (
            pipe.settings_message({"host": "h"})
            + pipe.epoch_message(pipe.LOST, 7, "cut")
            + pipe.sequences_message(pipe.ACKED, sequences(1, 2**40))
        )
        reader = pipe.MessageReader()
        messages = []
        for index in range(len(data)):
            messages += reader.feed(data[index : index + 1])
        [(k1, settings), (k2, lost), (k3, acked)] = messages
        self.assertEqual((k1, k2, k3), (pipe.SETTINGS, pipe.LOST, pipe.ACKED))
        self.assertEqual(settings, b'{"host": "h"}')
        self.assertEqual(pipe.read_epoch(lost), (7, "cut"))
        self.assertEqual(list(pipe.read_sequences(acked)), [1, 2**40])


class PieceTests(unittest.TestCase):
    def test_window(self) -> None:
        self.assertEqual([in_flight_window(n) for n in (1, 2, 500, 100000)], [1, 1, 250, 5000])


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
