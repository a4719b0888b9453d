"""SASL mechanisms, one module each, and the factory that creates one per attempt."""

from mim_twisted.auth.errors import SaslError
from mim_twisted.storage.interfaces import IAccountStore
from mim_twisted.xmpp.sasl.mechanism import ISaslMechanism
from mim_twisted.xmpp.sasl.plain import PlainMechanism
from mim_twisted.xmpp.sasl.scram import ScramSha1Mechanism, ScramSha256Mechanism

# Mechanism name -> class called with (*, domain, accounts, secure) and providing ISaslMechanism.
# EXTERNAL and plugins add their own entries.
MECHANISMS: dict[str, type] = {
    cls.name: cls for cls in (ScramSha256Mechanism, ScramSha1Mechanism, PlainMechanism)
}


def mechanism_factory(
    name: str, *, domain: str, accounts: IAccountStore, secure: bool
) -> ISaslMechanism:
    """A fresh mechanism for one attempt on a stream of ``domain``; invalid-mechanism if unknown."""
    try:
        mechanism_class = MECHANISMS[name]
    except KeyError:
        raise SaslError("invalid-mechanism", f"unknown mechanism {name!r}") from None
    return mechanism_class(domain=domain, accounts=accounts, secure=secure)
