"""Node configuration and subscription options: the fields, their defaults and their validation.

Values are kept as JSON-compatible Python values (bool, int, str, list of str) under their
XEP-0060 field names. Input may come straight from a submitted data form, where every value is
text ("1", "false", "10") and every field a list of values, or from Python callers with native
values; both give the same result.
"""

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import datetime
from types import MappingProxyType
from typing import Any

from mim_twisted.pubsub.errors import PubSubError

# The XEP-0068 form type field of a submitted form: it names the form, it is no setting.
FORM_TYPE = "FORM_TYPE"


@dataclass(frozen=True)
class ServiceLimits:
    """Upper bounds the operator sets (``[pubsub]`` in the config file)."""

    max_items_limit: int = 1000  # the largest pubsub#max_items a node may have
    max_payload_size: int = 60000  # bytes; also the largest pubsub#max_payload_size


@dataclass(frozen=True)
class Field:
    """One form field: its XEP-0004 type and label, which also say how values are checked.

    ``options`` are the allowed values of a list field (empty: any text); ``limit`` names the
    ``ServiceLimits`` attribute bounding an integer field, which forms carry as text-single.
    """

    type: str
    label: str
    options: tuple[str, ...] = ()
    limit: str | None = None
    integer: bool = False


def _boolean(label: str) -> Field:
    return Field("boolean", label)


# XEP-0060 §16.4.3 pubsub#node_config, the fields MongooseIM 3.3 offers for leaf nodes.
NODE_CONFIG_FIELDS: Mapping[str, Field] = MappingProxyType(
    {
        "pubsub#title": Field("text-single", "A friendly name for the node"),
        "pubsub#deliver_notifications": _boolean("Whether to deliver event notifications"),
        "pubsub#deliver_payloads": _boolean("Whether to deliver payloads with event notifications"),
        "pubsub#notify_config": _boolean(
            "Whether to notify subscribers when the node configuration changes"
        ),
        "pubsub#notify_delete": _boolean("Whether to notify subscribers when the node is deleted"),
        "pubsub#notify_retract": _boolean(
            "Whether to notify subscribers when items are removed from the node"
        ),
        "pubsub#persist_items": _boolean("Whether to persist items to storage"),
        "pubsub#max_items": Field(
            "text-single",
            "The maximum number of items to persist, `max` for the service's limit",
            limit="max_items_limit",
            integer=True,
        ),
        "pubsub#max_payload_size": Field(
            "text-single",
            "The maximum payload size in bytes",
            limit="max_payload_size",
            integer=True,
        ),
        "pubsub#subscribe": _boolean("Whether to allow subscriptions"),
        "pubsub#access_model": Field(
            "list-single",
            "Who may subscribe and retrieve items",
            ("open", "presence", "roster", "authorize", "whitelist"),
        ),
        "pubsub#roster_groups_allowed": Field(
            "list-multi", "The roster group(s) allowed to subscribe and retrieve items"
        ),
        "pubsub#publish_model": Field(
            "list-single", "The publisher model", ("publishers", "subscribers", "open")
        ),
        "pubsub#notification_type": Field(
            "list-single", "Specify the delivery style for notifications", ("headline", "normal")
        ),
        "pubsub#send_last_published_item": Field(
            "list-single",
            "When to send the last published item",
            ("never", "on_sub", "on_sub_and_presence"),
        ),
        "pubsub#presence_based_delivery": _boolean(
            "Whether to deliver notifications to available users only"
        ),
        "pubsub#purge_offline": _boolean(
            "Whether to purge all items when the relevant publisher goes offline"
        ),
        "pubsub#itemreply": Field(
            "list-single",
            "Whether owners or publisher should receive replies to items",
            ("owner", "publisher"),
        ),
    }
)

# MongooseIM 3.3's defaults for flat (generic) nodes.
GENERIC_NODE_DEFAULTS: Mapping[str, Any] = MappingProxyType(
    {
        "pubsub#title": "",
        "pubsub#deliver_notifications": True,
        "pubsub#deliver_payloads": True,
        "pubsub#notify_config": False,
        "pubsub#notify_delete": False,
        "pubsub#notify_retract": False,
        "pubsub#persist_items": True,
        "pubsub#max_items": 10,
        "pubsub#max_payload_size": 60000,
        "pubsub#subscribe": True,
        "pubsub#access_model": "open",
        "pubsub#roster_groups_allowed": [],
        "pubsub#publish_model": "publishers",
        "pubsub#notification_type": "headline",
        "pubsub#send_last_published_item": "never",
        "pubsub#presence_based_delivery": False,
        "pubsub#purge_offline": False,
        "pubsub#itemreply": "owner",
    }
)

# PEP nodes differ in these (MongooseIM 3.3 node_pep).
PEP_NODE_DEFAULTS: Mapping[str, Any] = MappingProxyType(
    {
        **GENERIC_NODE_DEFAULTS,
        "pubsub#max_items": 1,
        "pubsub#access_model": "presence",
        "pubsub#send_last_published_item": "on_sub_and_presence",
        "pubsub#presence_based_delivery": True,
    }
)

NodeDefaults = Mapping[str, Any]

SHOW_VALUES = ("away", "chat", "dnd", "online", "xa")

# XEP-0060 §16.4.2 pubsub#subscribe_options, without the collection-only fields.
SUBSCRIPTION_OPTION_FIELDS: Mapping[str, Field] = MappingProxyType(
    {
        "pubsub#deliver": _boolean("Whether an entity wants to receive or disable notifications"),
        "pubsub#digest": _boolean(
            "Whether an entity wants to receive digests (aggregations) of notifications"
        ),
        "pubsub#digest_frequency": Field(
            "text-single",
            "The minimum number of milliseconds between sending any two notification digests",
            integer=True,
        ),
        "pubsub#expire": Field(
            "text-single", "The DateTime at which a leased subscription will end, or `presence`"
        ),
        "pubsub#include_body": _boolean(
            "Whether an entity wants to receive an XMPP message body in addition to the payload"
        ),
        "pubsub#show-values": Field(
            "list-multi",
            "The presence states for which an entity wants to receive notifications",
            SHOW_VALUES,
        ),
    }
)

SUBSCRIPTION_DEFAULTS: Mapping[str, Any] = MappingProxyType(
    {
        "pubsub#deliver": True,
        "pubsub#digest": False,
        "pubsub#digest_frequency": 0,
        "pubsub#include_body": False,
        "pubsub#show-values": list(SHOW_VALUES),
    }
)

_BOOLEANS = {"1": True, "true": True, "0": False, "false": False}
_DIGITS = re.compile(r"[0-9]+")


class _BadValue(ValueError):
    """A value a field does not accept; the callers turn it into the error of their use case."""


def _single(value: Any) -> Any:
    # A data form field always carries a list of values; a single-valued field exactly one.
    if isinstance(value, list | tuple):
        if len(value) != 1:
            raise _BadValue("expects one value")
        return value[0]
    return value


def _maximum(field: Field, limits: ServiceLimits) -> int | None:
    return getattr(limits, field.limit) if field.limit else None


def _parse(var: str, field: Field, value: Any, maximum: int | None = None) -> Any:
    if field.type == "list-multi":
        values = [value] if isinstance(value, str) else value
        if not isinstance(values, Iterable) or not all(isinstance(v, str) for v in values):
            raise _BadValue("expects a list of text values")
        if field.options and not set(values) <= set(field.options):
            raise _BadValue(f"accepts only {', '.join(field.options)}")
        return list(dict.fromkeys(values))  # without duplicates, in the order given
    value = _single(value)
    if field.type == "boolean":
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value in _BOOLEANS:
            return _BOOLEANS[value]
        raise _BadValue("expects a boolean")
    if field.integer:
        if var == "pubsub#max_items" and value == "max":  # XEP-0060 1.16: the service's limit
            return maximum
        if isinstance(value, str) and _DIGITS.fullmatch(value):
            value = int(value)
        if not isinstance(value, int) or isinstance(value, bool) or value < 0:
            raise _BadValue("expects a non-negative integer")
        if maximum is not None and value > maximum:
            raise _BadValue(f"is limited to {maximum}")
        return value
    if not isinstance(value, str):
        raise _BadValue("expects text")
    if field.options and value not in field.options:
        raise _BadValue(f"accepts only {', '.join(field.options)}")
    return value


def validate_config(
    changes: Mapping[str, Any], current: Mapping[str, Any], limits: ServiceLimits
) -> dict[str, Any]:
    """The configuration ``current`` becomes with ``changes`` (a submitted node_config form).

    Fields left out keep their value (XEP-0004 partial submission). An unknown field or a value
    the field does not accept -> ``not-acceptable`` naming it (XEP-0060 §8.2.5.2).
    """
    config = dict(current)
    for var, value in changes.items():
        if var == FORM_TYPE:
            continue
        field = NODE_CONFIG_FIELDS.get(var)
        if field is None:
            raise PubSubError("not-acceptable", text=f"unknown configuration field {var}")
        try:
            config[var] = _parse(var, field, value, _maximum(field, limits))
        except _BadValue as e:
            raise PubSubError("not-acceptable", text=f"{var} {e}") from None
    return config


def bounded(config: Mapping[str, Any], limits: ServiceLimits) -> dict[str, Any]:
    """``config`` with its integer fields lowered to the service's limits (for the defaults)."""
    result = dict(config)
    for var, field in NODE_CONFIG_FIELDS.items():
        maximum = _maximum(field, limits)
        if maximum is not None and var in result:
            result[var] = min(result[var], maximum)
    return result


def check_preconditions(
    preconditions: Mapping[str, Any], config: Mapping[str, Any], limits: ServiceLimits
) -> None:
    """Check publish-options against a node's configuration (XEP-0060 §7.1.5).

    Each field must equal the node's value (as a set for list-multi fields); an unknown field or
    value can never be met. Failing -> ``conflict`` + ``precondition-not-met``.
    """
    for var, value in preconditions.items():
        if var == FORM_TYPE:
            continue
        field = NODE_CONFIG_FIELDS.get(var)
        if field is None:
            raise PubSubError(
                "conflict", "precondition-not-met", text=f"unknown configuration field {var}"
            )
        try:
            wanted = _parse(var, field, value, _maximum(field, limits))
        except _BadValue as e:
            raise PubSubError("conflict", "precondition-not-met", text=f"{var} {e}") from None
        actual = config.get(var)
        if field.type == "list-multi":
            met = set(wanted) == set(actual or ())
        else:
            met = wanted == actual
        if not met:
            raise PubSubError(
                "conflict", "precondition-not-met", text=f"{var} is {actual!r}, not {wanted!r}"
            )


def _expire(value: Any) -> str:
    # "presence" asks for a temporary subscription (XEP-0060 §12.4); otherwise a DateTime.
    if value == "presence":
        return value
    try:
        datetime.fromisoformat(value.replace("Z", "+00:00"))
    except (AttributeError, ValueError):
        raise _BadValue("expects a DateTime or presence") from None
    return value


def validate_subscription_options(
    options: Mapping[str, Any], current: Mapping[str, Any]
) -> dict[str, Any]:
    """The subscription options ``current`` become with ``options`` (a subscribe_options form).

    An unknown field or a value it does not accept -> ``bad-request`` + ``invalid-options``
    (XEP-0060 §6.3.5).
    """
    result = dict(current)
    for var, value in options.items():
        if var == FORM_TYPE:
            continue
        field = SUBSCRIPTION_OPTION_FIELDS.get(var)
        try:
            if field is None:
                raise _BadValue("is no subscription option")
            if var == "pubsub#expire":
                result[var] = _expire(_single(value))
            else:
                result[var] = _parse(var, field, value)
        except _BadValue as e:
            raise PubSubError("bad-request", "invalid-options", text=f"{var} {e}") from None
    return result
