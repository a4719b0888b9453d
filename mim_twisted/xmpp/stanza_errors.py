"""Error replies to stanzas (RFC 6120 §8.3): addressed back to the sender, carrying a copy of
the request as §8.3.1 allows, except when the request holds a credential (a password change
refused, say), whose copy would send the password back in clear and into every log of it."""

from twisted.words.protocols.jabber import error, xmlstream
from twisted.words.xish import domish

from mim_twisted.xmpp.credentials import carries_credentials


def error_response(failure: error.StanzaError, stanza: domish.Element) -> domish.Element:
    """The error reply to ``stanza``; ``stanza`` itself is left as it was."""
    if not carries_credentials(stanza):
        return failure.toResponse(stanza)
    response = xmlstream.toResponse(stanza, "error")
    response.addChild(failure.getElement())
    return response
