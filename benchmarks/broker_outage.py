"""Run by hand: a broker outage under chat load loses no event up to the buffer size, and the
server's drop counter says exactly how many went beyond it.

Starts `twistd -n mim` (as bench.py does: SQLite, accounts load1..N) with the event pusher on,
reaching RabbitMQ through a TCP relay of this script's on a free loopback port, and exchanges of
the run's own bound to an exclusive queue that a pika consumer (a thread of this script) reads.
Runs load.py's chat load with numbered bodies (so that every event is distinct) for
--before + --outage + --after seconds. After --before seconds the relay stops listening and cuts
its connections (the shared RabbitMQ itself is never touched); after --outage seconds it listens
again. Once the load has ended and the server's buffer is empty, the events the consumer got are
counted against those the run produced: a chat_msg_sent event per message sent, a chat_msg_recv
event per message delivered, and an online and an offline presence event per client.

    .venv/bin/python benchmarks/broker_outage.py --outage 60 --buffer 1000000
    .venv/bin/python benchmarks/broker_outage.py --outage 60 --buffer 20000
"""

import argparse
import asyncio
import collections
import contextlib
import json
import secrets
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import pika

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench  # noqa: E402

BROKER = ("127.0.0.1", 5672)


class Relay:
    """A loopback TCP port in front of the broker, on an event loop in a thread of its own."""

    def __init__(self) -> None:
        self.port = bench.free_port()
        self.loop = asyncio.new_event_loop()
        self.connections: set[asyncio.StreamWriter] = set()
        self.server: asyncio.base_events.Server | None = None
        self.accepted = 0
        threading.Thread(target=self.loop.run_forever, daemon=True).start()
        self._call(self._listen())

    def _call(self, coroutine) -> None:
        asyncio.run_coroutine_threadsafe(coroutine, self.loop).result(10)

    async def _listen(self) -> None:
        self.server = await asyncio.start_server(self._relay, "127.0.0.1", self.port)

    async def _relay(self, client_reader, client_writer) -> None:
        self.accepted += 1
        try:
            broker_reader, broker_writer = await asyncio.open_connection(*BROKER)
        except OSError:
            client_writer.close()
            return
        self.connections |= {client_writer, broker_writer}
        await asyncio.gather(
            self._forward(client_reader, broker_writer),
            self._forward(broker_reader, client_writer),
        )

    async def _forward(self, reader, writer) -> None:
        with contextlib.suppress(OSError):
            while data := await reader.read(65536):
                writer.write(data)
                await writer.drain()
        writer.close()
        self.connections.discard(writer)

    async def _cut(self) -> None:
        self.server.close()
        await self.server.wait_closed()
        for writer in list(self.connections):
            writer.transport.abort()

    def cut(self) -> None:
        """The broker is gone: the port refuses connections, those open are cut."""
        self._call(self._cut())

    def restore(self) -> None:
        self._call(self._listen())


class Consumer:
    """An exclusive queue bound to the run's exchanges; counts each distinct event it gets."""

    def __init__(self, exchanges: list[str]) -> None:
        self.exchanges = exchanges
        self.counts: collections.Counter = collections.Counter()
        self.last = time.monotonic()
        self.connection = pika.BlockingConnection(pika.ConnectionParameters(*BROKER))
        self.channel = self.connection.channel()
        self.queue = self.channel.queue_declare("", exclusive=True).method.queue
        for exchange in exchanges:
            self.channel.exchange_declare(exchange, exchange_type="topic")
            self.channel.queue_bind(self.queue, exchange, routing_key="#")
        self.channel.basic_consume(self.queue, self._received, auto_ack=True)
        self.thread = threading.Thread(target=self.channel.start_consuming, daemon=True)
        self.thread.start()

    def _received(self, channel, method, properties, body: bytes) -> None:
        self.counts[method.exchange, method.routing_key, body] += 1
        self.last = time.monotonic()

    def quiet(self, seconds: float) -> None:
        while time.monotonic() - self.last < seconds:
            time.sleep(0.2)

    def stop(self) -> None:
        self.connection.add_callback_threadsafe(self.channel.stop_consuming)
        self.thread.join(10)
        for exchange in self.exchanges:
            self.channel.exchange_delete(exchange)
        self.connection.close()


def wait_until_empty(server: bench.MimServer, timeout: float) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        counters = server.counters()
        if counters.get("event_pusher_buffered", 0) == 0 or time.monotonic() > deadline:
            return counters
        time.sleep(0.5)


def run(args: argparse.Namespace) -> dict:
    suffix = secrets.token_hex(4)
    exchanges = [f"{name}-outage-{suffix}" for name in ("presence", "chat_msg", "gc_msg")]
    consumer = Consumer(exchanges)
    relay = Relay()
    presence, chat, groupchat = exchanges
    pusher = (
        f"[event_pusher.rabbit]\nenabled = true\nport = {relay.port}\n"
        f"max_buffered_events = {args.buffer}\n"
        f'presence_exchange = {{ name = "{presence}" }}\n'
        f'chat_msg_exchange = {{ name = "{chat}" }}\n'
        f'groupchat_msg_exchange = {{ name = "{groupchat}" }}\n'
    )
    settings = argparse.Namespace(
        concurrency=50, pg_pool=4, mysql_pool=4, pubsub_workers=4, extra_config=pusher
    )
    workdir = Path(tempfile.mkdtemp(prefix="mim-outage-"))
    server = bench.MimServer("sqlite", workdir, settings)
    server.prepare(args.clients)
    server.start()
    try:
        duration = args.before + args.outage + args.after
        command = [
            sys.executable, str(bench.LOAD), "messages", "--numbered-bodies",
            "--host", "127.0.0.1", "--port", str(server.port), "--domain", bench.DOMAIN,
            "--user-prefix", bench.PREFIX, "--password", bench.PASSWORD,
            "--clients", str(args.clients), "--window", str(args.window),
            "--warmup", "0", "--duration", str(duration), "--runs", "1",
            "--server-pid", str(server.pid),
        ]  # fmt: skip
        load = subprocess.Popen(command, stdout=subprocess.PIPE, text=True)
        time.sleep(args.before)
        relay.cut()
        cut = server.counters()
        print(f"# broker cut off; counters: {cut}", flush=True)
        time.sleep(args.outage)
        during = server.counters()
        relay.restore()
        print(f"# broker back after {args.outage} s; counters: {during}", flush=True)
        output, _ = load.communicate(timeout=duration + 300)
        figures = json.loads([line for line in output.splitlines() if line.startswith("{")][-1])
        counters = wait_until_empty(server, 300)
    finally:
        server.stop()
        shutil.rmtree(workdir, ignore_errors=True)
    consumer.quiet(3)
    consumer.stop()
    final = counters
    produced = {
        "chat_msg_sent": figures["sent"],
        "chat_msg_recv": figures["delivered"],
        "presence": 2 * figures["clients"],
    }
    received = collections.Counter()
    duplicates = 0
    for (exchange, routing_key, _), count in consumer.counts.items():
        kind = "presence" if exchange == presence else routing_key.rsplit(".", 1)[1]
        received[kind] += 1
        duplicates += count - 1
    missing = sum(produced.values()) - sum(received.values())
    return {
        "clients": figures["clients"],
        "window": args.window,
        "buffer": args.buffer,
        "outage_s": args.outage,
        "messages_per_s": figures["messages_per_s"],
        "messages_sent": figures["sent"],
        "messages_delivered": figures["delivered"],
        "events_produced": produced,
        "events_received_distinct": dict(received),
        "duplicates": duplicates,
        "missing": missing,
        "buffered_when_broker_back": during.get("event_pusher_buffered"),
        "server_published": final.get("event_pusher_published"),
        "server_confirmed": final.get("event_pusher_confirmed"),
        "server_dropped": final.get("event_pusher_dropped"),
        "server_buffered_at_end": final.get("event_pusher_buffered"),
        "relay_connections": relay.accepted,
        "exact": missing == final.get("event_pusher_dropped"),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--clients", type=int, default=20)
    parser.add_argument("--window", type=int, default=2, help="messages in flight per client")
    parser.add_argument("--before", type=float, default=15.0, help="seconds of load before")
    parser.add_argument("--outage", type=float, default=60.0, help="seconds the broker is away")
    parser.add_argument("--after", type=float, default=15.0, help="seconds of load after")
    parser.add_argument("--buffer", type=int, default=100000, help="max_buffered_events")
    result = run(parser.parse_args())
    print(json.dumps(result), flush=True)
    return 0 if result["exact"] else 1


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        sys.exit(main())
