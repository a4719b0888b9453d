"""slixmpp's XEP-0060 plugin against pubsub.localhost: owner, publisher and subscriber use cases.

Every test runs on SQLite and again on PostgreSQL (the subclass at the end).
"""

import asyncio

from slixmpp.exceptions import IqError
from slixmpp.plugins.xep_0004 import Form
from slixmpp.xmlstream import ET

from tests.e2e.harness import Client, ServerTestCase, wait_for

SERVICE = "pubsub.localhost"
PASSWORD = "publish or perish"
NS_PUBSUB = "http://jabber.org/protocol/pubsub"
NS_EVENT = "http://jabber.org/protocol/pubsub#event"
NS_OWNER = "http://jabber.org/protocol/pubsub#owner"
NS_ERRORS = "http://jabber.org/protocol/pubsub#errors"
NS_DATA = "jabber:x:data"


def payload(text: str) -> ET.Element:
    entry = ET.Element("{urn:example:news}entry")
    entry.text = text
    return entry


def affiliations(stanza: object, namespace: str, key: str) -> dict[str, str]:
    """{jid or node: affiliation} of an <affiliations/> reply, in the ``namespace`` of its use."""
    path = f"{{{namespace}}}pubsub/{{{namespace}}}affiliations/{{{namespace}}}affiliation"
    return {element.get(key): element.get("affiliation") for element in stanza.xml.findall(path)}


def config_form(**fields: object) -> Form:
    form = Form()
    form["type"] = "submit"
    form.add_field(
        var="FORM_TYPE", ftype="hidden", value="http://jabber.org/protocol/pubsub#node_config"
    )
    for name, value in fields.items():
        form.add_field(var=f"pubsub#{name}", value=value)
    return form


class PubSubTests(ServerTestCase):
    async def setUp(self) -> None:
        await self.start_server()
        for user in ("owner", "reader", "other"):
            await self.register(user, PASSWORD)
        self.owner = await self.online("owner@localhost/desk")
        self.reader = await self.online("reader@localhost/phone")

    async def online(self, jid: str) -> Client:
        client = self.client(jid, PASSWORD)
        client.xmpp.register_plugin("xep_0060")
        self.assertEqual(await client.connect(), "session_start")
        client.xmpp.send_presence()
        return client

    def pubsub(self, client: Client):
        return client.xmpp.plugin["xep_0060"]

    async def expect_error(self, awaitable, condition: str, app_condition: str | None = None):
        with self.assertRaises(IqError) as raised:
            await wait_for(awaitable)
        self.assertEqual(raised.exception.condition, condition)
        if app_condition is not None:
            error = raised.exception.iq["error"].xml
            self.assertIsNotNone(error.find(f"{{{NS_ERRORS}}}{app_condition}"), app_condition)
        return raised.exception

    async def test_publish_notifies_subscribers_with_the_payload(self) -> None:
        other = await self.online("other@localhost/tablet")
        await wait_for(self.pubsub(self.owner).create_node(SERVICE, "news"))
        await wait_for(self.pubsub(self.reader).subscribe(SERVICE, "news"))  # bare JID
        await wait_for(self.pubsub(other).subscribe(SERVICE, "news", bare=False))  # full JID
        to_reader = self.reader.next_event("pubsub_publish")
        to_other = other.next_event("pubsub_publish")
        await wait_for(
            self.pubsub(self.owner).publish(SERVICE, "news", id="first", payload=payload("hello"))
        )
        for message in (await wait_for(to_reader), await wait_for(to_other)):
            [items] = message.xml.findall(f"{{{NS_EVENT}}}event/{{{NS_EVENT}}}items")
            self.assertEqual(items.get("node"), "news")
            [item] = items
            self.assertEqual((item.tag, item.get("id")), (f"{{{NS_EVENT}}}item", "first"))
            [entry] = item
            self.assertEqual((entry.tag, entry.text), ("{urn:example:news}entry", "hello"))

    async def test_a_burst_of_publications_is_answered_and_notified_in_order(self) -> None:
        # Sent in one go, they wait together in the node's queue and are stored together.
        other = await self.online("other@localhost/tablet")
        await wait_for(self.pubsub(self.owner).create_node(SERVICE, "burst"))
        await wait_for(self.pubsub(self.reader).subscribe(SERVICE, "burst"))
        notified: list[str] = []
        all_notified = asyncio.get_running_loop().create_future()

        def on_publish(message) -> None:
            notified.append(message["pubsub_event"]["items"]["item"]["id"])
            if len(notified) == 20 and not all_notified.done():
                all_notified.set_result(None)

        self.reader.xmpp.add_event_handler("pubsub_publish", on_publish)
        sent = [
            asyncio.ensure_future(
                self.pubsub(self.owner).publish(SERVICE, "burst", id=f"i{n}", payload=payload("x"))
            )
            for n in range(10)
        ]
        intruder = asyncio.ensure_future(
            self.pubsub(other).publish(SERVICE, "burst", id="x", payload=payload("x"))
        )
        sent += [
            asyncio.ensure_future(
                self.pubsub(self.owner).publish(SERVICE, "burst", id=f"i{n}", payload=payload("x"))
            )
            for n in range(10, 20)
        ]
        results = await wait_for(asyncio.gather(*sent))
        published = [r["pubsub"]["publish"]["item"]["id"] for r in results]
        self.assertEqual(published, [f"i{n}" for n in range(20)])
        await self.expect_error(intruder, "forbidden")
        await wait_for(all_notified)
        self.assertEqual(notified, [f"i{n}" for n in range(20)])
        result = await wait_for(self.pubsub(self.reader).get_items(SERVICE, "burst"))
        # The node keeps 10 items, the newest.
        self.assertEqual(
            [i["id"] for i in result["pubsub"]["items"]], [f"i{n}" for n in range(10, 20)]
        )

    async def test_items_retrieval_and_restart_survival(self) -> None:
        await wait_for(self.pubsub(self.owner).create_node(SERVICE, "log"))
        for n in range(3):
            await wait_for(
                self.pubsub(self.owner).publish(SERVICE, "log", id=f"i{n}", payload=payload(f"{n}"))
            )
        result = await wait_for(self.pubsub(self.reader).get_items(SERVICE, "log"))
        self.assertEqual([i["id"] for i in result["pubsub"]["items"]], ["i0", "i1", "i2"])
        latest = await wait_for(self.pubsub(self.reader).get_items(SERVICE, "log", max_items=1))
        self.assertEqual([i["id"] for i in latest["pubsub"]["items"]], ["i2"])
        one = await wait_for(self.pubsub(self.reader).get_item(SERVICE, "log", "i1"))
        self.assertEqual([i["id"] for i in one["pubsub"]["items"]], ["i1"])

        # Items live in the database: a restarted server still has them.
        await self.owner.close()
        await self.reader.close()
        await self.server.stopService()
        self.server.startService()
        await self.server.ready
        self.port = self.server.ports[0].getHost().port
        reader = await self.online("reader@localhost/again")
        result = await wait_for(self.pubsub(reader).get_items(SERVICE, "log"))
        self.assertEqual([i["id"] for i in result["pubsub"]["items"]], ["i0", "i1", "i2"])

    async def test_retract_with_notify_and_purge(self) -> None:
        await wait_for(self.pubsub(self.owner).create_node(SERVICE, "feed"))
        await wait_for(self.pubsub(self.reader).subscribe(SERVICE, "feed"))
        await wait_for(
            self.pubsub(self.owner).publish(SERVICE, "feed", id="a", payload=payload("a"))
        )
        retracted = self.reader.next_event("pubsub_retract")
        await wait_for(self.pubsub(self.owner).retract(SERVICE, "feed", "a", notify=True))
        [items] = (await wait_for(retracted)).xml.findall(
            f"{{{NS_EVENT}}}event/{{{NS_EVENT}}}items"
        )
        self.assertEqual(items.get("node"), "feed")
        self.assertEqual([(e.tag, e.get("id")) for e in items], [(f"{{{NS_EVENT}}}retract", "a")])
        await wait_for(
            self.pubsub(self.owner).publish(SERVICE, "feed", id="b", payload=payload("b"))
        )
        await wait_for(
            self.pubsub(self.owner).set_node_config(
                SERVICE, "feed", config_form(notify_retract="1")
            )
        )
        purged = self.reader.next_event("pubsub_purge")
        await wait_for(self.pubsub(self.owner).purge(SERVICE, "feed"))
        await wait_for(purged)
        result = await wait_for(self.pubsub(self.reader).get_items(SERVICE, "feed"))
        self.assertEqual(list(result["pubsub"]["items"]), [])

    async def test_configure_and_delete_notify_subscribers(self) -> None:
        await wait_for(
            self.pubsub(self.owner).create_node(
                SERVICE, "conf", config=config_form(notify_config="1", notify_delete="1")
            )
        )
        await wait_for(self.pubsub(self.reader).subscribe(SERVICE, "conf"))
        configured = self.reader.next_event("pubsub_config")
        await wait_for(
            self.pubsub(self.owner).set_node_config(SERVICE, "conf", config_form(title="Renamed"))
        )
        await wait_for(configured)
        stored = await wait_for(self.pubsub(self.owner).get_node_config(SERVICE, "conf"))
        [title] = stored.xml.findall(
            f"{{{NS_OWNER}}}pubsub/{{{NS_OWNER}}}configure/{{{NS_DATA}}}x"
            f"/{{{NS_DATA}}}field[@var='pubsub#title']/{{{NS_DATA}}}value"
        )
        self.assertEqual(title.text, "Renamed")
        deleted = self.reader.next_event("pubsub_delete")
        await wait_for(self.pubsub(self.owner).delete_node(SERVICE, "conf"))
        await wait_for(deleted)
        await self.expect_error(
            self.pubsub(self.reader).get_items(SERVICE, "conf"), "item-not-found"
        )

    async def test_unsubscribe_stops_notifications(self) -> None:
        await wait_for(self.pubsub(self.owner).create_node(SERVICE, "quiet"))
        await wait_for(self.pubsub(self.reader).subscribe(SERVICE, "quiet"))
        await wait_for(self.pubsub(self.reader).unsubscribe(SERVICE, "quiet"))
        got = self.reader.next_event("pubsub_publish")
        await wait_for(self.pubsub(self.owner).publish(SERVICE, "quiet", payload=payload("x")))
        await wait_for(asyncio.sleep(0.3))
        self.assertFalse(got.done())
        got.cancel()

    async def test_affiliations_and_publishers(self) -> None:
        await wait_for(self.pubsub(self.owner).create_node(SERVICE, "team"))
        await self.expect_error(
            self.pubsub(self.reader).publish(SERVICE, "team", payload=payload("no")), "forbidden"
        )
        await wait_for(
            self.pubsub(self.owner).modify_affiliations(
                SERVICE, "team", [("reader@localhost", "publisher")]
            )
        )
        await wait_for(self.pubsub(self.reader).publish(SERVICE, "team", payload=payload("yes")))
        listed = await wait_for(self.pubsub(self.owner).get_node_affiliations(SERVICE, "team"))
        self.assertEqual(
            affiliations(listed, NS_OWNER, "jid"),
            {"owner@localhost": "owner", "reader@localhost": "publisher"},
        )
        own = await wait_for(self.pubsub(self.reader).get_affiliations(SERVICE))
        self.assertEqual(affiliations(own, NS_PUBSUB, "node"), {"team": "publisher"})
        # The last owner cannot leave.
        await self.expect_error(
            self.pubsub(self.owner).modify_affiliations(
                SERVICE, "team", [("owner@localhost", "none")]
            ),
            "not-acceptable",
        )

    async def test_whitelist_node(self) -> None:
        await wait_for(
            self.pubsub(self.owner).create_node(
                SERVICE, "club", config=config_form(access_model="whitelist")
            )
        )
        await self.expect_error(
            self.pubsub(self.reader).subscribe(SERVICE, "club"), "not-allowed", "closed-node"
        )
        await wait_for(
            self.pubsub(self.owner).modify_affiliations(
                SERVICE, "club", [("reader@localhost", "member")]
            )
        )
        await wait_for(self.pubsub(self.reader).subscribe(SERVICE, "club"))

    async def test_authorize_node(self) -> None:
        await wait_for(
            self.pubsub(self.owner).create_node(
                SERVICE, "vip", config=config_form(access_model="authorize")
            )
        )
        approval = self.owner.next_event("message_xform")
        result = await wait_for(self.pubsub(self.reader).subscribe(SERVICE, "vip"))
        self.assertEqual(result["pubsub"]["subscription"]["subscription"], "pending")
        request = await wait_for(approval)
        form = request["form"]
        answer = self.owner.xmpp.make_message(mto=SERVICE)
        form["type"] = "submit"
        form.field["pubsub#allow"]["value"] = True
        answer.append(form)
        approved = self.reader.next_event("pubsub_subscription")
        answer.send()
        event = await wait_for(approved)
        [subscription] = event.xml.findall(f"{{{NS_EVENT}}}event/{{{NS_EVENT}}}subscription")
        self.assertEqual(
            (subscription.get("node"), subscription.get("jid"), subscription.get("subscription")),
            ("vip", "reader@localhost", "subscribed"),
        )

    async def test_main_error_conditions(self) -> None:
        await wait_for(self.pubsub(self.owner).create_node(SERVICE, "errs"))
        await self.expect_error(self.pubsub(self.owner).create_node(SERVICE, "errs"), "conflict")
        await self.expect_error(
            self.pubsub(self.reader).get_items(SERVICE, "missing"), "item-not-found"
        )
        await self.expect_error(self.pubsub(self.reader).delete_node(SERVICE, "errs"), "forbidden")
        await self.expect_error(
            self.pubsub(self.owner).set_node_config(SERVICE, "errs", config_form(max_items="x")),
            "not-acceptable",
        )
        big = payload("x" * 70_000)
        await self.expect_error(
            self.pubsub(self.owner).publish(SERVICE, "errs", payload=big),
            "not-acceptable",
            "payload-too-big",
        )

    async def test_disco_of_the_service(self) -> None:
        self.owner.xmpp.register_plugin("xep_0030")
        await wait_for(self.pubsub(self.owner).create_node(SERVICE, "listed"))
        disco = self.owner.xmpp.plugin["xep_0030"]
        info = await wait_for(disco.get_info(jid=SERVICE))
        self.assertIn(
            ("pubsub", "service", None, "Publish-Subscribe"), info["disco_info"]["identities"]
        )
        items = await wait_for(disco.get_items(jid=SERVICE))
        self.assertIn("listed", [node for _, node, _ in items["disco_items"]["items"]])
        server_items = await wait_for(disco.get_items(jid="localhost"))
        self.assertIn(SERVICE, [jid for jid, _, _ in server_items["disco_items"]["items"]])


class PubSubOnPostgreSQLTests(PubSubTests):
    storage = "postgresql"


class PubSubOnMySQLTests(PubSubTests):
    storage = "mysql"


class BackPressureTests(ServerTestCase):
    extra_config = "[pubsub]\nworkers = 1\nmax_queue_length = 2\n"

    async def test_an_overfull_queue_answers_resource_constraint(self) -> None:
        await self.start_server()
        await self.register("owner", PASSWORD)
        owner = self.client("owner@localhost/desk", PASSWORD)
        owner.xmpp.register_plugin("xep_0060")
        self.assertEqual(await owner.connect(), "session_start")
        pubsub = owner.xmpp.plugin["xep_0060"]
        await wait_for(pubsub.create_node(SERVICE, "busy"))
        # Twenty publications in one burst: one runs, two wait, the rest are refused at once.
        sent = [
            asyncio.ensure_future(pubsub.publish(SERVICE, "busy", id=f"i{n}", payload=payload("x")))
            for n in range(20)
        ]
        results = await wait_for(asyncio.gather(*sent, return_exceptions=True))
        refused = [r for r in results if isinstance(r, IqError)]
        self.assertTrue(refused)
        for error in refused:
            self.assertEqual((error.condition, error.etype), ("resource-constraint", "wait"))
        accepted = [r for r in results if not isinstance(r, Exception)]
        self.assertEqual(len(accepted) + len(refused), 20)
        stored = await self.server.database.pubsub.get_items(SERVICE, "busy")
        self.assertEqual(len(stored), min(len(accepted), 10))  # the node keeps 10 items
