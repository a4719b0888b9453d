"""XEP-0054 vcard-temp: each account's vCard, set by the account, read by anyone.

The server answers for the account's bare JID (§3.3: never forwarded to a resource). A get with
no 'to' or to one's own bare JID reads one's own vCard, answered with an empty <vCard/> when
none is stored (§3.1 allows it, and clients take it better than an error). A get of another
account's vCard that is not there is an error (§3.3's MUST), `service-unavailable`, the same for
an account without a vCard and one that does not exist (RFC 6121 §8.5.1), so a query does not
tell which accounts exist. A set replaces the whole vCard (§3.2), only one's own (`forbidden`),
and only up to `[vcard] max_size` bytes of serialised XML (`not-acceptable`).

XEP-0153 avatars need nothing more here: the client puts the photo's hash in its presence
(<x xmlns='vcard-temp:x:update'/>) and the server broadcasts that presence as it is. The server
does not add or correct the hash itself (XEP-0153 gives it no part in it; ejabberd's
mod_vcard_xupdate does it for clients that cannot).
"""

from typing import TYPE_CHECKING

from twisted.internet import defer
from twisted.words.protocols.jabber import error, xmlstream
from twisted.words.protocols.jabber.jid import JID
from twisted.words.xish import domish

from mim_twisted.im.sessions import Session
from mim_twisted.im.stanzas import error_without_request
from mim_twisted.storage.interfaces import AccountNotFound, IVCardStore, fragment_size

if TYPE_CHECKING:
    from mim_twisted.im.disco import DiscoService
    from mim_twisted.im.router import Router

NS_VCARD = "vcard-temp"


class VCards:
    """The vcard-temp handler of the accounts' bare JIDs."""

    def __init__(self, store: IVCardStore, max_size: int) -> None:
        self.store = store
        self.max_size = max_size

    def install(self, router: "Router", disco: "DiscoService") -> None:
        router.account_iq[NS_VCARD, "vCard"] = self.handle_iq
        disco.add_server_feature(NS_VCARD)
        disco.add_account_feature(NS_VCARD)

    def handle_iq(self, session: Session, iq: domish.Element, target: JID) -> defer.Deferred:
        return defer.Deferred.fromCoroutine(self._handle_iq(session, iq, target))

    async def _handle_iq(
        self, session: Session, iq: domish.Element, target: JID
    ) -> domish.Element | None:
        own = target.userhost() == session.jid.userhost()
        if iq["type"] == "get":
            stored = await self.store.get_vcard(target.host, target.user)
            if stored is None and not own:
                raise error.StanzaError("service-unavailable")
            result = xmlstream.toResponse(iq, "result")
            if stored is None:
                result.addElement((NS_VCARD, "vCard"))
            else:
                result.addRawXml(stored)
            return result
        if not own:
            raise error.StanzaError("forbidden", text="Only the account sets its vCard")
        vcard = next(iq.elements()).toXml()
        if fragment_size(vcard) > self.max_size:
            limit = f"A vCard is limited to {self.max_size} bytes"
            return error_without_request(iq, "not-acceptable", limit)
        try:
            await self.store.set_vcard(session.jid.host, session.jid.user, vcard)
        except AccountNotFound:
            raise error.StanzaError("item-not-found", text="The account is gone") from None
        return None
