"""XEP-0030 service discovery: the server's own info and items, and local accounts' on their behalf.

Other modules declare what they implement here (`add_server_feature`, `add_account_feature`,
`add_account_identity`, `add_server_item`, `add_account_items`), so the server advertises exactly
what is wired in.

Accounts: the server answers disco#info and disco#items sent to a local bare JID (RFC 6121
§8.5) only to the account's owner and to contacts the account shares its presence with
(subscription 'from' or 'both'), as Prosody and ejabberd do, because the answer reveals what
the account uses (PEP nodes, later). Everyone else, and any query to an account that does not
exist, gets <service-unavailable/> (RFC 6121 §8.5.1), so the two cases cannot be told apart.
Queries to a full JID are routed to that client and never reach this module.
"""

from collections.abc import Awaitable, Callable, Iterable
from typing import TYPE_CHECKING, Any

from twisted.words.protocols.jabber import error, xmlstream
from twisted.words.protocols.jabber.jid import JID
from twisted.words.xish import domish
from wokkel.disco import (
    NS_DISCO_INFO,
    NS_DISCO_ITEMS,
    DiscoFeature,
    DiscoIdentity,
    DiscoInfo,
    DiscoItem,
    DiscoItems,
)

from mim_twisted.im import caps
from mim_twisted.im.sessions import Session

if TYPE_CHECKING:
    from mim_twisted.im.router import Router

SERVER_NAME = "mim-twisted"

# The registered feature of a server that stores messages for offline users (XEP-0160).
FEATURE_MSGOFFLINE = "msgoffline"

# `provider(requester, account)` -> the items the requester may see at the account's bare JID.
ItemsProvider = Callable[[JID, JID], Iterable[DiscoItem] | Awaitable[Iterable[DiscoItem]]]


class DiscoService:
    """The disco#info and disco#items answers of the served domains and their accounts.

    The router only calls the handlers for served domains, so the service needs no list of them.

    ``rosters`` (an IRosterStore) lets contacts see an account's info; without it only the
    owner can.
    """

    def __init__(self, accounts: Any, rosters: Any = None) -> None:
        self.accounts = accounts
        self.rosters = rosters
        # XEP-0115 §7: the server does caps (its stream feature, the node below, and clients').
        self._server_features = {NS_DISCO_INFO, NS_DISCO_ITEMS, caps.NS_CAPS}
        self._account_features = {NS_DISCO_INFO, NS_DISCO_ITEMS}
        self._server_identities = [DiscoIdentity("server", "im", SERVER_NAME)]
        self._account_identities = [DiscoIdentity("account", "registered")]
        self._server_items: dict[str, list[DiscoItem]] = {}
        self._account_items: list[ItemsProvider] = []
        self._caps_node: str | None = None

    # -- registration by the modules that implement things ---------------------------------

    def add_server_feature(self, namespace: str) -> None:
        self._server_features.add(namespace)
        self._caps_node = None  # the server's caps hash changes with its features

    def add_server_identity(self, category: str, type: str, name: str | None = None) -> None:
        self._server_identities.append(DiscoIdentity(category, type, name))
        self._caps_node = None

    def add_account_feature(self, namespace: str) -> None:
        self._account_features.add(namespace)

    def add_account_identity(self, category: str, type: str, name: str | None = None) -> None:
        """E.g. pubsub/pep, which XEP-0163 puts on the accounts of a server with PEP."""
        self._account_identities.append(DiscoIdentity(category, type, name))

    def add_server_item(self, domain: str, jid: str, name: str | None = None) -> None:
        """List a service (e.g. ``pubsub.<domain>``) in the disco#items of ``domain``."""
        self._server_items.setdefault(domain, []).append(DiscoItem(JID(jid), name=name))

    def add_account_items(self, provider: ItemsProvider) -> None:
        """Add items (e.g. PEP nodes) to accounts' disco#items; see ItemsProvider."""
        self._account_items.append(provider)

    def install(self, router: "Router") -> None:
        router.server_iq[NS_DISCO_INFO, "query"] = self.server_info_request
        router.server_iq[NS_DISCO_ITEMS, "query"] = self.server_items_request
        router.account_iq[NS_DISCO_INFO, "query"] = self.account_info_request
        router.account_iq[NS_DISCO_ITEMS, "query"] = self.account_items_request

    # -- what is advertised ------------------------------------------------------------------

    def server_info(self) -> DiscoInfo:
        """The server's disco#info, the same for every served domain (its caps hash covers it)."""
        info = DiscoInfo()
        for identity in self._server_identities:
            info.append(identity)
        for namespace in sorted(self._server_features):
            info.append(DiscoFeature(namespace))
        return info

    def server_caps_node(self) -> str:
        """The node a client asks to check the server's stream-feature caps (XEP-0115 §6.2)."""
        if self._caps_node is None:
            ver = caps.hash_disco_info("sha-1", self.server_info().toElement())
            self._caps_node = f"{caps.SERVER_NODE}#{ver}"
        return self._caps_node

    # -- IQ handlers -------------------------------------------------------------------------

    def server_info_request(
        self, session: Session, iq: domish.Element, target: JID
    ) -> domish.Element:
        node = _node_of(iq)
        if node and node != self.server_caps_node():
            raise error.StanzaError("item-not-found")
        info = self.server_info()
        info.nodeIdentifier = node
        return _result(iq, info.toElement())

    def server_items_request(
        self, session: Session, iq: domish.Element, target: JID
    ) -> domish.Element:
        if _node_of(iq):
            raise error.StanzaError("item-not-found")
        items = DiscoItems()
        for item in self._server_items.get(target.host, ()):
            items.append(item)
        return _result(iq, items.toElement())

    async def account_info_request(
        self, session: Session, iq: domish.Element, target: JID
    ) -> domish.Element:
        node = _node_of(iq)
        await self._check_access(session.jid, target)
        if node:
            raise error.StanzaError("item-not-found")
        info = DiscoInfo()
        for identity in self._account_identities:
            info.append(identity)
        for namespace in sorted(self._account_features):
            info.append(DiscoFeature(namespace))
        return _result(iq, info.toElement())

    async def account_items_request(
        self, session: Session, iq: domish.Element, target: JID
    ) -> domish.Element:
        node = _node_of(iq)
        account = target.userhostJID()
        await self._check_access(session.jid, account)
        if node:
            raise error.StanzaError("item-not-found")
        items = DiscoItems()
        for provider in self._account_items:
            provided = provider(session.jid, account)
            if isinstance(provided, Awaitable):
                provided = await provided
            for item in provided:
                items.append(item)
        return _result(iq, items.toElement())

    async def _check_access(self, requester: JID, account: JID) -> None:
        if requester.userhost() == account.userhost():
            return
        if self.rosters is not None and await self.accounts.account_exists(
            account.host, account.user
        ):
            item = await self.rosters.get_item(account.host, account.user, requester.userhost())
            if item is not None and item.subscription in ("from", "both"):
                return
        raise error.StanzaError("service-unavailable")


def _node_of(iq: domish.Element) -> str:
    """The requested node of a disco get; disco is read-only, so a set is not allowed."""
    if iq.getAttribute("type") != "get":
        raise error.StanzaError("not-allowed", text="Service discovery is read with type 'get'")
    return next(iq.elements()).getAttribute("node", "")


def _result(iq: domish.Element, query: domish.Element) -> domish.Element:
    result = xmlstream.toResponse(iq, "result")
    result.addChild(query)
    return result
