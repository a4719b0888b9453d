"""Where a stanza carries a credential: SASL payloads, passwords of in-band registration and
of legacy authentication, and private data-form fields. The traffic log redacts them and error
replies never echo a request that holds one."""

from collections.abc import Iterator

from twisted.words.xish import domish

from mim_twisted.xmpp import namespaces

NS_REGISTER = "jabber:iq:register"
NS_LEGACY_AUTH = "jabber:iq:auth"  # XEP-0078: not served, but clients may still send it
NS_DATA_FORMS = "jabber:x:data"

# Elements whose text is a credential.
SECRET_ELEMENTS = frozenset(
    {
        (namespaces.SASL, "auth"),
        (namespaces.SASL, "response"),
        (namespaces.SASL, "challenge"),
        (namespaces.SASL, "success"),
        (NS_REGISTER, "password"),
        (NS_LEGACY_AUTH, "password"),
        (NS_LEGACY_AUTH, "digest"),
    }
)


def credential_elements(element: domish.Element) -> Iterator[domish.Element]:
    """The elements in ``element`` (itself included) whose text is a credential:
    never logged, never echoed back."""
    stack = [element]
    while stack:
        current = stack.pop()
        if (current.uri, current.name) in SECRET_ELEMENTS:
            yield current
        elif (
            current.uri == NS_DATA_FORMS
            and current.name == "field"
            and (
                current.getAttribute("type") == "text-private"
                or current.getAttribute("var") == "password"
            )
        ):
            yield from current.elements(NS_DATA_FORMS, "value")
        else:
            stack.extend(current.elements())


def carries_credentials(element: domish.Element) -> bool:
    return next(credential_elements(element), None) is not None
