"""A real client's login, with the traffic log on, leaves no credential in the log."""

import base64
import re

from twisted.logger import formatEvent, globalLogPublisher

from tests.e2e.harness import ServerTestCase

PASSWORD = "correct horse battery staple"
SASL_PAYLOAD = re.compile(
    r"<(auth|response|challenge|success) xmlns='urn:ietf:params:xml:ns:xmpp-sasl'[^>]*>([^<]*)<"
)


class TrafficLogTests(ServerTestCase):
    extra_config = "[log]\ntraffic = true\n"

    async def setUp(self) -> None:
        self.lines: list[str] = []
        globalLogPublisher.addObserver(self.observe)
        self.addCleanup(globalLogPublisher.removeObserver, self.observe)
        await self.start_server()
        await self.register("alice", PASSWORD)

    def observe(self, event: dict) -> None:
        self.lines.append(formatEvent(event))

    async def test_logins_log_stanzas_but_no_password(self) -> None:
        for mechanism in ("PLAIN", "SCRAM-SHA-256"):
            client = self.client("alice@localhost/desk", PASSWORD, mechanism)
            self.assertEqual(await client.connect(), "session_start")
            await client.close()
        traffic = [line for line in self.lines if line.startswith(("RECV ", "SEND "))]
        self.assertTrue(any("urn:ietf:params:xml:ns:xmpp-bind" in line for line in traffic))
        payloads = [match for line in traffic for match in SASL_PAYLOAD.findall(line)]
        # PLAIN: <auth/>; SCRAM: <auth/>, <challenge/>, <response/>, <success/>.
        self.assertEqual(
            sorted(name for name, _ in payloads),
            ["auth", "auth", "challenge", "response", "success"],
        )
        self.assertEqual({text for _, text in payloads}, {"[redacted]"})
        plain = base64.b64encode(f"\0alice\0{PASSWORD}".encode()).decode()
        for secret in (PASSWORD, plain[8:24]):
            self.assertFalse([line for line in traffic if secret in line], secret)
