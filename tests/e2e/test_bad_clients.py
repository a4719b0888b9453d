"""Misbehaving connections get the right stream error and never disturb a well-behaved client."""

import ssl

from tests.e2e.harness import STREAM_HEADER, RawClient, ServerTestCase, wait_for
from tests.wire import STREAM_ERROR, STREAM_ERRORS, parse_server_output
from tests.xml_samples import BILLION_LAUGHS

STARTTLS = b"<starttls xmlns='urn:ietf:params:xml:ns:xmpp-tls'/>"


class BadClientTests(ServerTestCase):
    extra_config = "[limits]\nmax_stanza_size = 4096\n"

    async def setUp(self) -> None:
        await self.start_server()
        await self.register("alice", "wonderland")
        self.alice = self.client("alice@localhost/good", "wonderland")
        self.assertEqual(await self.alice.connect(), "session_start")

    async def assertAliceStillServed(self) -> None:
        """The good client still gets answers from the server after the bad one is gone."""
        ping = self.alice.xmpp.make_iq_get(queryxmlns="urn:example:unknown", ito="localhost")
        try:
            await wait_for(ping.send(timeout=10))
        except Exception as e:  # slixmpp raises IqError for the expected error reply
            self.assertEqual(e.iq["error"]["condition"], "service-unavailable")
        self.assertEqual(len(self.server.core.sessions), 1)

    def assertStreamError(self, answer: bytes, condition: str) -> None:
        """The answer ends with a {streams}error holding the condition, then the stream end."""
        output = parse_server_output(answer)
        self.assertEqual(output.elements[-1].tag, STREAM_ERROR)
        self.assertEqual(output.elements[-1][0].tag, f"{{{STREAM_ERRORS}}}{condition}")
        self.assertTrue(output.closed)

    async def bad_stream(self, data: bytes, condition: str) -> None:
        raw = self.raw()
        await raw.connect()
        await raw.send(data)
        self.assertStreamError(await raw.read_until_closed(), condition)
        await self.assertAliceStillServed()

    async def secure(self) -> RawClient:
        """A raw connection after STARTTLS, before its second stream header."""
        raw = self.raw()
        await raw.connect()
        await raw.send(STREAM_HEADER + STARTTLS)
        await raw.read_until(b"<proceed")
        await raw.starttls(ssl.create_default_context(cafile=self.certificate))
        return raw

    async def bad_secure_stream(self, data: bytes, condition: str) -> None:
        """After STARTTLS the error is the same, and the server closes the TLS connection."""
        raw = await self.secure()
        await raw.send(data)
        self.assertStreamError(await raw.read_until_closed(), condition)
        await self.assertAliceStillServed()

    async def test_billion_laughs(self) -> None:
        await self.bad_stream(BILLION_LAUGHS, "restricted-xml")

    async def test_comment(self) -> None:
        await self.bad_stream(STREAM_HEADER + b"<!-- hi -->", "restricted-xml")

    async def test_processing_instruction(self) -> None:
        await self.bad_stream(STREAM_HEADER + b"<?php echo 1; ?>", "restricted-xml")

    async def test_oversized_stanza(self) -> None:
        await self.bad_stream(
            STREAM_HEADER + b"<message><body>" + b"A" * 100_000 + b"</body></message>",
            "policy-violation",
        )

    async def test_garbage(self) -> None:
        await self.bad_stream(STREAM_HEADER + b"<message><<>>", "not-well-formed")

    async def test_unknown_host(self) -> None:
        await self.bad_stream(
            STREAM_HEADER.replace(b"to='localhost'", b"to='elsewhere.example'"), "host-unknown"
        )

    async def test_garbage_after_starttls(self) -> None:
        await self.bad_secure_stream(STREAM_HEADER + b"<message><<>>", "not-well-formed")

    async def test_garbage_instead_of_the_header_after_starttls(self) -> None:
        await self.bad_secure_stream(b"<<>>", "not-well-formed")

    async def test_unknown_element_after_starttls(self) -> None:
        await self.bad_secure_stream(
            STREAM_HEADER + b"<foo xmlns='urn:example'/>", "unsupported-stanza-type"
        )

    async def test_two_auth_elements_in_one_write_after_starttls(self) -> None:
        auth = (
            b"<auth xmlns='urn:ietf:params:xml:ns:xmpp-sasl' mechanism='PLAIN'>AGFsaWNlAHg=</auth>"
        )
        await self.bad_secure_stream(STREAM_HEADER + auth + auth, "policy-violation")
