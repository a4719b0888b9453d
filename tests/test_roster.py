"""The roster protocol (RFC 6121 §2) and roster versioning (XEP-0237) at the stanza level."""

from twisted.internet import defer
from twisted.trial import unittest
from twisted.words.protocols.jabber import error, xmlstream
from twisted.words.protocols.jabber.jid import JID
from twisted.words.xish import domish

from mim_twisted.im import roster
from mim_twisted.im.roster import NS_ROSTER, RosterService
from mim_twisted.im.sessions import SessionManager
from mim_twisted.storage.interfaces import RosterItem
from mim_twisted.storage.memory import MemoryDatabase
from tests.imsupport import FakeSession, error_condition, parse

ALICE = JID("alice@localhost")


def items_of(query: domish.Element) -> list[tuple[dict, list[str]]]:
    """The <item/>s of a roster query as (attributes, groups)."""
    return [
        (dict(item.attributes), [str(group) for group in item.elements(NS_ROSTER, "group")])
        for item in query.elements(NS_ROSTER, "item")
    ]


class RosterTestCase(unittest.TestCase):
    def setUp(self) -> None:
        self.database = MemoryDatabase()
        self.successResultOf(self.database.accounts.create_account("localhost", "alice", {}))
        self.sessions = SessionManager()
        self.removed: list[tuple[JID, RosterItem]] = []
        self.service = RosterService(
            self.database.rosters,
            self.sessions,
            on_remove=lambda owner, item: self.removed.append((owner, item)),
        )
        self.phone = self.connect("alice@localhost/phone", interested=True)
        self.laptop = self.connect("alice@localhost/laptop", interested=True)
        self.watch = self.connect("alice@localhost/watch", interested=False)

    def connect(self, jid: str, interested: bool) -> FakeSession:
        session = FakeSession(jid)
        session.roster_requested = interested
        self.sessions.bind(session)
        return session

    async def request(
        self, session: FakeSession, payload: str, **attributes: str
    ) -> domish.Element:
        """Send an IQ to the service and return the reply, answered as the router answers."""
        attributes.setdefault("type", "get")
        attributes.setdefault("id", "r1")
        attributes["from"] = session.jid.full()
        attrs = " ".join(f"{key}='{value}'" for key, value in attributes.items())
        iq = parse(f"<iq {attrs}>{payload}</iq>")
        to = iq.getAttribute("to")
        target = JID(to) if to else session.jid.userhostJID()
        try:
            result = await defer.maybeDeferred(self.service.handle_iq, session, iq, target)
        except error.StanzaError as e:
            return e.toResponse(iq)
        return result if result is not None else xmlstream.toResponse(iq, "result")

    def roster_set(self, session: FakeSession, item: str) -> defer.Deferred:
        payload = f"<query xmlns='jabber:iq:roster'>{item}</query>"
        return defer.ensureDeferred(self.request(session, payload, type="set"))

    async def store(self, *items: RosterItem) -> int:
        version = 0
        for item in items:
            version = await self.database.rosters.put_item("localhost", "alice", item)
        return version

    async def stored(self, jid: str) -> RosterItem | None:
        return await self.database.rosters.get_item("localhost", "alice", jid)


class GetTests(RosterTestCase):
    async def test_empty_roster(self) -> None:
        session = self.connect("alice@localhost/new", interested=False)
        response = await self.request(session, "<query xmlns='jabber:iq:roster'/>")
        self.assertEqual(response["type"], "result")
        query = next(response.elements(NS_ROSTER, "query"))
        self.assertEqual(query["ver"], "0")
        self.assertEqual(items_of(query), [])
        self.assertTrue(session.roster_requested)

    async def test_items_in_the_roster(self) -> None:
        version = await self.store(
            RosterItem("bob@localhost", "Bob", ("Friends", "Work"), "both"),
            RosterItem("carol@example.org", ask=True),
            RosterItem("dave@localhost", pending_in=True, in_roster=False),
            RosterItem("eve@localhost", subscription="to", pending_in=True),
            RosterItem("frank@localhost", approved=True),
        )
        response = await self.request(self.phone, "<query xmlns='jabber:iq:roster'/>")
        query = next(response.elements(NS_ROSTER, "query"))
        self.assertEqual(query["ver"], str(version))
        self.assertEqual(
            items_of(query),
            [
                (
                    {"jid": "bob@localhost", "name": "Bob", "subscription": "both"},
                    ["Friends", "Work"],
                ),
                ({"jid": "carol@example.org", "subscription": "none", "ask": "subscribe"}, []),
                ({"jid": "eve@localhost", "subscription": "to"}, []),
                ({"jid": "frank@localhost", "subscription": "none", "approved": "true"}, []),
            ],
        )

    async def test_explicit_own_bare_jid(self) -> None:
        response = await self.request(
            self.phone, "<query xmlns='jabber:iq:roster'/>", to="alice@localhost"
        )
        self.assertEqual(response["type"], "result")

    async def test_current_version_gets_empty_result(self) -> None:
        version = await self.store(RosterItem("bob@localhost"), RosterItem("carol@localhost"))
        response = await self.request(
            self.phone, f"<query xmlns='jabber:iq:roster' ver='{version}'/>"
        )
        self.assertEqual(response["type"], "result")
        self.assertIsNone(next(response.elements(), None))
        self.assertTrue(self.phone.roster_requested)

    async def test_other_version_gets_full_roster(self) -> None:
        await self.store(RosterItem("bob@localhost"), RosterItem("carol@localhost"))
        for ver in ("1", "", "ver17"):
            response = await self.request(
                self.phone, f"<query xmlns='jabber:iq:roster' ver='{ver}'/>"
            )
            query = next(response.elements(NS_ROSTER, "query"))
            self.assertEqual(query["ver"], "2", ver)
            self.assertEqual(len(items_of(query)), 2, ver)

    async def test_get_with_items(self) -> None:
        response = await self.request(
            self.phone, "<query xmlns='jabber:iq:roster'><item jid='bob@localhost'/></query>"
        )
        self.assertEqual(error_condition(response), "bad-request")

    async def test_another_users_roster_is_forbidden(self) -> None:
        for kind, payload in [
            ("get", "<query xmlns='jabber:iq:roster'/>"),
            ("set", "<query xmlns='jabber:iq:roster'><item jid='carol@localhost'/></query>"),
        ]:
            response = await self.request(self.phone, payload, type=kind, to="bob@localhost")
            self.assertEqual(error_condition(response), "forbidden", kind)
        self.assertFalse(self.phone.sent)


class SetTests(RosterTestCase):
    async def test_add_pushes_to_interested_resources(self) -> None:
        response = await self.roster_set(
            self.phone, "<item jid='Bob@LocalHost' name='Bob'><group>Friends</group></item>"
        )
        self.assertEqual(response["type"], "result")
        self.assertIsNone(next(response.elements(), None))
        self.assertEqual(
            await self.stored("bob@localhost"),
            RosterItem("bob@localhost", "Bob", ("Friends",)),
        )
        for session in (self.phone, self.laptop):
            [push] = session.sent
            self.assertEqual(push["type"], "set")
            self.assertEqual(push["to"], session.jid.full())
            self.assertIsNone(push.getAttribute("from"))
            query = next(push.elements(NS_ROSTER, "query"))
            self.assertEqual(query["ver"], "1")
            self.assertEqual(
                items_of(query),
                [({"jid": "bob@localhost", "name": "Bob", "subscription": "none"}, ["Friends"])],
            )
        self.assertNotEqual(self.phone.sent[0]["id"], self.laptop.sent[0]["id"])
        self.assertEqual(self.watch.sent, [])

    async def test_update_keeps_subscription_state(self) -> None:
        await self.store(RosterItem("bob@localhost", "Bob", ("Old",), "from", ask=True))
        # 'subscription' values other than "remove" and 'ask' are ignored (RFC 6121 §2.1.2).
        response = await self.roster_set(
            self.phone,
            "<item jid='bob@localhost' subscription='both' ask='subscribe'><group>New</group>"
            "</item>",
        )
        self.assertIsNone(error_condition(response))
        self.assertEqual(
            await self.stored("bob@localhost"),
            RosterItem("bob@localhost", None, ("New",), "from", ask=True),
        )

    async def test_adding_a_pending_contact_makes_it_visible(self) -> None:
        stanza = "<presence type='subscribe'/>"
        await self.store(
            RosterItem("bob@localhost", pending_in=True, pending_in_stanza=stanza, in_roster=False)
        )
        await self.roster_set(self.phone, "<item jid='bob@localhost' name='Bob'/>")
        self.assertEqual(
            await self.stored("bob@localhost"),
            RosterItem("bob@localhost", "Bob", pending_in=True, pending_in_stanza=stanza),
        )
        self.assertEqual(len(self.laptop.sent), 1)

    async def test_invalid_items(self) -> None:
        too_long = "é" * 512  # 1024 bytes in UTF-8
        cases = [
            ("<item jid='bob@localhost'/><item jid='carol@localhost'/>", "bad-request"),
            ("", "bad-request"),
            ("<item name='Bob'/>", "bad-request"),
            ("<item jid='bob@@localhost'/>", "jid-malformed"),
            ("<item jid='bob@localhost/phone'/>", "jid-malformed"),
            ("<item jid='alice@localhost'/>", "not-allowed"),
            ("<item jid='bob@localhost'><group>A</group><group>A</group></item>", "bad-request"),
            ("<item jid='bob@localhost'><group/></item>", "not-acceptable"),
            (f"<item jid='bob@localhost'><group>{too_long}</group></item>", "not-acceptable"),
            (f"<item jid='bob@localhost' name='{too_long}'/>", "not-acceptable"),
        ]
        for item, expected in cases:
            response = await self.roster_set(self.phone, item)
            self.assertEqual(error_condition(response), expected, item)
        self.assertEqual(await self.database.rosters.get_roster("localhost", "alice"), (0, []))
        self.assertEqual(self.laptop.sent, [])

    async def test_longest_group_and_name(self) -> None:
        longest = "é" * 511 + "a"  # 1023 bytes
        response = await self.roster_set(
            self.phone,
            f"<item jid='bob@localhost' name='{longest}'><group>{longest}</group></item>",
        )
        self.assertIsNone(error_condition(response))


class RemoveTests(RosterTestCase):
    async def test_remove_in_each_state(self) -> None:
        # The contact must be told when the removal ends or refuses a subscription (§2.5.2).
        cases = [
            (RosterItem("bob@localhost"), False),
            (RosterItem("bob@localhost", ask=True), True),
            (RosterItem("bob@localhost", pending_in=True), True),
            (RosterItem("bob@localhost", subscription="to"), True),
            (RosterItem("bob@localhost", subscription="from"), True),
            (RosterItem("bob@localhost", subscription="both"), True),
            (RosterItem("bob@localhost", approved=True), False),
        ]
        for item, notified in cases:
            version = await self.store(item) + 1
            self.phone.sent.clear()
            self.laptop.sent.clear()
            self.removed.clear()
            response = await self.roster_set(
                self.phone, "<item jid='bob@localhost' subscription='remove'/>"
            )
            self.assertIsNone(error_condition(response), item)
            self.assertIsNone(await self.stored("bob@localhost"), item)
            self.assertEqual(self.removed, [(ALICE, item)] if notified else [], item)
            for session in (self.phone, self.laptop):
                [push] = session.sent
                query = next(push.elements(NS_ROSTER, "query"))
                self.assertEqual(query["ver"], str(version))
                self.assertEqual(
                    items_of(query), [({"jid": "bob@localhost", "subscription": "remove"}, [])]
                )
        self.assertEqual(self.watch.sent, [])

    async def test_remove_unknown_contact(self) -> None:
        await self.store(RosterItem("carol@localhost", pending_in=True, in_roster=False))
        for jid in ("bob@localhost", "carol@localhost"):
            response = await self.roster_set(
                self.phone, f"<item jid='{jid}' subscription='remove'/>"
            )
            self.assertEqual(error_condition(response), "item-not-found", jid)
        self.assertIsNotNone(await self.stored("carol@localhost"))
        self.assertEqual(self.removed, [])
        self.assertEqual(self.laptop.sent, [])

    async def test_removal_waits_for_on_remove(self) -> None:
        await self.store(RosterItem("bob@localhost", subscription="both"))
        notified: defer.Deferred = defer.Deferred()
        self.service.on_remove = lambda owner, item: notified
        reply = self.roster_set(self.phone, "<item jid='bob@localhost' subscription='remove'/>")
        self.assertNoResult(reply)
        notified.callback(None)
        self.assertIsNone(error_condition(self.successResultOf(reply)))


class PresenceLayerApiTests(RosterTestCase):
    async def test_replace_and_get_item(self) -> None:
        item = RosterItem("bob@localhost", subscription="to")
        self.assertEqual(await self.service.replace_item(ALICE, item.jid, None, item), 1)
        self.assertEqual(await self.service.get_item(ALICE, JID("bob@localhost/phone")), item)
        self.assertIsNone(await self.service.get_item(ALICE, JID("carol@localhost")))
        # What was read is no longer what is stored: nothing is written.
        self.assertIsNone(await self.service.replace_item(ALICE, item.jid, None, item))
        self.assertEqual(await self.service.replace_item(ALICE, item.jid, item, None), 2)
        self.assertIsNone(await self.service.get_item(ALICE, JID("bob@localhost")))

    def test_push(self) -> None:
        self.service.push(ALICE, RosterItem("bob@localhost", subscription="from"), 7)
        [push] = self.phone.sent
        query = next(push.elements(NS_ROSTER, "query"))
        self.assertEqual(query["ver"], "7")
        self.assertEqual(items_of(query), [({"jid": "bob@localhost", "subscription": "from"}, [])])
        self.assertEqual(len(self.laptop.sent), 1)
        self.assertEqual(self.watch.sent, [])

    def test_items_out_of_the_roster_are_not_pushed(self) -> None:
        hidden = RosterItem("bob@localhost", pending_in=True, in_roster=False)
        self.service.push(ALICE, hidden, 3)
        self.service.push(ALICE, hidden, 4, removed=True)
        self.assertEqual(self.phone.sent, [])

    def test_stream_features(self) -> None:
        self.assertEqual(
            [(feature.uri, feature.name) for feature in roster.stream_features()],
            [("urn:xmpp:features:rosterver", "ver"), ("urn:xmpp:features:pre-approval", "sub")],
        )


class LockTests(RosterTestCase):
    """Roster sets and removals change an item under its owner's key, as the presence layer does."""

    async def test_a_roster_set_waits_for_the_owners_key(self) -> None:
        locks = self.service.locks
        await locks.acquire("alice@localhost")
        reply = self.roster_set(self.phone, "<item jid='bob@localhost' name='Bob'/>")
        self.assertNoResult(reply)
        self.assertIsNone(await self.stored("bob@localhost"))
        # Another account's key is another lock.
        await self.database.accounts.create_account("localhost", "bob", {})
        bob = self.connect("bob@localhost/desk", interested=False)
        other = self.roster_set(bob, "<item jid='alice@localhost'/>")
        self.assertIsNone(error_condition(self.successResultOf(other)))
        locks.release("alice@localhost")
        self.assertIsNone(error_condition(self.successResultOf(reply)))
        self.assertEqual(await self.stored("bob@localhost"), RosterItem("bob@localhost", "Bob"))
        self.assertEqual(len(locks), 0)

    async def test_a_removal_lets_the_key_go_before_cancelling(self) -> None:
        await self.store(RosterItem("bob@localhost", subscription="both"))
        held: list[bool] = []
        self.service.on_remove = lambda owner, item: held.append(
            self.service.locks.locked("alice@localhost")
        )
        reply = self.roster_set(self.phone, "<item jid='bob@localhost' subscription='remove'/>")
        self.assertIsNone(error_condition(self.successResultOf(reply)))
        # The presence layer takes the contact's key to cancel: never two keys at once.
        self.assertEqual(held, [False])

    async def test_an_error_lets_the_key_go(self) -> None:
        reply = self.roster_set(self.phone, "<item jid='bob@localhost' subscription='remove'/>")
        self.assertEqual(error_condition(self.successResultOf(reply)), "item-not-found")
        self.assertEqual(len(self.service.locks), 0)
