"""What the server wrote, read back namespace-aware, as a client's XML parser sees it.

Tests compare qualified names (``{namespace}name``) rather than byte substrings, so an element
in the wrong namespace (an ``<error/>`` that is ``{jabber:client}error``) fails them.
"""

import xml.etree.ElementTree as ET
from dataclasses import dataclass, field

STREAMS = "http://etherx.jabber.org/streams"
STREAM_ERRORS = "urn:ietf:params:xml:ns:xmpp-streams"
STREAM_ERROR = f"{{{STREAMS}}}error"
STREAM_FEATURES = f"{{{STREAMS}}}features"

# Output that does not start with a stream header continues a stream the test has already
# read: it is parsed inside the header the server sends.
_CONTINUED_HEADER = (
    b"<stream:stream xmlns='jabber:client' xmlns:stream='http://etherx.jabber.org/streams'>"
)


@dataclass
class ServerOutput:
    headers: list[ET.Element] = field(default_factory=list)  # each stream's root element
    elements: list[ET.Element] = field(default_factory=list)  # the top-level children, in order
    closed: bool = False  # the last stream ended with </stream:stream>

    def stream_error(self) -> str | None:
        """The condition of the stream error the output ends with, None if it has none."""
        if not self.elements or self.elements[-1].tag != STREAM_ERROR:
            return None
        for child in self.elements[-1]:
            if (
                child.tag.startswith(f"{{{STREAM_ERRORS}}}")
                and child.tag != f"{{{STREAM_ERRORS}}}text"
            ):
                return child.tag.split("}", 1)[1]
        return None


def parse_server_output(data: bytes) -> ServerOutput:
    """Parse what the server wrote: one or more streams (each restart sends a new header).

    Raises ET.ParseError on output that is not well-formed or uses an undeclared prefix.
    """
    output = ServerOutput()
    documents = data.split(b"<?xml")
    if documents[0].strip():
        _parse_stream(_CONTINUED_HEADER + documents[0], output, continued=True)
    for document in documents[1:]:
        output.closed = False
        _parse_stream(b"<?xml" + document, output, continued=False)
    return output


def _parse_stream(document: bytes, output: ServerOutput, *, continued: bool) -> None:
    parser = ET.XMLPullParser(events=("start", "end"))
    parser.feed(document)
    depth = 0
    for event, element in parser.read_events():
        if event == "start":
            if depth == 0 and not continued:
                output.headers.append(element)
            depth += 1
        else:
            depth -= 1
            if depth == 1:
                output.elements.append(element)
            elif depth == 0:
                output.closed = True
