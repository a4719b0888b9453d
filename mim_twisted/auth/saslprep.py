"""SASLprep (RFC 4013): the stringprep profile for user names and passwords.

Built on the stdlib ``stringprep`` tables, which are those of Unicode 3.2 as RFC 3454 requires;
normalisation therefore uses ``unicodedata.ucd_3_2_0`` rather than the current Unicode version.
"""

import stringprep
import unicodedata

# RFC 4013 §2.3: every table that must not appear in the output. C.1.2 is mapped to SPACE before
# this check, yet stays listed because NFKC could in principle produce one.
_PROHIBITED = (
    stringprep.in_table_c12,
    stringprep.in_table_c21_c22,
    stringprep.in_table_c3,
    stringprep.in_table_c4,
    stringprep.in_table_c5,
    stringprep.in_table_c6,
    stringprep.in_table_c7,
    stringprep.in_table_c8,
    stringprep.in_table_c9,
)


def saslprep(text: str, allow_unassigned: bool = False) -> str:
    """Prepare ``text`` per RFC 4013; ValueError if it holds a prohibited character.

    ``allow_unassigned`` selects the "query" flavour of stringprep (RFC 3454 §7): true when
    comparing what a client sent, false (the default) for strings about to be stored.
    """
    # Printable ASCII (SPACE to "~") is in no mapping or prohibited table, NFKC keeps it and it
    # has no right-to-left character: the usual user name or password is its own SASLprep form,
    # without the table lookups per character below, a visible part of a login's CPU.
    if text.isascii() and text.isprintable():
        return text
    # §2.1 mapping: non-ASCII spaces become SPACE, "commonly mapped to nothing" characters go.
    mapped = "".join(
        " " if stringprep.in_table_c12(char) else char
        for char in text
        if not stringprep.in_table_b1(char)
    )
    # §2.2 normalisation.
    prepared = unicodedata.ucd_3_2_0.normalize("NFKC", mapped)
    for char in prepared:
        if any(in_table(char) for in_table in _PROHIBITED):
            raise ValueError(f"prohibited character U+{ord(char):04X}")
        if not allow_unassigned and stringprep.in_table_a1(char):
            raise ValueError(f"unassigned code point U+{ord(char):04X}")
    _check_bidi(prepared)
    return prepared


def _check_bidi(text: str) -> None:
    """RFC 3454 §6: right-to-left text must be wholly so, and start and end with an RTL char."""
    if not any(stringprep.in_table_d1(char) for char in text):
        return
    if any(stringprep.in_table_d2(char) for char in text):
        raise ValueError("mixes right-to-left and left-to-right characters")
    if not (stringprep.in_table_d1(text[0]) and stringprep.in_table_d1(text[-1])):
        raise ValueError("right-to-left text must start and end with a right-to-left character")
