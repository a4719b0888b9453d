"""The recipients of a node's notifications, sorted out once while its subscriptions stay."""

from dataclasses import replace

from twisted.trial import unittest

from mim_twisted.pubsub import broadcast, core
from mim_twisted.storage.interfaces import PubSubSubscription
from tests.test_pubsub_protocol import published


class RecipientListTests(unittest.TestCase):
    def test_the_same_subscriptions_give_the_same_recipients_without_sorting_again(self) -> None:
        event = published("bob@localhost", "carol@localhost")
        first = broadcast.fanout_of(event).recipients
        calls = []
        recipients = broadcast._recipients
        self.patch(broadcast, "_recipients", lambda *a: calls.append(a) or recipients(*a))
        # The node cache hands each publication a copy of the subscriptions it holds.
        copy = tuple(list(event.subscriptions))
        again = broadcast.fanout_of(replace(event, item_id="2", subscriptions=copy)).recipients
        self.assertEqual(again, first)
        self.assertIsNot(again, first)  # each fan-out its own list
        self.assertEqual(calls, [])

    def test_changed_subscriptions_are_sorted_out_again(self) -> None:
        event = published("bob@localhost")
        broadcast.fanout_of(event)
        added = (*event.subscriptions, PubSubSubscription("dave@localhost", "s2"))
        recipients = broadcast.fanout_of(replace(event, subscriptions=added)).recipients
        self.assertEqual([r.jid for r in recipients], ["bob@localhost", "dave@localhost"])

    def test_a_deleted_node_tells_pending_subscribers_too(self) -> None:
        event = published("bob@localhost")
        subscriptions = (
            *event.subscriptions,
            PubSubSubscription("erin@localhost", "s3", state="pending"),
        )
        publication = replace(event, subscriptions=subscriptions)
        self.assertEqual(
            [r.jid for r in broadcast.fanout_of(publication).recipients], ["bob@localhost"]
        )
        deleted = core.NodeDeleted(
            service=event.service,
            node=event.node,
            config=event.config,
            subscriptions=subscriptions,
            notify=True,
            redirect=None,
        )
        self.assertEqual(
            [r.jid for r in broadcast.fanout_of(deleted).recipients],
            ["bob@localhost", "erin@localhost"],
        )

    def test_a_changed_subscription_is_sorted_out_again(self) -> None:
        event = published("bob@localhost", "carol@localhost")
        broadcast.fanout_of(event)
        bob, carol = event.subscriptions
        changed = (bob, replace(carol, options={"pubsub#deliver": False}))
        recipients = broadcast.fanout_of(replace(event, subscriptions=changed)).recipients
        self.assertEqual([r.jid for r in recipients], ["bob@localhost"])

    def test_the_oldest_lists_are_let_go(self) -> None:
        lists = broadcast._RecipientLists(2)
        events = [published(f"u{n}@localhost") for n in range(3)]
        for event in events:
            lists.get(event.subscriptions, False)
        self.assertEqual(len(lists._lists), 2)
        self.assertNotIn((1, id(events[0].subscriptions[0]), False), lists._lists)
