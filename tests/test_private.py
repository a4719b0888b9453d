"""XEP-0049 private XML storage at the stanza level, through the IM core as tap.py wires it."""

import dataclasses

from twisted.words.xish import domish

from mim_twisted.config import PrivateConfig
from mim_twisted.im.disco import NS_DISCO_INFO
from mim_twisted.im.private import NS_PRIVATE
from tests.imsupport import FakeSession, ImCoreTestCase, error_condition

BOOKMARKS = (
    "<storage xmlns='storage:bookmarks'>"
    "<conference jid='café@muc.localhost' autojoin='true'><nick>Al</nick></conference>"
    "</storage>"
)


class PrivateStorageTestCase(ImCoreTestCase):
    def setUp(self) -> None:
        super().setUp()
        self.alice = self.online("alice@localhost/desk")

    def iq(self, session: FakeSession, kind: str, payload: str, to: str = "") -> domish.Element:
        """Send a jabber:iq:private request; its answer."""
        to_attribute = f" to='{to}'" if to else ""
        self.send(
            session,
            f"<iq type='{kind}' id='p1'{to_attribute}><query xmlns='{NS_PRIVATE}'>{payload}"
            "</query></iq>",
        )
        [answer] = session.take()
        self.assertEqual((answer.name, answer.getAttribute("id")), ("iq", "p1"))
        return answer

    def stored(self, session: FakeSession, payload: str) -> list[domish.Element]:
        """The children of the <query/> answering a get of ``payload``."""
        answer = self.iq(session, "get", payload)
        self.assertEqual(answer["type"], "result")
        [query] = answer.elements(NS_PRIVATE, "query")
        return list(query.elements())


class StoreAndRetrieveTests(PrivateStorageTestCase):
    def test_set_then_get(self) -> None:
        self.assertEqual(self.iq(self.alice, "set", BOOKMARKS)["type"], "result")
        [storage] = self.stored(self.alice, "<storage xmlns='storage:bookmarks'/>")
        self.assertEqual((storage.uri, storage.name), ("storage:bookmarks", "storage"))
        [conference] = storage.elements("storage:bookmarks", "conference")
        self.assertEqual(conference["jid"], "café@muc.localhost")
        self.assertEqual(str(next(conference.elements("storage:bookmarks", "nick"))), "Al")

    def test_nothing_stored_is_the_empty_element(self) -> None:
        [prefs] = self.stored(self.alice, "<exodus xmlns='exodus:prefs'/>")
        self.assertEqual((prefs.uri, prefs.name, prefs.children), ("exodus:prefs", "exodus", []))

    def test_another_resource_and_a_later_session_see_it(self) -> None:
        self.iq(self.alice, "set", BOOKMARKS)
        phone = self.online("alice@localhost/phone")
        [storage] = self.stored(phone, "<storage xmlns='storage:bookmarks'/>")
        self.assertEqual(len(list(storage.elements())), 1)

    def test_to_own_bare_jid(self) -> None:
        answer = self.iq(self.alice, "set", BOOKMARKS, to="alice@localhost")
        self.assertEqual(answer["type"], "result")

    def test_set_replaces_by_namespace(self) -> None:
        self.iq(self.alice, "set", BOOKMARKS + "<exodus xmlns='exodus:prefs'><nick/></exodus>")
        self.iq(self.alice, "set", "<storage xmlns='storage:bookmarks'/>")
        [storage] = self.stored(self.alice, "<storage xmlns='storage:bookmarks'/>")
        self.assertEqual(storage.children, [])
        [prefs] = self.stored(self.alice, "<exodus xmlns='exodus:prefs'/>")
        self.assertEqual([child.name for child in prefs.elements()], ["nick"])

    def test_several_elements_of_one_namespace_are_kept_together(self) -> None:
        self.iq(self.alice, "set", "<a xmlns='urn:example'>1</a><b xmlns='urn:example'>2</b>")
        stored = self.stored(self.alice, "<a xmlns='urn:example'/>")
        self.assertEqual(
            [(e.uri, e.name, str(e)) for e in stored],
            [
                ("urn:example", "a", "1"),
                ("urn:example", "b", "2"),
            ],
        )


class RefusalTests(PrivateStorageTestCase):
    def test_another_account_is_forbidden(self) -> None:
        for kind in ("get", "set"):
            answer = self.iq(self.alice, kind, BOOKMARKS, to="bob@localhost")
            self.assertEqual(error_condition(answer), "forbidden")
            answer = self.iq(self.alice, kind, BOOKMARKS, to="nobody@localhost")
            self.assertEqual(error_condition(answer), "forbidden")
        bob = self.online("bob@localhost/home")
        self.assertEqual(self.stored(bob, "<storage xmlns='storage:bookmarks'/>")[0].children, [])

    def test_reserved_namespaces_are_not_acceptable(self) -> None:
        for payload in (
            "<query xmlns='jabber:iq:private'/>",
            "<x xmlns='jabber:client'/>",
            "<x xmlns='jabber:server'/>",
            "<x xmlns=''/>",
        ):
            for kind in ("get", "set"):
                answer = self.iq(self.alice, kind, payload)
                self.assertEqual(error_condition(answer), "not-acceptable", (kind, payload))

    def test_a_child_without_its_own_namespace_is_in_jabber_iq_private(self) -> None:
        self.assertEqual(error_condition(self.iq(self.alice, "set", "<x/>")), "not-acceptable")

    def test_an_empty_query_is_not_acceptable(self) -> None:
        for kind in ("get", "set"):
            self.assertEqual(error_condition(self.iq(self.alice, kind, "")), "not-acceptable")

    def test_a_refused_set_stores_nothing(self) -> None:
        self.iq(self.alice, "set", BOOKMARKS + "<x xmlns='jabber:client'/>")
        [storage] = self.stored(self.alice, "<storage xmlns='storage:bookmarks'/>")
        self.assertEqual(storage.children, [])


class LimitTests(PrivateStorageTestCase):
    def setUp(self) -> None:
        super().setUp()
        self.config = dataclasses.replace(self.config, private=PrivateConfig(max_size=200))
        self.build()
        self.alice = self.online("alice@localhost/desk")

    def test_over_the_limit_is_not_acceptable_and_not_echoed(self) -> None:
        self.assertEqual(self.iq(self.alice, "set", BOOKMARKS)["type"], "result")
        big = "<exodus xmlns='exodus:prefs'>" + "x" * 100 + "</exodus>"
        answer = self.iq(self.alice, "set", big)
        self.assertEqual(error_condition(answer), "not-acceptable")
        self.assertEqual([child.name for child in answer.elements()], ["error"])
        self.assertEqual(self.stored(self.alice, "<exodus xmlns='exodus:prefs'/>")[0].children, [])
        # The limit is per account: Bob has his own.
        bob = self.online("bob@localhost/home")
        self.assertEqual(self.iq(bob, "set", big)["type"], "result")


class SwitchTests(ImCoreTestCase):
    def features(self) -> set[str]:
        session = self.online("alice@localhost/desk")
        self.send(
            session, f"<iq type='get' id='d' to='localhost'><query xmlns='{NS_DISCO_INFO}'/></iq>"
        )
        [answer] = session.take()
        [query] = answer.elements(NS_DISCO_INFO, "query")
        return {feature["var"] for feature in query.elements(NS_DISCO_INFO, "feature")}

    def test_on_by_default_and_advertised(self) -> None:
        self.assertIn(NS_PRIVATE, self.features())

    def test_off(self) -> None:
        self.config = dataclasses.replace(
            self.config, modules=dataclasses.replace(self.config.modules, private=False)
        )
        self.build()
        self.assertNotIn(NS_PRIVATE, self.features())
        session = self.online("bob@localhost/home")
        self.send(
            session,
            f"<iq type='get' id='p'><query xmlns='{NS_PRIVATE}'><a xmlns='b'/></query></iq>",
        )
        self.assertEqual(error_condition(session.take()[-1]), "service-unavailable")
