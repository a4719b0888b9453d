"""benchmarks/load.py's receiving end of the PubSub fan-out: notifications counted from the bytes
received, and a sample of them parsed in full and checked."""

import asyncio
import importlib.util
import ssl
from pathlib import Path
from types import SimpleNamespace

from twisted.trial import unittest

from tests.certfactory import Authority

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


def subscriber(every: int = 1) -> tuple:
    """A subscriber's scanner, checking every `every`-th notification, and what it counts."""
    fanout = FakeFanout()
    client = SimpleNamespace(bare="load7@localhost", jid="load7@localhost/r")
    expected = load.ExpectedNotification(SERVICE, NODE, PAYLOAD)
    return fanout, load.NotificationScanner(fanout, client, expected, every)


class NotificationScannerTests(unittest.TestCase):
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
            fanout, scanner = subscriber()
            for start in range(0, len(stream), size):
                scanner.feed(stream[start : start + size])
            self.assertEqual(fanout.ids, ["0-1", "0-2", "0-3"], size)
            self.assertEqual((fanout.verified, fanout.malformed), (3, []), size)

    def test_the_first_and_then_every_nth_is_parsed(self) -> None:
        fanout, scanner = subscriber(every=4)
        scanner.feed(b"".join(notification(f"0-{k}") for k in range(10)))
        self.assertEqual(len(fanout.ids), 10)
        self.assertEqual(fanout.verified, 3)  # the 1st, 5th and 9th

    def test_what_is_wrong_in_a_checked_notification_is_reported(self) -> None:
        fanout, scanner = subscriber()
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
        fanout, scanner = subscriber()
        whole = notification("0-1")
        scanner.feed(whole[:-3])
        self.assertEqual(fanout.ids, [])
        scanner.feed(whole[-3:])
        self.assertEqual(fanout.ids, ["0-1"])
        self.assertEqual(scanner.rest, b"")


class DirectReadingTests(unittest.TestCase):
    """A subscriber's socket read past asyncio's TLS transport while items are published, and
    handed back to it for the end of the stream."""

    def test_notifications_over_tls_then_the_transport_again(self) -> None:
        directory = self.mktemp()
        certificate, key = Authority().issue_server("localhost").write_pem(directory, "server")
        server_context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        server_context.load_cert_chain(certificate, key)
        client_context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        client_context.check_hostname = False
        client_context.verify_mode = ssl.CERT_NONE
        stream = b"".join(notification(f"0-{k}") for k in range(50))

        async def scenario() -> tuple:
            writers: list[asyncio.StreamWriter] = []
            connected = asyncio.Event()

            async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
                writers.append(writer)
                connected.set()
                await reader.read()  # until the client closes

            server = await asyncio.start_server(serve, "127.0.0.1", 0, ssl=server_context)
            port = server.sockets[0].getsockname()[1]
            loop = asyncio.get_running_loop()
            transport, conn = await loop.create_connection(
                load.XmppConnection, "127.0.0.1", port, ssl=client_context
            )
            await connected.wait()
            fanout, reading = subscriber()
            conn.read_directly(reading)
            self.assertIsNotNone(conn._direct)
            for start in range(0, len(stream), 333):  # records cut anywhere
                writers[0].write(stream[start : start + 333])
                await writers[0].drain()
            while len(fanout.ids) < 50:
                await asyncio.sleep(0.01)
            conn.give_back()
            writers[0].write(notification("0-50"))  # read by the transport itself now
            await writers[0].drain()
            while len(fanout.ids) < 51:
                await asyncio.sleep(0.01)
            conn.close()
            await asyncio.wait_for(conn.lost, 10)
            server.close()
            await server.wait_closed()
            return fanout

        loop = asyncio.new_event_loop()
        try:
            fanout = loop.run_until_complete(asyncio.wait_for(scenario(), 30))
        finally:
            loop.close()
        self.assertEqual(fanout.ids, [f"0-{k}" for k in range(51)])
        self.assertEqual(fanout.malformed, [])
