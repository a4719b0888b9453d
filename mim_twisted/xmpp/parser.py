"""The incoming XML stream parser: domish's expat stream with XMPP's restrictions.

RFC 6120 §11.1 forbids comments, processing instructions, DTDs and entity declarations in an
XML stream; rejecting the DOCTYPE as soon as it starts is also what stops a billion-laughs
document before any entity is expanded. The stanza size limit is counted exactly: the bytes
fed since the end of the last complete top-level element. The parser also says whether a
top-level element is open and counts those begun, so that the stream can limit the time one
stanza may take to arrive.
"""

import pyexpat

from twisted.words.xish import domish


class RestrictedXml(Exception):
    """The peer sent XML that RFC 6120 §11.1 does not allow in a stream."""


class StanzaTooLarge(Exception):
    """A single stanza grew past the size, element-count or nesting limit."""


# Real stanzas stay far below these; past them a stanza is an attack on memory or on the
# recursion of whatever walks the tree later (serialising it, for one).
MAX_DEPTH = 100
MAX_ELEMENTS = 10_000


class StreamParser(domish.ExpatElementStream):
    """Parses one XML stream; restarted streams get a new parser."""

    def __init__(self, max_stanza_size: int) -> None:
        super().__init__()
        # Our exact counts below replace domish's approximations (and its generic error).
        self.max_stanza_size = max_stanza_size
        self._depth = 0
        self._elements = 0
        self._bytes_fed = 0
        self._last_stanza_end = 0
        self.stanzas_started = 0  # top-level elements (stanzas, SASL, ...) begun so far
        parser = self.parser
        parser.SetParamEntityParsing(pyexpat.XML_PARAM_ENTITY_PARSING_NEVER)
        # Text in one piece where the data has it so (expat would split it at each line end
        # and character reference).
        parser.buffer_text = True
        parser.StartDoctypeDeclHandler = self._forbid("DTD")
        parser.EntityDeclHandler = self._forbid("entity declaration")
        parser.CommentHandler = self._forbid("comment")
        parser.ProcessingInstructionHandler = self._forbid("processing instruction")

    @staticmethod
    def _forbid(what: str):
        def handler(*args: object) -> None:
            raise RestrictedXml(f"{what} not allowed in an XML stream")

        return handler

    def parse(self, data: bytes) -> None:
        self._bytes_fed += len(data)
        try:
            self.parser.Parse(data)
        except pyexpat.error as e:
            raise domish.ParserError(str(e)) from None
        # A stanza still open at the end of the data may be growing without bound.
        self._check_size(self._bytes_fed)

    @property
    def in_stanza(self) -> bool:
        """Whether a top-level element has begun and not yet ended."""
        return self._depth > 1

    # The three handlers below build the same tree as domish's, in one call each instead of
    # ours and then domish's: they run for every element and every text of every stanza.

    def _onStartElement(self, name: str, attrs: dict) -> None:
        depth = self._depth = self._depth + 1
        if depth == 2:
            self.stanzas_started += 1
        self._elements += 1
        # The stream's root element is depth 1, a stanza depth 2.
        if depth > MAX_DEPTH + 1:
            raise StanzaTooLarge(f"elements nested deeper than {MAX_DEPTH}")
        if self._elements > MAX_ELEMENTS + 1:
            raise StanzaTooLarge(f"stanza of more than {MAX_ELEMENTS} elements")
        # Expat names an element or attribute in a namespace "uri name".
        uri, _, local = name.rpartition(" ")
        for key in attrs:
            if " " in key:
                attrs = _qualified(attrs)
                break
        element = domish.Element((uri, local), self.defaultNsStack[-1], attrs, self.localPrefixes)
        self.localPrefixes = {}
        parent = self.currElem
        if parent is not None:
            parent.children.append(element)
            element.parent = parent
            self.currElem = element
        elif self.documentStarted:
            self.currElem = element
        else:
            self.documentStarted = 1
            self.DocumentStartEvent(element)

    def _onEndElement(self, name: str) -> None:
        self._depth -= 1
        element = self.currElem
        if element is None:
            self.DocumentEndEvent()
        elif element.parent is None:
            # A stanza that ends within the data is checked before it is dispatched.
            end = self.parser.CurrentByteIndex
            self._check_size(end)
            self._last_stanza_end = end
            self._elements = 1  # the root
            self.ElementEvent(element)
            self.currElem = None
        else:
            self.currElem = element.parent

    def _onCdata(self, data: str) -> None:
        element = self.currElem
        if element is not None:
            children = element.children
            if children and isinstance(children[-1], str):
                children[-1] += data
            else:
                children.append(data)

    def _check_size(self, position: int) -> None:
        if position - self._last_stanza_end > self.max_stanza_size:
            raise StanzaTooLarge(f"stanza larger than {self.max_stanza_size} bytes")


def _qualified(attrs: dict[str, str]) -> dict:
    """Attributes with those in a namespace ("uri name") keyed (uri, name) and after the
    others, as domish has them."""
    plain: dict = {key: value for key, value in attrs.items() if " " not in key}
    for key, value in attrs.items():
        if " " in key:
            uri, _, name = key.rpartition(" ")
            plain[(uri, name)] = value
    return plain
