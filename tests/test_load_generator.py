"""benchmarks/load.py's receiving ends of the PubSub fan-out and of PEP: notifications counted
from the bytes received, and a sample of them parsed in full and checked."""

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


def device_list(label: str, *, owner: str = "load3@localhost") -> bytes:
    return (
        f"<message from='{owner}' to='load7@localhost/r' type='headline'>"
        "<event xmlns='http://jabber.org/protocol/pubsub#event'>"
        "<items node='urn:xmpp:omemo:2:devices'><item id='current'>"
        f"<devices xmlns='urn:xmpp:omemo:2'><device id='3' label='{label}'/></devices>"
        "</item></items></event></message>"
    ).encode()


class FakePepClient:
    def __init__(self) -> None:
        self.handled: list[str] = []
        self.conn = SimpleNamespace(failed=[])
        self.conn._fail = self.conn.failed.append

    def _dispatch(self, element) -> None:
        self.handled.append(element.tag.split("}")[-1] + ":" + (element.get("id") or ""))


def pep_user(every: int = 1) -> tuple:
    ring = load.PepRing()
    ring.measuring = True
    ring.sent_at = {f"3.{k}": 0.0 for k in range(20)}
    client = FakePepClient()
    return ring, client, load.PepScanner(client, ring, every)


class PepScannerTests(unittest.TestCase):
    def test_notifications_counted_and_other_stanzas_handled_however_the_bytes_are_cut(
        self,
    ) -> None:
        stream = (
            b"\n"
            + device_list("3.1")
            + b"<iq type='result' id='q1'/>"
            # another server's way: double quotes and a default namespace on the stanza
            + b'<message xmlns="jabber:client" from="load3@localhost"><event'
            b' xmlns="http://jabber.org/protocol/pubsub#event"><items node="n"><item id="c">'
            b'<devices xmlns="urn:xmpp:omemo:2"><device label="3.2" id="3"/></devices>'
            b"</item></items></event></message>"
            + b"<iq type='result' id='q2'><pubsub xmlns='http://jabber.org/protocol/pubsub'/></iq>"
            + b"<message from='a@localhost' id='m1'><body>no device list</body></message>"
            + device_list("3.3")
        )
        for size in (1, 2, 7, 64, len(stream)):
            ring, client, scanner = pep_user()
            for start in range(0, len(stream), size):
                scanner.feed(stream[start : start + size])
            self.assertEqual(ring.notifications, 3, size)
            self.assertEqual((ring.verified, ring.malformed), (3, []), size)
            self.assertEqual(client.handled, ["iq:q1", "iq:q2", "message:m1"], size)
            self.assertEqual(scanner.rest, b"", size)

    def test_the_first_and_then_every_nth_is_parsed_and_what_is_wrong_reported(self) -> None:
        ring, client, scanner = pep_user(every=4)
        scanner.feed(b"".join(device_list(f"3.{k}") for k in range(10)))
        self.assertEqual((ring.notifications, ring.verified), (10, 3))
        ring, client, scanner = pep_user()
        scanner.feed(device_list("3.1").replace(b"pubsub#event", b"pubsub"))
        scanner.feed(b"<message><device label='3.2'><x></device></message>")
        self.assertEqual(ring.notifications, 2)
        self.assertEqual(len(ring.malformed), 2, ring.malformed)
        self.assertIn("not the notification of 3.1", ring.malformed[0])
        self.assertIn("not well-formed", ring.malformed[1])

    def test_the_end_of_the_stream_and_a_stream_error_fail_the_connection(self) -> None:
        for end in (b"</stream:stream>", b"<stream:error><conflict/></stream:error>"):
            ring, client, scanner = pep_user()
            scanner.feed(device_list("3.1") + end)
            self.assertEqual(ring.notifications, 1)
            self.assertEqual(len(client.conn.failed), 1, end)


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
