"""Misbehaving connections get the right stream error and never disturb a well-behaved client."""

from tests.e2e.harness import STREAM_HEADER, ServerTestCase, wait_for
from tests.xml_samples import BILLION_LAUGHS


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

    async def bad_stream(self, data: bytes, condition: str) -> None:
        raw = self.raw()
        await raw.connect()
        await raw.send(data)
        answer = await raw.read_until_closed()
        self.assertIn(
            f"<{condition} xmlns='urn:ietf:params:xml:ns:xmpp-streams'/>".encode(), answer
        )
        self.assertTrue(answer.endswith(b"</stream:stream>"))
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
