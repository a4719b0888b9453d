"""RabbitMQ's own CPU per confirmed event, with no XMPP server involved.

One pika publisher with publisher confirms keeps WINDOW events in flight to a topic exchange
bound to a queue capped at 10,000 messages (drop-head), as bench.py's sink for the event
pusher; the broker's CPU is read from /proc before and after. This is the ceiling of the event
pusher on this machine: whatever the XMPP side does, the broker confirms no more than this.

    .venv/bin/python benchmarks/rabbitmq_cost.py [EVENTS]
"""

import json
import os
import secrets
import sys
import time

import pika
from bench import rabbitmq_pid
from load import _process_cpu

WINDOW = 2000
BODY = json.dumps(
    {"from_user_id": "load1@localhost/res", "to_user_id": "load2@localhost", "message": "x" * 60}
).encode()


class Run:
    def __init__(self, events: int) -> None:
        self.events = events
        self.pid = rabbitmq_pid()
        suffix = secrets.token_hex(3)
        self.exchange, self.queue = f"chat-cost-{suffix}", f"cost-{suffix}"
        self.sent = self.confirmed = 0
        self.started = self.cpu_at_start = 0.0
        parameters = pika.ConnectionParameters("127.0.0.1")
        self.connection = pika.SelectConnection(parameters, on_open_callback=self.opened)

    def cpu_seconds(self) -> float:
        return _process_cpu(self.pid, os.sysconf("SC_CLK_TCK"))

    def opened(self, connection: pika.SelectConnection) -> None:
        connection.channel(on_open_callback=self.channel_opened)

    def channel_opened(self, channel) -> None:
        self.channel = channel
        channel.exchange_declare(self.exchange, exchange_type="topic", callback=self.declared)

    def declared(self, _frame) -> None:
        arguments = {"x-max-length": 10000, "x-overflow": "drop-head"}
        self.channel.queue_declare(self.queue, arguments=arguments, callback=self.queued)

    def queued(self, _frame) -> None:
        self.channel.queue_bind(self.queue, self.exchange, routing_key="#", callback=self.bound)

    def bound(self, _frame) -> None:
        self.channel.confirm_delivery(self.settled, callback=self.start)

    def start(self, _frame) -> None:
        self.started, self.cpu_at_start = time.monotonic(), self.cpu_seconds()
        self.pump()

    def pump(self) -> None:
        while self.sent < self.events and self.sent - self.confirmed < WINDOW:
            self.channel.basic_publish(self.exchange, "chat_msg_sent", BODY)
            self.sent += 1

    def settled(self, frame) -> None:
        method = frame.method
        self.confirmed = method.delivery_tag if method.multiple else self.confirmed + 1
        if self.confirmed < self.events:
            self.pump()
            return
        seconds = time.monotonic() - self.started
        cpu = self.cpu_seconds() - self.cpu_at_start
        print(
            f"{self.events} confirmed in {seconds:.2f} s = {self.events / seconds:,.0f}/s;"
            f" RabbitMQ CPU {cpu:.2f} s = {cpu / self.events * 1e6:.1f} µs per event"
            f" ({100 * cpu / seconds:.0f} % of a core)"
        )
        self.channel.queue_delete(self.queue)
        self.channel.exchange_delete(self.exchange, callback=lambda _: self.connection.close())


def main(argv: list[str]) -> int:
    run = Run(int(argv[0]) if argv else 60000)
    run.connection.ioloop.start()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
