"""XEP-0054 vcard-temp at the stanza level, through the IM core as tap.py wires it, and the
XEP-0153 photo hash in presence, which the server passes on as the client wrote it."""

import dataclasses

from twisted.words.xish import domish

from mim_twisted.config import VCardConfig
from mim_twisted.im.disco import NS_DISCO_INFO
from mim_twisted.im.vcard import NS_VCARD
from tests.imsupport import FakeSession, ImCoreTestCase, error_condition

VCARD = (
    f"<vCard xmlns='{NS_VCARD}'><FN>Alice Ünver</FN><NICKNAME>al</NICKNAME>"
    "<PHOTO><TYPE>image/png</TYPE><BINVAL>iVBORw0KGgo=</BINVAL></PHOTO></vCard>"
)
NS_VCARD_UPDATE = "vcard-temp:x:update"
PHOTO_HASH = "01b87fcd030b72895ff8e88db57ec525450f000d"


class VCardTestCase(ImCoreTestCase):
    def setUp(self) -> None:
        super().setUp()
        self.alice = self.online("alice@localhost/desk")
        self.bob = self.online("bob@localhost/home")

    def iq(self, session: FakeSession, kind: str, payload: str, to: str = "") -> domish.Element:
        """Send a vcard-temp request; its answer."""
        to_attribute = f" to='{to}'" if to else ""
        self.send(session, f"<iq type='{kind}' id='v1'{to_attribute}>{payload}</iq>")
        [answer] = session.take()
        self.assertEqual((answer.name, answer.getAttribute("id")), ("iq", "v1"))
        return answer

    def get(self, session: FakeSession, to: str = "") -> domish.Element:
        return self.iq(session, "get", f"<vCard xmlns='{NS_VCARD}'/>", to)

    def vcard_of(self, answer: domish.Element) -> domish.Element:
        self.assertEqual(answer["type"], "result")
        [vcard] = answer.elements(NS_VCARD, "vCard")
        return vcard


class OwnVCardTests(VCardTestCase):
    def test_none_stored_is_an_empty_vcard(self) -> None:
        self.assertEqual(self.vcard_of(self.get(self.alice)).children, [])

    def test_set_then_get(self) -> None:
        self.assertEqual(self.iq(self.alice, "set", VCARD)["type"], "result")
        vcard = self.vcard_of(self.get(self.alice))
        self.assertEqual(str(next(vcard.elements(NS_VCARD, "FN"))), "Alice Ünver")
        [photo] = vcard.elements(NS_VCARD, "PHOTO")
        self.assertEqual(str(next(photo.elements(NS_VCARD, "BINVAL"))), "iVBORw0KGgo=")

    def test_set_to_own_bare_jid_and_replace(self) -> None:
        self.iq(self.alice, "set", VCARD, to="alice@localhost")
        self.iq(self.alice, "set", f"<vCard xmlns='{NS_VCARD}'><FN>New</FN></vCard>")
        vcard = self.vcard_of(self.get(self.alice, to="alice@localhost"))
        self.assertEqual([child.name for child in vcard.elements()], ["FN"])

    def test_another_account_cannot_set_it(self) -> None:
        answer = self.iq(self.bob, "set", VCARD, to="alice@localhost")
        self.assertEqual(error_condition(answer), "forbidden")
        self.assertEqual(self.vcard_of(self.get(self.alice)).children, [])


class OthersVCardTests(VCardTestCase):
    def test_anyone_reads_it_from_the_bare_jid(self) -> None:
        self.iq(self.alice, "set", VCARD)
        answer = self.get(self.bob, to="alice@localhost")
        self.assertEqual(answer["from"], "alice@localhost")
        self.assertEqual(str(next(self.vcard_of(answer).elements(NS_VCARD, "NICKNAME"))), "al")

    def test_no_vcard_and_no_account_give_the_same_error(self) -> None:
        for to in ("alice@localhost", "nobody@localhost"):
            answer = self.get(self.bob, to=to)
            self.assertEqual(error_condition(answer), "service-unavailable", to)


class LimitTests(VCardTestCase):
    def test_over_the_limit_is_not_acceptable_and_not_echoed(self) -> None:
        self.config = dataclasses.replace(self.config, vcard=VCardConfig(max_size=len(VCARD) + 10))
        self.build()
        alice = self.online("alice@localhost/desk")
        self.assertEqual(self.iq(alice, "set", VCARD)["type"], "result")
        big = VCARD.replace("<FN>", "<DESC>" + "x" * 20 + "</DESC><FN>")
        answer = self.iq(alice, "set", big)
        self.assertEqual(error_condition(answer), "not-acceptable")
        self.assertEqual([child.name for child in answer.elements()], ["error"])
        self.assertEqual(len(list(self.vcard_of(self.get(alice)).elements(NS_VCARD, "DESC"))), 0)


class SwitchTests(ImCoreTestCase):
    def features(self, to: str) -> set[str]:
        session = self.online("alice@localhost/desk")
        self.send(session, f"<iq type='get' id='d' to='{to}'><query xmlns='{NS_DISCO_INFO}'/></iq>")
        [answer] = session.take()
        [query] = answer.elements(NS_DISCO_INFO, "query")
        return {feature["var"] for feature in query.elements(NS_DISCO_INFO, "feature")}

    def test_on_by_default_and_advertised_by_the_server_and_accounts(self) -> None:
        self.assertIn(NS_VCARD, self.features("localhost"))
        self.assertIn(NS_VCARD, self.features("alice@localhost"))

    def test_off(self) -> None:
        modules = dataclasses.replace(self.config.modules, vcard=False)
        self.config = dataclasses.replace(self.config, modules=modules)
        self.build()
        self.assertNotIn(NS_VCARD, self.features("localhost"))
        session = self.online("bob@localhost/home")
        self.send(session, f"<iq type='get' id='v'><vCard xmlns='{NS_VCARD}'/></iq>")
        self.assertEqual(error_condition(session.take()[-1]), "service-unavailable")


class PhotoHashTests(ImCoreTestCase):
    def test_the_hash_in_presence_reaches_contacts_as_sent(self) -> None:
        self.subscribe("bob", "alice")
        bob = self.online("bob@localhost/home")
        alice = self.connect("alice@localhost/desk")
        self.send(
            alice,
            f"<presence><x xmlns='{NS_VCARD_UPDATE}'><photo>{PHOTO_HASH}</photo></x></presence>",
        )
        [presence] = [stanza for stanza in bob.take() if stanza.name == "presence"]
        self.assertEqual(presence["from"], "alice@localhost/desk")
        [update] = presence.elements(NS_VCARD_UPDATE, "x")
        [photo] = update.elements(NS_VCARD_UPDATE, "photo")
        self.assertEqual(str(photo), PHOTO_HASH)
