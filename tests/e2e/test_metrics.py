"""The metrics endpoint end to end: known traffic from slixmpp clients, then /metrics read with
prometheus_client's own parser (on SQLite and PostgreSQL), and /health while the database
answers and once it does not."""

from prometheus_client.parser import text_string_to_metric_families
from slixmpp.xmlstream import ET
from twisted.internet import reactor
from twisted.web.client import Agent, readBody
from twisted.words.protocols.jabber.jid import JID

from mim_twisted.tap import open_storage
from tests.e2e.harness import Client, ServerTestCase, eventually, wait_for

PASSWORD = "count me in"
METRICS = '[metrics]\nenabled = true\nendpoint = "tcp:0:interface=127.0.0.1"\n'


class MetricsTestCase(ServerTestCase):
    extra_config = METRICS

    async def setUp(self) -> None:
        await self.start_server()
        for user in ("alice", "bob"):
            await self.register(user, PASSWORD)
        self.agent = Agent(reactor)

    async def get(self, path: str) -> tuple[int, bytes]:
        port = self.server.metrics.port.getHost().port
        response = await self.agent.request(b"GET", f"http://127.0.0.1:{port}{path}".encode())
        return response.code, await readBody(response)

    async def samples(self) -> dict[tuple[str, frozenset], float]:
        """Every sample of /metrics, keyed by (name, its labels)."""
        code, body = await self.get("/metrics")
        self.assertEqual(code, 200)
        return {
            (sample.name, frozenset(sample.labels.items())): sample.value
            for family in text_string_to_metric_families(body.decode())
            for sample in family.samples
        }

    async def online(self, jid: str) -> Client:
        client = self.client(jid, PASSWORD)
        client.xmpp.register_plugin("xep_0060")
        self.assertEqual(await client.connect(), "session_start")
        return client


class MetricsTests(MetricsTestCase):
    async def test_counts_known_traffic(self) -> None:
        alice = await self.online("alice@localhost/desk")
        bob = await self.online("bob@localhost/phone")
        for n in range(3):
            body = f"hello {n}"
            received = bob.next_event("message", lambda m, body=body: m["body"] == body)
            alice.xmpp.send_message(mto="bob@localhost/phone", mbody=body)
            await wait_for(received)
        entry = ET.Element("{urn:example:news}entry")
        entry.text = "news"
        await wait_for(alice.xmpp.plugin["xep_0060"].create_node("pubsub.localhost", "news"))
        await wait_for(
            alice.xmpp.plugin["xep_0060"].publish("pubsub.localhost", "news", payload=entry)
        )
        # A message to an account that does not exist bounces (an error goes back to alice); one
        # to an offline user is kept.
        alice.xmpp.send_message(mto="nobody@localhost", mbody="anyone?")
        await bob.close()
        await eventually(
            lambda: len(self.server.core.sessions.sessions_of(JID("bob@localhost"))) == 0
        )
        alice.xmpp.send_message(mto="bob@localhost", mbody="later")
        messages = self.server.core.router.messages
        await eventually(lambda: messages.outcomes["offline"] == 1)
        await eventually(lambda: messages.outcomes["bounced"] == 1)

        samples = await self.samples()

        def value(name: str, **labels: str) -> float:
            return samples[name, frozenset(labels.items())]

        self.assertEqual(value("mim_logins_total", mechanism="SCRAM-SHA-256", result="success"), 2)
        self.assertEqual(value("mim_stanzas_total", direction="in", kind="message"), 5)
        self.assertEqual(value("mim_stanzas_total", direction="out", kind="message"), 4)
        self.assertEqual(value("mim_messages_routed_total", outcome="delivered"), 3)
        self.assertEqual(value("mim_messages_routed_total", outcome="offline"), 1)
        self.assertEqual(value("mim_messages_routed_total", outcome="bounced"), 1)
        self.assertEqual(value("mim_pubsub_requests_total", result="ok"), 2)
        self.assertEqual(value("mim_pubsub_requests_total", result="refused"), 0)
        self.assertEqual(value("mim_pubsub_queue_length", queue="0"), 0)
        self.assertEqual(value("mim_connections", state="bound"), 1)
        self.assertEqual(value("mim_sessions", state="unavailable"), 1)
        self.assertEqual(value("mim_offline_messages"), 1)
        self.assertEqual(value("mim_tls_handshake_failures_total"), 0)
        self.assertEqual(value("mim_storage_errors_total"), 0)
        self.assertGreater(value("mim_storage_seconds_count"), 0)


class MetricsOnPostgreSQLTests(MetricsTests):
    storage = "postgresql"


class MetricsOnMySQLTests(MetricsTests):
    storage = "mysql"


class HealthTests(MetricsTestCase):
    async def test_health_follows_the_database(self) -> None:
        self.assertEqual(await self.get("/health"), (200, b"ok\n"))
        self.server.metrics.probe_timeout = 0.5
        await self.server.storage.database.close()
        code, body = await self.get("/health")
        self.assertEqual(code, 503)
        self.assertTrue(body.startswith(b"storage: "), body)
        # Healthy again once the database answers again.
        self.server.storage.database = await open_storage(self.server.config)
        self.assertEqual(await self.get("/health"), (200, b"ok\n"))
