"""The subscription state machine against every row of RFC 6121 Appendix A, plus pre-approval."""

from twisted.trial import unittest

from mim_twisted.im import subscription
from mim_twisted.im.subscription import Outcome, State
from mim_twisted.storage.interfaces import RosterItem

# The nine states of Appendix A.1.
NONE = State()
NONE_OUT = State(ask=True)
NONE_IN = State(pending_in=True)
NONE_OUT_IN = State(ask=True, pending_in=True)
TO = State("to")
TO_IN = State("to", pending_in=True)
FROM = State("from")
FROM_OUT = State("from", ask=True)
BOTH = State("both")

NAMES = {
    NONE: "None",
    NONE_OUT: "None + Pending Out",
    NONE_IN: "None + Pending In",
    NONE_OUT_IN: "None + Pending Out+In",
    TO: "To",
    TO_IN: "To + Pending In",
    FROM: "From",
    FROM_OUT: "From + Pending Out",
    BOTH: "Both",
}

# Rows: (existing state, new state, routed or delivered, extra Outcome fields).
# A.2.1, outbound subscribe: always routed.
OUTBOUND_SUBSCRIBE = [
    (NONE, NONE_OUT, True),
    (NONE_OUT, NONE_OUT, True),
    (NONE_IN, NONE_OUT_IN, True),
    (NONE_OUT_IN, NONE_OUT_IN, True),
    (TO, TO, True),
    (TO_IN, TO_IN, True),
    (FROM, FROM_OUT, True),
    (FROM_OUT, FROM_OUT, True),
    (BOTH, BOTH, True),
]

# A.2.2, outbound unsubscribe: always routed.
OUTBOUND_UNSUBSCRIBE = [
    (NONE, NONE, True),
    (NONE_OUT, NONE, True),
    (NONE_IN, NONE_IN, True),
    (NONE_OUT_IN, NONE_IN, True),
    (TO, NONE, True),
    (TO_IN, NONE_IN, True),
    (FROM, FROM, True),
    (FROM_OUT, FROM, True),
    (BOTH, FROM, True),
]

AVAILABLE = {"send_presence": "available"}
UNAVAILABLE = {"send_presence": "unavailable"}
SUBSCRIBED = {"auto_reply": "subscribed"}

# A.2.3, outbound subscribed; where the table has no state change without a pending request,
# the server notes a pre-approval instead (§3.4.2).
OUTBOUND_SUBSCRIBED = [
    (NONE, State(approved=True), False),
    (NONE_OUT, State(ask=True, approved=True), False),
    (NONE_IN, FROM, True, AVAILABLE),
    (NONE_OUT_IN, FROM_OUT, True, AVAILABLE),
    (TO, State("to", approved=True), False),
    (TO_IN, BOTH, True, AVAILABLE),
    (FROM, FROM, False),
    (FROM_OUT, FROM_OUT, False),
    (BOTH, BOTH, False),
]

# A.2.4, outbound unsubscribed; unavailable presence goes first (§3.2.2).
OUTBOUND_UNSUBSCRIBED = [
    (NONE, NONE, False),
    (NONE_OUT, NONE_OUT, False),
    (NONE_IN, NONE, True, UNAVAILABLE),
    (NONE_OUT_IN, NONE_OUT, True, UNAVAILABLE),
    (TO, TO, False),
    (TO_IN, TO, True, UNAVAILABLE),
    (FROM, NONE, True, UNAVAILABLE),
    (FROM_OUT, NONE_OUT, True, UNAVAILABLE),
    (BOTH, TO, True, UNAVAILABLE),
]

# A.3.1, inbound subscribe; the server answers for a user who is already subscribed to.
INBOUND_SUBSCRIBE = [
    (NONE, NONE_IN, True),
    (NONE_OUT, NONE_OUT_IN, True),
    (NONE_IN, NONE_IN, False),
    (NONE_OUT_IN, NONE_OUT_IN, False),
    (TO, TO_IN, True),
    (TO_IN, TO_IN, False),
    (FROM, FROM, False, SUBSCRIBED),
    (FROM_OUT, FROM_OUT, False, SUBSCRIBED),
    (BOTH, BOTH, False, SUBSCRIBED),
]

# A.3.2, inbound unsubscribe; a lost subscriber gets unavailable presence (§3.3.3).
INBOUND_UNSUBSCRIBE = [
    (NONE, NONE, False),
    (NONE_OUT, NONE_OUT, False),
    (NONE_IN, NONE, True),
    (NONE_OUT_IN, NONE_OUT, True),
    (TO, TO, False),
    (TO_IN, TO, True),
    (FROM, NONE, True, UNAVAILABLE),
    (FROM_OUT, NONE_OUT, True, UNAVAILABLE),
    (BOTH, TO, True, UNAVAILABLE),
]

# A.3.3, inbound subscribed: only an answer to our own pending request counts.
INBOUND_SUBSCRIBED = [
    (NONE, NONE, False),
    (NONE_OUT, TO, True),
    (NONE_IN, NONE_IN, False),
    (NONE_OUT_IN, TO_IN, True),
    (TO, TO, False),
    (TO_IN, TO_IN, False),
    (FROM, FROM, False),
    (FROM_OUT, BOTH, True),
    (BOTH, BOTH, False),
]

# A.3.4, inbound unsubscribed.
INBOUND_UNSUBSCRIBED = [
    (NONE, NONE, False),
    (NONE_OUT, NONE, True),
    (NONE_IN, NONE_IN, False),
    (NONE_OUT_IN, NONE_IN, True),
    (TO, NONE, True),
    (TO_IN, NONE_IN, True),
    (FROM, FROM, False),
    (FROM_OUT, FROM, True),
    (BOTH, FROM, True),
]


class AppendixATests(unittest.TestCase):
    def check(self, transition, kind: str, rows: list) -> None:
        self.assertEqual({row[0] for row in rows}, set(NAMES), "a table covers all nine states")
        for old, new, route, *extra in rows:
            expected = Outcome(
                state=new, changed=new != old, route=route, **(extra[0] if extra else {})
            )
            self.assertEqual(transition(old, kind), expected, f"{kind} in {NAMES[old]}")

    def test_outbound_subscribe(self) -> None:
        self.check(subscription.outbound, "subscribe", OUTBOUND_SUBSCRIBE)

    def test_outbound_unsubscribe(self) -> None:
        self.check(subscription.outbound, "unsubscribe", OUTBOUND_UNSUBSCRIBE)

    def test_outbound_subscribed(self) -> None:
        self.check(subscription.outbound, "subscribed", OUTBOUND_SUBSCRIBED)

    def test_outbound_unsubscribed(self) -> None:
        self.check(subscription.outbound, "unsubscribed", OUTBOUND_UNSUBSCRIBED)

    def test_inbound_subscribe(self) -> None:
        self.check(subscription.inbound, "subscribe", INBOUND_SUBSCRIBE)

    def test_inbound_unsubscribe(self) -> None:
        self.check(subscription.inbound, "unsubscribe", INBOUND_UNSUBSCRIBE)

    def test_inbound_subscribed(self) -> None:
        self.check(subscription.inbound, "subscribed", INBOUND_SUBSCRIBED)

    def test_inbound_unsubscribed(self) -> None:
        self.check(subscription.inbound, "unsubscribed", INBOUND_UNSUBSCRIBED)

    def test_unknown_kind(self) -> None:
        self.assertRaises(ValueError, subscription.outbound, NONE, "probe")
        self.assertRaises(ValueError, subscription.inbound, NONE, "available")


class PreApprovalTests(unittest.TestCase):
    """RFC 6121 §3.4: the user approves a request before it arrives."""

    def test_repeated_pre_approval_changes_nothing(self) -> None:
        approved = State(approved=True)
        self.assertEqual(
            subscription.outbound(approved, "subscribed"),
            Outcome(state=approved, changed=False, route=False),
        )

    def test_request_is_approved_by_the_server(self) -> None:
        for old, new in [
            (State(approved=True), FROM),
            (State(ask=True, approved=True), FROM_OUT),
            (State("to", approved=True), BOTH),
        ]:
            self.assertEqual(
                subscription.inbound(old, "subscribe"),
                Outcome(state=new, changed=True, route=False, auto_reply="subscribed"),
                NAMES[new],
            )

    def test_unsubscribed_withdraws_pre_approval_without_routing(self) -> None:
        for old, new in [(State(approved=True), NONE), (State("to", approved=True), TO)]:
            self.assertEqual(
                subscription.outbound(old, "unsubscribed"),
                Outcome(state=new, changed=True, route=False),
            )

    def test_pre_approval_survives_other_changes(self) -> None:
        approved = State(approved=True)
        self.assertEqual(
            subscription.outbound(approved, "subscribe").state, State(ask=True, approved=True)
        )
        self.assertEqual(
            subscription.inbound(State("to", approved=True), "unsubscribed").state, approved
        )


class CancellationTests(unittest.TestCase):
    """What removing the contact from the roster sends to it (RFC 6121 §2.5.2)."""

    def test_each_state(self) -> None:
        expected = {
            NONE: (),
            NONE_OUT: ("unsubscribe",),
            NONE_IN: ("unsubscribed",),
            NONE_OUT_IN: ("unsubscribe", "unsubscribed"),
            TO: ("unsubscribe",),
            TO_IN: ("unsubscribe", "unsubscribed"),
            FROM: ("unsubscribed",),
            FROM_OUT: ("unsubscribe", "unsubscribed"),
            BOTH: ("unsubscribe", "unsubscribed"),
        }
        for state, kinds in expected.items():
            self.assertEqual(subscription.cancellations(state), kinds, NAMES[state])


class RosterItemMappingTests(unittest.TestCase):
    def test_state_of(self) -> None:
        self.assertEqual(subscription.state_of(None), NONE)
        item = RosterItem("bob@example.org", subscription="from", ask=True, approved=False)
        self.assertEqual(subscription.state_of(item), FROM_OUT)

    def test_apply_keeps_name_and_groups(self) -> None:
        item = RosterItem("bob@example.org", name="Bob", groups=("Friends",))
        self.assertEqual(
            subscription.apply(item, BOTH),
            RosterItem("bob@example.org", name="Bob", groups=("Friends",), subscription="both"),
        )

    def test_pending_request_alone_stays_out_of_the_roster(self) -> None:
        unknown = RosterItem("bob@example.org", in_roster=False)
        pending = subscription.apply(unknown, NONE_IN)
        self.assertTrue(pending.pending_in)
        self.assertFalse(pending.in_roster)

    def test_item_becomes_visible_when_the_user_acts(self) -> None:
        pending = RosterItem("bob@example.org", pending_in=True, in_roster=False)
        for state in (FROM, NONE_OUT_IN, State(approved=True)):
            self.assertTrue(subscription.apply(pending, state).in_roster, state)

    def test_stored_request_is_dropped_with_the_pending_state(self) -> None:
        stanza = "<presence type='subscribe'/>"
        pending = RosterItem("bob@example.org", pending_in=True, pending_in_stanza=stanza)
        self.assertEqual(subscription.apply(pending, NONE_OUT_IN).pending_in_stanza, stanza)
        self.assertIsNone(subscription.apply(pending, FROM).pending_in_stanza)
