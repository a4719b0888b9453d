"""Events from the hooks, as MongooseIM 3.3's mod_event_pusher_rabbit publishes them."""

import json

from twisted.trial import unittest
from twisted.words.protocols.jabber.jid import JID
from twisted.words.xish import domish

from mim_twisted import hooks
from mim_twisted.config import load_config
from mim_twisted.events.formats import (
    HOOK_PRIORITY,
    Event,
    EventSource,
    message_json,
    presence_body,
)
from tests.test_config import write


class FakeSession:
    def __init__(self, jid: str) -> None:
        self.jid = JID(jid)


def message(kind: str | None, body: str | None, to: str, sender: str) -> domish.Element:
    element = domish.Element(("jabber:client", "message"))
    if kind is not None:
        element["type"] = kind
    element["to"] = to
    element["from"] = sender
    if body is not None:
        element.addElement("body", content=body)
    return element


class EventSourceTests(unittest.TestCase):
    config = ""

    def setUp(self) -> None:
        settings = load_config(write(self, self.config)).event_pusher.rabbit
        self.events: list[Event] = []
        self.hooks = hooks.Hooks()
        for name, handler in EventSource(settings, self.events.append).handlers():
            self.hooks.add(name, handler, HOOK_PRIORITY)
        self.alice = FakeSession("alice@localhost/home")
        self.bob = FakeSession("bob@localhost/phone")

    def published(self) -> list[tuple[str, str, dict]]:
        return [(exchange, key, json.loads(body)) for exchange, key, body in self.events]

    def test_presence(self) -> None:
        self.hooks.run(hooks.USER_AVAILABLE, self.alice)
        self.hooks.run(hooks.USER_UNAVAILABLE, self.alice, None)
        self.assertEqual(
            self.published(),
            [
                (
                    "presence",
                    "alice@localhost",
                    {"user_id": "alice@localhost/home", "present": True},
                ),
                (
                    "presence",
                    "alice@localhost",
                    {"user_id": "alice@localhost/home", "present": False},
                ),
            ],
        )

    def test_chat_sent_then_received(self) -> None:
        stanza = message("chat", "hi", "Bob@LOCALHOST", "alice@localhost/home")
        self.hooks.run(hooks.MESSAGE_SENT, self.alice, stanza)
        self.hooks.run(hooks.MESSAGE_DELIVERED, self.bob, stanza)
        self.assertEqual(
            self.published(),
            [
                (
                    "chat_msg",
                    "alice@localhost.chat_msg_sent",
                    {
                        "from_user_id": "alice@localhost/home",
                        "to_user_id": "bob@localhost",  # as addressed, normalised
                        "message": "hi",
                    },
                ),
                (
                    "chat_msg",
                    "bob@localhost.chat_msg_recv",
                    {
                        "from_user_id": "alice@localhost/home",
                        "to_user_id": "bob@localhost/phone",
                        "message": "hi",
                    },
                ),
            ],
        )

    def test_groupchat(self) -> None:
        stanza = message("groupchat", "all", "room@muc.localhost", "alice@localhost/home")
        self.hooks.run(hooks.MESSAGE_SENT, self.alice, stanza)
        [(exchange, key, body)] = self.published()
        self.assertEqual((exchange, key), ("groupchat_msg", "alice@localhost.groupchat_msg_sent"))
        self.assertEqual(body["to_user_id"], "room@muc.localhost")

    def test_other_types_and_messages_without_body_are_not_events(self) -> None:
        for kind, body in (("normal", "x"), (None, "x"), ("headline", "x"), ("error", "x")):
            self.hooks.run(hooks.MESSAGE_SENT, self.alice, message(kind, body, "bob@localhost", ""))
        self.hooks.run(
            hooks.MESSAGE_SENT, self.alice, message("chat", None, "bob@localhost", "")
        )  # a chat state notification, for instance
        self.assertEqual(self.events, [])

    def test_no_event_when_the_routing_key_would_be_too_long(self) -> None:
        long_user = FakeSession(f"{'x' * 250}@localhost/home")
        self.hooks.run(hooks.USER_AVAILABLE, long_user)
        self.assertEqual(self.events, [])
        short_enough = FakeSession(f"{'x' * 245}@localhost/home")  # 255 bytes with the domain
        self.hooks.run(hooks.USER_AVAILABLE, short_enough)
        self.assertEqual(len(self.events), 1)

    def test_unicode_body_is_utf8_json(self) -> None:
        stanza = message("chat", "grüße ✓", "bob@localhost", "alice@localhost/home")
        self.hooks.run(hooks.MESSAGE_SENT, self.alice, stanza)
        self.assertIn("grüße ✓".encode(), self.events[0][2])
        self.assertEqual(json.loads(self.events[0][2])["message"], "grüße ✓")


class BodyTests(unittest.TestCase):
    """The bodies are written by hand for speed: byte for byte what the json module writes."""

    def test_same_bytes_as_json_dumps(self) -> None:
        texts = ["hi", "grüße ✓", 'quote " and \\ backslash', "tab\tnew\nline\x01\x1f", "😀", ""]
        for text in texts:
            self.assertEqual(
                message_json("a@d/r", text, text),
                json.dumps(
                    {"from_user_id": "a@d/r", "to_user_id": text, "message": text},
                    ensure_ascii=False,
                    separators=(",", ":"),
                ).encode(),
            )
            self.assertEqual(
                presence_body(text, True),
                json.dumps(
                    {"user_id": text, "present": True}, separators=(",", ":"), ensure_ascii=False
                ).encode(),
            )
        self.assertEqual(presence_body("a@d/r", False), b'{"user_id":"a@d/r","present":false}')


class CustomExchangeTests(EventSourceTests):
    config = (
        "[event_pusher.rabbit]\n"
        'presence_exchange = { name = "p", type = "fanout" }\n'
        'chat_msg_exchange = { name = "c", sent_topic = "out", recv_topic = "in" }\n'
    )

    def test_presence(self) -> None:
        self.hooks.run(hooks.USER_AVAILABLE, self.alice)
        self.assertEqual([e[:2] for e in self.events], [("p", "alice@localhost")])

    def test_chat_sent_then_received(self) -> None:
        stanza = message("chat", "hi", "bob@localhost", "alice@localhost/home")
        self.hooks.run(hooks.MESSAGE_SENT, self.alice, stanza)
        self.hooks.run(hooks.MESSAGE_DELIVERED, self.bob, stanza)
        self.assertEqual(
            [e[:2] for e in self.events], [("c", "alice@localhost.out"), ("c", "bob@localhost.in")]
        )
