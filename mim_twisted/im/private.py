"""XEP-0049 private XML storage: each account keeps XML fragments on the server, one per
namespace (bookmarks of older clients in 'storage:bookmarks', client preferences ...).

Only the account itself reads and writes them (§2.3: `forbidden` for anyone else). A set stores
each child of <query/> under its namespace, replacing what was there; several children of one
namespace are kept together, as a result may hold them (§2.3). A get names the namespaces with
empty children and is answered with what is stored, or with the empty child when nothing is.
An empty <query/> is `not-acceptable` (§2.3's MUST; its later "bad format" has no RFC 6120
condition), and so are the namespaces that would confuse the stream or this protocol:
'jabber:client', 'jabber:server' and 'jabber:iq:private' itself (§2.3 lets servers refuse
reserved namespaces). An account's fragments together take at most `[private] max_size` bytes.
"""

from collections import defaultdict
from typing import TYPE_CHECKING

from twisted.internet import defer
from twisted.words.protocols.jabber import error, xmlstream
from twisted.words.protocols.jabber.jid import JID
from twisted.words.xish import domish

from mim_twisted.im.sessions import Session
from mim_twisted.im.stanzas import error_without_request
from mim_twisted.storage.interfaces import AccountNotFound, IPrivateStore

if TYPE_CHECKING:
    from mim_twisted.im.disco import DiscoService
    from mim_twisted.im.router import Router

NS_PRIVATE = "jabber:iq:private"
RESERVED_NAMESPACES = frozenset({"", "jabber:client", "jabber:server", NS_PRIVATE})


def fragments_by_namespace(query: domish.Element) -> dict[str, str]:
    """The children of a set's <query/>, serialised and joined per namespace.

    Raises StanzaError `not-acceptable` for a query without children or with a reserved
    namespace.
    """
    fragments: defaultdict[str, list[str]] = defaultdict(list)
    for child in query.elements():
        namespace = _namespace(child)
        # Serialised on its own, the child declares its namespace (and those inside it).
        fragments[namespace].append(child.toXml())
    if not fragments:
        raise error.StanzaError("not-acceptable", text="Nothing to store")
    return {namespace: "".join(parts) for namespace, parts in fragments.items()}


def requested_elements(query: domish.Element) -> dict[str, tuple[str, str]]:
    """{namespace: (namespace, name)} of the (first) child per namespace of a get's <query/>,
    in order; `not-acceptable` as for a set."""
    requested: dict[str, tuple[str, str]] = {}
    for child in query.elements():
        requested.setdefault(_namespace(child), (child.uri, child.name))
    if not requested:
        raise error.StanzaError("not-acceptable", text="Name the namespace to read")
    return requested


def _namespace(child: domish.Element) -> str:
    namespace = child.uri or ""
    if namespace in RESERVED_NAMESPACES:
        raise error.StanzaError(
            "not-acceptable", text=f"The namespace '{namespace}' cannot be stored"
        )
    return namespace


class PrivateStorage:
    """The jabber:iq:private handler of the accounts' bare JIDs."""

    def __init__(self, store: IPrivateStore, max_size: int) -> None:
        self.store = store
        self.max_size = max_size

    def install(self, router: "Router", disco: "DiscoService") -> None:
        router.account_iq[NS_PRIVATE, "query"] = self.handle_iq
        disco.add_server_feature(NS_PRIVATE)

    def handle_iq(self, session: Session, iq: domish.Element, target: JID) -> defer.Deferred:
        return defer.Deferred.fromCoroutine(self._handle_iq(session, iq, target))

    async def _handle_iq(
        self, session: Session, iq: domish.Element, target: JID
    ) -> domish.Element | None:
        if target.userhost() != session.jid.userhost():
            raise error.StanzaError("forbidden", text="Private XML is its owner's alone")
        query = next(iq.elements())
        account = (session.jid.host, session.jid.user)
        if iq["type"] == "get":
            requested = requested_elements(query)
            stored = await self.store.get_fragments(*account, list(requested))
            result = xmlstream.toResponse(iq, "result")
            answer = result.addElement((NS_PRIVATE, "query"))
            for namespace, qualified_name in requested.items():
                if namespace in stored:
                    answer.addRawXml(stored[namespace])
                else:
                    answer.addElement(qualified_name)  # nothing stored: the empty element
            return result
        fragments = fragments_by_namespace(query)
        try:
            stored = await self.store.set_fragments(*account, fragments, self.max_size)
        except AccountNotFound:
            raise error.StanzaError("item-not-found", text="The account is gone") from None
        if not stored:
            limit = f"Private XML is limited to {self.max_size} bytes per account"
            return error_without_request(iq, "not-acceptable", limit)
        return None
