"""The traffic log keeps credentials out, however the client's data is cut into reads."""

import base64
import xml.etree.ElementTree as ET

from twisted.internet.address import IPv4Address
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.logger import Logger
from twisted.trial import unittest
from twisted.words.xish import domish

from mim_twisted.auth.scram import derive_all
from mim_twisted.config import load_config
from mim_twisted.storage.memory import MemoryDatabase
from mim_twisted.tap import build_im_core
from mim_twisted.xmpp import traffic
from mim_twisted.xmpp.c2s import C2SFactory, C2SSettings
from mim_twisted.xmpp.sasl import plain
from tests.test_auth_failures import HEADER, SASL, plain_auth, top_level_elements
from tests.test_sasl_mechanisms import synchronously
from tests.test_scram import client_final

CLIENT = "jabber:client"
REGISTER = "jabber:iq:register"
PASSWORD = "correct horse battery staple"


def parse(xml: str) -> domish.Element:
    """One element as domish parses it off the wire."""
    parsed: list[domish.Element] = []
    stream = domish.ExpatElementStream()
    stream.DocumentStartEvent = lambda root: None
    stream.ElementEvent = parsed.append
    stream.parse(f"<stream xmlns='{CLIENT}'>{xml}".encode())
    return parsed[0]


class RedactedXmlTests(unittest.TestCase):
    def redacted(self, xml: str) -> ET.Element:
        element = parse(xml)
        before = element.toXml()
        # With the jabber:client declaration, so that ElementTree reads qualified names.
        redacted = traffic.redacted_xml(element, default_uri="")
        self.assertEqual(element.toXml(), before, "the element itself is left as it was")
        return ET.fromstring(redacted)

    def test_sasl_payloads(self) -> None:
        for name in ("auth", "response", "challenge", "success"):
            logged = self.redacted(f"<{name} xmlns='{SASL}' mechanism='PLAIN'>AGEAYg==</{name}>")
            self.assertEqual(logged.tag, f"{{{SASL}}}{name}")
            self.assertEqual(logged.text, traffic.REDACTED)

    def test_empty_payload_stays_empty(self) -> None:
        logged = self.redacted(f"<auth xmlns='{SASL}' mechanism='SCRAM-SHA-1'/>")
        self.assertIsNone(logged.text)
        self.assertEqual(logged.get("mechanism"), "SCRAM-SHA-1")

    def test_registration_password_but_not_the_username(self) -> None:
        logged = self.redacted(
            f"<iq type='set' id='r1'><query xmlns='{REGISTER}'>"
            f"<username>alice</username><password>{PASSWORD}</password></query></iq>"
        )
        query = logged.find(f"{{{REGISTER}}}query")
        self.assertEqual(query.findtext(f"{{{REGISTER}}}username"), "alice")
        self.assertEqual(query.findtext(f"{{{REGISTER}}}password"), traffic.REDACTED)

    def test_legacy_authentication(self) -> None:
        logged = self.redacted(
            "<iq type='set' id='a1'><query xmlns='jabber:iq:auth'><username>alice</username>"
            f"<password>{PASSWORD}</password><digest>abc123</digest></query></iq>"
        )
        query = logged.find("{jabber:iq:auth}query")
        self.assertEqual(query.findtext("{jabber:iq:auth}password"), traffic.REDACTED)
        self.assertEqual(query.findtext("{jabber:iq:auth}digest"), traffic.REDACTED)

    def test_private_form_fields(self) -> None:
        logged = self.redacted(
            f"<iq type='set' id='r2'><query xmlns='{REGISTER}'><x xmlns='jabber:x:data'>"
            "<field var='username'><value>alice</value></field>"
            f"<field var='password'><value>{PASSWORD}</value></field>"
            "<field var='pin' type='text-private'><value>1234</value></field>"
            "</x></query></iq>"
        )
        values = {
            field.get("var"): field.findtext("{jabber:x:data}value")
            for field in logged.iter("{jabber:x:data}field")
        }
        self.assertEqual(
            values, {"username": "alice", "password": traffic.REDACTED, "pin": traffic.REDACTED}
        )

    def test_message_bodies_are_kept(self) -> None:
        logged = self.redacted(
            "<message to='bob@localhost'><body>password: hunter2</body></message>"
        )
        self.assertEqual(logged.findtext(f"{{{CLIENT}}}body"), "password: hunter2")


class TrafficLogOnStreamTests(unittest.TestCase):
    def setUp(self) -> None:
        self.patch(plain, "run_hash", synchronously)
        self.events: list[dict] = []
        self.patch(traffic, "log", Logger(observer=self.events.append))
        self.clock = Clock()
        database = MemoryDatabase()
        self.successResultOf(
            database.accounts.create_account("localhost", "alice", derive_all(PASSWORD))
        )
        core = build_im_core(load_config(None), database, self.clock)
        self.factory = C2SFactory(
            C2SSettings(
                domains=frozenset({"localhost"}),
                tls_options=None,
                starttls_required=False,
                mechanisms=("SCRAM-SHA-256", "PLAIN"),
                allow_plain_without_tls=True,
                max_failures=3,
                failure_delay=0.0,
                max_stanza_size=4096,
                auth_timeout=30.0,
                max_outgoing_buffer=65536,
                log_traffic=True,
            ),
            accounts=database.accounts,
            im=core.router,
            clock=self.clock,
        )

    def connect(self) -> tuple:
        stream = self.factory.buildProtocol(None)
        transport = StringTransport(peerAddress=IPv4Address("TCP", "192.0.2.1", 40000))
        stream.makeConnection(transport)
        return stream, transport

    def logged(self, direction: str) -> list[str]:
        return [event["xml"] for event in self.events if event["direction"] == direction]

    def assertNoSecretLogged(self, *secrets: bytes) -> None:
        """No log entry holds any 8-byte piece of any of ``secrets``."""
        text = "".join(event["xml"] for event in self.events)
        for secret in secrets:
            for start in range(len(secret) - 7):
                self.assertNotIn(secret[start : start + 8].decode(), text)

    def test_plain_password_cut_at_every_byte_between_two_reads(self) -> None:
        auth = plain_auth("alice", PASSWORD)
        token = auth.split(b">")[1].split(b"<")[0]
        for cut in range(1, len(auth)):
            stream, transport = self.connect()
            stream.dataReceived(HEADER)
            transport.clear()
            stream.dataReceived(auth[:cut])
            stream.dataReceived(auth[cut:])
            answers = top_level_elements(transport.value())
            self.assertEqual(answers[0].tag, f"{{{SASL}}}success")
            stream.connectionLost()
        self.assertNoSecretLogged(token, PASSWORD.encode())
        received = [ET.fromstring(xml) for xml in self.logged("RECV") if "auth" in xml]
        self.assertEqual(len(received), len(auth) - 1)
        for element in received:
            self.assertEqual(element.tag, f"{{{SASL}}}auth")
            self.assertEqual(element.text, traffic.REDACTED)

    def test_scram_proof_and_server_signature(self) -> None:
        stream, transport = self.connect()
        stream.dataReceived(HEADER)
        transport.clear()
        client_first = b"n,,n=alice,r=clientnonce"
        stream.dataReceived(
            f"<auth xmlns='{SASL}' mechanism='SCRAM-SHA-256'>"
            f"{base64.b64encode(client_first).decode()}</auth>".encode()
        )
        challenge = top_level_elements(transport.value())[0]
        self.assertEqual(challenge.tag, f"{{{SASL}}}challenge")
        server_first = base64.b64decode(challenge.text)
        transport.clear()
        final, server_final = client_final(
            "SCRAM-SHA-256", PASSWORD, client_first[3:], server_first
        )
        response = base64.b64encode(final)
        stream.dataReceived(f"<response xmlns='{SASL}'>".encode() + response[:20])
        stream.dataReceived(response[20:] + b"</response>")
        success = top_level_elements(transport.value())[0]
        self.assertEqual(success.tag, f"{{{SASL}}}success")
        self.assertNoSecretLogged(response, base64.b64encode(server_final), challenge.text.encode())
        sasl_logged = [
            ET.fromstring(xml)
            for xml in self.logged("RECV") + self.logged("SEND")
            if SASL in xml and "features" not in xml
        ]
        self.assertEqual(
            sorted(element.tag for element in sasl_logged),
            sorted(f"{{{SASL}}}{name}" for name in ("auth", "response", "challenge", "success")),
        )
        self.assertTrue(all(element.text == traffic.REDACTED for element in sasl_logged))

    def test_registration_password_cut_between_two_reads(self) -> None:
        stream, _ = self.connect()
        request = (
            f"<iq type='set' id='r1'><query xmlns='{REGISTER}'><username>bob</username>"
            f"<password>{PASSWORD}</password></query></iq>"
        ).encode()
        cut = request.index(b"battery")
        stream.dataReceived(HEADER + request[:cut])
        stream.dataReceived(request[cut:])
        self.assertNoSecretLogged(PASSWORD.encode())
        logged = ET.fromstring(next(xml for xml in self.logged("RECV") if REGISTER in xml))
        self.assertEqual(
            logged.findtext(f"{{{REGISTER}}}query/{{{REGISTER}}}password"), traffic.REDACTED
        )

    def test_header_and_stream_end_are_logged(self) -> None:
        stream, _ = self.connect()
        stream.dataReceived(HEADER + b"</stream:stream>")
        received = self.logged("RECV")
        self.assertTrue(received[0].startswith("<stream:stream"))
        self.assertEqual(received[-1], "</stream:stream>")
        self.assertTrue(self.logged("SEND"))
