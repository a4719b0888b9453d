"""XEP-0030 service discovery at the stanza level, through a real Router."""

from dataclasses import dataclass

from twisted.internet import defer
from twisted.internet.task import Clock
from twisted.trial import unittest
from twisted.words.protocols.jabber.jid import JID
from twisted.words.xish import domish

from mim_twisted.auth.scram import derive_all
from mim_twisted.im import caps, ping
from mim_twisted.im.disco import NS_DISCO_INFO, NS_DISCO_ITEMS, DiscoItem, DiscoService
from mim_twisted.im.sessions import SessionManager
from mim_twisted.storage.memory import MemoryDatabase
from tests.imsupport import FakeSession, error_condition, make_router, send


def query_of(stanza: domish.Element, namespace: str) -> domish.Element:
    return next(stanza.elements(namespace, "query"))


def identities(query: domish.Element) -> list[tuple[str, str, str | None]]:
    return [
        (i["category"], i["type"], i.getAttribute("name"))
        for i in query.elements(NS_DISCO_INFO, "identity")
    ]


def features(query: domish.Element) -> list[str]:
    return [f["var"] for f in query.elements(NS_DISCO_INFO, "feature")]


@dataclass
class Item:
    subscription: str


class FakeRosters:
    """Just `IRosterStore.get_item`, from a table of (owner, contact) -> subscription."""

    def __init__(self, table: dict[tuple[str, str], str]) -> None:
        self.table = table

    def get_item(self, domain: str, username: str, jid: str) -> defer.Deferred:
        subscription = self.table.get((f"{username}@{domain}", jid))
        return defer.succeed(None if subscription is None else Item(subscription))


class DiscoTestCase(unittest.TestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.sessions = SessionManager()
        self.router = make_router(self.sessions, self.clock)
        self.accounts = MemoryDatabase().accounts
        for user in ("alice", "bob", "carol"):
            self.successResultOf(self.accounts.create_account("localhost", user, derive_all("pw")))
        self.rosters = FakeRosters(
            {
                ("alice@localhost", "bob@localhost"): "both",
                ("alice@localhost", "carol@localhost"): "to",
            }
        )
        self.disco = DiscoService(self.accounts, self.rosters)
        self.disco.install(self.router)
        self.alice = self.bind("alice@localhost/desk")
        self.bob = self.bind("bob@localhost/phone")
        self.carol = self.bind("carol@localhost/tablet")

    def bind(self, jid: str) -> FakeSession:
        session = FakeSession(jid)
        self.sessions.bind(session)
        return session

    def ask(
        self, session: FakeSession, namespace: str, to: str | None, attrs: str = ""
    ) -> domish.Element:
        address = f" to='{to}'" if to else ""
        return send(
            self.router,
            session,
            f"<iq type='get' id='d1'{address}><query xmlns='{namespace}'{attrs}/></iq>",
        )


class ServerInfoTests(DiscoTestCase):
    def test_identity_and_own_features(self) -> None:
        result = self.ask(self.alice, NS_DISCO_INFO, "localhost")
        self.assertEqual(result["type"], "result")
        self.assertEqual(result["from"], "localhost")
        query = query_of(result, NS_DISCO_INFO)
        self.assertEqual(identities(query), [("server", "im", "mim-twisted")])
        self.assertEqual(features(query), [caps.NS_CAPS, NS_DISCO_INFO, NS_DISCO_ITEMS])

    def test_features_registered_by_modules(self) -> None:
        ping.install(self.router, self.disco)
        self.disco.add_server_feature("urn:example:a")
        query = query_of(self.ask(self.alice, NS_DISCO_INFO, "example.org"), NS_DISCO_INFO)
        self.assertEqual(
            features(query),
            sorted([caps.NS_CAPS, NS_DISCO_INFO, NS_DISCO_ITEMS, ping.NS_PING, "urn:example:a"]),
        )

    def test_unknown_node_is_item_not_found(self) -> None:
        result = self.ask(self.alice, NS_DISCO_INFO, "localhost", " node='nope'")
        self.assertEqual(error_condition(result), "item-not-found")

    def test_caps_node_answers_with_the_server_info(self) -> None:
        node = self.disco.server_caps_node()
        self.assertEqual(
            node, f"{caps.SERVER_NODE}#{caps.server_caps_element(self.disco.server_info())['ver']}"
        )
        query = query_of(
            self.ask(self.alice, NS_DISCO_INFO, "localhost", f" node='{node}'"), NS_DISCO_INFO
        )
        self.assertEqual(query["node"], node)
        self.assertEqual(identities(query), [("server", "im", "mim-twisted")])

    def test_caps_node_follows_feature_changes(self) -> None:
        before = self.disco.server_caps_node()
        self.disco.add_server_feature("urn:example:a")
        self.assertNotEqual(self.disco.server_caps_node(), before)
        result = self.ask(self.alice, NS_DISCO_INFO, "localhost", f" node='{before}'")
        self.assertEqual(error_condition(result), "item-not-found")

    def test_set_is_not_allowed(self) -> None:
        result = send(
            self.router,
            self.alice,
            f"<iq type='set' id='s1' to='localhost'><query xmlns='{NS_DISCO_INFO}'/></iq>",
        )
        self.assertEqual(error_condition(result), "not-allowed")


class ServerItemsTests(DiscoTestCase):
    def test_empty_by_default(self) -> None:
        result = self.ask(self.alice, NS_DISCO_ITEMS, "localhost")
        self.assertEqual(list(query_of(result, NS_DISCO_ITEMS).elements()), [])

    def test_items_per_domain(self) -> None:
        self.disco.add_server_item("localhost", "pubsub.localhost", "Publish-Subscribe")
        query = query_of(self.ask(self.alice, NS_DISCO_ITEMS, "localhost"), NS_DISCO_ITEMS)
        items = [(i["jid"], i.getAttribute("name")) for i in query.elements()]
        self.assertEqual(items, [("pubsub.localhost", "Publish-Subscribe")])
        other = query_of(self.ask(self.alice, NS_DISCO_ITEMS, "example.org"), NS_DISCO_ITEMS)
        self.assertEqual(list(other.elements()), [])

    def test_unknown_node_is_item_not_found(self) -> None:
        result = self.ask(self.alice, NS_DISCO_ITEMS, "localhost", " node='x'")
        self.assertEqual(error_condition(result), "item-not-found")


class AccountInfoTests(DiscoTestCase):
    def test_own_account_without_to(self) -> None:
        result = self.ask(self.alice, NS_DISCO_INFO, None)
        query = query_of(result, NS_DISCO_INFO)
        self.assertEqual(identities(query), [("account", "registered", None)])
        self.assertEqual(features(query), [NS_DISCO_INFO, NS_DISCO_ITEMS])

    def test_own_account_with_to(self) -> None:
        result = self.ask(self.alice, NS_DISCO_INFO, "alice@localhost")
        self.assertEqual(result["type"], "result")
        self.assertEqual(result["from"], "alice@localhost")

    def test_features_and_identities_registered_by_modules(self) -> None:
        self.disco.add_account_feature("http://jabber.org/protocol/pubsub#publish")
        self.disco.add_account_identity("pubsub", "pep")
        query = query_of(self.ask(self.alice, NS_DISCO_INFO, None), NS_DISCO_INFO)
        self.assertEqual(
            identities(query), [("account", "registered", None), ("pubsub", "pep", None)]
        )
        self.assertIn("http://jabber.org/protocol/pubsub#publish", features(query))

    def test_contact_with_presence_subscription(self) -> None:
        result = self.ask(self.bob, NS_DISCO_INFO, "alice@localhost")
        self.assertEqual(
            identities(query_of(result, NS_DISCO_INFO))[0][:2], ("account", "registered")
        )

    def test_contact_without_access_to_presence(self) -> None:
        # Alice sees Carol's presence ('to'), but Carol does not see Alice's.
        result = self.ask(self.carol, NS_DISCO_INFO, "alice@localhost")
        self.assertEqual(error_condition(result), "service-unavailable")

    def test_stranger(self) -> None:
        result = self.ask(self.bob, NS_DISCO_INFO, "carol@localhost")
        self.assertEqual(error_condition(result), "service-unavailable")

    def test_unknown_account_is_service_unavailable(self) -> None:
        # Even with a roster left behind by a removed account.
        self.rosters.table["nobody@localhost", "alice@localhost"] = "both"
        result = self.ask(self.alice, NS_DISCO_INFO, "nobody@localhost")
        self.assertEqual(error_condition(result), "service-unavailable")

    def test_without_roster_store_only_the_owner(self) -> None:
        self.disco.rosters = None
        result = self.ask(self.bob, NS_DISCO_INFO, "alice@localhost")
        self.assertEqual(error_condition(result), "service-unavailable")
        self.assertEqual(self.ask(self.alice, NS_DISCO_INFO, None)["type"], "result")

    def test_node(self) -> None:
        result = self.ask(self.alice, NS_DISCO_INFO, None, " node='urn:xmpp:omemo:2:devices'")
        self.assertEqual(error_condition(result), "item-not-found")
        # Access is checked first: a stranger learns nothing about nodes.
        result = self.ask(self.carol, NS_DISCO_INFO, "alice@localhost", " node='x'")
        self.assertEqual(error_condition(result), "service-unavailable")


class AccountItemsTests(DiscoTestCase):
    def test_empty_for_the_owner(self) -> None:
        result = self.ask(self.alice, NS_DISCO_ITEMS, None)
        self.assertEqual(list(query_of(result, NS_DISCO_ITEMS).elements()), [])

    def test_providers(self) -> None:
        calls = []

        def nodes(requester: JID, account: JID) -> list[DiscoItem]:
            calls.append((requester.full(), account.full()))
            return [DiscoItem(account, "urn:xmpp:avatar:data")]

        self.disco.add_account_items(nodes)
        self.disco.add_account_items(
            lambda requester, account: defer.succeed(
                [DiscoItem(account, "urn:xmpp:avatar:metadata")]
            )
        )
        query = query_of(self.ask(self.bob, NS_DISCO_ITEMS, "alice@localhost"), NS_DISCO_ITEMS)
        items = [(i["jid"], i["node"]) for i in query.elements()]
        self.assertEqual(
            items,
            [
                ("alice@localhost", "urn:xmpp:avatar:data"),
                ("alice@localhost", "urn:xmpp:avatar:metadata"),
            ],
        )
        self.assertEqual(calls, [("bob@localhost/phone", "alice@localhost")])

    def test_stranger(self) -> None:
        result = self.ask(self.carol, NS_DISCO_ITEMS, "alice@localhost")
        self.assertEqual(error_condition(result), "service-unavailable")

    def test_node(self) -> None:
        result = self.ask(self.alice, NS_DISCO_ITEMS, None, " node='x'")
        self.assertEqual(error_condition(result), "item-not-found")


class FullJidTests(DiscoTestCase):
    def test_query_to_a_full_jid_goes_to_that_client(self) -> None:
        self.assertIsNone(self.ask(self.alice, NS_DISCO_INFO, "bob@localhost/phone"))
        forwarded = self.bob.last()
        self.assertEqual(forwarded["from"], "alice@localhost/desk")
        self.assertEqual(query_of(forwarded, NS_DISCO_INFO).uri, NS_DISCO_INFO)
        answer = send(
            self.router,
            self.bob,
            "<iq type='result' id='d1' to='alice@localhost/desk'>"
            f"<query xmlns='{NS_DISCO_INFO}'><identity category='client' type='phone'/>"
            "</query></iq>",
        )
        self.assertIsNone(answer)
        self.assertEqual(
            identities(query_of(self.alice.last(), NS_DISCO_INFO)), [("client", "phone", None)]
        )

    def test_query_to_an_absent_resource(self) -> None:
        result = self.ask(self.alice, NS_DISCO_INFO, "bob@localhost/gone")
        self.assertEqual(error_condition(result), "service-unavailable")
