"""XEP-0115 entity capabilities: the §5 vectors, and learning clients' features over a Router."""

import base64
import hashlib

from twisted.internet.task import Clock
from twisted.logger import Logger
from twisted.trial import unittest

from mim_twisted.im import caps
from mim_twisted.im.caps import CapsService, Identity, IllFormed
from mim_twisted.im.disco import NS_DISCO_INFO, DiscoService
from mim_twisted.im.sessions import SessionManager
from mim_twisted.storage.memory import MemoryDatabase
from tests.imsupport import FakeSession, make_router, parse, send

DISCO = "http://jabber.org/protocol/disco#"
MUC = "http://jabber.org/protocol/muc"
SIMPLE_FEATURES = [DISCO + "items", caps.NS_CAPS, MUC, DISCO + "info"]
SIMPLE_S = (
    "client/pc//Exodus 0.9.1<http://jabber.org/protocol/caps<http://jabber.org/protocol/disco#info<"
    "http://jabber.org/protocol/disco#items<http://jabber.org/protocol/muc<"
)
SIMPLE_VER = "QgayPKawpkPSDYmwT/WM94uAlu0="

# §5.3, as the client sends it (the identities out of order on purpose).
COMPLEX_QUERY = """
<iq type='result' id='disco1'>
  <query xmlns='http://jabber.org/protocol/disco#info'
         node='http://psi-im.org#q07IKJEyjvHSyhy//CH0CxmKi8w='>
    <identity xml:lang='en' category='client' name='Psi 0.11' type='pc'/>
    <identity xml:lang='el' category='client' name='\u03a8 0.11' type='pc'/>
    <feature var='http://jabber.org/protocol/caps'/>
    <feature var='http://jabber.org/protocol/disco#info'/>
    <feature var='http://jabber.org/protocol/disco#items'/>
    <feature var='http://jabber.org/protocol/muc'/>
    <x xmlns='jabber:x:data' type='result'>
      <field var='FORM_TYPE' type='hidden'>
        <value>urn:xmpp:dataforms:softwareinfo</value>
      </field>
      <field var='ip_version'>
        <value>ipv4</value>
        <value>ipv6</value>
      </field>
      <field var='os'><value>Mac</value></field>
      <field var='os_version'><value>10.5.1</value></field>
      <field var='software'><value>Psi</value></field>
      <field var='software_version'><value>0.11</value></field>
    </x>
  </query>
</iq>"""
COMPLEX_S = (
    "client/pc/el/\u03a8 0.11<client/pc/en/Psi 0.11<http://jabber.org/protocol/caps<"
    "http://jabber.org/protocol/disco#info<http://jabber.org/protocol/disco#items<"
    "http://jabber.org/protocol/muc<urn:xmpp:dataforms:softwareinfo<"
    "ip_version<ipv4<ipv6<os<Mac<os_version<10.5.1<software<Psi<software_version<0.11<"
)
COMPLEX_VER = "q07IKJEyjvHSyhy//CH0CxmKi8w="


def query_element(xml: str):
    return next(parse(xml).elements(NS_DISCO_INFO, "query"))


def info_query(body: str) -> str:
    return f"<iq type='result' id='x'><query xmlns='{NS_DISCO_INFO}'>{body}</query></iq>"


class VerificationStringTests(unittest.TestCase):
    def test_simple_example(self) -> None:
        identities = [Identity("client", "pc", name="Exodus 0.9.1")]
        self.assertEqual(caps.verification_string(identities, SIMPLE_FEATURES, []), SIMPLE_S)
        self.assertEqual(caps.caps_hash("sha-1", identities, SIMPLE_FEATURES), SIMPLE_VER)

    def test_complex_example(self) -> None:
        identities, features, forms = caps.parse_disco_info(query_element(COMPLEX_QUERY))
        self.assertEqual(caps.verification_string(identities, features, forms), COMPLEX_S)
        self.assertEqual(caps.caps_hash("sha-1", identities, features, forms), COMPLEX_VER)
        self.assertEqual(caps.hash_disco_info("sha-1", query_element(COMPLEX_QUERY)), COMPLEX_VER)

    def test_sha_256(self) -> None:
        identities = [Identity("client", "pc", name="Exodus 0.9.1")]
        expected = base64.b64encode(hashlib.sha256(SIMPLE_S.encode()).digest()).decode()
        self.assertEqual(caps.caps_hash("sha-256", identities, SIMPLE_FEATURES), expected)

    def test_unsupported_hash(self) -> None:
        self.assertRaises(ValueError, caps.caps_hash, "md5", [], [])

    def test_lt_is_not_unescaped(self) -> None:
        # §5.1 note: "&lt;" inside a factor is taken literally, never turned into "<".
        query = query_element(
            info_query("<identity category='client' type='pc' name='A&amp;lt;B'/>")
        )
        self.assertEqual(
            caps.verification_string(*caps.parse_disco_info(query)), "client/pc//A&lt;B<"
        )

    def test_forms_without_hidden_form_type_are_ignored(self) -> None:
        query = query_element(
            info_query(
                "<feature var='a'/>"
                "<x xmlns='jabber:x:data' type='result'><field var='FORM_TYPE'>"
                "<value>urn:x</value></field><field var='f'><value>1</value></field></x>"
                "<x xmlns='jabber:x:data' type='result'><field var='f'><value>1</value></field></x>"
            )
        )
        self.assertEqual(caps.verification_string(*caps.parse_disco_info(query)), "a<")

    def test_ill_formed_responses(self) -> None:
        form = (
            "<x xmlns='jabber:x:data' type='result'><field var='FORM_TYPE' type='hidden'>"
            "<value>urn:x</value></field></x>"
        )
        for body in [
            "<identity category='client' type='pc'/><identity category='client' type='pc'/>",
            "<feature var='a'/><feature var='a'/>",
            form + form,
            "<x xmlns='jabber:x:data' type='result'><field var='FORM_TYPE' type='hidden'>"
            "<value>urn:x</value><value>urn:y</value></field></x>",
            "<x xmlns='jabber:x:data' type='result'><field var='FORM_TYPE' type='hidden'>"
            "<value>urn:x</value></field><field var='f'/><field var='f'/></x>",
        ]:
            self.assertRaises(IllFormed, caps.parse_disco_info, query_element(info_query(body)))


class ServerCapsTests(unittest.TestCase):
    def test_element(self) -> None:
        disco = DiscoService(MemoryDatabase().accounts)
        element = caps.server_caps_element(disco.server_info())
        self.assertEqual((element.uri, element.name), (caps.NS_CAPS, "c"))
        self.assertEqual(element["hash"], "sha-1")
        self.assertEqual(element["node"], caps.SERVER_NODE)
        identities = [Identity("server", "im", name="mim-twisted")]
        features = [caps.NS_CAPS, DISCO + "info", DISCO + "items"]
        self.assertEqual(element["ver"], caps.caps_hash("sha-1", identities, features))


def caps_presence(ver: str, algo: str | None = "sha-1", node: str = "http://psi-im.org") -> str:
    hash_attribute = f" hash='{algo}'" if algo else ""
    c = f"<c xmlns='{caps.NS_CAPS}'{hash_attribute} node='{node}' ver='{ver}'/>"
    return f"<presence>{c}</presence>"


class CapsServiceTests(unittest.TestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.sessions = SessionManager()
        self.router = make_router(self.sessions, self.clock)
        self.caps = CapsService(self.router, timeout=10.0)
        self.learned: list[FakeSession] = []
        self.caps.on_caps_learned.append(self.learned.append)

    def bind(self, jid: str) -> FakeSession:
        session = FakeSession(jid)
        self.sessions.bind(session)
        return session

    def announce(self, session: FakeSession, xml: str) -> None:
        self.caps.presence_received(session, parse(xml))

    def queries(self, session: FakeSession) -> list:
        return [s for s in session.sent if s.name == "iq" and s["type"] == "get"]

    def answer(self, session: FakeSession, query, body: str) -> None:
        send(
            self.router,
            session,
            f"<iq type='result' id='{query['id']}' to='{session.jid.host}'>"
            f"<query xmlns='{NS_DISCO_INFO}'>{body}</query></iq>",
        )

    def answer_complex(self, session: FakeSession, query) -> None:
        result = parse(COMPLEX_QUERY)
        result["id"] = query["id"]
        result["to"] = session.jid.host
        result["from"] = session.jid.full()
        self.router.route_from_client(session, result)

    def test_unknown_ver_is_asked_verified_and_recorded(self) -> None:
        alice = self.bind("alice@localhost/desk")
        self.announce(alice, caps_presence(COMPLEX_VER))
        [query] = self.queries(alice)
        self.assertEqual(query["to"], "alice@localhost/desk")
        self.assertEqual(query["from"], "localhost")
        disco = next(query.elements(NS_DISCO_INFO, "query"))
        self.assertEqual(disco["node"], "http://psi-im.org#" + COMPLEX_VER)
        self.assertIsNone(self.caps.features_of(alice))
        self.answer_complex(alice, query)
        self.assertIn(MUC, self.caps.features_of(alice))
        self.assertEqual(self.learned, [alice])

    def test_one_query_for_two_sessions_and_none_after(self) -> None:
        alice = self.bind("alice@localhost/desk")
        bob = self.bind("bob@localhost/phone")
        self.announce(alice, caps_presence(COMPLEX_VER))
        self.announce(bob, caps_presence(COMPLEX_VER, node="http://other.example"))
        self.assertEqual(len(self.queries(alice)), 1)
        self.assertEqual(self.queries(bob), [])
        self.answer_complex(alice, self.queries(alice)[0])
        self.assertEqual(self.caps.features_of(alice), self.caps.features_of(bob))
        self.assertEqual(self.learned, [alice, bob])
        # Cache hit: known at once, nothing asked.
        carol = self.bind("carol@localhost/tablet")
        self.announce(carol, caps_presence(COMPLEX_VER))
        self.assertEqual(self.queries(carol), [])
        self.assertIn(MUC, self.caps.features_of(carol))
        self.assertEqual(self.learned, [alice, bob, carol])

    def test_same_caps_again_changes_nothing(self) -> None:
        alice = self.bind("alice@localhost/desk")
        self.announce(alice, caps_presence(COMPLEX_VER))
        self.answer_complex(alice, self.queries(alice)[0])
        self.announce(alice, caps_presence(COMPLEX_VER))
        self.announce(alice, "<presence><show>away</show></presence>")
        self.assertEqual(self.learned, [alice])
        self.assertIn(MUC, self.caps.features_of(alice))

    def test_wrong_hash_is_not_cached(self) -> None:
        alice = self.bind("alice@localhost/desk")
        self.announce(alice, caps_presence(SIMPLE_VER))
        self.answer(alice, self.queries(alice)[0], "<feature var='urn:lies'/>")
        self.assertIsNone(self.caps.features_of(alice))
        self.assertEqual(self.learned, [])
        # Another client with that ver is asked in turn; the liar is not asked again.
        bob = self.bind("bob@localhost/phone")
        self.announce(bob, caps_presence(SIMPLE_VER))
        self.announce(alice, caps_presence(SIMPLE_VER))
        self.assertEqual(len(self.queries(alice)), 1)
        self.assertEqual(len(self.queries(bob)), 1)

    def test_after_a_wrong_answer_the_next_waiting_session_is_asked(self) -> None:
        alice = self.bind("alice@localhost/desk")
        bob = self.bind("bob@localhost/phone")
        self.announce(alice, caps_presence(COMPLEX_VER))
        self.announce(bob, caps_presence(COMPLEX_VER))
        self.answer(alice, self.queries(alice)[0], "<feature var='urn:lies'/>")
        [query] = self.queries(bob)
        self.answer_complex(bob, query)
        self.assertIn(MUC, self.caps.features_of(bob))
        self.assertIsNone(self.caps.features_of(alice))
        self.assertEqual(self.learned, [bob])

    def test_timeout_then_the_next_session(self) -> None:
        alice = self.bind("alice@localhost/desk")
        bob = self.bind("bob@localhost/phone")
        self.announce(alice, caps_presence(COMPLEX_VER))
        self.announce(bob, caps_presence(COMPLEX_VER))
        self.clock.advance(9)
        self.assertEqual(self.queries(bob), [])
        self.clock.advance(1)
        [query] = self.queries(bob)
        self.clock.advance(10)
        self.assertIsNone(self.caps.features_of(bob))
        # A late answer from Alice is dropped; nothing is pending any more.
        self.answer_complex(alice, self.queries(alice)[0])
        self.assertIsNone(self.caps.features_of(alice))
        self.assertEqual(self.learned, [])

    def test_error_reply(self) -> None:
        alice = self.bind("alice@localhost/desk")
        self.announce(alice, caps_presence(COMPLEX_VER))
        query = self.queries(alice)[0]
        send(
            self.router,
            alice,
            f"<iq type='error' id='{query['id']}' to='localhost'><error type='cancel'>"
            "<service-unavailable xmlns='urn:ietf:params:xml:ns:xmpp-stanzas'/></error></iq>",
        )
        self.assertIsNone(self.caps.features_of(alice))
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_session_end_while_asked(self) -> None:
        alice = self.bind("alice@localhost/desk")
        bob = self.bind("bob@localhost/phone")
        self.announce(alice, caps_presence(COMPLEX_VER))
        self.announce(bob, caps_presence(COMPLEX_VER))
        self.caps.session_ended(alice)
        [query] = self.queries(bob)
        self.answer_complex(bob, query)
        self.assertEqual(self.learned, [bob])

    def test_session_end_forgets_the_session(self) -> None:
        alice = self.bind("alice@localhost/desk")
        bob = self.bind("bob@localhost/phone")
        self.announce(alice, caps_presence(COMPLEX_VER))
        self.announce(bob, caps_presence(COMPLEX_VER))
        self.caps.session_ended(bob)
        self.answer_complex(alice, self.queries(alice)[0])
        self.assertIsNone(self.caps.features_of(bob))
        self.assertEqual(self.learned, [alice])
        self.caps.session_ended(alice)
        self.assertIsNone(self.caps.features_of(alice))

    def test_the_session_table_is_told_when_features_change(self) -> None:
        changed: list[str] = []
        self.sessions.on_sessions_changed.append(changed.append)
        alice = self.bind("alice@localhost/desk")
        self.announce(alice, caps_presence(COMPLEX_VER))
        self.assertEqual(changed, ["alice@localhost"])  # bound; the features not known yet
        self.answer_complex(alice, self.queries(alice)[0])
        self.assertEqual(changed, ["alice@localhost"] * 2)
        self.announce(alice, caps_presence(COMPLEX_VER))  # the same: no change
        self.assertEqual(len(changed), 2)
        self.caps.session_ended(alice)
        self.assertEqual(changed, ["alice@localhost"] * 3)

    def test_new_ver_replaces_the_features(self) -> None:
        alice = self.bind("alice@localhost/desk")
        self.announce(alice, caps_presence(COMPLEX_VER))
        self.answer_complex(alice, self.queries(alice)[0])
        self.announce(alice, caps_presence(SIMPLE_VER))
        self.assertIsNone(self.caps.features_of(alice))
        body = "<identity category='client' type='pc' name='Exodus 0.9.1'/>" + "".join(
            f"<feature var='{f}'/>" for f in SIMPLE_FEATURES
        )
        self.answer(alice, self.queries(alice)[1], body)
        self.assertEqual(self.caps.features_of(alice), frozenset(SIMPLE_FEATURES))

    def test_legacy_caps_and_other_presences_are_ignored(self) -> None:
        alice = self.bind("alice@localhost/desk")
        self.announce(alice, caps_presence("0.9", algo=None))
        self.announce(
            alice, caps_presence(COMPLEX_VER).replace("<presence>", "<presence type='unavailable'>")
        )
        self.assertEqual(alice.sent, [])

    def test_unsupported_hash_is_believed_for_that_session_only(self) -> None:
        alice = self.bind("alice@localhost/desk")
        bob = self.bind("bob@localhost/phone")
        self.announce(alice, caps_presence("whatever", algo="md5"))
        self.answer(alice, self.queries(alice)[0], "<feature var='urn:a+notify'/>")
        self.assertTrue(self.caps.wants_notify(alice, "urn:a"))
        self.announce(bob, caps_presence("whatever", algo="md5"))
        self.assertIsNone(self.caps.features_of(bob))
        self.assertEqual(len(self.queries(bob)), 1)

    def test_wants_notify(self) -> None:
        alice = self.bind("alice@localhost/desk")
        self.assertFalse(self.caps.wants_notify(alice, "urn:xmpp:avatar:metadata"))
        self.announce(alice, caps_presence(SIMPLE_VER))
        features = ["urn:xmpp:avatar:metadata+notify", "urn:xmpp:avatar:data"]
        identities = [Identity("client", "pc")]
        ver = caps.caps_hash("sha-1", identities, features)
        self.announce(alice, caps_presence(ver))
        body = "<identity category='client' type='pc'/>" + "".join(
            f"<feature var='{f}'/>" for f in features
        )
        self.answer(alice, self.queries(alice)[-1], body)
        self.assertTrue(self.caps.wants_notify(alice, "urn:xmpp:avatar:metadata"))
        self.assertFalse(self.caps.wants_notify(alice, "urn:xmpp:avatar:data"))

    def test_a_failing_callback_does_not_stop_the_others(self) -> None:
        def broken(session: FakeSession) -> None:
            raise RuntimeError("bug")

        self.caps.on_caps_learned.insert(0, broken)
        alice = self.bind("alice@localhost/desk")
        self.announce(alice, caps_presence(COMPLEX_VER))
        self.answer_complex(alice, self.queries(alice)[0])
        self.assertEqual(self.learned, [alice])
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)

    def test_cache_is_bounded(self) -> None:
        self.caps.cache_size = 1
        alice = self.bind("alice@localhost/desk")
        self.announce(alice, caps_presence(COMPLEX_VER))
        self.answer_complex(alice, self.queries(alice)[0])
        bob = self.bind("bob@localhost/phone")
        self.announce(bob, caps_presence(SIMPLE_VER))
        body = "<identity category='client' type='pc' name='Exodus 0.9.1'/>" + "".join(
            f"<feature var='{f}'/>" for f in SIMPLE_FEATURES
        )
        self.answer(bob, self.queries(bob)[0], body)
        carol = self.bind("carol@localhost/tablet")
        self.announce(carol, caps_presence(COMPLEX_VER))
        self.assertEqual(len(self.queries(carol)), 1)
        self.assertIn(MUC, self.caps.features_of(alice))  # what a session learned stays

    def pending(self) -> int:
        """Queries the router still waits on; each has its timeout timer."""
        self.assertEqual(len(self.clock.getDelayedCalls()), len(self.router._queries))
        return len(self.router._queries)

    def test_a_new_ver_cancels_the_query_about_the_previous_one(self) -> None:
        alice = self.bind("alice@localhost/desk")
        for n in range(20):
            self.announce(alice, caps_presence(f"random{n}="))
        self.assertEqual(len(self.queries(alice)), 20)
        self.assertEqual(self.pending(), 1)
        self.assertEqual(len(self.caps._waiting), 1)
        # The one still asked is about the latest ver; answers to the others are dropped.
        self.answer_complex(alice, self.queries(alice)[0])
        self.assertIsNone(self.caps.features_of(alice))
        self.announce(alice, caps_presence(COMPLEX_VER))
        self.assertEqual(self.pending(), 1)
        self.answer_complex(alice, self.queries(alice)[-1])
        self.assertIn(MUC, self.caps.features_of(alice))
        self.assertEqual((self.pending(), self.caps._waiting), (0, {}))

    def test_a_withdrawn_session_hands_the_question_on(self) -> None:
        alice = self.bind("alice@localhost/desk")
        bob = self.bind("bob@localhost/phone")
        self.announce(alice, caps_presence(COMPLEX_VER))
        self.announce(bob, caps_presence(COMPLEX_VER))
        self.announce(alice, caps_presence(SIMPLE_VER))
        [query] = self.queries(bob)
        self.assertEqual(self.pending(), 2)  # Bob about COMPLEX_VER, Alice about SIMPLE_VER
        self.answer_complex(bob, query)
        self.assertIn(MUC, self.caps.features_of(bob))
        self.assertIsNone(self.caps.features_of(alice))

    def test_a_session_waiting_for_another_ones_answer_is_not_asked_after_leaving(self) -> None:
        alice = self.bind("alice@localhost/desk")
        bob = self.bind("bob@localhost/phone")
        self.announce(alice, caps_presence(COMPLEX_VER))
        self.announce(bob, caps_presence(COMPLEX_VER))
        self.announce(bob, caps_presence("other="))
        self.assertEqual(self.caps._waiting[("sha-1", COMPLEX_VER)], [(alice, "http://psi-im.org")])
        self.clock.advance(10)  # neither answers
        self.assertEqual(len(self.queries(bob)), 1)  # about "other=" only
        self.assertEqual((self.pending(), self.caps._waiting), (0, {}))

    def test_unverified_queries_are_one_per_session_too(self) -> None:
        alice = self.bind("alice@localhost/desk")
        for n in range(5):
            self.announce(alice, caps_presence(f"v{n}", algo="md5"))
        self.assertEqual(self.pending(), 1)
        self.answer(alice, self.queries(alice)[0], "<feature var='urn:old+notify'/>")
        self.assertIsNone(self.caps.features_of(alice))
        self.answer(alice, self.queries(alice)[-1], "<feature var='urn:new+notify'/>")
        self.assertTrue(self.caps.wants_notify(alice, "urn:new"))
        self.assertEqual(self.pending(), 0)
        self.announce(alice, caps_presence("v9", algo="md5"))
        self.caps.session_ended(alice)
        self.assertEqual((self.pending(), self.caps._unverified), (0, {}))

    def test_unknown_vers_being_learned_are_bounded(self) -> None:
        events: list[dict] = []
        self.patch(caps, "log", Logger(observer=events.append))
        self.caps.max_unknown = 2
        alice, bob, carol, dave = (
            self.bind(f"{u}@localhost/r") for u in "alice bob carol dave".split()
        )
        self.announce(alice, caps_presence(COMPLEX_VER))
        self.announce(bob, caps_presence("b="))
        self.announce(carol, caps_presence("c="))
        self.announce(dave, caps_presence("d="))
        self.assertEqual((self.queries(carol), self.queries(dave)), ([], []))
        self.assertEqual(self.pending(), 2)
        self.assertEqual(len(events), 1)  # once, not once per presence left unasked
        self.assertEqual(events[0]["jid"], "carol@localhost/r")
        # Another session announcing a ver already being learned just waits for the answer.
        erin = self.bind("erin@localhost/r")
        self.announce(erin, caps_presence(COMPLEX_VER))
        self.answer_complex(alice, self.queries(alice)[0])
        self.assertIn(MUC, self.caps.features_of(erin))
        # Once there is room, carol's caps are asked about when she announces them again.
        self.announce(carol, caps_presence("c="))
        self.assertEqual(len(self.queries(carol)), 1)
