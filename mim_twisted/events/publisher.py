"""The event pusher's publisher process: it owns the connection to RabbitMQ.

Started and supervised by `RabbitPublisher` (mim_twisted.events.rabbit), which runs this
module with the server's interpreter, it reads the XMPP process's messages on its standard
input and answers on its standard output (mim_twisted.events.pipe). Publishing costs about as
much CPU per event as all the XMPP work of a chat message; here it runs on another core.

Its `EventLink` keeps one AMQP connection (mim_twisted.events.broker); each connection declares
the exchanges and (with `confirms`) turns on publisher confirms on its channel before saying
READY. A batch becomes `basic.publish` frames (written directly, mim_twisted.events.amqp), one
delivery tag per event, written in one piece; the broker's acks and nacks go back as the events'
sequence numbers, those of one reactor turn together. Without confirms an event counts as
acknowledged once written, as in MongooseIM. The events themselves stay in the XMPP process's
buffer until acknowledged, so this process holds nothing that a crash could lose.
"""

import json
import logging
import signal
import sys
from array import array
from collections import deque
from collections.abc import Callable
from typing import Any

import pika
import pika.spec
from twisted.internet import defer, interfaces, protocol, stdio
from twisted.logger import Logger, LogLevel, eventAsText, globalLogBeginner
from twisted.python.failure import Failure
from zope.interface import implementer

from mim_twisted.config import BrokerConfig
from mim_twisted.events import pipe
from mim_twisted.events.amqp import publish_frames, short_string
from mim_twisted.events.broker import (
    BrokerConnection,
    BrokerLink,
    disconnect,
    fail_unless_called,
)

log = Logger()

# The channel the events go on.
CHANNEL = 1


class Unconfirmed:
    """The sequence numbers behind one channel's delivery tags not yet acked or nacked.

    Kept per batch (its first tag and its sequence numbers: consecutive tags), so that an
    event costs nothing here until the broker settles it."""

    def __init__(self) -> None:
        self.batches: deque[tuple[int, array]] = deque()
        self.next_tag = 1  # delivery tags count a channel's publishes from 1

    def add(self, sequences: array) -> None:
        self.batches.append((self.next_tag, sequences))
        self.next_tag += len(sequences)

    def settle(self, tag: int, multiple: bool) -> array:
        """The sequence numbers an ack or nack of `tag` settles."""
        settled = array(pipe.SEQUENCES)
        batches = self.batches
        if multiple:
            while batches:
                first, sequences = batches[0]
                if first > tag:
                    break
                cut = tag - first + 1
                if cut >= len(sequences):
                    settled.extend(batches.popleft()[1])
                    continue
                settled.extend(sequences[:cut])
                batches[0] = (tag + 1, sequences[cut:])
                break
            return settled
        for index, (first, sequences) in enumerate(batches):
            if first <= tag < first + len(sequences):
                cut = tag - first
                settled.append(sequences[cut])
                del batches[index]
                after = sequences[cut + 1 :]
                if after:
                    batches.insert(index, (tag + 1, after))
                before = sequences[:cut]
                if before:
                    batches.insert(index, (first, before))
                break
        return settled


class EventLink(BrokerLink):
    """The event pusher's connection; `report` writes a message to the XMPP process."""

    label = "Event pusher"
    meanwhile = "events are buffered meanwhile"

    def __init__(
        self,
        settings: dict[str, Any],
        reactor: Any,
        report: Callable[[bytes], None],
        *,
        retry_policy: Any = None,
    ) -> None:
        super().__init__(
            BrokerConfig(**settings["broker"]),
            reactor,
            connection_name=settings["connection_name"],
            retry_policy=retry_policy,
        )
        self.report = report
        self.confirms: bool = settings["confirms"]
        self.declared: list[tuple[str, str]] = settings["exchanges"]  # (name, type)
        self.epoch = 0  # counts the connections made ready
        self.exchanges: dict[str, bytes] = {}  # names as AMQP shortstrs
        self.unconfirmed: Unconfirmed | None = None
        self._prepared: Unconfirmed | None = None
        # Settled since the last report to the XMPP process.
        self._acked = array(pipe.SEQUENCES)
        self._nacked = array(pipe.SEQUENCES)
        self._report_scheduled = False

    async def _prepare(self, connection: BrokerConnection) -> None:
        channel = await connection.channel(channel_number=CHANNEL)
        for name, kind in self.declared:
            await channel.exchange_declare(exchange=name, exchange_type=kind)
        # A channel closed by the broker (an error of ours) takes the connection with it, so
        # that a new one is made.
        channel.on_closed.addBoth(lambda _: disconnect(connection))
        unconfirmed = Unconfirmed()
        if self.confirms:
            selected: defer.Deferred = defer.Deferred()
            channel._channel.confirm_delivery(
                lambda frame: self._settled(unconfirmed, frame), selected.callback
            )
            connection.when_lost().addCallback(fail_unless_called, selected)
            await selected
        self._prepared = unconfirmed

    def _ready(self) -> None:
        self.epoch += 1
        self.unconfirmed, self._prepared = self._prepared, None
        self.report(pipe.epoch_message(pipe.READY, self.epoch))

    def _lost(self, reason: Failure) -> None:
        self.unconfirmed = None
        # What the broker confirmed is confirmed: said before LOST, so it is not sent again.
        self._report_settled()
        self.report(pipe.epoch_message(pipe.LOST, self.epoch, reason.getErrorMessage()))

    def batch(self, payload: bytes) -> None:
        """Write a batch to the broker, if it is meant for the connection that is up."""
        epoch, sequences, events = pipe.read_batch(payload)
        connection = self.connection
        if epoch != self.epoch or connection is None:
            return  # the XMPP process sends it again once it reads our LOST
        exchanges = self.exchanges
        frames = []
        for exchange, routing_key, body in events:
            name = exchanges.get(exchange)
            if name is None:
                name = exchanges[exchange] = short_string(exchange)
            frames.append(publish_frames(CHANNEL, name, short_string(routing_key), body))
        connection.transport.write(b"".join(frames))
        if self.confirms:
            self.unconfirmed.add(sequences)
        else:
            self.report(pipe.sequences_message(pipe.ACKED, sequences))

    def _settled(self, unconfirmed: Unconfirmed, frame: Any) -> None:
        if unconfirmed is not self.unconfirmed:
            return  # a channel gone since: the XMPP process sends its events again
        method = frame.method
        nacked = isinstance(method, pika.spec.Basic.Nack)
        settled = self._nacked if nacked else self._acked
        settled.extend(unconfirmed.settle(method.delivery_tag, method.multiple))
        if not self._report_scheduled:
            # The broker often acks one event at a time: the acks of one reactor turn go to
            # the XMPP process together.
            self._report_scheduled = True
            self.reactor.callLater(0, self._report_settled)

    def _report_settled(self) -> None:
        self._report_scheduled = False
        if self._acked:
            self.report(pipe.sequences_message(pipe.ACKED, self._acked))
            self._acked = array(pipe.SEQUENCES)
        if self._nacked:
            self.report(pipe.sequences_message(pipe.NACKED, self._nacked))
            self._nacked = array(pipe.SEQUENCES)

    async def stop(self) -> None:
        await defer.maybeDeferred(self.stopService)
        await self._close()


@implementer(interfaces.IHalfCloseableProtocol)
class PipeProtocol(protocol.Protocol):
    """The XMPP process's end: SETTINGS starts the link, BATCHes feed it, the end of standard
    input (the XMPP process stops or went) stops it."""

    def __init__(self, reactor: Any) -> None:
        self.reactor = reactor
        self.reader = pipe.MessageReader()
        self.link: EventLink | None = None
        self.stopping = False
        self.failed = False
        self.done: defer.Deferred = defer.Deferred()

    def connectionMade(self) -> None:
        globalLogBeginner.beginLoggingTo([self._log], redirectStandardIO=False)

    def _log(self, event: dict) -> None:
        level = event.get("log_level")
        if level is not None and level >= LogLevel.info and self.transport is not None:
            text = eventAsText(event, includeTimestamp=False, includeSystem=False)
            self.transport.write(pipe.log_message(level.name, text))

    def dataReceived(self, data: bytes) -> None:
        try:
            self._dispatch(data)
        except Exception:
            # A bug of ours: said on the pipe, then the process ends (and is started again).
            log.failure("Event pusher: the publisher process could not handle a message")
            self.failed = True
            self.transport.loseConnection()

    def _dispatch(self, data: bytes) -> None:
        for kind, payload in self.reader.feed(data):
            if kind == pipe.BATCH:
                if self.link is not None:
                    self.link.batch(payload)
            elif kind == pipe.SETTINGS and self.link is None:
                self.link = EventLink(json.loads(payload), self.reactor, self.transport.write)
                self.link.startService()

    def readConnectionLost(self) -> None:
        if not self.stopping:
            self.stopping = True
            defer.ensureDeferred(self._stop()).chainDeferred(self.done)

    async def _stop(self) -> None:
        if self.link is not None:
            await self.link.stop()
        self.transport.loseConnection()
        if self.failed:
            raise RuntimeError("stopped after an error (logged)")

    def writeConnectionLost(self) -> None:
        pass  # the XMPP process is going; it closes our standard input too

    def connectionLost(self, reason: Failure = protocol.connectionDone) -> None:
        self.readConnectionLost()


def main() -> None:
    # pika logs what our own lines already say, and would write it to standard error.
    logging.getLogger("pika").setLevel(logging.CRITICAL)
    # The server ends this process by closing its standard input once the last events are
    # confirmed; a Ctrl-C or SIGTERM sent to the server's whole process group must not end it
    # first (hence no signal handlers of the reactor's either).
    for number in (signal.SIGINT, signal.SIGTERM):
        signal.signal(number, signal.SIG_IGN)
    from twisted.internet import reactor

    pipe_protocol = PipeProtocol(reactor)
    stdio.StandardIO(pipe_protocol, reactor=reactor)
    failed: list[Failure] = []
    pipe_protocol.done.addErrback(failed.append)
    pipe_protocol.done.addBoth(lambda _: reactor.stop())
    reactor.run(installSignalHandlers=False)
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
