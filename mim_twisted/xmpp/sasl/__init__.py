"""SASL mechanisms, one module each, and the factory that creates one per attempt."""

from mim_twisted.auth.errors import SaslError
from mim_twisted.xmpp.sasl.external import ExternalMechanism
from mim_twisted.xmpp.sasl.mechanism import ISaslMechanism, SaslContext
from mim_twisted.xmpp.sasl.plain import PlainMechanism
from mim_twisted.xmpp.sasl.scram import ScramSha1Mechanism, ScramSha256Mechanism

# Mechanism name -> class called with a SaslContext and providing ISaslMechanism. Plugins add
# their own entries. Which of them a stream offers is the negotiation's business.
MECHANISMS: dict[str, type] = {
    cls.name: cls
    for cls in (ExternalMechanism, ScramSha256Mechanism, ScramSha1Mechanism, PlainMechanism)
}


def mechanism_factory(name: str, context: SaslContext) -> ISaslMechanism:
    """A fresh mechanism for one attempt on the stream ``context`` describes; invalid-mechanism
    if ``name`` is unknown."""
    try:
        mechanism_class = MECHANISMS[name]
    except KeyError:
        raise SaslError("invalid-mechanism", f"unknown mechanism {name!r}") from None
    return mechanism_class(context)
