"""JID parsing with a bounded cache.

Parsing a JID runs stringprep on each part, which costs tens of microseconds: far too much to
repeat for every stanza. Twisted's `internJID` caches without bound, so JIDs made up by a client
would fill it for the life of the process; this cache forgets the least recently used ones.
"""

from functools import lru_cache

from twisted.words.protocols.jabber.jid import JID, InvalidFormat

CACHE_SIZE = 65536


@lru_cache(maxsize=CACHE_SIZE)
def parse_jid(text: str) -> JID:
    """The JID of `text`; raises InvalidFormat (or UnicodeError) for a malformed one.

    The returned JID is shared: never change its attributes.
    """
    if not text:
        raise InvalidFormat("empty JID")  # Twisted's JID raises RuntimeError for this one
    return JID(text)
