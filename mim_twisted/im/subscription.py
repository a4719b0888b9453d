"""The presence subscription state machine of RFC 6121 §3 and Appendix A, as data in, data out.

A roster item's subscription state, seen from its owner (the user), is one of the nine states of
Appendix A.1 ("None", "None + Pending Out", ..., "Both") plus the pre-approval flag of §3.4.
`outbound` answers what the user's server does with a subscription stanza the user sends to the
contact (A.2), `inbound` what it does with one the contact sends to the user (A.3). Neither does
any I/O: the presence layer stores, pushes, routes and replies as the Outcome says.

The tables of Appendix A summarise the rules of §3, which are cited below where they add to
them: pre-approval (§3.4), which this server supports, and the server's own replies.
"""

import dataclasses
from dataclasses import dataclass

from mim_twisted.storage.interfaces import RosterItem


@dataclass(frozen=True)
class State:
    subscription: str = "none"  # none | to | from | both
    ask: bool = False  # our subscribe request to the contact is pending (Pending Out)
    pending_in: bool = False  # the contact's subscribe request to us is pending (Pending In)
    approved: bool = False  # we pre-approved the contact's future request (§3.4)

    @property
    def has_to(self) -> bool:
        return self.subscription in ("to", "both")

    @property
    def has_from(self) -> bool:
        return self.subscription in ("from", "both")


@dataclass(frozen=True)
class Outcome:
    state: State  # the new state of the roster item on this side
    changed: bool  # the roster item changed: store it and push it (if visible)
    # Outbound: send the stanza on to the contact. Inbound: deliver it to the user's resources
    # (or keep it for offline delivery when it is a subscribe).
    route: bool
    # Inbound only: a presence type the server sends back on the user's behalf.
    auto_reply: str | None = None
    # "available": send the user's current presence from all available resources to the
    # contact; "unavailable": send unavailable presence from them; None: nothing.
    send_presence: str | None = None


def _with(
    state: State, *, to: bool | None = None, from_: bool | None = None, **flags: bool
) -> State:
    """The state with its 'to' and/or 'from' half and the given flags replaced."""
    to = state.has_to if to is None else to
    from_ = state.has_from if from_ is None else from_
    subscription = "both" if to and from_ else "to" if to else "from" if from_ else "none"
    return dataclasses.replace(state, subscription=subscription, **flags)


def _outcome(old: State, new: State, route: bool, **extra: str | None) -> Outcome:
    return Outcome(state=new, changed=new != old, route=route, **extra)


def outbound(state: State, kind: str) -> Outcome:
    """The user sends <presence type=kind to=contact/> (RFC 6121 A.2 and §3)."""
    if kind == "subscribe":
        # §3.1.2: always routed, so that a lost request can be sent again.
        return _outcome(state, state if state.has_to else _with(state, ask=True), route=True)
    if kind == "unsubscribe":
        # §3.3.2: always routed; it also withdraws a request still pending.
        return _outcome(state, _with(state, to=False, ask=False), route=True)
    if kind == "subscribed":
        if state.has_from:
            return _outcome(state, state, route=False)  # §3.4.2 rule 1: silently ignored
        if state.pending_in:
            # §3.1.5: an approval; the contact then receives the user's current presence.
            new = _with(state, from_=True, pending_in=False, approved=False)
            return _outcome(state, new, route=True, send_presence="available")
        # §3.4.2 rules 3 and 4: a pre-approval, noted and not routed.
        return _outcome(state, _with(state, approved=True), route=False)
    if kind == "unsubscribed":
        if state.has_from or state.pending_in:
            # §3.2.2 rule 3 (a cancellation, or the denial of a pending request): unavailable
            # presence goes to the contact first, then the stanza.
            new = _with(state, from_=False, pending_in=False, approved=False)
            return _outcome(state, new, route=True, send_presence="unavailable")
        # §3.2.2 rules 1 and 2: not routed; only a pre-approval is withdrawn.
        return _outcome(state, _with(state, approved=False), route=False)
    raise ValueError(f"not a subscription presence type: {kind!r}")


def inbound(state: State, kind: str) -> Outcome:
    """A contact's <presence type=kind/> arrives for the user (RFC 6121 A.3 and §3)."""
    if kind == "subscribe":
        if state.has_from:
            # §3.1.3 rule 2: already subscribed, so the server answers for the user.
            return _outcome(state, state, route=False, auto_reply="subscribed")
        if state.pending_in:
            return _outcome(state, state, route=False)  # A.3.1: the user has it already
        if state.approved:
            # §3.4: the pre-approval is used up by this request.
            new = _with(state, from_=True, approved=False)
            return _outcome(state, new, route=False, auto_reply="subscribed")
        return _outcome(state, _with(state, pending_in=True), route=True)
    if kind == "unsubscribe":
        if state.has_from or state.pending_in:
            # §3.3.3: the contact stops receiving presence, so it gets unavailable from every
            # resource of the user that it could see.
            new = _with(state, from_=False, pending_in=False)
            presence = "unavailable" if state.has_from else None
            return _outcome(state, new, route=True, send_presence=presence)
        return _outcome(state, state, route=False)
    if kind == "subscribed":
        if state.ask and not state.has_to:
            return _outcome(state, _with(state, to=True, ask=False), route=True)
        return _outcome(state, state, route=False)  # §3.1.6: no request of ours: ignored
    if kind == "unsubscribed":
        if state.has_to or state.ask:
            return _outcome(state, _with(state, to=False, ask=False), route=True)
        return _outcome(state, state, route=False)  # §3.2.3: nothing to cancel: ignored
    raise ValueError(f"not a subscription presence type: {kind!r}")


def cancellations(state: State) -> tuple[str, ...]:
    """The presence types the user's server sends when the user removes the contact (§2.5.2).

    "unsubscribe" ends the user's subscription or withdraws its pending request; "unsubscribed"
    ends the contact's subscription or denies its pending request, which would otherwise stay
    pending at the contact's server for good.
    """
    kinds = []
    if state.has_to or state.ask:
        kinds.append("unsubscribe")
    if state.has_from or state.pending_in:
        kinds.append("unsubscribed")
    return tuple(kinds)


def state_of(item: RosterItem | None) -> State:
    """The state of a roster item; no item is "None" (Appendix A.1, implementation note)."""
    if item is None:
        return State()
    return State(item.subscription, item.ask, item.pending_in, item.approved)


def apply(item: RosterItem, state: State) -> RosterItem:
    """The roster item with a new state.

    For a contact the user has no item for, start from ``RosterItem(jid, in_roster=False)``.
    An item holding nothing but a pending inbound request stays out of the roster (A.1, state 3);
    it becomes visible once the user subscribes, approves or pre-approves. An invisible item
    left in the plain "None" state holds nothing and can be deleted instead of stored.
    """
    visible = item.in_roster or state.subscription != "none" or state.ask or state.approved
    return dataclasses.replace(
        item,
        subscription=state.subscription,
        ask=state.ask,
        pending_in=state.pending_in,
        pending_in_stanza=item.pending_in_stanza if state.pending_in else None,
        approved=state.approved,
        in_roster=visible,
    )
