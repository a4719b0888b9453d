"""slixmpp's PEP (XEP-0163) against a real server: auto-create, +notify filtering, the last item
on login and on a new subscription, retract, max_items, item ids, publish-options and the
owner's second resource.

Every test runs on SQLite and again on PostgreSQL and MySQL (the subclasses at the end).
"""

import asyncio

from slixmpp.exceptions import IqError
from slixmpp.plugins.xep_0004 import Form
from slixmpp.xmlstream import ET
from twisted.words.protocols.jabber.jid import JID

from mim_twisted.storage.interfaces import RosterItem
from tests.e2e.harness import Client, ServerTestCase, eventually, wait_for

PASSWORD = "personal eventing"
NODE = "urn:example:mood"
NS_EVENT = "http://jabber.org/protocol/pubsub#event"
NS_ERRORS = "http://jabber.org/protocol/pubsub#errors"
NS_DELAY = "urn:xmpp:delay"
# Long enough for a notification that was going to be sent to have arrived.
QUIET = 0.3


def payload(text: str) -> ET.Element:
    mood = ET.Element(f"{{{NODE}}}mood")
    mood.text = text
    return mood


def publish_options(**fields: str) -> Form:
    form = Form()
    form["type"] = "submit"
    form.add_field(
        var="FORM_TYPE", ftype="hidden", value="http://jabber.org/protocol/pubsub#publish-options"
    )
    for name, value in fields.items():
        form.add_field(var=f"pubsub#{name}", value=value)
    return form


def items_of(message: object) -> tuple[str, str, list[tuple[str, str | None]]]:
    """(from, node, [(tag, id)]) of an event notification."""
    [items] = message.xml.findall(f"{{{NS_EVENT}}}event/{{{NS_EVENT}}}items")
    return message["from"].full, items.get("node"), [(e.tag, e.get("id")) for e in items]


class PepTests(ServerTestCase):
    async def setUp(self) -> None:
        await self.start_server()
        for user in ("alice", "bob", "carol", "dave"):
            await self.register(user, PASSWORD)
        # Bob and Carol see Alice's presence (and she theirs); Dave is a stranger.
        for contact in ("bob", "carol"):
            await self.befriend("alice", contact)

    async def befriend(self, user: str, contact: str) -> None:
        rosters = self.server.database.rosters
        for owner, other in ((user, contact), (contact, user)):
            item = RosterItem(f"{other}@localhost", subscription="both")
            await rosters.put_item("localhost", owner, item)

    async def online(self, jid: str, *interests: str) -> Client:
        """Logged in, announcing caps with ``<node>+notify`` for each interest, and available
        once the server has learned them (it asks the client for its disco#info)."""
        client = self.client(jid, PASSWORD)
        for plugin in ("xep_0030", "xep_0060", "xep_0115", "xep_0163"):
            client.xmpp.register_plugin(plugin)
        client.received = []
        client.xmpp.add_event_handler("pubsub_publish", client.received.append)
        client.xmpp.add_event_handler("pubsub_retract", client.received.append)
        for namespace in interests:
            client.xmpp.plugin["xep_0030"].add_feature(f"{namespace}+notify")
        self.assertEqual(await client.connect(), "session_start")
        await wait_for(client.xmpp.plugin["xep_0115"].update_caps(broadcast=False))
        client.xmpp.send_presence()
        if interests:
            await eventually(lambda: self.caps_learned(client.bound_jid))
        return client

    def caps_learned(self, jid: str) -> bool:
        session = self.server.core.sessions.session(JID(jid))
        return session is not None and self.server.core.caps.features_of(session) is not None

    def pep(self, client: Client):
        return client.xmpp.plugin["xep_0060"]

    async def publish(self, client: Client, item_id: str, text: str, **options: str):
        form = publish_options(**options) if options else None
        return await wait_for(
            self.pep(client).publish(None, NODE, id=item_id, payload=payload(text), options=form)
        )

    async def quiet(self) -> None:
        await wait_for(asyncio.sleep(QUIET))

    async def test_auto_create_and_only_contacts_asking_for_notify(self) -> None:
        alice = await self.online("alice@localhost/desk")
        bob = await self.online("bob@localhost/phone", NODE)
        carol = await self.online("carol@localhost/pc", "urn:example:other")
        dave = await self.online("dave@localhost/pc", NODE)
        notified = bob.next_event("pubsub_publish")
        result = await self.publish(alice, "m1", "happy")
        self.assertEqual(result["pubsub"]["publish"]["item"]["id"], "m1")
        message = await wait_for(notified)
        self.assertEqual(
            items_of(message), ("alice@localhost", NODE, [(f"{{{NS_EVENT}}}item", "m1")])
        )
        [mood] = message.xml.findall(f"{{{NS_EVENT}}}event/{{{NS_EVENT}}}items/*/*")
        self.assertEqual((mood.tag, mood.text), (f"{{{NODE}}}mood", "happy"))
        await self.quiet()
        self.assertEqual((carol.received, dave.received, alice.received), ([], [], []))
        node = await self.server.database.pubsub.get_node("alice@localhost", NODE)
        self.assertIsNotNone(node)

    async def test_owners_second_resource(self) -> None:
        desk = await self.online("alice@localhost/desk")
        phone = await self.online("alice@localhost/phone", NODE)
        notified = phone.next_event("pubsub_publish")
        await self.publish(desk, "m1", "busy")
        self.assertEqual(items_of(await wait_for(notified))[0], "alice@localhost")

    async def test_last_item_on_login_once_with_a_delay(self) -> None:
        alice = await self.online("alice@localhost/desk")
        await self.publish(alice, "m1", "sleepy")
        await self.publish(alice, "m2", "awake")
        bob = await self.online("bob@localhost/phone", NODE)
        await eventually(lambda: bob.received)
        await self.quiet()
        [last] = bob.received
        self.assertEqual(items_of(last)[2], [(f"{{{NS_EVENT}}}item", "m2")])
        self.assertIsNotNone(last.xml.find(f"{{{NS_DELAY}}}delay"))
        # A second resource with the same caps (known now, no query) gets it too, once.
        tablet = await self.online("bob@localhost/tablet", NODE)
        await eventually(lambda: tablet.received)
        bob.xmpp.send_presence(pstatus="still here")
        await self.quiet()
        self.assertEqual((len(bob.received), len(tablet.received)), (1, 1))

    async def test_last_item_on_a_new_subscription(self) -> None:
        alice = await self.online("alice@localhost/desk")
        await self.publish(alice, "m1", "open to friends")
        dave = await self.online("dave@localhost/pc", NODE)
        await self.quiet()
        self.assertEqual(dave.received, [])
        # Alice's client approves the request (slixmpp's default), then the item follows.
        dave.xmpp.send_presence(pto="alice@localhost", ptype="subscribe")
        await eventually(lambda: dave.received)
        self.assertEqual(items_of(dave.received[0])[:2], ("alice@localhost", NODE))

    async def test_max_items_item_ids_and_retract(self) -> None:
        alice = await self.online("alice@localhost/desk")
        bob = await self.online("bob@localhost/phone", NODE)
        await self.publish(alice, "first", "a")
        await self.publish(alice, "second", "b")
        items = await wait_for(self.pep(bob).get_items("alice@localhost", NODE))
        self.assertEqual([i["id"] for i in items["pubsub"]["items"]], ["second"])
        retracted = bob.next_event("pubsub_retract")
        await wait_for(self.pep(alice).retract(None, NODE, "second", notify=True))
        self.assertEqual(
            items_of(await wait_for(retracted))[2], [(f"{{{NS_EVENT}}}retract", "second")]
        )
        items = await wait_for(self.pep(bob).get_items("alice@localhost", NODE))
        self.assertEqual(list(items["pubsub"]["items"]), [])

    async def test_publish_options_open_and_a_precondition_mismatch(self) -> None:
        alice = await self.online("alice@localhost/desk")
        dave = await self.online("dave@localhost/pc")
        await self.publish(alice, "b1", "public", access_model="open")
        items = await wait_for(self.pep(dave).get_items("alice@localhost", NODE))
        self.assertEqual([i["id"] for i in items["pubsub"]["items"]], ["b1"])
        with self.assertRaises(IqError) as raised:
            await self.publish(alice, "b2", "private", access_model="whitelist")
        self.assertEqual(raised.exception.condition, "conflict")
        error = raised.exception.iq["error"].xml
        self.assertIsNotNone(error.find(f"{{{NS_ERRORS}}}precondition-not-met"))
        # A node with the default (presence) access model is closed to strangers.
        await wait_for(
            self.pep(alice).publish(None, "urn:example:private", id="p", payload=payload("x"))
        )
        with self.assertRaises(IqError) as raised:
            await wait_for(self.pep(dave).get_items("alice@localhost", "urn:example:private"))
        self.assertEqual(raised.exception.condition, "not-authorized")


class PepOnPostgreSQLTests(PepTests):
    storage = "postgresql"


class PepOnMySQLTests(PepTests):
    storage = "mysql"
