"""SASL mechanisms, one module each, and the factory that creates one per attempt."""

from collections.abc import Mapping
from types import MappingProxyType

from mim_twisted.auth.errors import SaslError
from mim_twisted.xmpp.sasl.external import ExternalMechanism
from mim_twisted.xmpp.sasl.mechanism import ISaslMechanism, SaslContext
from mim_twisted.xmpp.sasl.plain import PlainMechanism
from mim_twisted.xmpp.sasl.scram import ScramSha1Mechanism, ScramSha256Mechanism

# Mechanism name -> class called with a SaslContext and providing ISaslMechanism. Read-only: a
# server's registry starts from a copy and extensions add to that (mim_twisted.extensions).
# Which of them a stream offers is the negotiation's business.
BUILTIN_MECHANISMS: Mapping[str, type] = MappingProxyType(
    {
        cls.name: cls
        for cls in (ExternalMechanism, ScramSha256Mechanism, ScramSha1Mechanism, PlainMechanism)
    }
)


def create_mechanism(
    mechanisms: Mapping[str, type], name: str, context: SaslContext
) -> ISaslMechanism:
    """A fresh mechanism of ``mechanisms`` for one attempt on the stream ``context`` describes;
    invalid-mechanism if ``name`` is unknown."""
    try:
        mechanism_class = mechanisms[name]
    except KeyError:
        raise SaslError("invalid-mechanism", f"unknown mechanism {name!r}") from None
    return mechanism_class(context)


def mechanism_factory(name: str, context: SaslContext) -> ISaslMechanism:
    """A fresh built-in mechanism (a server with extensions uses its registry's factory)."""
    return create_mechanism(BUILTIN_MECHANISMS, name, context)
