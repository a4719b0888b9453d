"""The bounded JID and stringprep caches."""

from twisted.trial import unittest
from twisted.words.protocols.jabber.jid import JID, InvalidFormat
from twisted.words.protocols.jabber.xmpp_stringprep import nodeprep, resourceprep

from mim_twisted.xmpp.jids import (
    CACHE_SIZE,
    MAX_CACHED_PART,
    nodeprep_cached,
    parse_jid,
    prepared_jid,
    resourceprep_cached,
    with_resource,
)


class ParseJidTests(unittest.TestCase):
    def test_parses_and_reuses(self) -> None:
        jid = parse_jid("Alice@LocalHost/Phone")
        self.assertEqual(jid.full(), "alice@localhost/Phone")
        self.assertIs(parse_jid("Alice@LocalHost/Phone"), jid)

    def test_malformed(self) -> None:
        for text in ("alice@", "a b@localhost", ""):
            self.assertRaises(InvalidFormat, parse_jid, text)

    def test_the_cache_is_bounded(self) -> None:
        self.assertEqual(parse_jid.cache_info().maxsize, CACHE_SIZE)


class StringprepCacheTests(unittest.TestCase):
    def test_same_as_stringprep(self) -> None:
        for text in ("Alice", "ÄLICE", "x" * (MAX_CACHED_PART + 1)):
            self.assertEqual(nodeprep_cached(text), nodeprep.prepare(text))
            self.assertEqual(resourceprep_cached(text), resourceprep.prepare(text))
        self.assertEqual(resourceprep_cached("Phone \u2163"), resourceprep.prepare("Phone \u2163"))

    def test_refusals_are_not_remembered_as_results(self) -> None:
        for _ in range(2):
            self.assertRaises(UnicodeError, nodeprep_cached, "a b")
            self.assertRaises(UnicodeError, resourceprep_cached, "a\u0000b")


class WithResourceTests(unittest.TestCase):
    def test_equals_the_jid_built_by_stringprep(self) -> None:
        full = with_resource(parse_jid("alice@localhost"), "Phone")
        self.assertEqual(full, JID(tuple=("alice", "localhost", "Phone")))
        self.assertEqual(hash(full), hash(JID("alice@localhost/Phone")))
        self.assertEqual(full.full(), "alice@localhost/Phone")
        self.assertEqual(full.userhostJID(), parse_jid("alice@localhost"))

    def test_an_empty_resource_is_none(self) -> None:
        self.assertIsNone(with_resource(parse_jid("alice@localhost"), "").resource)


class PreparedJidTests(unittest.TestCase):
    def test_equals_the_parsed_jid_of_a_full_jid_text(self) -> None:
        for text in ("Alice@LocalHost/Phone/x@y", "alice@localhost", "localhost/res", "localhost"):
            parsed = parse_jid(text)
            jid = prepared_jid(parsed.full())
            self.assertEqual(
                (jid.user, jid.host, jid.resource), (parsed.user, parsed.host, parsed.resource)
            )
            self.assertEqual((jid, hash(jid)), (parsed, hash(parsed)))
            self.assertEqual(jid.userhostJID(), parsed.userhostJID())
