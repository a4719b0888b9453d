"""The roster protocol (RFC 6121 §2, jabber:iq:roster) with roster versioning (XEP-0237).

Wiring (in tap.py): ``router.account_iq[(NS_ROSTER, "query")] = service.handle_iq`` and
``c2s_factory.bound_features.extend(stream_features())``.

A resource becomes "interested" (§2.2) by asking for the roster: from then on it receives a
roster push for every change, whether the change comes from a roster set here or from a
subscription change in the presence layer (`push`). The version is the store's change counter;
a client that already holds the current version gets an empty result, and later changes as
pushes (§2.6.3). Items with ``in_roster=False`` only hold a pending inbound subscription request
(RFC 6121 Appendix A.1, state 3) and are neither listed nor pushed.

Every read-modify-write of a user's roster item, here and in the presence layer, holds the user's
key in the `locks.KeyedLock` that both are given, so that neither overwrites what the other wrote
in between; the pushes go out in the order of the versions.
"""

import dataclasses
import secrets
from collections.abc import Callable
from typing import Any

from twisted.internet import defer
from twisted.words.protocols.jabber import xmlstream
from twisted.words.protocols.jabber.error import StanzaError
from twisted.words.protocols.jabber.jid import JID, InvalidFormat
from twisted.words.xish import domish

from mim_twisted.im import subscription
from mim_twisted.im.locks import KeyedLock
from mim_twisted.im.sessions import Session, SessionManager
from mim_twisted.storage.interfaces import IRosterStore, RosterItem

NS_ROSTER = "jabber:iq:roster"
NS_ROSTER_VERSIONING = "urn:xmpp:features:rosterver"
NS_PRE_APPROVAL = "urn:xmpp:features:pre-approval"

# The "server-configured limit" of RFC 6121 §2.3.3 on the length of names and group names.
MAX_TEXT_BYTES = 1023

# Called when a removed contact had a subscription or a request to cancel, after the removal was
# pushed, with the owner's bare JID and the item as it was; it may return a Deferred, which the
# result to the client waits for. The presence layer sends the contact, in order, the
# presence types `subscription.cancellations(subscription.state_of(item))` (RFC 6121 §2.5.2),
# straight to the contact: the item is gone, so the outbound state machine no longer applies.
OnRemove = Callable[[JID, RosterItem], Any]


def stream_features() -> list[domish.Element]:
    """The features announced after authentication: versioning (§2.6.1), pre-approval (§3.4.1)."""
    return [domish.Element((NS_ROSTER_VERSIONING, "ver")), domish.Element((NS_PRE_APPROVAL, "sub"))]


class RosterService:
    """Serves users their own rosters and pushes changes to their interested resources."""

    def __init__(
        self,
        rosters: IRosterStore,
        sessions: SessionManager,
        on_remove: OnRemove | None = None,
        *,
        locks: KeyedLock | None = None,
    ) -> None:
        self.rosters = rosters
        self.sessions = sessions
        self.on_remove = on_remove
        # Keyed by the owner's bare JID; shared with the presence layer (see tap.build_im_core).
        self.locks = KeyedLock() if locks is None else locks

    # -- for the presence layer ---------------------------------------------------------------

    def get_item(self, owner: JID, contact: JID) -> defer.Deferred:
        """Deferred firing with the owner's RosterItem for the contact's bare JID, or None."""
        return self.rosters.get_item(owner.host, owner.user, contact.userhost())

    def replace_item(
        self, owner: JID, jid: str, expected: RosterItem | None, item: RosterItem | None
    ) -> defer.Deferred:
        """Store `item` (None: remove) if `expected` is still what the store holds for `jid`;
        Deferred firing with the roster's version, or None if it is not (read again and
        decide anew: another node of a cluster changed it since)."""
        return self.rosters.replace_item(owner.host, owner.user, jid, expected, item)

    def push(self, owner: JID, item: RosterItem, version: int, removed: bool = False) -> None:
        """Send a roster push (§2.1.6) of the item, or of its removal, to interested resources."""
        if not item.in_roster:
            return
        for session in self.sessions.sessions_of(owner):
            if not session.roster_requested:
                continue
            iq = domish.Element((None, "iq"))
            iq["type"] = "set"
            iq["id"] = "push-" + secrets.token_hex(6)
            iq["to"] = session.jid.full()
            # No 'from': a push from the user's own account (§2.1.6).
            query = iq.addElement((NS_ROSTER, "query"))
            query["ver"] = str(version)
            query.addChild(_removed_element(item) if removed else _item_element(item))
            session.send(iq)

    # -- the IQ handler -----------------------------------------------------------------------

    def handle_iq(self, session: Session, iq: domish.Element, target: JID) -> defer.Deferred:
        """The account IQ handler for ("jabber:iq:roster", "query")."""
        if target != session.jid.userhostJID():
            raise StanzaError("forbidden", text="Only its owner may use a roster")
        query = next(iq.elements())
        if iq["type"] == "get":
            return defer.Deferred.fromCoroutine(self._get(session, iq, query))
        return defer.Deferred.fromCoroutine(self._set(session, query))

    async def _get(
        self, session: Session, iq: domish.Element, query: domish.Element
    ) -> domish.Element | None:
        if next(query.elements(), None) is not None:
            raise StanzaError("bad-request", text="A roster get carries no items")
        owner = session.jid.userhostJID()
        # Interested before reading, so that no change can fall between the read and the pushes.
        session.roster_requested = True
        version, items = await self.rosters.get_roster(owner.host, owner.user)
        ver = str(version)
        if query.getAttribute("ver") == ver:
            return None  # the client's copy is current (§2.6.3): an empty result
        result = xmlstream.toResponse(iq, "result")
        listing = result.addElement((NS_ROSTER, "query"))
        listing["ver"] = ver
        for item in items:
            if item.in_roster:
                listing.addChild(_item_element(item))
        return result

    async def _set(self, session: Session, query: domish.Element) -> None:
        elements = list(query.elements(NS_ROSTER, "item"))
        if len(elements) != 1:
            raise StanzaError("bad-request", text="A roster set carries exactly one item")
        element = elements[0]
        owner = session.jid.userhostJID()
        contact = _contact_of(element, owner)
        # Any other 'subscription' value, and 'ask' and 'approved', are ignored (§2.1.2): the
        # subscription state changes only through presence stanzas.
        if element.getAttribute("subscription") == "remove":
            await self._remove(owner, contact)
            return
        name, groups = _name_and_groups(element)
        async with self.locks.hold(owner.userhost()):
            version = None
            while version is None:  # None: another node changed the item meanwhile
                current = await self.get_item(owner, contact)
                if current is None:
                    item = RosterItem(contact.full(), name, groups)
                else:
                    item = dataclasses.replace(current, name=name, groups=groups, in_roster=True)
                version = await self.replace_item(owner, item.jid, current, item)
            self.push(owner, item, version)

    async def _remove(self, owner: JID, contact: JID) -> None:
        async with self.locks.hold(owner.userhost()):
            version = None
            while version is None:  # None: another node changed the item meanwhile
                item = await self.get_item(owner, contact)
                if item is None or not item.in_roster:
                    raise StanzaError("item-not-found", text="The contact is not in the roster")
                version = await self.replace_item(owner, item.jid, item, None)
            self.push(owner, item, version, removed=True)
        # Outside the owner's key: the cancellations change the contact's roster under theirs.
        if self.on_remove is not None and subscription.cancellations(subscription.state_of(item)):
            await defer.maybeDeferred(self.on_remove, owner, item)


def _contact_of(element: domish.Element, owner: JID) -> JID:
    value = element.getAttribute("jid")
    if not value:
        raise StanzaError("bad-request", text="The item has no 'jid'")
    try:
        contact = JID(value)
    except (InvalidFormat, UnicodeError) as e:
        raise StanzaError("jid-malformed", text="The item's 'jid' is not a JID") from e
    if contact.resource is not None:
        raise StanzaError("jid-malformed", text="A roster item is a bare JID")
    if contact == owner:
        # RFC 6121 names no condition for this; <not-allowed/> as Prosody and ejabberd answer.
        raise StanzaError("not-allowed", text="The user's own JID cannot be a contact")
    return contact


def _name_and_groups(element: domish.Element) -> tuple[str | None, tuple[str, ...]]:
    """The item's name and groups, checked as RFC 6121 §2.3.3 requires."""
    name = element.getAttribute("name") or None  # an empty name is no name
    if name is not None and len(name.encode()) > MAX_TEXT_BYTES:
        raise StanzaError("not-acceptable", text="The name is too long")
    groups = tuple(str(group) for group in element.elements(NS_ROSTER, "group"))
    for group in groups:
        if not group:
            # To leave all groups, a client sends no <group/> at all.
            raise StanzaError("not-acceptable", text="A group name is empty")
        if len(group.encode()) > MAX_TEXT_BYTES:
            raise StanzaError("not-acceptable", text="A group name is too long")
    if len(set(groups)) != len(groups):
        raise StanzaError("bad-request", text="A group is named twice")
    return name, groups


def _item_element(item: RosterItem) -> domish.Element:
    element = domish.Element((NS_ROSTER, "item"))
    element["jid"] = item.jid
    if item.name:
        element["name"] = item.name
    element["subscription"] = item.subscription
    if item.ask:
        element["ask"] = "subscribe"
    if item.approved:
        element["approved"] = "true"  # RFC 6121 §2.1.2.1: the client learns of pre-approvals
    for group in item.groups:
        element.addElement("group", content=group)
    return element


def _removed_element(item: RosterItem) -> domish.Element:
    element = domish.Element((NS_ROSTER, "item"))
    element["jid"] = item.jid
    element["subscription"] = "remove"
    return element
