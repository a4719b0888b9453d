"""The table of bound sessions: which full JIDs are connected here.

The router reaches sessions only through this small interface ("the session for this full JID",
"the sessions of this bare JID"), so that a shared implementation can later replace the local one
when several nodes serve the same domains.
"""

from typing import Protocol

from twisted.words.protocols.jabber.jid import JID


class Session(Protocol):
    """What the session table needs of a connected, bound client stream."""

    jid: JID
    closed: bool

    def send(self, stanza: object) -> None: ...

    def replaced(self) -> None:
        """Another connection bound the same full JID: close this one with <conflict/>."""


class SessionManager:
    """The local session table: bare JID -> {resource: session}."""

    def __init__(self) -> None:
        self._by_bare: dict[JID, dict[str, Session]] = {}

    def bind(self, session: Session) -> None:
        """Register a session under its full JID; an existing session there is replaced."""
        jid = session.jid
        resources = self._by_bare.setdefault(jid.userhostJID(), {})
        previous = resources.get(jid.resource)
        resources[jid.resource] = session
        if previous is not None and previous is not session:
            previous.replaced()

    def unbind(self, session: Session) -> None:
        """Forget a session, unless another one has already replaced it."""
        bare = session.jid.userhostJID()
        resources = self._by_bare.get(bare)
        if resources is None or resources.get(session.jid.resource) is not session:
            return
        del resources[session.jid.resource]
        if not resources:
            del self._by_bare[bare]

    # A session that is closing (its stream error sent, the connection not yet gone) is no
    # longer found: whatever would be sent to it now would be lost.

    def session(self, full_jid: JID) -> Session | None:
        session = self._by_bare.get(full_jid.userhostJID(), {}).get(full_jid.resource)
        return None if session is None or session.closed else session

    def sessions_of(self, bare_jid: JID) -> list[Session]:
        resources = self._by_bare.get(bare_jid.userhostJID(), {})
        return [session for session in resources.values() if not session.closed]

    def __len__(self) -> int:
        return sum(len(resources) for resources in self._by_bare.values())
