"""XML documents that a server must refuse, shared by the protocol and end-to-end tests."""

_ENTITIES = b"".join(b'<!ENTITY l%d "%s">' % (i, b"&l%d;" % (i - 1) * 10) for i in range(1, 10))

# Nine levels of ten-fold entity expansion: 10^9 "lol"s if a parser ever expanded it.
BILLION_LAUGHS = (
    b'<?xml version="1.0"?><!DOCTYPE lolz [<!ENTITY l0 "lol">' + _ENTITIES + b"]><lolz>&l9;</lolz>"
)
