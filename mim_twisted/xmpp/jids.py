"""JID parsing with a bounded cache.

Parsing a JID runs stringprep on each part, which costs tens of microseconds: far too much to
repeat for every stanza. Twisted's `internJID` caches without bound, so JIDs made up by a client
would fill it for the life of the process; this cache forgets the least recently used ones.
"""

from functools import lru_cache

from twisted.words.protocols.jabber.jid import JID, InvalidFormat
from twisted.words.protocols.jabber.xmpp_stringprep import nodeprep, resourceprep

CACHE_SIZE = 65536


@lru_cache(maxsize=CACHE_SIZE)
def parse_jid(text: str) -> JID:
    """The JID of `text`; raises InvalidFormat (or UnicodeError) for a malformed one.

    The returned JID is shared: never change its attributes.
    """
    if not text:
        raise InvalidFormat("empty JID")  # Twisted's JID raises RuntimeError for this one
    return JID(text)


# RFC 7622 limits each part to 1023 bytes; a longer text is not worth a cache entry.
MAX_CACHED_PART = 1023


def nodeprep_cached(text: str) -> str:
    """``nodeprep.prepare(text)``, remembered: users log in under the same names again and again."""
    return _nodeprep(text) if len(text) <= MAX_CACHED_PART else nodeprep.prepare(text)


def resourceprep_cached(text: str) -> str:
    """``resourceprep.prepare(text)``, remembered: clients reuse their resource names."""
    return _resourceprep(text) if len(text) <= MAX_CACHED_PART else resourceprep.prepare(text)


_nodeprep = lru_cache(maxsize=CACHE_SIZE)(nodeprep.prepare)
_resourceprep = lru_cache(maxsize=CACHE_SIZE)(resourceprep.prepare)


def with_resource(bare: JID, resource: str) -> JID:
    """The full JID of ``bare`` and ``resource``, which must already be resourceprepped.

    ``JID(tuple=...)`` would run stringprep on all three parts once more, the largest share of
    a login's CPU after the parser; the parts here went through it already.
    """
    full = JID.__new__(JID)
    full.user, full.host, full.resource = bare.user, bare.host, resource or None
    return full


def prepared_jid(text: str) -> JID:
    """The JID of a text this server made of one (``JID.full()``, sent between cluster nodes):
    its parts are in their prepared forms already, so they are split, not prepared again."""
    bare, slash, resource = text.partition("/")
    user, at, host = bare.rpartition("@")
    jid = JID.__new__(JID)
    jid.user, jid.host, jid.resource = user if at else None, host, resource if slash else None
    return jid
