"""XEP-0352 Client State Indication: what an inactive client is spared until it is active again.

A client says <inactive/> when its user is not looking (a phone in a pocket) and <active/> when
they are again. While it is inactive, its session holds back what only updates a picture the
user is not looking at, keeping only the latest of each:

- presence (available or unavailable) per sending full JID;
- PEP notifications (pubsub#event messages from an account's PEP service) of one published
  item per publisher, node and item id: a node may hold several items (bookmarks), each of
  which the client needs. Any other PEP event (a retraction, a purge, a deletion, several
  items at once) is held in its place, never merged, as the items it touches may be
  published again after it;

and drops chat-state-only messages (XEP-0085 "composing" and the like without a body), which
would be stale by the time the user looks; the next message carries its own state. Everything
else, messages first of all, subscription requests and IQs, goes out at once. <active/> sends
what was held, oldest first. Holding is bounded: past `MAX_HELD` updates everything held is
sent and holding starts over.
"""

import itertools

from twisted.words.xish import domish

from mim_twisted.im.stream_management import parse_stanza

NS_CSI = "urn:xmpp:csi:0"
NS_PUBSUB_EVENT = "http://jabber.org/protocol/pubsub#event"
NS_CHATSTATES = "http://jabber.org/protocol/chatstates"
MAX_HELD = 500

Stanza = domish.Element | bytes | str


def stream_feature() -> domish.Element:
    """<csi/> among the stream features after authentication."""
    return domish.Element((NS_CSI, "csi"))


class ClientState:
    """One session's client state and what it holds back while inactive."""

    def __init__(self) -> None:
        self.inactive = False
        # Insertion order is the order of the latest update: a newer update of the same key
        # moves to the end.
        self._held: dict[tuple[str, ...], Stanza] = {}
        self._arrivals = itertools.count()  # a key of its own for what is never merged

    def hold(self, stanza: Stanza) -> bool | None:
        """While inactive: True if the stanza is held back, None if it is dropped, False if it
        is to be sent now."""
        if not self.inactive:
            return False
        element = stanza if isinstance(stanza, domish.Element) else parse_stanza(stanza)
        key = _held_key(element)
        if key is None:
            return None if _chat_state_only(element) else False
        if key is _UNMERGED:
            key = ("unmerged", str(next(self._arrivals)))
        self._held.pop(key, None)
        self._held[key] = stanza
        return True

    def __len__(self) -> int:
        """Updates held."""
        return len(self._held)

    def overflowing(self) -> bool:
        return len(self._held) > MAX_HELD

    def release(self) -> list[Stanza]:
        """What was held, oldest first, forgotten."""
        held = list(self._held.values())
        self._held.clear()
        return held


_UNMERGED = ("unmerged",)  # held, under a key of its own


def _held_key(stanza: domish.Element) -> tuple[str, ...] | None:
    sender = stanza.getAttribute("from", "")
    if stanza.name == "presence":
        if stanza.getAttribute("type") in (None, "unavailable"):
            return ("presence", sender)
        return None
    if stanza.name == "message" and "@" in sender and "/" not in sender:
        for event in stanza.elements(NS_PUBSUB_EVENT, "event"):
            return _pep_key(sender, event)
    return None


def _pep_key(sender: str, event: domish.Element) -> tuple[str, ...]:
    """(publisher, node, item id) for the notification of one published item, else
    _UNMERGED."""
    children = list(event.elements())
    if len(children) == 1 and children[0].name == "items":
        entries = list(children[0].elements())
        if len(entries) == 1 and entries[0].name == "item" and entries[0].getAttribute("id"):
            return ("pep", sender, children[0].getAttribute("node", ""), entries[0]["id"])
    return _UNMERGED


def _chat_state_only(stanza: domish.Element) -> bool:
    if stanza.name != "message" or stanza.getAttribute("type") == "error":
        return False
    children = list(stanza.elements())
    return bool(children) and all(
        child.uri == NS_CHATSTATES or (child.name == "thread" and child.uri == stanza.uri)
        for child in children
    )
