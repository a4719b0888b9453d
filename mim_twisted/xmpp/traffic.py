"""The traffic log (`--log-traffic`, `log.traffic`): what a client sends and receives, without
its credentials.

Received data is logged per parsed element rather than per TCP read: a read may end in the
middle of a password, which no scanner of raw chunks can redact without holding state across
reads, while the parser hands over whole elements. An element is logged (re-serialised) before
it is acted on; the stream header and its end are logged as they arrive. What a parse error
stops is not logged: the stream error says why.

Sent elements are redacted the same way; data the server sends already serialised (stream
headers, stream errors, PubSub notifications serialised once for all their recipients) never
carries credentials and is logged as it is.

Redacted: the payload of SASL <auth/>, <response/>, <challenge/> and <success/> (a PLAIN
password, a SCRAM proof or server signature), the <password/> of in-band registration and of
legacy authentication (and its <digest/>), and the values of data-form fields of type
text-private or named "password". Everything else, message bodies included, is logged.

Each entry is one log line: the XML is written as a quoted Python string, so a newline in a
message body cannot start a forged line (a fake authentication failure, say).
"""

from collections.abc import Callable

from twisted.logger import Logger
from twisted.words.xish import domish

from mim_twisted.xmpp import namespaces
from mim_twisted.xmpp.credentials import credential_elements

log = Logger()

REDACTED = "[redacted]"
# Stream-level elements (features, errors) as the stream header declares them.
_STREAM_PREFIXES = {namespaces.STREAMS: "stream"}


def redacted_xml(element: domish.Element, default_uri: str = namespaces.CLIENT) -> str:
    """``element`` serialised with the text of every secret replaced by REDACTED.

    The element itself is left as it was: it is still to be handled or sent.
    """
    hidden = [
        (secret, secret.children)
        for secret in credential_elements(element)
        if any(isinstance(child, str) and child.strip() for child in secret.children)
    ]
    for secret, _children in hidden:
        secret.children = [REDACTED]
    try:
        return element.toXml(
            prefixes=_STREAM_PREFIXES, defaultUri=default_uri, prefixesInScope=["stream"]
        )
    finally:
        for secret, children in hidden:
            secret.children = children


def log_received_events(parser: domish.ExpatElementStream, peer: Callable[[], str]) -> None:
    """Log what ``parser`` dispatches (the stream header, each element, the stream's end)
    before its handlers get it; ``peer`` names the connection at the time."""
    on_start, on_element, on_end = (
        parser.DocumentStartEvent,
        parser.ElementEvent,
        parser.DocumentEndEvent,
    )

    def start(root: domish.Element) -> None:
        _log("RECV", peer(), root.toXml(closeElement=0))
        on_start(root)

    def element(received: domish.Element) -> None:
        _log("RECV", peer(), redacted_xml(received))
        on_element(received)

    def end() -> None:
        _log("RECV", peer(), "</stream:stream>")
        on_end()

    parser.DocumentStartEvent, parser.ElementEvent, parser.DocumentEndEvent = start, element, end


def log_sent(peer: str, data: domish.Element | bytes | str) -> None:
    """Log what is about to be sent to ``peer``."""
    if isinstance(data, domish.Element):
        text = redacted_xml(data)
    elif isinstance(data, bytes):
        text = data.decode("utf-8", "replace")
    else:
        text = data
    _log("SEND", peer, text)


def _log(direction: str, peer: str, xml: str) -> None:
    log.info("{direction} {peer}: {xml!r}", direction=direction, peer=peer, xml=xml)
