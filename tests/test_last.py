"""XEP-0012 Last Activity at the stanza level, through the IM core as tap.py wires it."""

import dataclasses

from twisted.words.xish import domish

from mim_twisted.im.disco import NS_DISCO_INFO
from mim_twisted.im.last import NS_LAST
from mim_twisted.storage.interfaces import LastActivity, RosterItem
from tests.imsupport import FakeSession, ImCoreTestCase, error_condition, presence_xml


class LastActivityTests(ImCoreTestCase):
    def ask(self, session: FakeSession, to: str, kind: str = "get") -> domish.Element:
        self.send(session, f"<iq type='{kind}' id='l1' to='{to}'><query xmlns='{NS_LAST}'/></iq>")
        return session.take()[-1]

    def answer(self, reply: domish.Element) -> tuple[str | None, str | None, str]:
        """(type, seconds, status text) of a reply."""
        query = next(reply.elements(NS_LAST, "query"), None)
        if query is None:
            return (reply.getAttribute("type"), None, "")
        return (reply["type"], query.getAttribute("seconds"), str(query))

    def test_server_uptime(self) -> None:
        alice = self.online("alice@localhost/desk")
        self.clock.advance(42)
        self.assertEqual(self.answer(self.ask(alice, "localhost")), ("result", "42", ""))

    def test_offline_contact_last_logout_and_status(self) -> None:
        self.subscribe("alice", "bob")  # alice sees bob's presence: bob's item says 'from'
        bob = self.online("bob@localhost/phone")
        self.send(bob, presence_xml(type="unavailable", status="Gone fishing"))
        self.disconnect(bob)
        self.clock.advance(300)
        alice = self.online("alice@localhost/desk")
        self.assertEqual(
            self.answer(self.ask(alice, "bob@localhost")), ("result", "300", "Gone fishing")
        )

    def test_a_lost_connection_counts_as_a_logout_without_status(self) -> None:
        self.subscribe("alice", "bob")
        bob = self.online("bob@localhost/phone")
        self.clock.advance(10)
        self.disconnect(bob)
        self.clock.advance(5)
        alice = self.online("alice@localhost/desk")
        self.assertEqual(self.answer(self.ask(alice, "bob@localhost")), ("result", "5", ""))
        self.assertEqual(
            self.successResultOf(self.database.last_activity.get_last_activity("localhost", "bob")),
            LastActivity(int(self.clock.seconds()) - 5, ""),
        )

    def test_an_online_contact_was_active_0_seconds_ago(self) -> None:
        self.subscribe("alice", "bob")
        self.successResultOf(
            self.database.last_activity.set_last_activity(
                "localhost", "bob", LastActivity(1, "old")
            )
        )
        self.online("bob@localhost/phone")
        alice = self.online("alice@localhost/desk")
        self.assertEqual(self.answer(self.ask(alice, "bob@localhost")), ("result", "0", ""))

    def test_forbidden_without_a_presence_subscription(self) -> None:
        # alice has a 'to' subscription in bob's roster view only one way: bob shares nothing.
        self.put("bob", RosterItem("alice@localhost", subscription="to"))
        self.successResultOf(
            self.database.last_activity.set_last_activity("localhost", "bob", LastActivity(1))
        )
        alice = self.online("alice@localhost/desk")
        for account in ("bob@localhost", "carol@localhost", "nobody@localhost"):
            self.assertEqual(error_condition(self.ask(alice, account)), "forbidden", account)

    def test_own_account(self) -> None:
        alice = self.online("alice@localhost/desk")
        self.assertEqual(self.answer(self.ask(alice, "alice@localhost")), ("result", "0", ""))

    def test_nothing_known_is_service_unavailable(self) -> None:
        self.subscribe("alice", "bob")
        alice = self.online("alice@localhost/desk")
        self.assertEqual(error_condition(self.ask(alice, "bob@localhost")), "service-unavailable")

    def test_only_get(self) -> None:
        alice = self.online("alice@localhost/desk")
        for to in ("localhost", "alice@localhost"):
            self.assertEqual(error_condition(self.ask(alice, to, "set")), "bad-request", to)

    def test_advertised_and_switched_off_in_the_config(self) -> None:
        alice = self.online("alice@localhost/desk")
        self.assertIn(NS_LAST, self.server_features(alice))
        self.config = dataclasses.replace(
            self.config, modules=dataclasses.replace(self.config.modules, last=False)
        )
        self.build()
        alice = self.online("alice@localhost/desk")
        self.assertNotIn(NS_LAST, self.server_features(alice))
        self.assertEqual(error_condition(self.ask(alice, "localhost")), "service-unavailable")

    def server_features(self, session: FakeSession) -> list[str]:
        self.send(
            session, f"<iq type='get' id='d1' to='localhost'><query xmlns='{NS_DISCO_INFO}'/></iq>"
        )
        return [f["var"] for f in session.take()[-1].query.elements(NS_DISCO_INFO, "feature")]
