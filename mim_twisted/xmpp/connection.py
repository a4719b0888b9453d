"""What the stream layer and the layer above it (the IM core) know of each other.

A client stream negotiates TLS, SASL and resource binding by itself. Once a resource is bound it
asks a `SessionOpener` for a session, hands that `BoundSession` every stanza the client sends
and tells it when the connection is gone. The session talks back through the narrow
`ClientConnection`. So the stream layer never imports the IM core: the dependency points from
the IM core down to these protocols.
"""

from typing import Protocol, runtime_checkable

from twisted.internet.interfaces import IAddress
from twisted.words.protocols.jabber.jid import JID
from twisted.words.xish import domish


@runtime_checkable
class ClientConnection(Protocol):
    """A client's stream, as the layer above sees it."""

    domain: str | None  # the served domain the client named in its stream header
    peer: IAddress
    secure: bool  # TLS is on
    closed: bool  # nothing more is written: closing, or gone

    def send(self, stanza: domish.Element | bytes | str) -> None:
        """Write an element (in the jabber:client namespace) or serialised data."""

    def stream_error(
        self, condition: str, text: str | None = None, app_condition: domish.Element | None = None
    ) -> None:
        """Send a stream error (RFC 6120 §4.9), with an application-specific condition if
        given, and close the connection."""


@runtime_checkable
class BoundSession(Protocol):
    """The session of a bound resource: what the stream hands its stanzas to."""

    def stanza_received(self, stanza: domish.Element) -> None:
        """A stanza from the client, its 'from' stamped with the session's full JID."""

    def send(self, stanza: domish.Element | bytes | str) -> None:
        """A stanza to the client, sent the way the session sends its own: counted for stream
        management (XEP-0198), held back from an inactive client (XEP-0352)."""

    def nonza_received(self, element: domish.Element) -> None:
        """A top-level element from the client that is not a stanza: XEP-0198 stream management
        (<enable/>, <r/>, <a/>), XEP-0352 client state (<active/>, <inactive/>), or unknown."""

    def connection_lost(self, connection: ClientConnection, *, abrupt: bool = False) -> None:
        """`connection` is gone; nothing can be sent to it any more. `abrupt`: it broke
        without the stream being closed by either side, so its client may come back and
        resume the session (XEP-0198)."""


@runtime_checkable
class SessionOpener(Protocol):
    """The layer above the streams; it opens a session for each bound resource."""

    def open_session(self, connection: ClientConnection, jid: JID) -> BoundSession:
        """The client bound `jid` on `connection`: a session that takes its stanzas."""

    def resume_session(
        self, connection: ClientConnection, user: JID, request: domish.Element
    ) -> BoundSession | None:
        """An XEP-0198 <resume/> on `connection`, authenticated as the bare JID `user`: the
        session it resumes (told so and sent what it missed), or None (told why)."""
