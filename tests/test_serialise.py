"""The stanza serialiser writes what domish's toXml writes, and the stream parser builds the tree
domish's parser builds."""

from twisted.trial import unittest
from twisted.words.xish import domish

from mim_twisted.xmpp.parser import StreamParser
from mim_twisted.xmpp.serialise import to_bytes, to_xml

HEADER = (
    b"<stream:stream xmlns='jabber:client' xmlns:stream='http://etherx.jabber.org/streams'"
    b" xmlns:pre='urn:example:declared-on-the-stream' to='localhost' version='1.0'>"
)

# Stanzas as clients send them, the unusual next to the usual.
STANZAS = [
    b"<message type='chat' to='bob@localhost' id='1'><body>Hello</body></message>",
    b"<message to='bob@localhost'><body>a &amp; b &lt; c &gt; d 'q' \"dq\"</body></message>",
    b"<message to='bob@localhost' id='&apos;&quot;&amp;&lt;&gt;'><body/></message>",
    b"<message to='bob@localhost'><body>line one\nline two &#x263A; \xe2\x98\x83</body>"
    b"<active xmlns='http://jabber.org/protocol/chatstates'/></message>",
    b"<presence xml:lang='en'><show>away</show><status xml:lang='de'>weg</status>"
    b"<c xmlns='http://jabber.org/protocol/caps' hash='sha-1' node='n' ver='v='/></presence>",
    b"<iq type='set' id='2'><query xmlns='jabber:iq:roster'><item jid='a@b' name='A'>"
    b"<group>Friends</group></item></query></iq>",
    # Prefixes, declared on the stanza or on the stream: domish's serializer writes them.
    b"<message to='bob@localhost'><x:data xmlns:x='urn:example:x' x:attr='1'>t</x:data></message>",
    b"<message to='bob@localhost'><pre:thing>declared on the stream</pre:thing></message>",
    b"<message xmlns:y='urn:example:y' to='bob@localhost' y:flag='on'><body>b</body></message>",
    # A child back in the default namespace under one in another.
    b"<iq type='get' id='3'><query xmlns='urn:example:q'><inner xmlns='jabber:client'/>"
    b"</query></iq>",
    b"<message to='bob@localhost'><x xmlns=''><y>no namespace</y></x></message>",
]


def parse_all(parser: domish.ExpatElementStream, data: list[bytes]) -> list[domish.Element]:
    elements: list[domish.Element] = []
    parser.DocumentStartEvent = lambda root: None
    parser.ElementEvent = elements.append
    parser.DocumentEndEvent = lambda: None
    for chunk in data:
        parser.parse(chunk)
    return elements


def shape(element: domish.Element) -> tuple:
    """Everything domish keeps of an element, to compare two trees."""
    children = tuple(
        shape(child) if isinstance(child, domish.Element) else child for child in element.children
    )
    return (
        element.uri,
        element.name,
        element.defaultUri,
        tuple(element.attributes.items()),
        tuple(element.localPrefixes.items()),
        children,
    )


class SerialiserTests(unittest.TestCase):
    def test_parsed_stanzas_as_domish_writes_them(self) -> None:
        stanzas = parse_all(domish.elementStream(), [HEADER, *STANZAS])
        self.assertEqual(len(stanzas), len(STANZAS))
        for stanza in stanzas:
            stanza["from"] = "alice@localhost/desk"
            for default in ("jabber:client", ""):
                self.assertEqual(to_xml(stanza, default), stanza.toXml(defaultUri=default))
            self.assertEqual(to_bytes(stanza), stanza.toXml(defaultUri="jabber:client").encode())

    def test_built_elements_as_domish_writes_them(self) -> None:
        message = domish.Element((None, "message"))
        message["to"] = "bob@localhost"
        message.addElement("body", content="x < y")
        carbon = message.addElement(("urn:xmpp:carbons:2", "sent"))
        forwarded = carbon.addElement(("urn:xmpp:forward:0", "forwarded"))
        forwarded.addRawXml("<message xmlns='jabber:client'><body>raw</body></message>")
        error = domish.Element(("jabber:client", "iq"))
        error.addElement(("urn:ietf:params:xml:ns:xmpp-stanzas", "item-not-found"))
        empty = domish.Element(("urn:example", "empty"), defaultUri="urn:example")
        for element in (message, error, empty):
            self.assertEqual(to_xml(element), element.toXml(defaultUri="jabber:client"))

    def test_an_element_in_a_prefixed_namespace(self) -> None:
        element = domish.Element(("urn:example:p", "thing"), defaultUri="jabber:client")
        self.assertEqual(to_xml(element), element.toXml(defaultUri="jabber:client"))
        self.assertIn("xmlns:xn0='urn:example:p'", to_xml(element))


class StreamParserTreeTests(unittest.TestCase):
    def test_the_tree_is_domish_s(self) -> None:
        ours = parse_all(StreamParser(1 << 20), [HEADER, *STANZAS])
        theirs = parse_all(domish.elementStream(), [HEADER, *STANZAS])
        self.assertEqual([shape(e) for e in ours], [shape(e) for e in theirs])
        for element in ours:
            self.assertIsNone(element.parent)

    def test_byte_by_byte(self) -> None:
        data = HEADER + b"".join(STANZAS)
        ours = parse_all(StreamParser(1 << 20), [data[i : i + 1] for i in range(len(data))])
        theirs = parse_all(domish.elementStream(), [HEADER, *STANZAS])
        self.assertEqual([shape(e) for e in ours], [shape(e) for e in theirs])

    def test_the_stream_s_end(self) -> None:
        parser = StreamParser(1 << 20)
        ended: list[bool] = []
        parse_all(parser, [HEADER])
        parser.DocumentEndEvent = lambda: ended.append(True)
        parser.parse(b"</stream:stream>")
        self.assertEqual(ended, [True])
