"""The bounded JID cache."""

from twisted.trial import unittest
from twisted.words.protocols.jabber.jid import InvalidFormat

from mim_twisted.xmpp.jids import CACHE_SIZE, parse_jid


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
