"""The errors the PubSub core raises; the protocol layer turns each into one ``<error/>``.

An error is an RFC 6120 stanza condition, optionally with the XEP-0060 application condition
(``http://jabber.org/protocol/pubsub#errors``) and, for ``<unsupported/>``, the feature it names.
"""

from collections.abc import Sequence
from typing import Any

# RFC 6120 §8.3.3: the defined stanza conditions with the error type each usually comes with.
STANZA_CONDITIONS = {
    "bad-request": "modify",
    "conflict": "cancel",
    "feature-not-implemented": "cancel",
    "forbidden": "auth",
    "gone": "cancel",
    "internal-server-error": "cancel",
    "item-not-found": "cancel",
    "jid-malformed": "modify",
    "not-acceptable": "modify",
    "not-allowed": "cancel",
    "not-authorized": "auth",
    "payment-required": "auth",
    "policy-violation": "modify",
    "recipient-unavailable": "wait",
    "redirect": "modify",
    "registration-required": "auth",
    "remote-server-not-found": "cancel",
    "remote-server-timeout": "wait",
    "resource-constraint": "wait",
    "service-unavailable": "cancel",
    "subscription-required": "auth",
    "undefined-condition": "cancel",
    "unexpected-request": "wait",
}

# The children of <error/> in the pubsub#errors namespace (XEP-0060 §17.4 schema).
PUBSUB_CONDITIONS = frozenset(
    {
        "closed-node",
        "configuration-required",
        "invalid-jid",
        "invalid-options",
        "invalid-payload",
        "invalid-subid",
        "item-forbidden",
        "item-required",
        "jid-required",
        "max-items-exceeded",
        "max-nodes-exceeded",
        "nodeid-required",
        "not-in-roster-group",
        "not-subscribed",
        "payload-too-big",
        "payload-required",
        "pending-subscription",
        "precondition-not-met",
        "presence-subscription-required",
        "subid-required",
        "too-many-subscriptions",
        "unsupported",
        "unsupported-access-model",
    }
)

# Where XEP-0060's examples give another type than RFC 6120's usual one.
_TYPE_EXCEPTIONS = {("unexpected-request", "not-subscribed"): "cancel"}


class PubSubError(Exception):
    """A refused PubSub request.

    ``type`` is the error type of the stanza (``cancel``, ``modify``, ``auth``, ``wait``), the one
    XEP-0060 shows for the case unless given.
    """

    def __init__(
        self,
        condition: str,
        pubsub_condition: str | None = None,
        *,
        feature: str | None = None,
        text: str | None = None,
        type: str | None = None,
    ) -> None:
        # A misspelt condition would reach the client as an undefined element; fail where raised.
        if condition not in STANZA_CONDITIONS:
            raise ValueError(f"unknown stanza error condition {condition!r}")
        if pubsub_condition is not None and pubsub_condition not in PUBSUB_CONDITIONS:
            raise ValueError(f"unknown pubsub error condition {pubsub_condition!r}")
        if (feature is not None) != (pubsub_condition == "unsupported"):
            raise ValueError("a feature goes with <unsupported/> and only with it")
        super().__init__(condition, pubsub_condition, feature, text)
        self.condition = condition
        self.pubsub_condition = pubsub_condition
        self.feature = feature
        self.text = text
        self.type = type or _TYPE_EXCEPTIONS.get(
            (condition, pubsub_condition), STANZA_CONDITIONS[condition]
        )


class Forbidden(PubSubError):
    """The affiliation does not allow the operation (XEP-0060 §4.1), or it is another's JID."""

    def __init__(self, text: str | None = None) -> None:
        super().__init__("forbidden", text=text)


class NodeNotFoundError(PubSubError):
    """The node does not exist."""

    def __init__(self, node: str) -> None:
        super().__init__("item-not-found", text=f"no node {node!r}")
        self.node = node


class ItemNotFoundError(PubSubError):
    """The item does not exist on the node."""

    def __init__(self, item_id: str) -> None:
        super().__init__("item-not-found", text=f"no item {item_id!r}")
        self.item_id = item_id


class Conflict(PubSubError):
    """A node of that name already exists (XEP-0060 §8.1.3)."""

    def __init__(self, node: str) -> None:
        super().__init__("conflict", text=f"node {node!r} exists")
        self.node = node


class Unsupported(PubSubError):
    """The node or service does not do this: ``<feature-not-implemented/>`` + ``<unsupported/>``."""

    def __init__(self, feature: str, text: str | None = None) -> None:
        super().__init__("feature-not-implemented", "unsupported", feature=feature, text=text)


class ResourceConstraint(PubSubError):
    """The request queue of the node is full: try again later (``<wait/>``)."""

    def __init__(self) -> None:
        super().__init__("resource-constraint", text="too many requests queued")


class PartlyFailed(PubSubError):
    """Some entries of a multi-entry change were refused (XEP-0060 §8.8.2.4, §8.9.2.4).

    The other entries were applied. ``failed`` holds the refused entries with their current,
    unchanged values, for the error response: ``(jid, affiliation)`` pairs from
    ``set_affiliations``, ``PubSubSubscription``s (state "none" when there was none) from
    ``set_subscriptions``.
    """

    def __init__(self, failed: Sequence[Any], text: str | None = None) -> None:
        super().__init__("not-acceptable", text=text)
        self.failed = tuple(failed)
