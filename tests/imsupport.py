"""What the IM core's unit tests share: a fake client session, stanza helpers, and the IM core as
`tap.build_im_core` wires it, on a memory database."""

from collections.abc import Callable

from twisted.internet import defer
from twisted.internet.task import Clock
from twisted.trial import unittest
from twisted.words.protocols.jabber.jid import JID
from twisted.words.xish import domish

from mim_twisted.config import load_config
from mim_twisted.hooks import Hooks
from mim_twisted.im.roster import NS_ROSTER
from mim_twisted.im.router import Router
from mim_twisted.im.sessions import SessionManager
from mim_twisted.storage.interfaces import RosterItem
from mim_twisted.storage.memory import MemoryDatabase
from mim_twisted.tap import build_im_core
from mim_twisted.xmpp.namespaces import STANZAS

DOMAINS = frozenset({"localhost", "example.org"})


class FakeSession:
    """Stands in for an IM `Session` and its connection: the same IM state, and it keeps what it
    is sent as a client reads it: serialised as C2SStream writes it, then parsed
    namespace-aware."""

    def __init__(self, jid: str, *, secure: bool = True) -> None:
        self.jid = JID(jid)
        self.full_jid = self.jid.full()
        self.secure = secure
        self.presence: domish.Element | None = None
        self.priority = 0
        self.message_priority: int | None = None
        self.directed_to: set[str] = set()
        self.roster_requested = False
        self.caps: tuple[str, str] | None = None
        self.caps_features: frozenset[str] | None = None
        self.held_messages: list[domish.Element] | None = None
        self.holds = 0
        self.carbons = False
        self.block_list_requested = False
        self.ledger = None  # no stream management (XEP-0198)
        self.sent: list[domish.Element] = []
        self.stream_errors: list[str] = []
        self.closed = False  # as on C2SStream: once closed, nothing more is sent

    def send(self, stanza: domish.Element | bytes | str) -> None:
        if self.closed:
            return
        if isinstance(stanza, domish.Element):
            stanza = stanza.toXml(defaultUri="jabber:client")
        elif isinstance(stanza, bytes):
            stanza = stanza.decode("utf-8")
        self.sent.append(parse(stanza))

    def replaced(self) -> None:
        self.stream_error("conflict")

    def stream_error(
        self, condition: str, text: str | None = None, app_condition: domish.Element | None = None
    ) -> None:
        self.stream_errors.append(condition)
        self.closed = True

    def last(self) -> domish.Element:
        return self.sent[-1]

    def take(self) -> list[domish.Element]:
        """What the session was sent since the last take, forgotten."""
        sent, self.sent = self.sent, []
        return sent


def parse(xml: str) -> domish.Element:
    """One stanza, parsed in the jabber:client namespace as the C2S stream would."""
    parsed: list[domish.Element] = []
    stream = domish.elementStream()
    stream.DocumentStartEvent = lambda root: None
    stream.ElementEvent = parsed.append
    stream.DocumentEndEvent = lambda: None
    stream.parse(f"<stream xmlns='jabber:client'>{xml}</stream>".encode())
    return parsed[0]


def error_condition(stanza: domish.Element) -> str | None:
    """The defined condition of an error stanza, None if it is not one."""
    if stanza.getAttribute("type") != "error":
        return None
    element = next(child for child in stanza.elements() if child.name == "error")
    for child in element.elements():
        if child.uri == STANZAS and child.name != "text":
            return child.name
    return None


def make_router(sessions: SessionManager, clock: Clock) -> Router:
    """A real router; presence and messages are not routed by the tests that use it."""
    return Router(DOMAINS, sessions, clock, presence=None, messages=None, hooks_table=Hooks())


def send(router: Router, session: FakeSession, xml: str) -> domish.Element | None:
    """Route a stanza from the session (stamped with its full JID) and return its answer."""
    before = len(session.sent)
    stanza = parse(xml)
    stanza["from"] = session.jid.full()
    router.route_from_client(session, stanza)
    return session.sent[-1] if len(session.sent) > before else None


def summary(stanza: domish.Element) -> tuple[str, str | None, str | None, str | None]:
    """(name, type, from, to) of a stanza, for comparing what a session was sent."""
    return (
        stanza.name,
        stanza.getAttribute("type"),
        stanza.getAttribute("from"),
        stanza.getAttribute("to"),
    )


def pushed_items(stanzas: list[domish.Element]) -> list[dict[str, str]]:
    """The attributes of the items of the roster pushes among the stanzas."""
    return [
        dict(item.attributes)
        for stanza in stanzas
        if stanza.name == "iq" and stanza.getAttribute("type") == "set"
        for query in stanza.elements(NS_ROSTER, "query")
        for item in query.elements(NS_ROSTER, "item")
    ]


class HeldStore:
    """A store whose calls wait, in order, until the test lets them through.

    With `answers_only`, the calls are made at once and only their answers wait: what the test
    does in between comes after them in the store.
    """

    def __init__(self, store: object, *, answers_only: bool = False) -> None:
        self.inner = store  # not `store`: IOfflineStore has a method of that name
        self.answers_only = answers_only
        self.waiting: list[tuple[str, Callable[[], None]]] = []

    def __getattr__(self, name: str) -> Callable[..., defer.Deferred]:
        method = getattr(self.inner, name)

        def call(*args: object) -> defer.Deferred:
            answer: defer.Deferred = defer.Deferred()
            if self.answers_only:
                result = method(*args)
                self.waiting.append((name, lambda: result.chainDeferred(answer)))
            else:
                self.waiting.append((name, lambda: method(*args).chainDeferred(answer)))
            return answer

        return call

    def calls(self) -> list[str]:
        return [name for name, _ in self.waiting]

    def release(self) -> None:
        """Let the oldest waiting call through."""
        _, run = self.waiting.pop(0)
        run()

    def release_all(self) -> None:
        """Let the calls through one by one, the oldest first, until none waits."""
        while self.waiting:
            self.release()


def without_pushes(stanzas: list[domish.Element]) -> list[domish.Element]:
    return [stanza for stanza in stanzas if stanza.name != "iq"]


class ImCoreTestCase(unittest.TestCase):
    """The IM core of the default configuration, serving localhost with the accounts `users`.

    Sessions are FakeSessions bound as `Router.open_session` binds them; stanzas go to the core's
    router stamped with the session's full JID, as C2SStream stamps them.
    """

    users = ("alice", "bob", "carol")

    def setUp(self) -> None:
        self.config = load_config(None)
        self.database = MemoryDatabase()
        for user in self.users:
            self.successResultOf(self.database.accounts.create_account("localhost", user, {}))
        self.build()

    def build(self) -> None:
        """(Re)build the core on self.config and self.database."""
        self.clock = Clock()
        self.core = build_im_core(self.config, self.database, self.clock)
        self.connected: list[FakeSession] = []

    def connect(self, jid: str, *, roster: bool = True) -> FakeSession:
        """A bound session; `roster`: it has asked for the roster, so it gets roster pushes."""
        session = FakeSession(jid)
        session.roster_requested = roster
        self.core.sessions.bind(session)
        self.connected.append(session)
        return session

    def online(self, jid: str, priority: int | None = None, *, roster: bool = True) -> FakeSession:
        """A session that has sent initial presence; what any session was sent is forgotten."""
        session = self.connect(jid, roster=roster)
        self.send(session, presence_xml(priority=priority))
        self.forget()
        return session

    def forget(self) -> None:
        """Forget what every session was sent so far."""
        for session in self.connected:
            session.take()

    def send(self, session: FakeSession, xml: str) -> None:
        stanza = parse(xml)
        stanza["from"] = session.jid.full()
        self.core.router.route_from_client(session, stanza)

    def disconnect(self, session: FakeSession) -> None:
        """The connection is lost: closed, unbound, then ended, in the order of C2SStream's
        connectionLost and `Router.close_session`."""
        session.closed = True
        self.core.sessions.unbind(session)
        self.core.router.session_ended(session)

    def put(self, owner: str, item: RosterItem) -> None:
        # Through the core, which holds the rosters of the accounts online.
        self.successResultOf(self.core.roster.rosters.put_item("localhost", owner, item))

    def item(self, owner: str, contact: str) -> RosterItem | None:
        return self.successResultOf(self.database.rosters.get_item("localhost", owner, contact))

    def subscribe(self, user: str, contact: str) -> None:
        """Store a granted subscription: `user` sees the presence of `contact` (both local)."""
        for owner, other, half in ((user, contact, "to"), (contact, user, "from")):
            jid = f"{other}@localhost"
            current = self.item(owner, jid)
            old = "none" if current is None else current.subscription
            self.put(owner, RosterItem(jid, subscription=half if old in ("none", half) else "both"))


def presence_xml(
    type: str | None = None,
    to: str | None = None,
    priority: int | str | None = None,
    status: str | None = None,
) -> str:
    attributes = "".join(
        f" {name}='{value}'" for name, value in (("type", type), ("to", to)) if value is not None
    )
    children = ""
    if priority is not None:
        children += f"<priority>{priority}</priority>"
    if status is not None:
        children += f"<status>{status}</status>"
    return f"<presence{attributes}>{children}</presence>"
