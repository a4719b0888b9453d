"""OMEMO (XEP-0384) through the server with slixmpp-omemo: two accounts that never met publish
their device lists and bundles on PEP, one encrypts a message with the urn:xmpp:omemo:2 backend
(twomemo) and the other decrypts the original text; once as contacts (the device list reaches
the other through +notify), once as strangers (it is fetched from the `open` nodes).

slixmpp-omemo's own `encrypt_message` only encrypts for the legacy namespace (it lacks SCE), so
the message is encrypted and decrypted with its session manager under urn:xmpp:omemo:2.

Every test runs on SQLite and again on PostgreSQL and MySQL (the subclasses at the end).
"""

import asyncio
import logging
from typing import Any

from mim_twisted.storage.interfaces import RosterItem
from tests.ci import unavailable
from tests.e2e.harness import Client, ServerTestCase, eventually, wait_for

try:
    import omemo.storage
    import twomemo
    import twomemo.etree
    from slixmpp import JID
    from slixmpp.plugins.base import register_plugin
    from slixmpp_omemo import XEP_0384, TrustLevel
except ImportError:  # the `test` extra installs slixmpp-omemo
    XEP_0384 = None

# A first login warns that the own device is not in the (still empty) device list yet.
logging.getLogger("omemo").setLevel(logging.ERROR)

PASSWORD = "end to end"
TWOMEMO = "urn:xmpp:omemo:2"
DEVICES = "urn:xmpp:omemo:2:devices"
TEXT = "the original text: ünïcode 🎉"
# What clients without OMEMO show; slixmpp raises its "message" event only for a body, too.
FALLBACK = "This message is OMEMO encrypted."

if XEP_0384 is not None:

    class MemoryStorage(omemo.storage.Storage):
        """The client's OMEMO keys and sessions, for the test's lifetime."""

        def __init__(self) -> None:
            super().__init__()
            self.values: dict[str, Any] = {}

        async def _load(self, key: str) -> Any:
            if key in self.values:
                return omemo.storage.Just(self.values[key])
            return omemo.storage.Nothing()

        async def _store(self, key: str, value: Any) -> None:
            self.values[key] = value

        async def _delete(self, key: str) -> None:
            self.values.pop(key, None)

    class Omemo(XEP_0384):
        """slixmpp-omemo with memory storage, trusting new devices blindly (BTBV)."""

        def plugin_init(self) -> None:
            self.memory = MemoryStorage()
            super().plugin_init()

        @property
        def storage(self) -> omemo.storage.Storage:
            return self.memory

        @property
        def _btbv_enabled(self) -> bool:
            return True

        async def _prompt_manual_trust(self, manually_trusted: Any, identifier: Any) -> None:
            session_manager = await self.get_session_manager()
            for device in manually_trusted:
                await session_manager.set_trust(
                    device.bare_jid, device.identity_key, TrustLevel.TRUSTED.value
                )

    register_plugin(Omemo)


class OmemoTests(ServerTestCase):
    async def setUp(self) -> None:
        if XEP_0384 is None:
            unavailable("slixmpp-omemo is not installed", "pip install -e '.[test]'")
        await self.start_server()
        for user in ("alice", "bob"):
            await self.register(user, PASSWORD)

    async def befriend(self) -> None:
        rosters = self.server.database.rosters
        for owner, other in (("alice", "bob"), ("bob", "alice")):
            await rosters.put_item(
                "localhost", owner, RosterItem(f"{other}@localhost", subscription="both")
            )

    async def online(self, jid: str) -> Client:
        client = self.client(jid, PASSWORD)
        for plugin in ("xep_0030", "xep_0060", "xep_0115", "xep_0163", "xep_0384"):
            client.xmpp.register_plugin(plugin)
        client.omemo_messages = []
        client.xmpp.add_event_handler("message", self.collect(client))
        initialized = client.next_event("omemo_initialized")
        self.assertEqual(await client.connect(), "session_start")
        await wait_for(client.xmpp.plugin["xep_0115"].update_caps(broadcast=False))
        client.xmpp.send_presence()
        await wait_for(initialized, timeout=30)  # bundle and device list published
        return client

    @staticmethod
    def collect(client: Client):
        def received(message: Any) -> None:
            encrypted = message.xml.find(f"{{{TWOMEMO}}}encrypted")
            if encrypted is not None:
                client.omemo_messages.append((message["from"].bare, encrypted))

        return received

    def plugin(self, client: Client) -> Any:
        return client.xmpp.plugin["xep_0384"]

    async def device_list_items(self, owner: str) -> list[str]:
        items = await self.server.database.pubsub.get_items(owner, DEVICES)
        return [item.item_id for item in items]

    async def exchange(self, alice: Client, bob: Client) -> None:
        """Alice encrypts TEXT for Bob under urn:xmpp:omemo:2; Bob decrypts it."""
        sender = await wait_for(self.plugin(alice).get_session_manager())
        await wait_for(self.plugin(alice).refresh_device_lists({JID("bob@localhost")}))
        messages, errors = await wait_for(
            sender.encrypt(
                frozenset({"bob@localhost"}),
                {twomemo.twomemo.NAMESPACE: TEXT.encode()},
                backend_priority_order=[twomemo.twomemo.NAMESPACE],
            )
        )
        self.assertEqual(errors, frozenset())
        [message] = messages
        self.assertEqual(message.namespace, TWOMEMO)
        stanza = alice.xmpp.make_message(mto="bob@localhost", mtype="chat", mbody=FALLBACK)
        stanza.append(twomemo.etree.serialize_message(message))
        stanza.send()
        await eventually(lambda: bob.omemo_messages)
        [(sender_jid, encrypted)] = bob.omemo_messages
        self.assertEqual(sender_jid, "alice@localhost")
        receiver = await wait_for(self.plugin(bob).get_session_manager())
        parsed = twomemo.etree.parse_message(encrypted, sender_jid)
        plaintext, device, _ = await wait_for(receiver.decrypt(parsed))
        self.assertEqual(plaintext.decode(), TEXT)
        self.assertEqual(device.bare_jid, "alice@localhost")

    async def test_contacts(self) -> None:
        await self.befriend()
        alice = await self.online("alice@localhost/laptop")
        bob = await self.online("bob@localhost/phone")
        self.assertEqual(await self.device_list_items("bob@localhost"), ["current"])
        # Bob's caps ask for the device lists (+notify): Alice's reaches him without his asking.
        receiver = await wait_for(self.plugin(bob).get_session_manager())

        async def knows_alice() -> bool:
            return bool(await receiver.get_device_information("alice@localhost"))

        await self.until(knows_alice)
        await self.exchange(alice, bob)

    async def test_strangers(self) -> None:
        alice = await self.online("alice@localhost/laptop")
        bob = await self.online("bob@localhost/phone")
        await self.exchange(alice, bob)
        # Bob can answer: his reply is read by Alice, the stranger.
        await self.reverse(bob, alice)

    async def reverse(self, bob: Client, alice: Client) -> None:
        receiver_messages = alice.omemo_messages
        sender = await wait_for(self.plugin(bob).get_session_manager())
        await wait_for(self.plugin(bob).refresh_device_lists({JID("alice@localhost")}))
        messages, _ = await wait_for(
            sender.encrypt(
                frozenset({"alice@localhost"}),
                {twomemo.twomemo.NAMESPACE: b"reply"},
                backend_priority_order=[twomemo.twomemo.NAMESPACE],
            )
        )
        [message] = messages
        stanza = bob.xmpp.make_message(mto="alice@localhost", mtype="chat", mbody=FALLBACK)
        stanza.append(twomemo.etree.serialize_message(message))
        stanza.send()
        await eventually(lambda: receiver_messages)
        [(_, encrypted)] = receiver_messages
        receiver = await wait_for(self.plugin(alice).get_session_manager())
        plaintext, _, _ = await wait_for(
            receiver.decrypt(twomemo.etree.parse_message(encrypted, "bob@localhost"))
        )
        self.assertEqual(plaintext, b"reply")

    @staticmethod
    async def until(condition: Any, timeout: float = 15.0) -> None:
        loop = asyncio.get_event_loop()
        deadline = loop.time() + timeout
        while not await wait_for(condition()):
            if loop.time() > deadline:
                raise AssertionError("condition not met in time")
            await wait_for(asyncio.sleep(0.05))


class OmemoOnPostgreSQLTests(OmemoTests):
    storage = "postgresql"


class OmemoOnMySQLTests(OmemoTests):
    storage = "mysql"
