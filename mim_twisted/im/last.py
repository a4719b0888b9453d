"""XEP-0012 Last Activity: the server's uptime, and when an offline user was last online.

A query to a served domain is answered with the seconds since the server started (§5). A query
to an account's bare JID (§4) is answered only to the owner and to contacts the account shares
its presence with (subscription 'from' or 'both'), as presence itself; anyone else gets
<forbidden/>, whether the account exists or not. An account with an available resource was
active 0 seconds ago; otherwise the answer is the time since its last logout, with the status
of its last unavailable presence. An account with nothing stored gets <service-unavailable/>
(RFC 6121 §8.5.1, as if it did not exist). Queries to a full JID go to that client (its idle
time), through the router.
"""

from typing import TYPE_CHECKING

from twisted.internet.interfaces import IReactorTime
from twisted.words.protocols.jabber import error, xmlstream
from twisted.words.protocols.jabber.jid import JID
from twisted.words.xish import domish

from mim_twisted import hooks
from mim_twisted.im.sessions import Session, SessionManager
from mim_twisted.storage.interfaces import ILastActivityStore, IRosterStore, LastActivity

if TYPE_CHECKING:
    from mim_twisted.im.disco import DiscoService
    from mim_twisted.im.router import Router

NS_LAST = "jabber:iq:last"


def last_activity_result(iq: domish.Element, seconds: int, status: str = "") -> domish.Element:
    result = xmlstream.toResponse(iq, "result")
    query = result.addElement((NS_LAST, "query"))
    query["seconds"] = str(max(0, seconds))
    if status:
        query.addContent(status)
    return result


def unavailable_status(presence: domish.Element | None) -> str:
    """The <status/> of an unavailable presence; "" for none, or for a lost connection."""
    if presence is None:
        return ""
    element = next(presence.elements(presence.uri, "status"), None)
    return "" if element is None else str(element)


class LastActivityService:
    def __init__(
        self,
        store: ILastActivityStore,
        rosters: IRosterStore,
        sessions: SessionManager,
        clock: IReactorTime,
    ) -> None:
        self.store = store
        self.rosters = rosters
        self.sessions = sessions
        self.clock = clock
        self.started_at = clock.seconds()

    def install(self, router: "Router", disco: "DiscoService", hooks_table: hooks.Hooks) -> None:
        router.server_iq[NS_LAST, "query"] = self.server_uptime
        router.account_iq[NS_LAST, "query"] = self.account_last_activity
        disco.add_server_feature(NS_LAST)
        hooks_table.add(hooks.USER_UNAVAILABLE, self.user_unavailable)

    def _now(self) -> int:
        return int(self.clock.seconds())

    def server_uptime(self, session: Session, iq: domish.Element, target: JID) -> domish.Element:
        _require_get(iq)
        return last_activity_result(iq, int(self.clock.seconds() - self.started_at))

    async def account_last_activity(
        self, session: Session, iq: domish.Element, target: JID
    ) -> domish.Element:
        _require_get(iq)
        if not await self._may_see_presence(session.jid.userhostJID(), target):
            raise error.StanzaError("forbidden")
        if any(s.presence is not None for s in self.sessions.sessions_of(target)):
            return last_activity_result(iq, 0)  # §4: online now
        activity = await self.store.get_last_activity(target.host, target.user)
        if activity is None:
            raise error.StanzaError("service-unavailable")
        return last_activity_result(iq, self._now() - activity.logged_out_at, activity.status)

    async def _may_see_presence(self, requester: JID, account: JID) -> bool:
        if requester == account:
            return True
        item = await self.rosters.get_item(account.host, account.user, requester.userhost())
        return item is not None and item.subscription in ("from", "both")

    def user_unavailable(self, session: Session, presence: domish.Element | None) -> object:
        """A session ended its availability: remember when, and with what status."""
        activity = LastActivity(self._now(), unavailable_status(presence))
        return self.store.set_last_activity(session.jid.host, session.jid.user, activity)


def _require_get(iq: domish.Element) -> None:
    if iq.getAttribute("type") != "get":
        raise error.StanzaError("bad-request", text="Last activity is read with type 'get'")
