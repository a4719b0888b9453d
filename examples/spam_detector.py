"""A consumer of the event pusher's chat_msg_sent events that flags likely spammers.

Standalone (needs only pika), and written for MongooseIM 3.3's mod_event_pusher_rabbit: it
reads the same exchange, routing keys and JSON from mim-twisted. It binds an exclusive queue to
the `chat_msg` topic exchange with the key `*.chat_msg_sent` (one event per message a local user
sends, routing key `<sender bare JID>.chat_msg_sent`) and flags a sender who sends more than
`--max-messages` in `--window` seconds, or whose message contains a listed word. Flags are
printed as JSON lines on standard output:

    python3 examples/spam_detector.py --words viagra,lottery --max-messages 20 --window 10

Only talk to a broker you run: by default 127.0.0.1:5672 as guest/guest.
"""

import argparse
import json
import re
import sys
import time
from collections import defaultdict, deque

import pika


class SpamDetector:
    """Pure: feed it events, it answers with the reasons to flag the sender (none: empty)."""

    def __init__(self, max_messages: int, window: float, words: list[str]) -> None:
        self.max_messages = max_messages
        self.window = window
        self.words = (
            re.compile(r"\b(" + "|".join(re.escape(w) for w in words) + r")\b", re.IGNORECASE)
            if words
            else None
        )
        self.sent: dict[str, deque[float]] = defaultdict(deque)

    def check(self, sender: str, message: str, now: float) -> list[str]:
        reasons = []
        times = self.sent[sender]
        times.append(now)
        while times and times[0] <= now - self.window:
            times.popleft()
        if len(times) > self.max_messages:
            reasons.append(f"{len(times)} messages in {self.window:g} s")
        if self.words is not None:
            found = sorted({match.lower() for match in self.words.findall(message)})
            if found:
                reasons.append("listed words: " + ", ".join(found))
        return reasons


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=5672)
    parser.add_argument("--virtual-host", default="/")
    parser.add_argument("--username", default="guest")
    parser.add_argument("--password", default="guest")
    parser.add_argument("--exchange", default="chat_msg", help="chat_msg_exchange's name")
    parser.add_argument("--sent-topic", default="chat_msg_sent", help="its sent_topic")
    parser.add_argument("--max-messages", type=int, default=20)
    parser.add_argument("--window", type=float, default=10.0, help="seconds")
    parser.add_argument("--words", default="", help="comma-separated words to flag")
    return parser.parse_args(argv)


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    words = [word.strip() for word in args.words.split(",") if word.strip()]
    detector = SpamDetector(args.max_messages, args.window, words)
    parameters = pika.ConnectionParameters(
        host=args.host,
        port=args.port,
        virtual_host=args.virtual_host,
        credentials=pika.PlainCredentials(args.username, args.password),
        client_properties={"connection_name": "spam_detector"},
    )
    connection = pika.BlockingConnection(parameters)
    channel = connection.channel()
    # The same declaration as the server's: whichever starts first creates the exchange.
    channel.exchange_declare(exchange=args.exchange, exchange_type="topic")
    queue = channel.queue_declare(queue="", exclusive=True).method.queue
    channel.queue_bind(queue=queue, exchange=args.exchange, routing_key=f"*.{args.sent_topic}")

    def on_event(channel, method, properties, body: bytes) -> None:
        event = json.loads(body)
        sender = method.routing_key.removesuffix(f".{args.sent_topic}")  # a bare JID
        reasons = detector.check(sender, event.get("message", ""), time.monotonic())
        if reasons:
            flag = {"user": sender, "to": event.get("to_user_id"), "reasons": reasons}
            print(json.dumps(flag), flush=True)

    channel.basic_consume(queue=queue, on_message_callback=on_event, auto_ack=True)
    print(f"spam_detector: reading {args.exchange} *.{args.sent_topic}", file=sys.stderr)
    try:
        channel.start_consuming()
    except KeyboardInterrupt:
        pass
    finally:
        if connection.is_open:
            connection.close()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
