"""The events of MongooseIM 3.3's mod_event_pusher_rabbit, from the server's hooks.

Pure: `EventSource` turns hook calls into events (exchange, routing key, JSON body) and hands
them to a `publish` callable; where they go is the publisher's business. This runs in the XMPP
process for every event, so it is kept to a few string operations: plain tuples, and the JSON
written with the C string escaper that `json` itself uses. Exchanges, routing keys
and bodies are exactly MongooseIM's, so that consumers written for it read ours unchanged:
presence -> routing key the bare JID, `{"user_id": full JID, "present": bool}`; chat and
groupchat -> `<bare JID>.<topic>`, `{"from_user_id", "to_user_id", "message"}`.
"""

from collections.abc import Callable
from json.encoder import encode_basestring
from typing import Any

from twisted.logger import Logger
from twisted.words.protocols.jabber.jid import InvalidFormat
from twisted.words.xish import domish

from mim_twisted import hooks
from mim_twisted.config import RabbitConfig
from mim_twisted.xmpp.jids import parse_jid

log = Logger()

MAX_ROUTING_KEY = 255

# Before any other handler of the same hooks, so that a handler that waits cannot reorder what
# happened (a message's "sent" event always comes before its "recv" event).
HOOK_PRIORITY = 0


# (exchange, routing key, JSON body): a plain tuple, so that a batch of events goes to the
# publisher process in one `marshal` call.
Event = tuple[str, str, bytes]

# A str as a JSON string, as `json.dumps(..., ensure_ascii=False)` writes it (its C function).
_quote = encode_basestring


def presence_body(user_id: str, present: bool) -> bytes:
    """`{"user_id":...,"present":...}`: UTF-8 JSON without spaces, as MongooseIM's jiffy writes."""
    return f'{{"user_id":{_quote(user_id)},"present":{"true" if present else "false"}}}'.encode()


def message_json(from_user_id: str, to_user_id: str, text: str) -> bytes:
    """`{"from_user_id":...,"to_user_id":...,"message":...}`, the same way."""
    return (
        f'{{"from_user_id":{_quote(from_user_id)},"to_user_id":{_quote(to_user_id)},'
        f'"message":{_quote(text)}}}'
    ).encode()


def message_body(message: domish.Element) -> str | None:
    """The text of the message's <body/>, None if it has none (no event then)."""
    for child in message.children:
        if isinstance(child, domish.Element) and child.name == "body":
            return str(child)
    return None


class EventSource:
    """Turns the server's hooks into events on the configured exchanges."""

    def __init__(self, settings: RabbitConfig, publish: Callable[[Event], None]) -> None:
        self.publish = publish
        self.presence = settings.presence_exchange
        # Message type -> its exchange settings (name, sent_topic, recv_topic).
        self.messages = {
            "chat": settings.chat_msg_exchange,
            "groupchat": settings.groupchat_msg_exchange,
        }

    def handlers(self) -> list[tuple[str, Callable[..., None]]]:
        """(hook name, handler) for each hook that makes events; add them at HOOK_PRIORITY."""
        return [
            (hooks.USER_AVAILABLE, self.user_available),
            (hooks.USER_UNAVAILABLE, self.user_unavailable),
            (hooks.MESSAGE_SENT, self.message_sent),
            (hooks.MESSAGE_DELIVERED, self.message_delivered),
        ]

    # Session JIDs are stringprepped when bound, so their parts are already lowercased.

    def user_available(self, session: Any) -> None:
        self._presence(session, True)

    def user_unavailable(self, session: Any, presence: domish.Element | None = None) -> None:
        self._presence(session, False)

    def _presence(self, session: Any, present: bool) -> None:
        body = presence_body(session.jid.full(), present)
        self._emit(self.presence.name, session.jid.userhost(), body)

    def message_sent(self, session: Any, message: domish.Element) -> None:
        """A local user sent a message: routing key the sender's, to = the address written."""
        attributes = message.attributes  # read directly: this runs for every message
        exchange = self.messages.get(attributes.get("type"))
        if exchange is None:
            return
        text = message_body(message)
        to = attributes.get("to")
        if text is None:
            return
        try:
            recipient = parse_jid(to).full() if to else session.jid.userhost()
        except (InvalidFormat, UnicodeError):
            return  # the router answers it with jid-malformed
        body = message_json(session.jid.full(), recipient, text)
        self._emit(exchange.name, f"{session.jid.userhost()}.{exchange.sent_topic}", body)

    def message_delivered(self, session: Any, message: domish.Element) -> None:
        """A message was written to a local session: routing key the recipient's."""
        attributes = message.attributes
        exchange = self.messages.get(attributes.get("type"))
        if exchange is None:
            return
        text = message_body(message)
        if text is None:
            return
        sender = attributes.get("from", "")
        try:
            sender = parse_jid(sender).full()
        except (InvalidFormat, UnicodeError):
            pass  # stamped by the server; kept as it is
        body = message_json(sender, session.jid.full(), text)
        self._emit(exchange.name, f"{session.jid.userhost()}.{exchange.recv_topic}", body)

    def _emit(self, exchange: str, routing_key: str, body: bytes) -> None:
        # AMQP routing keys hold 255 bytes; a JID may be longer (1023 bytes a part).
        if len(routing_key) > MAX_ROUTING_KEY and len(routing_key.encode()) > MAX_ROUTING_KEY:
            log.warn(
                "Event pusher: no event for {key}: a routing key holds at most 255 bytes",
                key=routing_key[:80] + "...",
            )
            return
        self.publish((exchange, routing_key, body))
