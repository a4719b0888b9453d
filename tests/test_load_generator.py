"""benchmarks/load.py's receiving end of the PubSub fan-out: notifications counted from the bytes
received, and a sample of them parsed in full and checked."""

import importlib.util
from pathlib import Path
from types import SimpleNamespace

from twisted.trial import unittest

_spec = importlib.util.spec_from_file_location(
    "load", Path(__file__).resolve().parent.parent / "benchmarks" / "load.py"
)
load = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(load)

SERVICE = "pubsub.localhost"
NODE = "load-1-abcd"
PAYLOAD = "The quick brown fox & co"
ENTRY = "<entry xmlns='urn:mim-twisted:load'>The quick brown fox &amp; co</entry>"


def notification(
    item_id: str, *, node: str = NODE, payload: str = ENTRY, to: str = "load7@localhost"
) -> bytes:
    return (
        f"<message from='{SERVICE}' to='{to}' type='headline' id='x{item_id}'>"
        "<event xmlns='http://jabber.org/protocol/pubsub#event'>"
        f"<items node='{node}'><item id='{item_id}'>{payload}</item></items></event></message>"
    ).encode()


class FakeFanout:
    def __init__(self) -> None:
        self.ids: list[str] = []
        self.verified = 0
        self.malformed: list[str] = []

    def notified(self, item_id: str) -> None:
        self.ids.append(item_id)


class NotificationScannerTests(unittest.TestCase):
    def scanner(self, every: int = 1) -> tuple:
        fanout = FakeFanout()
        client = SimpleNamespace(bare="load7@localhost", jid="load7@localhost/r")
        expected = load.ExpectedNotification(SERVICE, NODE, PAYLOAD)
        return fanout, load.NotificationScanner(fanout, client, expected, every)

    def test_every_notification_counted_once_however_the_bytes_are_cut(self) -> None:
        stream = (
            notification("0-1")
            + b"<presence from='a@localhost/x'/>"
            # another server's way: double quotes, the id after another attribute, full JID
            + (
                b'<message xmlns="jabber:client" from="pubsub.localhost" to="load7@localhost/r">'
                b'<event xmlns="http://jabber.org/protocol/pubsub#event">'
                b'<items node="load-1-abcd"><item publisher="load1@localhost" id="0-2">'
                + ENTRY.encode()
                + b"</item></items></event></message>"
            )
            + b"<iq type='set' id='r1'><query xmlns='jabber:iq:roster'>"
            b"<item jid='b@localhost'/></query></iq>" + notification("0-3")
        )
        for size in (1, 2, 7, 64, len(stream)):
            fanout, scanner = self.scanner()
            for start in range(0, len(stream), size):
                scanner.feed(stream[start : start + size])
            self.assertEqual(fanout.ids, ["0-1", "0-2", "0-3"], size)
            self.assertEqual((fanout.verified, fanout.malformed), (3, []), size)

    def test_the_first_and_then_every_nth_is_parsed(self) -> None:
        fanout, scanner = self.scanner(every=4)
        scanner.feed(b"".join(notification(f"0-{k}") for k in range(10)))
        self.assertEqual(len(fanout.ids), 10)
        self.assertEqual(fanout.verified, 3)  # the 1st, 5th and 9th

    def test_what_is_wrong_in_a_checked_notification_is_reported(self) -> None:
        fanout, scanner = self.scanner()
        scanner.feed(notification("0-1", node="other"))
        scanner.feed(notification("0-2", payload="<entry xmlns='urn:other'>x</entry>"))
        scanner.feed(notification("0-3", to="someone@localhost"))
        scanner.feed(notification("0-4").replace(b"pubsub#event", b"pubsub"))
        scanner.feed(b"<message><item id='0-5'><x></item></message>")
        self.assertEqual(fanout.ids, ["0-1", "0-2", "0-3", "0-4", "0-5"])
        self.assertEqual(len(fanout.malformed), 5, fanout.malformed)
        self.assertIn("node='load-1-abcd'", fanout.malformed[0])
        self.assertIn("payload", fanout.malformed[1])
        self.assertIn("to 'someone@localhost'", fanout.malformed[2])
        self.assertIn("not well-formed", fanout.malformed[4])

    def test_bytes_after_the_last_complete_message_wait(self) -> None:
        fanout, scanner = self.scanner()
        whole = notification("0-1")
        scanner.feed(whole[:-3])
        self.assertEqual(fanout.ids, [])
        scanner.feed(whole[-3:])
        self.assertEqual(fanout.ids, ["0-1"])
        self.assertEqual(scanner.rest, b"")
