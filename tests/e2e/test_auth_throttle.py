"""Password guessing over many connections from one address spends its failure budget."""

import asyncio
import base64
import ssl
import xml.etree.ElementTree as ET

from tests.e2e.harness import STREAM_HEADER, RawClient, ServerTestCase, wait_for

SASL = "urn:ietf:params:xml:ns:xmpp-sasl"
STREAMS = "http://etherx.jabber.org/streams"
WINDOW = 3.0
BUDGET = 3


class ServerStream:
    """What the server writes on one stream, read element by element, namespace-aware."""

    def __init__(self, raw: RawClient) -> None:
        self.raw = raw
        self.parser = ET.XMLPullParser(events=("start", "end"))
        self.depth = 0
        self.elements: list[ET.Element] = []

    async def next_element(self) -> ET.Element:
        while not self.elements:
            chunk = await wait_for(self.raw.reader.read(65536))
            if not chunk:
                raise AssertionError("the server closed the connection")
            self.parser.feed(chunk)
            for event, element in self.parser.read_events():
                self.depth += 1 if event == "start" else -1
                if event == "end" and self.depth == 1:
                    self.elements.append(element)
        return self.elements.pop(0)


class AuthFailureBudgetTests(ServerTestCase):
    def server_config(self, directory: str) -> str:
        return (
            super()
            .server_config(directory)
            .replace(
                "[auth]\n",
                f"[auth]\naddress_failure_budget = {BUDGET}\nfailure_window = {WINDOW}\n",
            )
        )

    async def setUp(self) -> None:
        await self.start_server()
        await self.register("alice", "wonderland")

    async def plain_login(self, password: str) -> str:
        """PLAIN over STARTTLS on a new connection; the answer's qualified name, with the
        condition of a failure."""
        raw = self.raw()
        await raw.connect()
        await raw.send(STREAM_HEADER)
        plaintext = ServerStream(raw)
        self.assertEqual((await plaintext.next_element()).tag, f"{{{STREAMS}}}features")
        await raw.send(b"<starttls xmlns='urn:ietf:params:xml:ns:xmpp-tls'/>")
        await plaintext.next_element()  # <proceed/>
        await raw.starttls(ssl.create_default_context(cafile=self.certificate))
        await raw.send(STREAM_HEADER)
        secure = ServerStream(raw)
        self.assertEqual((await secure.next_element()).tag, f"{{{STREAMS}}}features")
        token = base64.b64encode(f"\0alice\0{password}".encode()).decode()
        await raw.send(f"<auth xmlns='{SASL}' mechanism='PLAIN'>{token}</auth>".encode())
        answer = await secure.next_element()
        raw.close()
        if answer.tag == f"{{{SASL}}}failure":
            return f"{answer.tag}/{answer[0].tag}"
        return answer.tag

    async def test_budget_spent_over_several_connections_then_refilled(self) -> None:
        for _ in range(BUDGET):
            self.assertEqual(
                await self.plain_login("queen of hearts"),
                f"{{{SASL}}}failure/{{{SASL}}}not-authorized",
            )
        self.assertEqual(
            await self.plain_login("wonderland"),
            f"{{{SASL}}}failure/{{{SASL}}}temporary-auth-failure",
        )
        await wait_for(asyncio.sleep(WINDOW))
        self.assertEqual(await self.plain_login("wonderland"), f"{{{SASL}}}success")
