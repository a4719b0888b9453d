"""slixmpp against a real server: service discovery, ping and entity capabilities."""

import asyncio

from slixmpp import Iq

from tests.e2e.harness import Client, ServerTestCase, eventually, wait_for

PASSWORD = "wonderland"
NS_DISCO_INFO = "http://jabber.org/protocol/disco#info"


class DiscoCapsTests(ServerTestCase):
    async def setUp(self) -> None:
        await self.start_server()
        await self.register("alice", PASSWORD)

    async def online(self, *plugins: str) -> Client:
        client = self.client("alice@localhost/laptop", PASSWORD)
        for plugin in ("xep_0030", *plugins):
            client.xmpp.register_plugin(plugin)
        self.assertEqual(await client.connect(), "session_start")
        return client

    async def test_server_info(self) -> None:
        client = await self.online()
        info = await wait_for(client.xmpp.plugin["xep_0030"].get_info(jid="localhost"))
        identities = {(c, t, name) for c, t, _lang, name in info["disco_info"]["identities"]}
        self.assertEqual(identities, {("server", "im", "mim-twisted")})
        features = set(info["disco_info"]["features"])
        self.assertLessEqual(
            {NS_DISCO_INFO, "urn:xmpp:ping", "jabber:iq:version", "msgoffline"}, features
        )

    async def test_own_account_info(self) -> None:
        client = await self.online()
        info = await wait_for(client.xmpp.plugin["xep_0030"].get_info(jid="alice@localhost"))
        identities = {(c, t) for c, t, _lang, _name in info["disco_info"]["identities"]}
        # PEP (on by default) makes every account a PubSub service too (XEP-0163 §6).
        self.assertEqual(identities, {("account", "registered"), ("pubsub", "pep")})

    async def test_ping_the_server(self) -> None:
        client = await self.online("xep_0199")
        # Not plugin.ping(): it counts an error reply from the own server as a pong.
        ping = client.xmpp.plugin["xep_0199"].send_ping(jid="localhost", timeout=5)
        reply = await wait_for(ping)  # an error reply would raise IqError
        self.assertEqual((reply["type"], reply["from"].full), ("result", "localhost"))
        self.assertEqual(list(reply.xml), [])  # XEP-0199 §4: an empty result

    async def test_caps_are_asked_for_and_the_server_caps_verify(self) -> None:
        client = await self.online("xep_0115")
        queries: list[Iq] = []

        def watch(stanza: object) -> object:
            if isinstance(stanza, Iq) and stanza["type"] == "get" and stanza["from"] == "localhost":
                if stanza.xml.find(f"{{{NS_DISCO_INFO}}}query") is not None:
                    queries.append(stanza)
            return stanza

        client.xmpp.add_filter("in", watch)
        caps = client.xmpp.plugin["xep_0115"]
        # slixmpp computes its own ver on demand; presence carries caps only once it has.
        await wait_for(caps.update_caps(broadcast=False))
        client.xmpp.send_presence()
        await eventually(lambda: queries)
        ver = await wait_for(caps.get_verstring(client.xmpp.boundjid))
        self.assertEqual(queries[0]["disco_info"]["node"], f"{caps.caps_node}#{ver}")
        # The server's stream-feature caps: slixmpp asks for node#ver and keeps the ver only if
        # the hash checks out.
        await wait_for(self.verified(caps, "localhost"))

    @staticmethod
    async def verified(caps: object, jid: str) -> None:
        while await caps.get_verstring(jid) is None:
            await asyncio.sleep(0.02)
