"""SASLprep against the examples of RFC 4013 §3 and the rules behind them."""

import stringprep
import unicodedata

from twisted.trial import unittest

from mim_twisted.auth.saslprep import _PROHIBITED, saslprep


class RFC4013ExamplesTests(unittest.TestCase):
    def test_soft_hyphen_mapped_to_nothing(self) -> None:
        self.assertEqual(saslprep("I\u00adX"), "IX")

    def test_no_transformation(self) -> None:
        self.assertEqual(saslprep("user"), "user")

    def test_case_preserved(self) -> None:
        self.assertEqual(saslprep("USER"), "USER")

    def test_nfkc_of_ordinal_indicator(self) -> None:
        self.assertEqual(saslprep("\u00aa"), "a")

    def test_nfkc_of_roman_numeral(self) -> None:
        self.assertEqual(saslprep("\u2168"), "IX")

    def test_control_character_prohibited(self) -> None:
        self.assertRaises(ValueError, saslprep, "\u0007")

    def test_bidi_check(self) -> None:
        self.assertRaises(ValueError, saslprep, "\u0627\u0031")


class SaslprepRulesTests(unittest.TestCase):
    def test_non_ascii_space_mapped_to_space(self) -> None:
        self.assertEqual(saslprep("a\u00a0b\u3000c"), "a b c")

    def test_zero_width_characters_removed(self) -> None:
        self.assertEqual(saslprep("a\u200bb\ufeffc"), "abc")

    def test_private_use_prohibited(self) -> None:
        self.assertRaises(ValueError, saslprep, "a\ue000")

    def test_right_to_left_text_accepted(self) -> None:
        self.assertEqual(saslprep("\u0627\u0031\u0628"), "\u0627\u0031\u0628")

    def test_mixed_directions_prohibited(self) -> None:
        self.assertRaises(ValueError, saslprep, "\u0627a\u0628")

    def test_unassigned_only_in_queries(self) -> None:
        # U+0221 was unassigned in Unicode 3.2, the version stringprep uses.
        self.assertRaises(ValueError, saslprep, "a\u0221")
        self.assertEqual(saslprep("a\u0221", allow_unassigned=True), "a\u0221")


class PrintableAsciiTests(unittest.TestCase):
    """The shortcut for printable ASCII agrees with the tables it skips."""

    def test_printable_ascii_is_in_no_table(self) -> None:
        for char in map(chr, range(0x20, 0x7F)):
            self.assertFalse(stringprep.in_table_b1(char) or stringprep.in_table_c12(char))
            self.assertFalse(any(in_table(char) for in_table in _PROHIBITED), repr(char))
            self.assertFalse(stringprep.in_table_a1(char) or stringprep.in_table_d1(char))
            self.assertEqual(unicodedata.ucd_3_2_0.normalize("NFKC", char), char)
            self.assertEqual(saslprep(f"a{char}b"), f"a{char}b")

    def test_ascii_controls_still_prohibited(self) -> None:
        for char in [*map(chr, range(0x20)), "\x7f"]:
            self.assertRaises(ValueError, saslprep, f"a{char}b")
