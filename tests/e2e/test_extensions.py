"""Extensions in a running server, driven by slixmpp: a plugin SASL mechanism offered and used, a
plugin EXTERNAL verification method, the example's XEP-0202 entity time, and a hook, an IQ
handler, disco entries, a child service and a PubSub observer."""

import ssl
from datetime import UTC, datetime

from slixmpp.exceptions import IqError
from slixmpp.xmlstream import ET

from mim_twisted.pubsub.core import ItemPublished, NodeCreated
from tests.e2e.harness import STREAM_HEADER, Client, ServerTestCase, eventually, wait_for
from tests.e2e.test_external import ExternalTestCase
from tests.extensionsupport import (
    DROPIN,
    NS_RECORDER,
    Recorder,
    add_dropin,
    add_example_extension,
)
from tests.test_external import mechanisms

NS_TIME = "urn:xmpp:time"
NS_DISCO_INFO = "http://jabber.org/protocol/disco#info"
NS_STANZAS = "urn:ietf:params:xml:ns:xmpp-stanzas"
PASSWORD = "wonderland"


async def ask(client: Client, to: str | None, payload: str) -> ET.Element:
    """Send an IQ get with an empty ``payload`` element (a qualified name); the reply's XML,
    a result or an error."""
    iq = client.xmpp.make_iq_get(ito=to)
    iq.xml.append(ET.Element(payload))
    try:
        reply = await wait_for(iq.send())
    except IqError as error:
        reply = error.iq
    return reply.xml


def error_condition(reply: ET.Element) -> str | None:
    for child in reply.iterfind("{jabber:client}error/*"):
        if child.tag.startswith(f"{{{NS_STANZAS}}}") and child.tag != f"{{{NS_STANZAS}}}text":
            return child.tag.split("}", 1)[1]
    return None


async def server_features(client: Client) -> set[str]:
    reply = await ask(client, "localhost", f"{{{NS_DISCO_INFO}}}query")
    return {
        feature.get("var")
        for feature in reply.iterfind(f"{{{NS_DISCO_INFO}}}query/{{{NS_DISCO_INFO}}}feature")
    }


class TokenLoginTests(ServerTestCase):
    extra_config = (
        '[extensions.token_login]\ntokens = { alice = "letmein" }\n'
        '[auth]\nmechanisms = ["X-OAUTH2", "SCRAM-SHA-1"]\nfailure_delay = 0.0\n'
    )

    def server_config(self, directory: str) -> str:
        # The [auth] table is the extra config's.
        return super().server_config(directory).replace("[auth]\nfailure_delay = 0.0\n", "")

    async def setUp(self) -> None:
        add_dropin(self, "token_dropin", DROPIN.format(name="TokenLogin"))
        await self.start_server()
        await self.register("alice", PASSWORD)

    def token_client(self, token: str) -> Client:
        client = self.client("alice@localhost/token", "", "X-OAUTH2")
        client.xmpp.credentials["access_token"] = token
        return client

    async def test_offered_after_starttls(self) -> None:
        raw = self.raw()
        await raw.connect()
        await raw.send(STREAM_HEADER)
        await raw.read_until(b"</stream:features>")
        await raw.send(b"<starttls xmlns='urn:ietf:params:xml:ns:xmpp-tls'/>")
        await raw.read_until(b"<proceed")
        await raw.starttls(ssl.create_default_context(cafile=self.certificate))
        await raw.send(STREAM_HEADER)
        features = await raw.read_until(b"</stream:features>")
        self.assertEqual(mechanisms(features), ["X-OAUTH2", "SCRAM-SHA-1"])

    async def test_used_by_a_client(self) -> None:
        client = self.token_client("letmein")
        self.assertEqual(await client.connect(), "session_start")
        self.assertEqual(client.bound_jid, "alice@localhost/token")
        self.assertEqual(self.server.factories[0].logins["X-OAUTH2", "success"], 1)

    async def test_a_wrong_token(self) -> None:
        self.assertEqual(await self.token_client("guess").connect(), "failed_auth")
        self.assertEqual(self.server.factories[0].logins["X-OAUTH2", "failure"], 1)

    async def test_the_other_mechanisms_still_work(self) -> None:
        client = self.client("alice@localhost/scram", PASSWORD, "SCRAM-SHA-1")
        self.assertEqual(await client.connect(), "session_start")


class EmployeeNumberTests(ExternalTestCase):
    """auth.sasl_external = ["employee_number"], a method that an extension registered."""

    methods = '["employee_number"]'

    async def setUp(self) -> None:
        add_dropin(self, "employee_dropin", DROPIN.format(name="EmployeeNumbers"))
        await super().setUp()

    def server_config(self, directory: str) -> str:
        return (
            super().server_config(directory)
            + '[extensions.employee_numbers]\naccounts = { 7 = "alice" }\n'
        )

    async def test_accepted_by_the_plugin_method(self) -> None:
        jid = await self.login("alice@localhost/badge", self.ca.issue("employee-7"))
        self.assertEqual(jid, "alice@localhost/badge")

    async def test_nothing_for_the_plugin_method(self) -> None:
        self.assertEqual(await self.refused(self.ca.issue("employee-8")), "not-authorized")
        # The standard method is not configured: an xmppAddr alone proves nothing here.
        issued = self.ca.issue("bob", ["bob@localhost"])
        self.assertEqual(await self.refused(issued), "not-authorized")


class EntityTimeTests(ServerTestCase):
    """examples/mim-entity-time in this process (the packaged one: test_extension_package)."""

    async def setUp(self) -> None:
        add_example_extension(self)

    async def online(self) -> Client:
        await self.register("alice", PASSWORD)
        client = self.client("alice@localhost/clock", PASSWORD)
        self.assertEqual(await client.connect(), "session_start")
        return client

    async def test_enabled(self) -> None:
        await self.start_server('[extensions.entity_time]\nutc_offset = "-06:00"\n')
        client = await self.online()
        reply = await ask(client, "localhost", f"{{{NS_TIME}}}time")
        self.assertEqual(reply.get("type"), "result")
        self.assertEqual(reply.findtext(f"{{{NS_TIME}}}time/{{{NS_TIME}}}tzo"), "-06:00")
        utc = reply.findtext(f"{{{NS_TIME}}}time/{{{NS_TIME}}}utc")
        stated = datetime.strptime(utc, "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=UTC)
        self.assertLess(abs((datetime.now(UTC) - stated).total_seconds()), 5)
        self.assertIn(NS_TIME, await server_features(client))

    async def test_set_is_not_allowed(self) -> None:
        await self.start_server("[extensions.entity_time]\n")
        client = await self.online()
        iq = client.xmpp.make_iq_set(ito="localhost")
        iq.xml.append(ET.Element(f"{{{NS_TIME}}}time"))
        with self.assertRaises(IqError) as raised:
            await wait_for(iq.send())
        self.assertEqual(error_condition(raised.exception.iq.xml), "not-allowed")

    async def test_not_enabled(self) -> None:
        await self.start_server()
        client = await self.online()
        reply = await ask(client, "localhost", f"{{{NS_TIME}}}time")
        self.assertEqual(error_condition(reply), "service-unavailable")
        self.assertNotIn(NS_TIME, await server_features(client))


class RecorderTests(ServerTestCase):
    extra_config = "[extensions.recorder]\n"

    async def setUp(self) -> None:
        add_dropin(self, "recorder_dropin", DROPIN.format(name="Recorder"))
        await self.start_server()
        self.recorder = Recorder.last
        await self.register("alice", PASSWORD)
        self.alice = self.client("alice@localhost/desk", PASSWORD)
        self.alice.xmpp.register_plugin("xep_0060")
        self.assertEqual(await self.alice.connect(), "session_start")

    async def test_child_service_runs_while_the_server_does(self) -> None:
        self.assertEqual(self.recorder.service.events, ["started"])
        self.assertIs(self.recorder.service.parent, self.server)
        await self.server.stopService()
        # Stopped before the database was closed.
        self.assertEqual(self.recorder.service.events, ["started", "stopped"])

    async def test_hook(self) -> None:
        self.alice.xmpp.send_presence()
        await eventually(lambda: self.recorder.available)
        self.assertEqual(self.recorder.available, ["alice@localhost/desk"])

    async def test_account_iq_handler_and_disco(self) -> None:
        reply = await ask(self.alice, None, f"{{{NS_RECORDER}}}query")
        self.assertEqual(reply.get("type"), "result")
        reply = await ask(self.alice, "alice@localhost", f"{{{NS_DISCO_INFO}}}query")
        features = reply.iterfind(f"{{{NS_DISCO_INFO}}}query/{{{NS_DISCO_INFO}}}feature")
        self.assertIn(NS_RECORDER, {feature.get("var") for feature in features})
        reply = await ask(self.alice, "localhost", f"{{{NS_DISCO_INFO}}}query")
        identities = {
            (identity.get("category"), identity.get("type"))
            for identity in reply.iterfind(f"{{{NS_DISCO_INFO}}}query/{{{NS_DISCO_INFO}}}identity")
        }
        self.assertEqual(identities, {("server", "im"), ("automation", "recorder")})

    async def test_pubsub_observer(self) -> None:
        pubsub = self.alice.xmpp["xep_0060"]
        await wait_for(pubsub.create_node("pubsub.localhost", "news"))
        entry = ET.Element("{urn:example:news}entry")
        await wait_for(pubsub.publish("pubsub.localhost", "news", id="1", payload=entry))
        kinds = [type(event) for event in self.recorder.pubsub_events]
        self.assertEqual(kinds, [NodeCreated, ItemPublished])
