"""The event pusher's RabbitMQ publisher on the XMPP side: a Twisted service that buffers the
events and feeds them to the publisher process (mim_twisted.events.publisher), which owns the
AMQP connection.

`publish` never waits: an event (a tuple of strings) goes into the bounded `EventBuffer`. Every
few milliseconds, the events that may go (at most the in-flight window) are written to the
publisher process in one batch, for the broker connection it last said was ready
(mim_twisted.events.pipe). They stay in the buffer until the process reports them acknowledged
by the broker (publisher confirms); a nack, a lost broker connection or the process's death puts
them back, in order, and they are sent again: an event can arrive twice but is never lost while
the buffer has room. The process is started with `spawnProcess` and started again with back-off
whenever it exits; its log lines come into this process's log.
"""

import dataclasses
import os
import random
import socket
import sys
from array import array
from typing import Any

from twisted.application import internet, service
from twisted.internet import defer, protocol, task
from twisted.logger import Logger, LogLevel
from twisted.python.failure import Failure
from zope.interface import implementer

import mim_twisted
from mim_twisted.config import BrokerConfig, RabbitConfig
from mim_twisted.events import pipe
from mim_twisted.events.buffer import EventBuffer
from mim_twisted.events.formats import HOOK_PRIORITY, Event, EventSource
from mim_twisted.extensions import IMimExtension, ServerRegistry

log = Logger()

# Events handed to the publisher process and not yet confirmed, at most: a broker that stops
# reading holds this many, the rest wait in the buffer (and are dropped from there, the oldest
# first, when it is full).
MAX_IN_FLIGHT = 5000

# Seconds of events written to the publisher process together. Under chat load a write per
# reactor turn took 3 % of the server's CPU in the pipe's write calls; an event waits this much
# longer at most.
BATCH_INTERVAL = 0.005

# Seconds that stopping waits for the broker to confirm what the buffer still holds, and then
# for the publisher process to close its connection and exit.
STOP_FLUSH_TIMEOUT = 2.0
STOP_EXIT_TIMEOUT = 5.0

# The publisher process: this interpreter running mim_twisted.events.publisher, with this
# package importable even where the server's path was extended at run time (added last, so
# that it shadows nothing).
PACKAGE_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(mim_twisted.__file__)))
PUBLISHER_COMMAND = (
    "import runpy, sys; sys.path.append(sys.argv.pop(1));"
    " runpy.run_module('mim_twisted.events.publisher', run_name='__main__')"
)


def in_flight_window(limit: int) -> int:
    # At most half the buffer, so that a full buffer still has pending events to drop
    # oldest-first rather than refusing the newest.
    return max(1, min(MAX_IN_FLIGHT, limit // 2))


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


class PublisherProcess(protocol.ProcessProtocol):
    """The XMPP process's end of the pipe to one publisher process."""

    def __init__(self, publisher: "RabbitPublisher") -> None:
        self.publisher = publisher
        self.reader = pipe.MessageReader()
        self.errors = b""
        self.ended: defer.Deferred = defer.Deferred()

    def connectionMade(self) -> None:
        self.transport.write(pipe.settings_message(self.publisher.process_settings()))

    def outReceived(self, data: bytes) -> None:
        publisher = self.publisher
        for kind, payload in self.reader.feed(data):
            if kind == pipe.ACKED:
                publisher.acked(pipe.read_sequences(payload))
            elif kind == pipe.NACKED:
                publisher.nacked(pipe.read_sequences(payload))
            elif kind == pipe.READY:
                publisher.ready(self, pipe.read_epoch(payload)[0])
            elif kind == pipe.LOST:
                publisher.lost(self, *pipe.read_epoch(payload))
            elif kind == pipe.LOG:
                level, text = pipe.read_log(payload)
                log.emit(LogLevel.levelWithName(level), "{text}", text=text)

    def errReceived(self, data: bytes) -> None:
        # What the process could not say on the pipe (a traceback): logged line by line.
        *lines, self.errors = (self.errors + data).split(b"\n")
        for line in lines:
            log.warn(
                "Event pusher: publisher process: {line}",
                line=line.decode("utf-8", "replace"),
            )

    def processEnded(self, reason: Failure) -> None:
        if self.errors:
            self.errReceived(b"\n")
        self.publisher.process_ended(self, reason)
        self.ended.callback(None)


class RabbitPublisher(service.Service):
    """Publishes events to RabbitMQ through the publisher process; `buffer` holds them and
    counts what happens to them."""

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
        self.process: PublisherProcess | None = None
        # The publisher process's broker connection that is ready, None while there is none.
        self.epoch: int | None = None
        self._send_scheduled = False
        self._exits = 0  # the process's exits since it was last ready
        self._restart: Any = None

    @property
    def connected(self) -> bool:
        """Whether events can go to the broker now."""
        return self.epoch is not None

    # -- the XMPP side ---------------------------------------------------------------------

    def publish(self, event: Event) -> None:
        """Buffer an event and send it at the end of the reactor turn; never waits, never
        fails."""
        if self.buffer.add(event) and self.buffer.burst_dropped == 1:
            log.warn(
                "Event pusher: the buffer is full ({limit} events, broker {state}): dropping"
                " the oldest events until it has room",
                limit=self.buffer.limit,
                state="connected" if self.epoch is not None else "unreachable",
            )
        if self.epoch is not None and not self._send_scheduled:
            self._send_soon()

    def _send_soon(self) -> None:
        # Once for all the events of BATCH_INTERVAL, and for what the acks read meanwhile let
        # go: one write on the pipe, not one per event, per ack or per reactor turn.
        self._send_scheduled = True
        self.reactor.callLater(BATCH_INTERVAL, self._send)

    def _send(self) -> None:
        self._send_scheduled = False
        if self.epoch is None or self.process is None:
            return
        sequences, events = self.buffer.take_batch()
        if sequences:
            self.process.transport.writeSequence(
                pipe.batch_message(self.epoch, array(pipe.SEQUENCES, sequences), events)
            )

    # -- the publisher process -------------------------------------------------------------

    def process_settings(self) -> dict[str, Any]:
        settings = self.settings
        return {
            # Every connection key, so that the process's BrokerConfig is the one configured.
            "broker": {
                field.name: getattr(settings, field.name)
                for field in dataclasses.fields(BrokerConfig)
            },
            "confirms": settings.confirms,
            "connection_name": self.connection_name,
            "exchanges": [
                (exchange.name, exchange.type)
                for exchange in (
                    settings.presence_exchange,
                    settings.chat_msg_exchange,
                    settings.groupchat_msg_exchange,
                )
            ],
        }

    def startService(self) -> None:
        super().startService()
        self._start_process()

    def _start_process(self) -> None:
        self._restart = None
        self.process = PublisherProcess(self)
        self.reactor.spawnProcess(
            self.process,
            sys.executable,
            [sys.executable, "-c", PUBLISHER_COMMAND, PACKAGE_ROOT],
            env=None,  # this process's environment
            childFDs={0: "w", 1: "r", 2: "r"},
        )

    def ready(self, process: PublisherProcess, epoch: int) -> None:
        if process is not self.process:
            return
        self.epoch = epoch
        self._exits = 0
        log.info(
            "Event pusher: connected to RabbitMQ at {host}:{port}, {count} events to send",
            host=self.settings.host,
            port=self.settings.port,
            count=len(self.buffer),
        )
        self._send()

    def lost(self, process: PublisherProcess, epoch: int, reason: str) -> None:
        if process is not self.process or epoch != self.epoch:
            return
        self.epoch = None
        self.buffer.retry_all()
        if self.running:
            log.warn(
                "Event pusher: lost the connection to RabbitMQ ({reason}); {count} events"
                " held until it is back",
                reason=reason,
                count=len(self.buffer),
            )

    def acked(self, sequences: array) -> None:
        """The broker has these events."""
        self.buffer.confirm(sequences)
        self._burst_over()
        if self.epoch is not None and not self._send_scheduled:
            self._send_soon()

    def nacked(self, sequences: array) -> None:
        """The broker could not take these events: they are sent again."""
        self.buffer.retry(sequences)
        if self.epoch is not None and not self._send_scheduled:
            self._send_soon()

    def process_ended(self, process: PublisherProcess, reason: Failure) -> None:
        if process is not self.process:
            return
        self.process = None
        self.epoch = None
        self.buffer.retry_all()
        if not self.running:
            return
        self._exits += 1
        delay = self.retry_policy(self._exits)
        log.warn(
            "Event pusher: the publisher process ended ({reason}); {count} events held,"
            " starting it again in {delay:.1f} s",
            reason=reason.getErrorMessage(),
            count=len(self.buffer),
            delay=delay,
        )
        self._restart = self.reactor.callLater(delay, self._start_process)

    def _burst_over(self) -> None:
        dropped = self.buffer.end_burst()
        if dropped:
            log.warn(
                "Event pusher: {dropped} events dropped while the buffer was full"
                " ({total} since start)",
                dropped=dropped,
                total=self.buffer.dropped,
            )

    async def _stop(self) -> None:
        waited = 0.0
        while self.epoch is not None and len(self.buffer) and waited < STOP_FLUSH_TIMEOUT:
            await task.deferLater(self.reactor, 0.05, lambda: None)
            waited += 0.05
        if self._restart is not None:
            self._restart.cancel()
            self._restart = None
        process = self.process
        if process is not None:
            # The end of its standard input: it closes its AMQP connection cleanly and exits.
            process.transport.closeStdin()
            ended = defer.Deferred()
            process.ended.chainDeferred(ended)
            try:
                await ended.addTimeout(STOP_EXIT_TIMEOUT, self.reactor)
            except defer.TimeoutError:
                process.transport.signalProcess("KILL")
                await process.ended
        if len(self.buffer):
            log.warn(
                "Event pusher: stopped with {count} events not confirmed by RabbitMQ",
                count=len(self.buffer),
            )

    def stopService(self) -> defer.Deferred:
        super().stopService()
        return defer.ensureDeferred(self._stop())
