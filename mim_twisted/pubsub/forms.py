"""The XEP-0004 data forms of XEP-0060, built and read with wokkel's data_form.

The field definitions (types, labels, options) live in `pubsub/config.py`; this module only turns
them into forms and submitted forms back into plain dictionaries for the core.
"""

from collections.abc import Mapping
from typing import Any

from twisted.words.protocols.jabber import error
from twisted.words.xish import domish
from wokkel import data_form

from mim_twisted.pubsub.config import (
    NODE_CONFIG_FIELDS,
    SUBSCRIPTION_OPTION_FIELDS,
    Field,
)
from mim_twisted.storage.interfaces import PubSubNode, PubSubSubscription

NS_NODE_CONFIG = "http://jabber.org/protocol/pubsub#node_config"
NS_SUBSCRIBE_OPTIONS = "http://jabber.org/protocol/pubsub#subscribe_options"
NS_SUBSCRIBE_AUTHORIZATION = "http://jabber.org/protocol/pubsub#subscribe_authorization"
NS_PUBLISH_OPTIONS = "http://jabber.org/protocol/pubsub#publish-options"
NS_META_DATA = "http://jabber.org/protocol/pubsub#meta-data"

MULTI_TYPES = frozenset(("list-multi", "text-multi", "jid-multi"))


def _field(var: str, spec: Field, value: Any) -> data_form.Field:
    options = [data_form.Option(option) for option in spec.options]
    if spec.type in MULTI_TYPES:
        return data_form.Field(
            spec.type, var=var, values=list(value or ()), options=options, label=spec.label
        )
    if spec.integer:
        value = str(value)
    return data_form.Field(spec.type, var=var, value=value, options=options, label=spec.label)


def _form(
    namespace: str, fields: Mapping[str, Field], values: Mapping[str, Any], form_type: str
) -> data_form.Form:
    form = data_form.Form(form_type, formNamespace=namespace)
    for var, spec in fields.items():
        if var in values:
            form.addField(_field(var, spec, values[var]))
    return form


def node_config_form(config: Mapping[str, Any], form_type: str = "form") -> data_form.Form:
    return _form(NS_NODE_CONFIG, NODE_CONFIG_FIELDS, config, form_type)


def subscription_options_form(
    options: Mapping[str, Any], form_type: str = "form"
) -> data_form.Form:
    return _form(NS_SUBSCRIBE_OPTIONS, SUBSCRIPTION_OPTION_FIELDS, options, form_type)


def subscription_authorization_form(node: str, subscription: PubSubSubscription) -> data_form.Form:
    """The approval form sent to owners of an authorize node (XEP-0060 §8.6)."""
    form = data_form.Form("form", title="PubSub subscriber request")
    form.formNamespace = NS_SUBSCRIBE_AUTHORIZATION
    form.addField(data_form.Field("hidden", var="pubsub#subid", value=subscription.subid))
    form.addField(data_form.Field("text-single", var="pubsub#node", value=node, label="Node ID"))
    form.addField(
        data_form.Field(
            "jid-single",
            var="pubsub#subscriber_jid",
            value=subscription.jid,
            label="Subscriber Address",
        )
    )
    form.addField(
        data_form.Field(
            "boolean",
            var="pubsub#allow",
            value=False,
            label="Allow this JID to subscribe to this pubsub node?",
        )
    )
    return form


def meta_data_form(node: PubSubNode, owners: list[str]) -> data_form.Form:
    """The node meta-data of disco#info on a node (XEP-0060 §5.4)."""
    form = data_form.Form("result", formNamespace=NS_META_DATA)
    config = node.config
    form.addField(data_form.Field("jid-multi", var="pubsub#owner", values=owners))
    for var in ("pubsub#title", "pubsub#access_model", "pubsub#publish_model", "pubsub#max_items"):
        if var in config:
            form.addField(_field(var, NODE_CONFIG_FIELDS[var], config[var]))
    if node.created_at is not None:
        created = node.created_at.strftime("%Y-%m-%dT%H:%M:%SZ")
        form.addField(data_form.Field("text-single", var="pubsub#creation_date", value=created))
    return form


# Forms read before, by their shape (see submitted_values): clients send the same few
# publish-options forms (OMEMO's, for one) with every publication. Only small forms are kept,
# so that the memory they take stays small whatever clients send.
_READ: dict[tuple, dict | None] = {}
MAX_FORMS_READ = 256
# The size of a form kept: the characters of its names, namespaces, attributes and text, and
# ELEMENT_SIZE per element (its shape's tuples), so that many empty elements count too.
MAX_FORM_SIZE = 2048
ELEMENT_SIZE = 32


def submitted_values(element: domish.Element | None, namespace: str) -> dict | None:
    """The values of a submitted form (x type='submit'), None for none or a cancelled one.

    A form wokkel cannot read (a field given twice, an option without value) or of another
    FORM_TYPE is a bad request (XEP-0060 §16.4).
    """
    if element is None:
        return None
    shape, size = _shape(element)
    key = (namespace, shape)
    try:
        values = _READ[key]
    except KeyError:
        values = _read(element, namespace)  # a bad request is raised again every time
        if size <= MAX_FORM_SIZE:
            if len(_READ) >= MAX_FORMS_READ:
                _READ.clear()
            _READ[key] = values
    if values is None:
        return None
    # A copy: the caller owns the dictionary and its lists.
    return {var: list(value) if isinstance(value, list) else value for var, value in values.items()}


def _shape(element: domish.Element) -> tuple[tuple, int]:
    """All of an element that wokkel reads a form from, hashable (equal shapes, equal forms),
    and its size (see MAX_FORM_SIZE)."""
    size = ELEMENT_SIZE + len(element.name) + len(element.uri or "")
    for key, value in element.attributes.items():
        # A namespaced attribute's key is (namespace, name).
        size += len(value) + (len(key) if type(key) is str else len(key[0]) + len(key[1]))
    children = []
    for child in element.children:
        if isinstance(child, domish.Element):
            shape, child_size = _shape(child)
            children.append(shape)
            size += child_size
        else:
            children.append(child)
            size += len(child)
    return (element.uri, element.name, tuple(element.attributes.items()), tuple(children)), size


def _read(element: domish.Element, namespace: str) -> dict | None:
    try:
        form = data_form.Form.fromElement(element)
    except data_form.Error as e:
        raise error.StanzaError("bad-request", text=f"Malformed data form: {e}") from None
    if form.formType == "cancel":
        return None
    if form.formNamespace not in (None, namespace):
        raise error.StanzaError("bad-request", text=f"Expected a {namespace} form")
    return form.getValues()


def find_form(parent: domish.Element | None) -> domish.Element | None:
    if parent is None:
        return None
    return next(parent.elements(data_form.NS_X_DATA, "x"), None)
