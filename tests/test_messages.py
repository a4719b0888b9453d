"""Message routing between local users (RFC 6121 §8.5), offline storage (XEP-0160, XEP-0203) and
the hook table, at the stanza level through the IM core as tap.py wires it."""

import dataclasses
import datetime

from twisted.internet import defer
from twisted.trial import unittest
from twisted.words.xish import domish

from mim_twisted import hooks
from mim_twisted.im.messages import highest_priority
from mim_twisted.im.offline import NS_DELAY, OfflineDelivery
from mim_twisted.storage.interfaces import OfflineMessage
from mim_twisted.storage.memory import MemoryDatabase
from mim_twisted.xmpp.jids import parse_jid
from tests.imsupport import (
    FakeSession,
    HeldStore,
    ImCoreTestCase,
    error_condition,
    parse,
    summary,
)

TYPES = ("chat", "normal", "headline", "groupchat", "error")


def message_xml(to: str, type: str | None = None, body: str = "Hello", id: str = "m1") -> str:
    kind = f" type='{type}'" if type is not None else ""
    return f"<message to='{to}' id='{id}'{kind}><body>{body}</body></message>"


def bodies(stanzas: list[domish.Element]) -> list[str]:
    return [str(stanza.body) for stanza in stanzas if stanza.name == "message"]


class MessageTestCase(ImCoreTestCase):
    def setUp(self) -> None:
        super().setUp()
        self.alice = self.online("alice@localhost/desk")

    def message(self, to: str, type: str | None = None, body: str = "Hello") -> list:
        """Alice sends a message; what she got back."""
        self.send(self.alice, message_xml(to, type, body))
        return self.alice.take()

    def stored_count(self, user: str = "bob") -> int:
        return self.successResultOf(self.database.offline.count("localhost", user))

    def stored(self, user: str = "bob") -> list[domish.Element]:
        """The messages stored for the user, taken out of the store."""
        messages = self.successResultOf(self.database.offline.pop_all("localhost", user))
        return [parse(message.stanza) for message in messages]


class FullJidTests(MessageTestCase):
    """RFC 6121 §8.5.3: to <localpart@domainpart/resourcepart>."""

    def test_delivered_to_that_resource_whatever_the_type(self) -> None:
        phone = self.online("bob@localhost/phone", 5)
        laptop = self.online("bob@localhost/laptop", 0)
        for kind in TYPES:
            self.assertEqual(self.message("bob@localhost/laptop", kind), [], kind)
            [received] = laptop.take()
            self.assertEqual(
                summary(received),
                ("message", kind, "alice@localhost/desk", "bob@localhost/laptop"),
            )
        self.assertEqual(phone.sent, [])

    def test_delivered_to_a_connected_resource_of_any_priority(self) -> None:
        # "an available or connected resource that exactly matches" (§8.5.3.1)
        connected = self.connect("bob@localhost/connected")
        negative = self.online("bob@localhost/negative", -5)
        for session in (connected, negative):
            self.message(session.jid.full(), "chat")
            self.assertEqual(bodies(session.take()), ["Hello"])
        self.assertEqual(self.stored_count(), 0)

    def test_chat_to_a_gone_resource_is_handled_as_to_the_bare_jid(self) -> None:
        phone = self.online("bob@localhost/phone", 1)
        laptop = self.online("bob@localhost/laptop", 3)
        self.assertEqual(self.message("bob@localhost/gone", "chat"), [])
        [received] = laptop.take()
        self.assertEqual(
            summary(received), ("message", "chat", "alice@localhost/desk", "bob@localhost/gone")
        )
        self.assertEqual(phone.sent, [])

    def test_chat_to_a_gone_resource_is_stored_when_no_resource_is_available(self) -> None:
        self.assertEqual(self.message("bob@localhost/gone", "chat"), [])
        self.assertEqual(bodies(self.stored()), ["Hello"])

    def test_a_closing_resource_counts_as_gone(self) -> None:
        # Its stream error is sent and its connection on the way out: it would lose the message.
        closing = self.online("bob@localhost/closing")
        closing.stream_error("policy-violation")
        self.assertEqual(self.message("bob@localhost/closing", "chat"), [])
        self.assertEqual(closing.take(), [])
        self.assertEqual(bodies(self.stored()), ["Hello"])

    def test_other_types_to_a_gone_resource(self) -> None:
        # §8.5.3.2.1: normal, groupchat and headline are ignored or answered with an error, never
        # handled as to the bare JID; errors are ignored.
        phone = self.online("bob@localhost/phone", 1)
        expected = {
            "normal": "service-unavailable",
            "groupchat": "service-unavailable",
            "headline": None,
            "error": None,
        }
        for kind, condition in expected.items():
            replies = self.message("bob@localhost/gone", kind)
            self.assertEqual(
                [error_condition(reply) for reply in replies], [condition] * bool(condition), kind
            )
        self.assertEqual(phone.sent, [])
        self.assertEqual(self.stored_count(), 0)


class BareJidTests(MessageTestCase):
    """RFC 6121 §8.5.2: to <localpart@domainpart>."""

    def test_chat_and_normal_go_to_the_highest_non_negative_priority(self) -> None:
        phone = self.online("bob@localhost/phone", 1)
        laptop = self.online("bob@localhost/laptop", 3)
        tablet = self.online("bob@localhost/tablet", -1)
        for kind in ("chat", "normal", None):
            self.assertEqual(self.message("bob@localhost", kind), [])
            [received] = laptop.take()
            self.assertEqual(
                summary(received), ("message", kind, "alice@localhost/desk", "bob@localhost")
            )
        self.assertEqual((phone.sent, tablet.sent), ([], []))

    def test_all_resources_of_the_highest_priority(self) -> None:
        phone = self.online("bob@localhost/phone", 2)
        laptop = self.online("bob@localhost/laptop", 2)
        tablet = self.online("bob@localhost/tablet", 1)
        self.message("bob@localhost", "chat")
        self.assertEqual(bodies(phone.take()), ["Hello"])
        self.assertEqual(bodies(laptop.take()), ["Hello"])
        self.assertEqual(tablet.sent, [])

    def test_negative_and_unavailable_resources_are_left_out(self) -> None:
        negative = self.online("bob@localhost/negative", -1)
        connected = self.connect("bob@localhost/connected")
        for kind in ("chat", "normal"):
            self.assertEqual(self.message("bob@localhost", kind, kind), [])
        self.assertEqual((negative.sent, connected.sent), ([], []))
        self.assertEqual(bodies(self.stored()), ["chat", "normal"])

    def test_headline_goes_to_every_non_negative_resource(self) -> None:
        phone = self.online("bob@localhost/phone", 1)
        laptop = self.online("bob@localhost/laptop", 3)
        tablet = self.online("bob@localhost/tablet", -1)
        self.assertEqual(self.message("bob@localhost", "headline"), [])
        self.assertEqual(bodies(phone.take()), ["Hello"])
        self.assertEqual(bodies(laptop.take()), ["Hello"])
        self.assertEqual(tablet.sent, [])

    def test_headline_without_a_non_negative_resource_is_dropped(self) -> None:
        tablet = self.online("bob@localhost/tablet", -1)
        self.assertEqual(self.message("bob@localhost", "headline"), [])
        self.assertEqual(tablet.sent, [])
        self.assertEqual(self.stored_count(), 0)

    def test_groupchat_is_service_unavailable(self) -> None:
        [reply] = self.message("bob@localhost", "groupchat")
        self.assertEqual(error_condition(reply), "service-unavailable")
        phone = self.online("bob@localhost/phone", 1)
        [reply] = self.message("bob@localhost", "groupchat")
        self.assertEqual(error_condition(reply), "service-unavailable")
        self.assertEqual(phone.sent, [])
        self.assertEqual(self.stored_count(), 0)

    def test_error_is_dropped(self) -> None:
        self.assertEqual(self.message("bob@localhost", "error"), [])
        phone = self.online("bob@localhost/phone", 1)
        self.assertEqual(self.message("bob@localhost", "error"), [])
        self.assertEqual(phone.sent, [])
        self.assertEqual(self.stored_count(), 0)

    def test_an_unknown_type_is_normal(self) -> None:
        # RFC 6121 §5.2.2: a 'type' that is not understood is "normal".
        self.assertEqual(self.message("bob@localhost", "memo"), [])
        self.assertEqual(bodies(self.stored()), ["Hello"])


class HighestPriorityTests(unittest.TestCase):
    def test_the_available_sessions_with_the_top_priority(self) -> None:
        sessions = {}
        for name, priority in (("a", 0), ("b", None), ("c", 5), ("d", -1), ("e", 5), ("f", 3)):
            sessions[name] = FakeSession(f"u@localhost/{name}")
            sessions[name].message_priority = priority
        chosen = highest_priority(list(sessions.values()))
        self.assertEqual([s.jid.resource for s in chosen], ["c", "e"])
        self.assertEqual(highest_priority([sessions["a"]]), [sessions["a"]])
        self.assertEqual(highest_priority([sessions["b"], sessions["d"]]), [])


class OfflineStorageTests(MessageTestCase):
    def test_stored_with_a_delay_stamp(self) -> None:
        before = datetime.datetime.now(datetime.UTC)
        self.assertEqual(self.message("bob@localhost", "chat"), [])
        [stored] = self.stored()
        self.assertEqual(
            summary(stored), ("message", "chat", "alice@localhost/desk", "bob@localhost")
        )
        self.assertEqual(str(stored.body), "Hello")
        [delay] = stored.elements(NS_DELAY, "delay")
        self.assertEqual(delay["from"], "localhost")
        stamp = datetime.datetime.strptime(delay["stamp"], "%Y-%m-%dT%H:%M:%S.%fZ")
        stamp = stamp.replace(tzinfo=datetime.UTC)
        self.assertTrue(before <= stamp <= datetime.datetime.now(datetime.UTC), stamp)

    def test_a_client_cannot_stamp_a_delay_in_the_servers_name(self) -> None:
        # The offline store keeps a stamp it made itself; a client's claim to be the server
        # would otherwise date the message for the recipient.
        forged = "<delay xmlns='urn:xmpp:delay' from='localhost' stamp='2000-01-01T00:00:00Z'/>"
        own = "<delay xmlns='urn:xmpp:delay' from='alice@localhost' stamp='2001-01-01T00:00:00Z'/>"
        xml = message_xml("bob@localhost", "chat").replace(
            "</message>", forged + own + "</message>"
        )
        self.send(self.alice, xml)
        [stored] = self.stored()
        delays = {d["from"]: d["stamp"] for d in stored.elements(NS_DELAY, "delay")}
        self.assertEqual(sorted(delays), ["alice@localhost", "localhost"])
        self.assertEqual(delays["alice@localhost"], "2001-01-01T00:00:00Z")
        self.assertFalse(delays["localhost"].startswith("2000-"), delays)

    def test_full_store_is_resource_constraint(self) -> None:
        limits = dataclasses.replace(self.config.limits, max_offline_messages=2)
        self.config = dataclasses.replace(self.config, limits=limits)
        self.build()
        self.alice = self.online("alice@localhost/desk")
        self.assertEqual(self.message("bob@localhost", "chat", "1"), [])
        self.assertEqual(self.message("bob@localhost", "normal", "2"), [])
        [reply] = self.message("bob@localhost", "chat", "3")
        self.assertEqual(error_condition(reply), "resource-constraint")
        self.assertEqual(reply.error["type"], "wait")
        self.assertEqual(
            summary(reply), ("message", "error", "bob@localhost", "alice@localhost/desk")
        )
        # The bounce is the message as it was sent: no stamp of a storage that did not happen.
        self.assertEqual(list(reply.elements(NS_DELAY, "delay")), [])
        self.assertEqual(bodies(self.stored()), ["1", "2"])

    def test_delivered_at_initial_presence_oldest_first_and_once(self) -> None:
        for body in ("1", "2", "3"):
            self.message("bob@localhost", "chat", body)
        phone = self.connect("bob@localhost/phone")
        self.send(phone, "<presence/>")
        received = phone.take()
        self.assertEqual(summary(received[0])[:3], ("presence", None, "bob@localhost/phone"))
        self.assertEqual(bodies(received), ["1", "2", "3"])
        for stanza in received[1:]:
            self.assertEqual(len(list(stanza.elements(NS_DELAY, "delay"))), 1)
        self.assertEqual(self.stored_count(), 0)
        self.send(phone, "<presence><show>away</show></presence>")
        laptop = self.online("bob@localhost/laptop")
        self.assertEqual(bodies(phone.sent + laptop.sent), [])

    def test_not_delivered_to_a_negative_priority(self) -> None:
        self.message("bob@localhost", "chat")
        phone = self.connect("bob@localhost/phone")
        self.send(phone, "<presence><priority>-1</priority></presence>")
        self.assertEqual(bodies(phone.take()), [])
        self.assertEqual(self.stored_count(), 1)
        # XEP-0160: delivered when the user "next sends non-negative available presence".
        self.send(phone, "<presence><priority>0</priority></presence>")
        self.assertEqual(bodies(phone.take()), ["Hello"])
        self.assertEqual(self.stored_count(), 0)


class UnknownRecipientTests(MessageTestCase):
    def test_unknown_local_user_is_service_unavailable(self) -> None:
        # RFC 6121 §8.5.1; no error answers an error (RFC 6120 §8.3.1).
        for to in ("nobody@localhost", "nobody@localhost/phone"):
            for kind in TYPES:
                replies = self.message(to, kind)
                expected = [] if kind == "error" else ["service-unavailable"]
                self.assertEqual([error_condition(r) for r in replies], expected, (to, kind))
                for reply in replies:
                    self.assertEqual(
                        summary(reply), ("message", "error", to, "alice@localhost/desk")
                    )

    def test_other_domain_is_remote_server_not_found(self) -> None:
        for to in ("bob@example.net", "bob@example.net/phone"):
            [reply] = self.message(to, "chat")
            self.assertEqual(error_condition(reply), "remote-server-not-found")
            self.assertEqual(self.message(to, "error"), [])


class StampingTests(MessageTestCase):
    def test_delivered_as_sent_with_the_senders_full_jid(self) -> None:
        phone = self.online("bob@localhost/phone")
        self.send(
            self.alice,
            "<message to='bob@localhost' type='chat' id='x7' from='mallory@localhost'>"
            "<body>Hi</body><thread>t1</thread><active xmlns='http://jabber.org/protocol/chatstates'/>"
            "</message>",
        )
        [received] = phone.take()
        self.assertEqual(received["from"], "alice@localhost/desk")
        self.assertEqual(received["id"], "x7")
        self.assertEqual(
            [(child.uri, child.name) for child in received.elements()],
            [
                ("jabber:client", "body"),
                ("jabber:client", "thread"),
                ("http://jabber.org/protocol/chatstates", "active"),
            ],
        )

    def test_errors_come_from_the_address_and_go_to_the_sender(self) -> None:
        self.send(self.alice, message_xml("bob@localhost", "groupchat", id="g1"))
        [reply] = self.alice.take()
        self.assertEqual(
            summary(reply), ("message", "error", "bob@localhost", "alice@localhost/desk")
        )
        self.assertEqual(reply["id"], "g1")
        self.assertEqual(str(reply.body), "Hello")


class MessageHookTests(MessageTestCase):
    def setUp(self) -> None:
        super().setUp()
        self.calls: list[tuple] = []
        for name in (hooks.MESSAGE_SENT, hooks.MESSAGE_DELIVERED):
            self.core.hooks.add(
                name, lambda session, message, name=name: self.record(name, session, message)
            )

    def record(self, name: str, session: FakeSession, message: domish.Element) -> None:
        self.calls.append((name, session.jid.full(), message.getAttribute("to"), str(message.body)))

    def test_sent_and_delivered(self) -> None:
        self.online("bob@localhost/phone", 1)
        self.online("bob@localhost/laptop", 1)
        self.message("bob@localhost", "chat", "tie")
        self.message("bob@localhost/phone", "chat", "full")
        self.assertEqual(
            self.calls,
            [
                ("message_sent", "alice@localhost/desk", "bob@localhost", "tie"),
                ("message_delivered", "bob@localhost/phone", "bob@localhost", "tie"),
                ("message_delivered", "bob@localhost/laptop", "bob@localhost", "tie"),
                ("message_sent", "alice@localhost/desk", "bob@localhost/phone", "full"),
                ("message_delivered", "bob@localhost/phone", "bob@localhost/phone", "full"),
            ],
        )

    def test_sent_but_not_delivered(self) -> None:
        self.message("carol@localhost", "chat", "stored")
        self.message("nobody@localhost", "chat", "bounced")
        self.assertEqual(
            self.calls,
            [
                ("message_sent", "alice@localhost/desk", "carol@localhost", "stored"),
                ("message_sent", "alice@localhost/desk", "nobody@localhost", "bounced"),
            ],
        )

    def test_a_failing_handler_does_not_stop_delivery(self) -> None:
        def broken(session: FakeSession, message: domish.Element) -> None:
            raise RuntimeError("broken handler")

        self.core.hooks.add(hooks.MESSAGE_SENT, broken, priority=10)
        self.core.hooks.add(hooks.MESSAGE_DELIVERED, broken, priority=10)
        phone = self.online("bob@localhost/phone")
        self.assertEqual(self.message("bob@localhost", "chat"), [])
        self.assertEqual(bodies(phone.take()), ["Hello"])
        self.assertEqual(len(self.calls), 2)
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 2)


class HookTableTests(unittest.TestCase):
    def setUp(self) -> None:
        self.hooks = hooks.Hooks()
        self.calls: list[str] = []

    def handler(self, label: str):
        return lambda *args: self.calls.append((label, *args))

    def test_priority_then_registration_order(self) -> None:
        self.hooks.add("h", self.handler("late"), priority=90)
        self.hooks.add("h", self.handler("first"))
        self.hooks.add("h", self.handler("early"), priority=10)
        self.hooks.add("h", self.handler("second"))
        self.assertIsNone(self.successResultOf(self.hooks.run("h", 1, 2)))
        self.assertEqual(
            self.calls,
            [("early", 1, 2), ("first", 1, 2), ("second", 1, 2), ("late", 1, 2)],
        )

    def test_waits_for_handlers(self) -> None:
        waiting: defer.Deferred = defer.Deferred()

        async def slow(value: int) -> None:
            await waiting
            self.calls.append(("slow", value))

        self.hooks.add("h", slow)
        self.hooks.add("h", self.handler("after"))
        running = self.hooks.run("h", 7)
        self.assertNoResult(running)
        self.assertEqual(self.calls, [])
        waiting.callback(None)
        self.successResultOf(running)
        self.assertEqual(self.calls, [("slow", 7), ("after", 7)])

    def test_a_failing_handler_is_logged_and_the_next_runs(self) -> None:
        def broken(value: int) -> None:
            raise ValueError(value)

        self.hooks.add("h", broken)
        self.hooks.add("h", lambda value: defer.fail(KeyError(value)))
        self.hooks.add("h", self.handler("ok"))
        self.assertIsNone(self.successResultOf(self.hooks.run("h", 3)))
        self.assertEqual(self.calls, [("ok", 3)])
        self.assertEqual(len(self.flushLoggedErrors(ValueError, KeyError)), 2)

    def test_no_handlers(self) -> None:
        self.assertFalse(self.hooks.has_handlers("h"))
        self.assertIsNone(self.successResultOf(self.hooks.run("h")))

    def test_remove(self) -> None:
        function = self.handler("function")
        self.hooks.add("h", function)
        self.hooks.add("h", self.record)
        self.assertTrue(self.hooks.has_handlers("h"))
        self.hooks.remove("h", function)
        # A bound method is a new object at each access: removal compares, not identifies.
        self.hooks.remove("h", self.record)
        self.assertFalse(self.hooks.has_handlers("h"))
        self.hooks.remove("other", function)

    def record(self, *args: object) -> None:
        self.calls.append(("method", *args))


class OfflineDeliveryRaceTests(MessageTestCase):
    """The messages leave the store before they are sent: a session gone by then loses none."""

    def setUp(self) -> None:
        super().setUp()
        for body in ("1", "2", "3"):
            self.message("bob@localhost", "chat", body)
        self.offline = HeldStore(self.database.offline, answers_only=True)
        self.build_held()

    def build_held(self) -> None:
        """The core on the held store; what the test itself reads or stores is not held."""
        self.database.offline = self.offline
        self.build()
        self.database.offline = self.offline.inner

    def test_the_session_closes_while_the_messages_are_read(self) -> None:
        phone = self.connect("bob@localhost/phone")
        self.send(phone, "<presence/>")
        self.assertEqual(self.offline.calls(), ["pop_all"])
        self.disconnect(phone)
        # One more comes while the answer is on its way: it stays after the older ones.
        self.message("bob@localhost", "chat", "4")
        self.offline.release_all()
        self.assertEqual(bodies(phone.take()), [])
        self.assertEqual(bodies(self.stored()), ["1", "2", "3", "4"])
        self.successResultOf(self.core.presence.idle())

    def test_the_session_is_cut_off_while_they_are_sent(self) -> None:
        # C2SStream.send closes a stream whose client reads too slowly and drops what it was
        # given; the second message is the one that finds the buffer full.
        phone = SlowReader("bob@localhost/phone", messages_read=1)
        phone.roster_requested = True
        self.core.sessions.bind(phone)
        self.send(phone, "<presence/>")
        self.offline.release_all()
        self.assertEqual(bodies(phone.take()), ["1"])
        self.assertEqual(bodies(self.stored()), ["2", "3"])

    def test_the_restored_messages_pass_the_store_limit(self) -> None:
        limits = dataclasses.replace(self.config.limits, max_offline_messages=3)
        self.config = dataclasses.replace(self.config, limits=limits)
        self.build_held()
        phone = self.connect("bob@localhost/phone")
        self.send(phone, "<presence/>")
        self.disconnect(phone)
        for body in ("4", "5", "6"):
            message = OfflineMessage("x", f"<message><body>{body}</body></message>")
            self.successResultOf(self.database.offline.store("localhost", "bob", message, 3))
        self.offline.release_all()
        self.assertEqual(bodies(self.stored()), ["1", "2", "3", "4", "5", "6"])


class KnownEmptyTests(unittest.TestCase):
    """The only writer of its store asks it nothing at the login of a user it emptied."""

    def setUp(self) -> None:
        self.database = MemoryDatabase()
        self.successResultOf(self.database.accounts.create_account("localhost", "bob", {}))
        self.store = HeldStore(self.database.offline)

    def deliver(self, offline: OfflineDelivery) -> list[str]:
        phone = FakeSession("bob@localhost/phone")
        delivering = defer.ensureDeferred(offline.deliver(phone))
        self.store.release_all()
        self.successResultOf(delivering)
        return bodies(phone.take())

    def keep(self, offline: OfflineDelivery, body: str) -> None:
        keeping = offline.keep(
            parse_jid("bob@localhost"), parse(message_xml("bob@localhost", "chat", body))
        )
        self.store.release_all()
        self.successResultOf(keeping)

    def test_asked_again_only_once_a_message_was_kept(self) -> None:
        offline = OfflineDelivery(self.store, 10, remember_empty=True)
        self.keep(offline, "1")
        self.assertEqual(self.deliver(offline), ["1"])
        self.deliver(offline)
        self.assertEqual(self.store.calls(), [])
        self.keep(offline, "2")
        self.assertEqual(self.deliver(offline), ["2"])

    def test_not_when_others_may_store(self) -> None:
        offline = OfflineDelivery(self.store, 10)
        self.deliver(offline)
        delivering = defer.ensureDeferred(offline.deliver(FakeSession("bob@localhost/phone")))
        self.assertEqual(self.store.calls(), ["pop_all"])
        self.store.release_all()
        self.successResultOf(delivering)


class SlowReader(FakeSession):
    """A session that C2SStream would cut off when it is sent one message too many."""

    def __init__(self, jid: str, messages_read: int) -> None:
        super().__init__(jid)
        self.messages_read = messages_read

    def send(self, stanza: domish.Element | bytes | str) -> None:
        if "<message" in (stanza if isinstance(stanza, str) else ""):
            if self.messages_read == 0:
                self.closed = True
                return
            self.messages_read -= 1
        super().send(stanza)


def delayed(stanzas: list[domish.Element]) -> list[bool]:
    """Per message among the stanzas: whether it carries an XEP-0203 delay (came from storage)."""
    return [
        any(stanza.elements(NS_DELAY, "delay")) for stanza in stanzas if stanza.name == "message"
    ]


class InitialPresenceRaceTests(MessageTestCase):
    """A message routed after the server received the recipient's initial presence goes to the
    session live, behind the stored messages, whatever the database is doing meanwhile.

    The core's stores are swapped for held ones after Alice is online: the test decides when
    each database call answers (`answers_only`: the calls themselves are made at once, in order).
    """

    def setUp(self) -> None:
        super().setUp()
        for body in ("1", "2"):
            self.message("bob@localhost", "chat", body)
        self.rosters = HeldStore(self.core.presence.rosters, answers_only=True)
        self.core.presence.rosters = self.rosters
        self.offline = HeldStore(self.core.presence.offline.store, answers_only=True)
        self.core.presence.offline.store = self.offline
        self.accounts = HeldStore(self.core.router.messages.accounts, answers_only=True)
        self.core.router.messages.accounts = self.accounts

    def tearDown(self) -> None:
        self.assertEqual(self.offline.calls() + self.rosters.calls(), [])
        self.successResultOf(self.core.presence.idle())
        self.assertEqual(self.stored_count(), 0)

    def test_a_message_while_the_roster_is_read(self) -> None:
        phone = self.connect("bob@localhost/phone")
        self.send(phone, "<presence/>")
        self.assertEqual(self.rosters.calls(), ["get_roster"])
        self.assertEqual(self.message("bob@localhost", "chat", "3"), [])
        self.assertEqual(phone.sent, [])  # it waits behind the stored ones
        self.rosters.release()
        self.assertEqual(self.offline.calls(), ["pop_all"])
        self.offline.release()
        received = phone.take()
        self.assertEqual(bodies(received), ["1", "2", "3"])
        self.assertEqual(delayed(received), [True, True, False])
        # Once they are through, messages go straight to the session again.
        self.message("bob@localhost", "chat", "4")
        self.assertEqual(bodies(phone.take()), ["4"])

    def test_a_message_while_the_stored_ones_are_read(self) -> None:
        phone = self.connect("bob@localhost/phone")
        self.send(phone, "<presence/>")
        self.rosters.release()
        phone.take()  # its own presence
        self.assertEqual(self.offline.calls(), ["pop_all"])
        self.message("bob@localhost", "chat", "3")
        self.message("bob@localhost/phone", "chat", "4")  # to the full JID too
        self.assertEqual(phone.sent, [])
        self.offline.release()
        received = phone.take()
        self.assertEqual(bodies(received), ["1", "2", "3", "4"])
        self.assertEqual(delayed(received), [True, True, False, False])

    def test_a_message_being_stored_when_the_presence_comes(self) -> None:
        phone = self.connect("bob@localhost/phone")
        self.message("bob@localhost", "chat", "3")  # bound but not available: stored
        self.assertEqual(self.offline.calls(), ["store"])
        self.send(phone, "<presence/>")
        self.rosters.release()
        # The store is emptied only once the message being stored is in it.
        self.assertEqual(self.offline.calls(), ["store"])
        self.offline.release()
        self.assertEqual(self.offline.calls(), ["pop_all"])
        self.offline.release()
        received = phone.take()
        self.assertEqual(bodies(received), ["1", "2", "3"])
        self.assertEqual(delayed(received), [True, True, True])

    def test_the_recipient_comes_online_while_its_account_is_looked_up(self) -> None:
        # No session at all: the router asks whether the account exists.
        self.assertEqual(self.message("bob@localhost", "chat", "3"), [])
        self.assertEqual(self.accounts.calls(), ["account_exists"])
        phone = self.connect("bob@localhost/phone")
        self.send(phone, "<presence/>")
        self.accounts.release()
        self.rosters.release()
        self.offline.release()
        received = phone.take()
        self.assertEqual(bodies(received), ["1", "2", "3"])
        self.assertEqual(delayed(received), [True, True, False])

    def test_a_message_after_unavailable_is_received_is_stored(self) -> None:
        phone = self.connect("bob@localhost/phone")
        self.send(phone, "<presence/>")
        self.send(phone, "<presence type='unavailable'/>")
        self.message("bob@localhost", "chat", "3")
        self.assertEqual(self.offline.calls(), ["store"])
        self.offline.release()
        self.rosters.release()
        self.offline.release()
        self.rosters.release()  # the unavailable presence's broadcast
        # Still connected when the delivery empties the store: nothing is left behind.
        received = phone.take()
        self.assertEqual(bodies(received), ["1", "2", "3"])
        self.assertEqual(delayed(received), [True, True, True])

    def test_presences_back_to_back(self) -> None:
        phone = self.connect("bob@localhost/phone")
        for xml in ("<presence/>", "<presence type='unavailable'/>", "<presence/>"):
            self.send(phone, xml)
        self.message("bob@localhost", "chat", "3")
        while self.rosters.waiting or self.offline.waiting:
            (self.rosters if self.rosters.waiting else self.offline).release()
        received = phone.take()
        self.assertEqual(bodies(received), ["1", "2", "3"])
        self.assertEqual(delayed(received), [True, True, False])

    def test_messages_held_for_a_session_that_closes_are_kept(self) -> None:
        phone = self.connect("bob@localhost/phone")
        self.send(phone, "<presence/>")
        self.message("bob@localhost", "chat", "3")
        self.message("bob@localhost", "headline", "news")  # never stored (RFC 6121 §8.5.2)
        self.disconnect(phone)
        self.rosters.release()
        self.assertEqual(self.offline.calls(), ["store"])
        self.offline.release()
        self.assertEqual(phone.sent, [])
        kept = self.stored()
        self.assertEqual(bodies(kept), ["1", "2", "3"])
        self.assertEqual(delayed(kept), [True, True, True])
