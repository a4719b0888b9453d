"""The protocol-free PubSub service (XEP-0060, XEP-0163) on the memory store."""

from collections.abc import Awaitable
from typing import Any

from twisted.internet import defer
from twisted.trial import unittest

from mim_twisted.pubsub import config as cfg
from mim_twisted.pubsub import errors
from mim_twisted.pubsub.config import (
    GENERIC_NODE_DEFAULTS,
    PEP_NODE_DEFAULTS,
    ServiceLimits,
    check_preconditions,
    validate_config,
    validate_subscription_options,
)
from mim_twisted.pubsub.core import (
    CAPABILITIES,
    AffiliationChanged,
    ItemPublished,
    ItemsRetracted,
    NodeConfigured,
    NodeCreated,
    NodeDeleted,
    NodePurged,
    Publication,
    PubSubService,
    Relation,
    SubscriptionChange,
    SubscriptionChanged,
    SubscriptionPending,
    bare_jid,
    may,
)
from mim_twisted.pubsub.errors import PartlyFailed, PubSubError
from mim_twisted.storage.interfaces import PubSubItem, PubSubSubscription
from mim_twisted.storage.memory import MemoryDatabase

SERVICE = "pubsub.localhost"
LIMITS = ServiceLimits(max_items_limit=50, max_payload_size=1000)
# What new nodes get on a service with LIMITS.
GENERIC = cfg.bounded(GENERIC_NODE_DEFAULTS, LIMITS)
PEP = cfg.bounded(PEP_NODE_DEFAULTS, LIMITS)
ALICE = "alice@localhost/home"  # creates the nodes
BOB = "bob@localhost/phone"
CAROL = "carol@localhost/desk"
ENTRY = "<entry xmlns='http://www.w3.org/2005/Atom'>hi</entry>"


class Base(unittest.TestCase):
    """A service with a recording broadcaster and a roster given as {(owner, requester): …}."""

    is_pep = False
    service_key = SERVICE
    defaults = GENERIC_NODE_DEFAULTS

    def setUp(self) -> None:
        self.store = MemoryDatabase().pubsub
        self.events: list[Any] = []
        self.relations: dict[tuple[str, str], Relation] = {}
        self.pubsub = self.make_service(relation=self.relation)

    def make_service(self, **kwargs: Any) -> PubSubService:
        return PubSubService(
            self.store,
            service_key=self.service_key,
            defaults=self.defaults,
            limits=LIMITS,
            broadcaster=self.events.append,
            is_pep=self.is_pep,
            **kwargs,
        )

    async def relation(self, owner: str, requester: str) -> Relation:
        return self.relations.get((owner, requester), Relation())

    def events_of(self, kind: type) -> list[Any]:
        return [event for event in self.events if isinstance(event, kind)]

    async def fails(
        self,
        call: Awaitable[Any],
        condition: str,
        pubsub_condition: str | None = None,
        feature: str | None = None,
    ) -> PubSubError:
        try:
            await call
        except PubSubError as e:
            self.assertEqual(
                (e.condition, e.pubsub_condition, e.feature),
                (condition, pubsub_condition, feature),
            )
            return e
        self.fail(f"no {condition} error")

    async def unsupported(self, call: Awaitable[Any], feature: str) -> None:
        await self.fails(call, "feature-not-implemented", "unsupported", feature)

    async def node(self, name: str = "news", **config: Any) -> str:
        """A node created by Alice with ``config`` (field names without ``pubsub#``)."""
        return await self.pubsub.create(
            ALICE, name, {f"pubsub#{key}": value for key, value in config.items()}
        )

    async def affiliate(self, node: str, jid: str, affiliation: str) -> None:
        await self.pubsub.set_affiliations(ALICE, node, {jid: affiliation})


class ConfigTests(unittest.TestCase):
    """pubsub/config.py: fields, defaults and validation, pure."""

    def test_form_values_become_typed(self) -> None:
        config = validate_config(
            {
                "FORM_TYPE": ["http://jabber.org/protocol/pubsub#node_config"],
                "pubsub#deliver_payloads": ["0"],
                "pubsub#notify_retract": "true",
                "pubsub#persist_items": True,
                "pubsub#max_items": ["20"],
                "pubsub#access_model": ["roster"],
                "pubsub#roster_groups_allowed": ["friends", "family", "friends"],
                "pubsub#title": "News",
            },
            GENERIC_NODE_DEFAULTS,
            LIMITS,
        )
        self.assertEqual(config["pubsub#deliver_payloads"], False)
        self.assertEqual(config["pubsub#notify_retract"], True)
        self.assertEqual(config["pubsub#max_items"], 20)
        self.assertEqual(config["pubsub#access_model"], "roster")
        self.assertEqual(config["pubsub#roster_groups_allowed"], ["friends", "family"])
        self.assertEqual(config["pubsub#title"], "News")
        self.assertNotIn("FORM_TYPE", config)
        # Fields left out keep their value.
        self.assertEqual(config["pubsub#publish_model"], "publishers")

    def test_max_means_the_service_limit(self) -> None:
        config = validate_config({"pubsub#max_items": "max"}, GENERIC_NODE_DEFAULTS, LIMITS)
        self.assertEqual(config["pubsub#max_items"], 50)

    def test_bad_values_are_not_acceptable(self) -> None:
        for changes in [
            {"pubsub#unknown": "1"},
            {"pubsub#deliver_payloads": "yes"},
            {"pubsub#max_items": "51"},  # above the service's limit
            {"pubsub#max_items": "-1"},
            {"pubsub#max_items": "1_0"},
            {"pubsub#max_items": True},
            {"pubsub#max_payload_size": "1001"},
            {"pubsub#max_payload_size": "max"},
            {"pubsub#access_model": "everyone"},
            {"pubsub#publish_model": ["open", "subscribers"]},
            {"pubsub#send_last_published_item": "always"},
            {"pubsub#notification_type": "chat"},
            {"pubsub#itemreply": "nobody"},
            {"pubsub#roster_groups_allowed": [1]},
            {"pubsub#title": 5},
        ]:
            with self.assertRaises(PubSubError, msg=changes) as raised:
                validate_config(changes, GENERIC_NODE_DEFAULTS, LIMITS)
            self.assertEqual(raised.exception.condition, "not-acceptable")
            self.assertEqual(raised.exception.type, "modify")
            self.assertIn(next(iter(changes)), raised.exception.text)

    def test_defaults(self) -> None:
        self.assertEqual(set(GENERIC_NODE_DEFAULTS), set(cfg.NODE_CONFIG_FIELDS))
        self.assertEqual(
            {
                key: GENERIC_NODE_DEFAULTS[key]
                for key in GENERIC_NODE_DEFAULTS
                if PEP_NODE_DEFAULTS[key] != GENERIC_NODE_DEFAULTS[key]
            },
            {
                "pubsub#max_items": 10,
                "pubsub#access_model": "open",
                "pubsub#send_last_published_item": "never",
                "pubsub#presence_based_delivery": False,
            },
        )
        self.assertEqual(PEP_NODE_DEFAULTS["pubsub#max_items"], 1)
        self.assertEqual(PEP_NODE_DEFAULTS["pubsub#access_model"], "presence")
        self.assertEqual(
            PEP_NODE_DEFAULTS["pubsub#send_last_published_item"], "on_sub_and_presence"
        )
        self.assertTrue(PEP_NODE_DEFAULTS["pubsub#presence_based_delivery"])
        self.assertTrue(GENERIC_NODE_DEFAULTS["pubsub#persist_items"])
        self.assertEqual(GENERIC_NODE_DEFAULTS["pubsub#publish_model"], "publishers")
        self.assertEqual(GENERIC_NODE_DEFAULTS["pubsub#max_payload_size"], 60000)

    def test_defaults_are_lowered_to_the_limits(self) -> None:
        config = cfg.bounded(GENERIC_NODE_DEFAULTS, ServiceLimits(5, 100))
        self.assertEqual(config["pubsub#max_items"], 5)
        self.assertEqual(config["pubsub#max_payload_size"], 100)

    def test_preconditions(self) -> None:
        config = validate_config(
            {"pubsub#roster_groups_allowed": ["a", "b"], "pubsub#max_items": "max"},
            GENERIC_NODE_DEFAULTS,
            LIMITS,
        )
        check_preconditions(
            {
                "FORM_TYPE": "http://jabber.org/protocol/pubsub#publish-options",
                "pubsub#access_model": "open",
                "pubsub#persist_items": "1",
                "pubsub#max_items": "max",
                "pubsub#roster_groups_allowed": ["b", "a"],
            },
            config,
            LIMITS,
        )
        for preconditions in [
            {"pubsub#access_model": "whitelist"},
            {"pubsub#persist_items": "false"},
            {"pubsub#max_items": "10"},
            {"pubsub#roster_groups_allowed": ["a"]},
            {"pubsub#unknown": "1"},
            {"pubsub#persist_items": "maybe"},
        ]:
            with self.assertRaises(PubSubError, msg=preconditions) as raised:
                check_preconditions(preconditions, config, LIMITS)
            error = raised.exception
            self.assertEqual(
                (error.condition, error.pubsub_condition), ("conflict", "precondition-not-met")
            )

    def test_subscription_options(self) -> None:
        options = validate_subscription_options(
            {
                "FORM_TYPE": "http://jabber.org/protocol/pubsub#subscribe_options",
                "pubsub#deliver": ["0"],
                "pubsub#show-values": ["chat", "online"],
                "pubsub#digest_frequency": "2000",
                "pubsub#expire": "2030-01-01T00:00:00Z",
            },
            {"pubsub#include_body": True},
        )
        self.assertEqual(
            options,
            {
                "pubsub#include_body": True,
                "pubsub#deliver": False,
                "pubsub#show-values": ["chat", "online"],
                "pubsub#digest_frequency": 2000,
                "pubsub#expire": "2030-01-01T00:00:00Z",
            },
        )
        self.assertEqual(
            validate_subscription_options({"pubsub#expire": "presence"}, {}),
            {"pubsub#expire": "presence"},
        )
        for bad in [
            {"pubsub#show-values": ["busy"]},
            {"pubsub#deliver": "no"},
            {"pubsub#expire": "tomorrow"},
            {"pubsub#subscription_type": "items"},
        ]:
            with self.assertRaises(PubSubError, msg=bad) as raised:
                validate_subscription_options(bad, {})
            error = raised.exception
            self.assertEqual(
                (error.condition, error.pubsub_condition), ("bad-request", "invalid-options")
            )


class ErrorTests(unittest.TestCase):
    def test_types(self) -> None:
        self.assertEqual(PubSubError("forbidden").type, "auth")
        self.assertEqual(PubSubError("not-allowed", "closed-node").type, "cancel")
        self.assertEqual(PubSubError("bad-request", "item-required").type, "modify")
        # XEP-0060 §6.2.3.2 shows not-subscribed as cancel, not RFC 6120's usual wait.
        self.assertEqual(PubSubError("unexpected-request", "not-subscribed").type, "cancel")
        self.assertEqual(PubSubError("resource-constraint").type, "wait")

    def test_named_errors(self) -> None:
        for error, expected in [
            (errors.Forbidden(), ("forbidden", None, None, "auth")),
            (errors.NodeNotFoundError("n"), ("item-not-found", None, None, "cancel")),
            (errors.ItemNotFoundError("i"), ("item-not-found", None, None, "cancel")),
            (errors.Conflict("n"), ("conflict", None, None, "cancel")),
            (errors.ResourceConstraint(), ("resource-constraint", None, None, "wait")),
            (
                errors.Unsupported("purge-nodes"),
                ("feature-not-implemented", "unsupported", "purge-nodes", "cancel"),
            ),
            (errors.PartlyFailed([]), ("not-acceptable", None, None, "modify")),
        ]:
            self.assertIsInstance(error, PubSubError)
            actual = (error.condition, error.pubsub_condition, error.feature, error.type)
            self.assertEqual(actual, expected)

    def test_misspelt_conditions_fail_where_raised(self) -> None:
        self.assertRaises(ValueError, PubSubError, "not-found")
        self.assertRaises(ValueError, PubSubError, "bad-request", "item-missing")
        self.assertRaises(ValueError, PubSubError, "feature-not-implemented", "unsupported")
        self.assertRaises(ValueError, PubSubError, "bad-request", "item-required", feature="x")


class CapabilityTableTests(unittest.TestCase):
    def test_rows_follow_xep_0060_4_1(self) -> None:
        # Subscribe, retrieve items, publish, delete any item, purge, configure, delete node.
        capabilities = (
            "subscribe",
            "get_items",
            "publish",
            "retract_any",
            "purge",
            "configure",
            "delete",
        )
        expected = {
            "owner": (1, 1, 1, 1, 1, 1, 1),
            "publisher": (1, 1, 1, 1, 0, 0, 0),
            "publish-only": (0, 0, 1, 0, 0, 0, 0),
            "member": (1, 1, 0, 0, 0, 0, 0),
            "none": (1, 1, 0, 0, 0, 0, 0),  # then subject to the access model
            "outcast": (0, 0, 0, 0, 0, 0, 0),
        }
        self.assertEqual(set(CAPABILITIES), set(expected))
        for affiliation, row in expected.items():
            self.assertEqual(
                tuple(int(may(affiliation, c)) for c in capabilities), row, affiliation
            )
        self.assertTrue(may("publish-only", "retract_own"))
        for affiliation in expected:
            managing = may(affiliation, "manage_affiliations")
            self.assertEqual(managing, affiliation == "owner")
            self.assertEqual(may(affiliation, "manage_subscriptions"), managing)


class AffiliationRowsTests(Base):
    """Each affiliation against a whitelist node, through the service's operations."""

    async def test_rows(self) -> None:
        outcomes = {}
        for affiliation in CAPABILITIES:
            node = await self.node(f"n-{affiliation}", access_model="whitelist")
            if affiliation != "none":
                await self.affiliate(node, BOB, affiliation)
            await self.pubsub.publish(ALICE, node, "first", ENTRY)
            row = []
            # Each called as method(BOB, node, *arguments).
            for method, *arguments in [
                (self.pubsub.subscribe, BOB),
                (self.pubsub.items,),
                (self.pubsub.publish, "second", ENTRY),
                (self.pubsub.retract, "first"),
                (self.pubsub.purge,),
                (self.pubsub.configure, {}),
                (self.pubsub.get_affiliations,),
                (self.pubsub.get_subscriptions,),
                (self.pubsub.delete,),
            ]:
                try:
                    await method(BOB, node, *arguments)
                except PubSubError as e:
                    row.append(e.condition)
                else:
                    row.append("ok")
            outcomes[affiliation] = row
        no, closed = "forbidden", "not-allowed"
        self.assertEqual(
            outcomes,
            {
                "owner": ["ok"] * 9,
                "publisher": ["ok", "ok", "ok", "ok", no, no, no, no, no],
                "publish-only": [no, no, "ok", no, no, no, no, no, no],
                "member": ["ok", "ok", no, no, no, no, no, no, no],
                "none": [closed, closed, no, no, no, no, no, no, no],
                "outcast": [no] * 9,
            },
        )


class NodeTests(Base):
    async def test_create(self) -> None:
        self.assertEqual(await self.node("news"), "news")
        node = await self.pubsub.get_node("news")
        self.assertEqual(node.config, GENERIC)
        self.assertEqual(
            await self.pubsub.get_affiliations(ALICE, "news"), {"alice@localhost": "owner"}
        )
        self.assertEqual(
            self.events,
            [NodeCreated(SERVICE, "news", GENERIC, "alice@localhost")],
        )

    async def test_instant_nodes_get_unique_names(self) -> None:
        first = await self.pubsub.create(ALICE, None)
        second = await self.pubsub.create(ALICE, "")
        self.assertNotEqual(first, second)
        self.assertTrue(first and second)
        self.assertEqual(
            await self.pubsub.affiliations_of(ALICE), {first: "owner", second: "owner"}
        )

    async def test_create_with_configuration(self) -> None:
        await self.node(access_model="whitelist", max_items="5")
        config = await self.pubsub.get_configuration(ALICE, "news")
        self.assertEqual(
            (config["pubsub#access_model"], config["pubsub#max_items"]), ("whitelist", 5)
        )

    async def test_create_errors(self) -> None:
        await self.fails(self.node(unknown="1"), "not-acceptable")
        await self.fails(self.node(max_items="51"), "not-acceptable")
        await self.fails(self.node(access_model="public"), "not-acceptable")
        await self.node()
        e = await self.fails(self.node(), "conflict")
        self.assertEqual(e.type, "cancel")
        await self.fails(self.pubsub.create(BOB, "news"), "conflict")

    async def test_configure(self) -> None:
        await self.node()
        self.events.clear()
        config = await self.pubsub.configure(ALICE, "news", {"pubsub#title": ["Daily"]})
        self.assertEqual(config["pubsub#title"], "Daily")
        self.assertEqual(
            (await self.pubsub.get_configuration(ALICE, "news"))["pubsub#title"], "Daily"
        )
        [event] = self.events
        self.assertEqual(
            event,
            NodeConfigured(
                service=SERVICE, node="news", config=config, subscriptions=(), notify=False
            ),
        )
        await self.pubsub.subscribe(BOB, "news", BOB)
        await self.pubsub.configure(ALICE, "news", {"pubsub#notify_config": "1"})
        [event] = self.events_of(NodeConfigured)[1:]
        self.assertTrue(event.notify)
        self.assertEqual([s.jid for s in event.subscriptions], [BOB])

    async def test_configure_errors(self) -> None:
        await self.node()
        await self.fails(self.pubsub.configure(BOB, "news", {}), "forbidden")
        await self.fails(self.pubsub.get_configuration(BOB, "news"), "forbidden")
        await self.fails(
            self.pubsub.configure(ALICE, "news", {"pubsub#max_items": "100"}), "not-acceptable"
        )
        await self.fails(self.pubsub.configure(ALICE, "old", {}), "item-not-found")
        await self.fails(
            self.pubsub.get_configuration(ALICE, None), "bad-request", "nodeid-required"
        )
        self.assertEqual(
            (await self.pubsub.get_configuration(ALICE, "news"))["pubsub#max_items"], 10
        )

    async def test_default_configuration(self) -> None:
        self.assertEqual(self.pubsub.default_configuration(), GENERIC)
        self.assertEqual(GENERIC["pubsub#max_payload_size"], 1000)
        small = PubSubService(
            self.store,
            service_key=SERVICE,
            defaults=GENERIC_NODE_DEFAULTS,
            limits=ServiceLimits(max_items_limit=3),
            broadcaster=self.events.append,
        )
        self.assertEqual(small.default_configuration()["pubsub#max_items"], 3)

    async def test_delete(self) -> None:
        await self.node(notify_delete=True)
        await self.pubsub.subscribe(BOB, "news", BOB)
        await self.fails(self.pubsub.delete(BOB, "news"), "forbidden")
        await self.pubsub.delete(ALICE, "news", redirect="xmpp:pubsub.localhost?;node=new")
        [event] = self.events_of(NodeDeleted)
        self.assertEqual(event.node, "news")
        self.assertEqual([s.jid for s in event.subscriptions], [BOB])
        self.assertEqual(event.redirect, "xmpp:pubsub.localhost?;node=new")
        self.assertTrue(event.notify)
        await self.fails(self.pubsub.get_node("news"), "item-not-found")
        await self.fails(self.pubsub.delete(ALICE, "news"), "item-not-found")
        self.assertEqual(await self.pubsub.subscriptions_of(BOB), [])

    async def test_delete_notifies_only_when_configured(self) -> None:
        await self.node()
        await self.pubsub.delete(ALICE, "news")
        [event] = self.events_of(NodeDeleted)
        self.assertFalse(event.notify)

    async def test_purge(self) -> None:
        await self.node()
        await self.pubsub.publish(ALICE, "news", "1", ENTRY)
        await self.fails(self.pubsub.purge(BOB, "news"), "forbidden")
        await self.pubsub.purge(ALICE, "news")
        self.assertEqual(await self.pubsub.items(ALICE, "news"), [])
        [event] = self.events_of(NodePurged)
        self.assertFalse(event.notify)
        await self.pubsub.configure(ALICE, "news", {"pubsub#notify_retract": "1"})
        await self.pubsub.purge(ALICE, "news")
        self.assertTrue(self.events_of(NodePurged)[1].notify)

    async def test_purge_of_a_node_persisting_nothing(self) -> None:
        await self.node(persist_items=False)
        await self.unsupported(self.pubsub.purge(ALICE, "news"), "persistent-items")

    async def test_list_nodes_shows_what_the_requester_may_read(self) -> None:
        await self.node("open")
        await self.node("closed", access_model="whitelist")
        await self.node("friends", access_model="presence")
        self.relations["alice@localhost", "carol@localhost"] = Relation(presence_subscribed=True)
        names = [node.name for node in await self.pubsub.list_nodes(BOB)]
        self.assertEqual(names, ["open"])
        names = [node.name for node in await self.pubsub.list_nodes(CAROL)]
        self.assertEqual(names, ["friends", "open"])
        names = [node.name for node in await self.pubsub.list_nodes(ALICE)]
        self.assertEqual(names, ["closed", "friends", "open"])


class PublishTests(Base):
    async def test_publish(self) -> None:
        await self.node()
        await self.pubsub.subscribe(BOB, "news", BOB)
        self.events.clear()
        self.assertEqual(await self.pubsub.publish(ALICE, "news", "1", ENTRY), "1")
        [item] = await self.pubsub.items(BOB, "news")
        self.assertEqual((item.item_id, item.payload, item.publisher), ("1", ENTRY, ALICE))
        [event] = self.events
        self.assertIsInstance(event, ItemPublished)
        self.assertEqual((event.node, event.item_id, event.payload), ("news", "1", ENTRY))
        self.assertEqual((event.publisher, event.notify), (ALICE, True))
        self.assertEqual([s.jid for s in event.subscriptions], [BOB])

    async def test_generated_ids_are_unique(self) -> None:
        await self.node()
        first = await self.pubsub.publish(ALICE, "news", None, ENTRY)
        second = await self.pubsub.publish(ALICE, "news", "", ENTRY)
        self.assertNotEqual(first, second)
        items = await self.pubsub.items(ALICE, "news")
        self.assertEqual([item.item_id for item in items], [second, first])

    async def test_republishing_replaces_the_item(self) -> None:
        await self.node()
        await self.pubsub.publish(ALICE, "news", "1", ENTRY)
        await self.pubsub.publish(ALICE, "news", "1", "<entry>new</entry>")
        [item] = await self.pubsub.items(ALICE, "news")
        self.assertEqual(item.payload, "<entry>new</entry>")

    async def test_items_are_trimmed_to_max_items(self) -> None:
        await self.node(max_items=2)
        for item_id in "123":
            await self.pubsub.publish(ALICE, "news", item_id, ENTRY)
        items = await self.pubsub.items(ALICE, "news")
        self.assertEqual([item.item_id for item in items], ["3", "2"])
        self.assertEqual(self.events_of(ItemsRetracted), [])  # notify_retract is off

    async def test_trimmed_items_are_notified_after_the_new_one(self) -> None:
        await self.node(max_items=1, notify_retract=True)
        await self.pubsub.publish(ALICE, "news", "1", ENTRY)
        await self.pubsub.publish(ALICE, "news", "1", ENTRY)  # a replacement pushes nothing out
        self.assertEqual(self.events_of(ItemsRetracted), [])
        self.events.clear()
        await self.pubsub.publish(ALICE, "news", "2", ENTRY)
        self.assertEqual([type(e) for e in self.events], [ItemPublished, ItemsRetracted])
        self.assertEqual(self.events[1].item_ids, ("1",))
        self.assertTrue(self.events[1].notify)

    async def test_payload_too_big(self) -> None:
        await self.node()
        big = "<x>" + "é" * 497 + "</x>"  # 1001 bytes in UTF-8
        e = await self.fails(
            self.pubsub.publish(ALICE, "news", "1", big), "not-acceptable", "payload-too-big"
        )
        self.assertEqual(e.type, "modify")
        await self.pubsub.configure(ALICE, "news", {"pubsub#max_payload_size": "10"})
        await self.fails(
            self.pubsub.publish(ALICE, "news", "1", ENTRY), "not-acceptable", "payload-too-big"
        )

    async def test_event_types(self) -> None:
        """XEP-0060 §4.3 and §7.1.3.6: what a publication holds depends on the node."""
        await self.node("persistent")
        await self.fails(
            self.pubsub.publish(ALICE, "persistent", has_item=False), "bad-request", "item-required"
        )
        await self.fails(
            self.pubsub.publish(ALICE, "persistent", "1"), "bad-request", "payload-required"
        )
        await self.node("transient", persist_items=False)
        await self.fails(
            self.pubsub.publish(ALICE, "transient", has_item=False),
            "bad-request",
            "payload-required",
        )
        await self.node("notification", persist_items=False, deliver_payloads=False)
        await self.fails(
            self.pubsub.publish(ALICE, "notification", "1", ENTRY), "bad-request", "item-forbidden"
        )
        await self.fails(
            self.pubsub.publish(ALICE, "notification", "1"), "bad-request", "item-forbidden"
        )
        await self.node("persistent-notification", deliver_payloads=False)
        self.events.clear()
        # A persistent notification-only node takes an empty item.
        self.assertEqual(await self.pubsub.publish(ALICE, "persistent-notification", "1"), "1")
        self.assertEqual(len(await self.pubsub.items(ALICE, "persistent-notification")), 1)
        # A transient notification-only node takes no item at all.
        self.assertIsNone(await self.pubsub.publish(ALICE, "notification", has_item=False))
        event = self.events[-1]
        self.assertEqual((event.node, event.item_id, event.payload), ("notification", None, ""))

    async def test_transient_items_are_notified_not_stored(self) -> None:
        await self.node(persist_items=False)
        item_id = await self.pubsub.publish(ALICE, "news", None, ENTRY)
        [event] = self.events_of(ItemPublished)
        self.assertEqual((event.item_id, event.payload), (item_id, ENTRY))
        self.assertIsNone(await self.pubsub.last_item("news"))
        await self.unsupported(self.pubsub.items(ALICE, "news"), "persistent-items")

    async def test_deliver_notifications_off(self) -> None:
        await self.node(deliver_notifications=False)
        await self.pubsub.publish(ALICE, "news", "1", ENTRY)
        [event] = self.events_of(ItemPublished)
        self.assertFalse(event.notify)

    async def test_publish_errors(self) -> None:
        await self.fails(self.pubsub.publish(ALICE, "news", "1", ENTRY), "item-not-found")
        await self.fails(
            self.pubsub.publish(ALICE, None, "1", ENTRY), "bad-request", "nodeid-required"
        )
        await self.node()
        await self.fails(self.pubsub.publish(BOB, "news", "1", ENTRY), "forbidden")

    async def test_publish_models(self) -> None:
        await self.node("publishers")
        await self.node("subscribers", publish_model="subscribers")
        await self.node("open", publish_model="open")
        await self.affiliate("open", "dave@localhost", "outcast")
        await self.pubsub.subscribe(BOB, "subscribers", "bob@localhost")
        for node, publisher, allowed in [
            ("publishers", BOB, False),
            ("subscribers", BOB, True),  # subscribed with its bare JID
            ("subscribers", "bob@localhost/other", True),
            ("subscribers", CAROL, False),
            ("open", CAROL, True),
            ("open", "dave@localhost/x", False),
        ]:
            call = self.pubsub.publish(publisher, node, "1", ENTRY)
            if allowed:
                await call
            else:
                await self.fails(call, "forbidden")
        await self.affiliate("publishers", BOB, "publish-only")
        await self.pubsub.publish(BOB, "publishers", "1", ENTRY)

    async def test_publish_options(self) -> None:
        await self.node()
        options = {
            "FORM_TYPE": "http://jabber.org/protocol/pubsub#publish-options",
            "pubsub#access_model": "open",
            "pubsub#persist_items": "true",
        }
        await self.pubsub.publish(ALICE, "news", "1", ENTRY, options)
        e = await self.fails(
            self.pubsub.publish(ALICE, "news", "2", ENTRY, {"pubsub#access_model": "whitelist"}),
            "conflict",
            "precondition-not-met",
        )
        self.assertEqual(e.type, "cancel")
        await self.fails(
            self.pubsub.publish(ALICE, "news", "2", ENTRY, {"pubsub#color": "red"}),
            "conflict",
            "precondition-not-met",
        )
        self.assertEqual([i.item_id for i in await self.pubsub.items(ALICE, "news")], ["1"])


class RecordedStoreBase(Base):
    """Base with the item ids of each publish_items recorded."""

    def setUp(self) -> None:
        super().setUp()
        self.stored: list[list[str]] = []
        publish_items = self.store.publish_items

        def recorded(service, name, items, max_items):
            self.stored.append([item.item_id for item in items])
            return publish_items(service, name, items, max_items)

        self.store.publish_items = recorded

    async def outcomes(self, *publications: Publication) -> list[Any]:
        """Item ids, and (condition, pubsub condition) for the refused."""
        return [
            (o.condition, o.pubsub_condition) if isinstance(o, PubSubError) else o
            async for o in self.pubsub.publish_many(publications)
        ]


class PublishManyTests(RecordedStoreBase):
    """Publications to one node stored together, with the outcomes of one by one."""

    async def test_checked_each_stored_once_in_order(self) -> None:
        await self.node(max_items=2)
        self.events.clear()
        outcomes = await self.outcomes(
            Publication(ALICE, "news", "1", ENTRY),
            Publication(BOB, "news", "2", ENTRY),
            Publication(ALICE, "news", None, None, has_item=False),
            Publication(ALICE, "news", "3", ENTRY, {"pubsub#max_items": "5"}),
            Publication(ALICE, "news", None, ENTRY),
            Publication(ALICE, "news", "1", ENTRY),
        )
        generated = outcomes[4]
        self.assertEqual(
            outcomes,
            [
                "1",
                ("forbidden", None),
                ("bad-request", "item-required"),
                ("conflict", "precondition-not-met"),
                generated,
                "1",
            ],
        )
        self.assertEqual(self.stored, [["1", generated, "1"]])
        self.assertEqual([e.item_id for e in self.events], ["1", generated, "1"])
        self.assertEqual([e.publisher for e in self.events], [ALICE] * 3)
        items = await self.pubsub.items(ALICE, "news")
        self.assertEqual([item.item_id for item in items], ["1", generated])

    async def test_a_failed_store_fails_the_publications_that_passed_their_checks(self) -> None:
        await self.node()
        self.events.clear()
        self.store.publish_items = lambda *args: defer.fail(RuntimeError("gone"))
        outcomes = [
            o
            async for o in self.pubsub.publish_many(
                [Publication(ALICE, "news", "1", ENTRY), Publication(BOB, "news", "2", ENTRY)]
            )
        ]
        self.assertIsInstance(outcomes[0], RuntimeError)
        self.assertEqual(outcomes[1].condition, "forbidden")
        self.assertEqual(self.events, [])

    async def test_what_sees_the_one_before_runs_one_at_a_time(self) -> None:
        # notify_retract: which items each pushes out depends on the one before.
        await self.node(max_items=1, notify_retract=True)
        self.events.clear()
        outcomes = await self.outcomes(
            Publication(ALICE, "news", "1", ENTRY), Publication(ALICE, "news", "2", ENTRY)
        )
        self.assertEqual(outcomes, ["1", "2"])
        self.assertEqual(self.stored, [])
        self.assertEqual(
            [(type(e), getattr(e, "item_ids", None)) for e in self.events],
            [(ItemPublished, None), (ItemPublished, None), (ItemsRetracted, ("1",))],
        )
        # A missing node: the first creates it, or says it is not there.
        self.assertEqual(
            await self.outcomes(Publication(ALICE, "nowhere", "1", ENTRY)),
            [("item-not-found", None)],
        )


class PepPublishManyTests(RecordedStoreBase):
    is_pep = True
    service_key = "alice@localhost"
    defaults = PEP_NODE_DEFAULTS

    async def test_checked_each_stored_once_in_order(self) -> None:
        self.events.clear()
        outcomes = await self.outcomes(
            Publication(ALICE, "urn:xmpp:omemo:2:devices", "a", "<devices/>"),
            Publication(ALICE, "urn:xmpp:omemo:2:devices", "b", "<devices/>"),
        )
        self.assertEqual(outcomes, ["a", "b"])
        self.assertEqual(
            [type(e) for e in self.events], [NodeCreated, ItemPublished, ItemPublished]
        )
        # Once it exists, they are stored together.
        outcomes = await self.outcomes(
            Publication(ALICE, "urn:xmpp:omemo:2:devices", "c", "<devices/>"),
            Publication(BOB, "urn:xmpp:omemo:2:devices", "x", "<devices/>"),
            Publication(ALICE, "urn:xmpp:omemo:2:devices", "d", "<devices/>"),
        )
        self.assertEqual(outcomes, ["c", ("forbidden", None), "d"])
        self.assertEqual(self.stored, [["c", "d"]])
        [item] = await self.pubsub.items(ALICE, "urn:xmpp:omemo:2:devices")
        self.assertEqual(item.item_id, "d")


class RetractTests(Base):
    async def stored_ids(self, node: str = "news") -> list[str]:
        """The ids of the node's items in the store, oldest first."""
        return sorted(i.item_id for i in await self.store.get_items(SERVICE, node))

    async def test_retract(self) -> None:
        await self.node()
        await self.pubsub.publish(ALICE, "news", "1", ENTRY)
        await self.pubsub.publish(ALICE, "news", "2", ENTRY)
        await self.pubsub.retract(ALICE, "news", "1")
        self.assertEqual([i.item_id for i in await self.pubsub.items(ALICE, "news")], ["2"])
        self.assertEqual(await self.pubsub.items(ALICE, "news", item_ids=["1"]), [])
        [event] = self.events_of(ItemsRetracted)
        self.assertEqual((event.item_ids, event.notify), (("1",), False))
        await self.pubsub.retract(ALICE, "news", "2", notify=True)
        self.assertEqual(await self.pubsub.items(ALICE, "news"), [])
        self.assertEqual(await self.stored_ids(), [])
        self.assertTrue(self.events_of(ItemsRetracted)[1].notify)

    async def test_notify_retract(self) -> None:
        await self.node(notify_retract=True)
        await self.pubsub.publish(ALICE, "news", "1", ENTRY)
        await self.pubsub.retract(ALICE, "news", "1")
        self.assertEqual(await self.stored_ids(), [])
        [event] = self.events_of(ItemsRetracted)
        self.assertEqual((event.item_ids, event.notify), (("1",), True))

    async def test_retract_errors(self) -> None:
        await self.node()
        await self.fails(self.pubsub.retract(ALICE, "news", "1"), "item-not-found")
        await self.fails(self.pubsub.retract(ALICE, "news", None), "bad-request", "item-required")
        await self.fails(self.pubsub.retract(ALICE, None, "1"), "bad-request", "nodeid-required")
        await self.fails(self.pubsub.retract(ALICE, "old", "1"), "item-not-found")
        await self.pubsub.publish(ALICE, "news", "1", ENTRY)
        await self.fails(self.pubsub.retract(BOB, "news", "1"), "forbidden")
        self.assertEqual(await self.stored_ids(), ["1"])  # a refused retract leaves the item
        await self.node("transient", persist_items=False)
        await self.unsupported(self.pubsub.retract(ALICE, "transient", "1"), "persistent-items")
        self.assertEqual(self.events_of(ItemsRetracted), [])

    async def test_publish_only_retracts_its_own_items(self) -> None:
        await self.node()
        await self.affiliate("news", BOB, "publish-only")
        await self.pubsub.publish(ALICE, "news", "alice's", ENTRY)
        await self.pubsub.publish("bob@localhost/laptop", "news", "bob's", ENTRY)
        await self.fails(self.pubsub.retract(BOB, "news", "alice's"), "forbidden")
        await self.pubsub.retract(BOB, "news", "bob's")  # another resource of the publisher
        self.assertEqual(await self.stored_ids(), ["alice's"])

    async def test_publishers_retract_any_item(self) -> None:
        await self.node()
        await self.affiliate("news", BOB, "publisher")
        await self.pubsub.publish(ALICE, "news", "1", ENTRY)
        await self.pubsub.retract(BOB, "news", "1")
        self.assertEqual(await self.stored_ids(), [])

    async def test_open_publishers_retract_their_own_items(self) -> None:
        await self.node(publish_model="open")
        await self.pubsub.publish(ALICE, "news", "alice's", ENTRY)
        await self.pubsub.publish(BOB, "news", "bob's", ENTRY)
        await self.fails(self.pubsub.retract(BOB, "news", "alice's"), "forbidden")
        await self.pubsub.retract(BOB, "news", "bob's")
        self.assertEqual(await self.stored_ids(), ["alice's"])


class PurgeOfflineTests(Base):
    async def test_only_the_publishers_items_on_a_purging_node(self) -> None:
        await self.node(purge_offline=True)
        await self.affiliate("news", bare_jid(BOB), "publisher")
        await self.pubsub.publish(ALICE, "news", "a", ENTRY)
        await self.pubsub.publish(BOB, "news", "b1", ENTRY)
        await self.pubsub.publish(BOB, "news", "b2", ENTRY)
        await self.pubsub.purge_offline_publisher("news", bare_jid(BOB))
        self.assertEqual([i.item_id for i in await self.pubsub.items(ALICE, "news")], ["a"])
        [event] = self.events_of(ItemsRetracted)
        self.assertEqual(sorted(event.item_ids), ["b1", "b2"])

    async def test_a_node_without_the_option_is_left_alone(self) -> None:
        await self.node()
        await self.pubsub.publish(ALICE, "news", "a", ENTRY)
        await self.pubsub.purge_offline_publisher("news", bare_jid(ALICE))
        self.assertEqual(len(await self.pubsub.items(ALICE, "news")), 1)

    async def test_a_deleted_node_is_no_error(self) -> None:
        await self.pubsub.purge_offline_publisher("gone", bare_jid(ALICE))


class ItemsTests(Base):
    async def test_items(self) -> None:
        await self.node()
        for item_id in "123":
            await self.pubsub.publish(ALICE, "news", item_id, ENTRY)
        ids = [i.item_id for i in await self.pubsub.items(BOB, "news")]
        self.assertEqual(ids, ["3", "2", "1"])
        ids = [i.item_id for i in await self.pubsub.items(BOB, "news", max_items=2)]
        self.assertEqual(ids, ["3", "2"])
        ids = [i.item_id for i in await self.pubsub.items(BOB, "news", item_ids=["1", "9"])]
        self.assertEqual(ids, ["1"])
        await self.pubsub.configure(ALICE, "news", {"pubsub#max_items": "1"})
        ids = [i.item_id for i in await self.pubsub.items(BOB, "news")]
        self.assertEqual(ids, ["3"])
        self.assertEqual((await self.pubsub.last_item("news")).item_id, "3")

    async def test_items_errors(self) -> None:
        await self.fails(self.pubsub.items(BOB, "news"), "item-not-found")
        await self.node()
        await self.affiliate("news", BOB, "outcast")
        await self.fails(self.pubsub.items(BOB, "news"), "forbidden")
        await self.affiliate("news", BOB, "publish-only")
        await self.fails(self.pubsub.items(BOB, "news"), "forbidden")

    async def test_max_items_must_be_positive(self) -> None:
        await self.node()
        for item_id in "123":
            await self.pubsub.publish(ALICE, "news", item_id, ENTRY)
        for max_items in (-1, 0):
            await self.fails(self.pubsub.items(BOB, "news", max_items=max_items), "bad-request")
        ids = [i.item_id for i in await self.pubsub.items(BOB, "news", max_items=1)]
        self.assertEqual(ids, ["3"])

    async def test_last_item(self) -> None:
        self.assertIsNone(await self.pubsub.last_item("news"))
        await self.node()
        self.assertIsNone(await self.pubsub.last_item("news"))
        await self.pubsub.publish(ALICE, "news", "1", ENTRY)
        await self.pubsub.publish(ALICE, "news", "2", ENTRY)
        last = await self.pubsub.last_item("news")
        self.assertIsInstance(last, PubSubItem)
        self.assertEqual(last.item_id, "2")


class AccessModelTests(Base):
    """Subscribing and reading items under each access model, for entities without affiliation."""

    async def both(self, node: str, who: str = BOB) -> None:
        await self.pubsub.items(who, node)
        await self.pubsub.subscribe(who, node, who)

    async def both_fail(self, node: str, condition: str, pubsub_condition: str) -> None:
        await self.fails(self.pubsub.items(BOB, node), condition, pubsub_condition)
        await self.fails(self.pubsub.subscribe(BOB, node, BOB), condition, pubsub_condition)

    async def test_open(self) -> None:
        await self.node()
        await self.both("news")

    async def test_presence(self) -> None:
        await self.node(access_model="presence")
        await self.both_fail("news", "not-authorized", "presence-subscription-required")
        self.relations["alice@localhost", "bob@localhost"] = Relation(presence_subscribed=True)
        await self.both("news")

    async def test_roster(self) -> None:
        await self.node(access_model="roster", roster_groups_allowed=["friends", "family"])
        self.relations["alice@localhost", "bob@localhost"] = Relation(
            presence_subscribed=True, groups=frozenset({"work"})
        )
        await self.both_fail("news", "not-authorized", "not-in-roster-group")
        self.relations["alice@localhost", "bob@localhost"] = Relation(groups=frozenset({"family"}))
        await self.both("news")

    async def test_any_owner_admits(self) -> None:
        await self.node(access_model="presence")
        await self.affiliate("news", CAROL, "owner")
        self.relations["carol@localhost", "bob@localhost"] = Relation(presence_subscribed=True)
        await self.both("news")

    async def test_without_relation_callback(self) -> None:
        self.pubsub = self.make_service()
        await self.node("presence", access_model="presence")
        await self.node("roster", access_model="roster", roster_groups_allowed=["friends"])
        await self.fails(
            self.pubsub.items(BOB, "presence"), "not-authorized", "presence-subscription-required"
        )
        await self.fails(self.pubsub.items(BOB, "roster"), "not-authorized", "not-in-roster-group")
        await self.pubsub.items(ALICE, "presence")

    async def test_whitelist(self) -> None:
        await self.node(access_model="whitelist")
        e = await self.fails(self.pubsub.subscribe(BOB, "news", BOB), "not-allowed", "closed-node")
        self.assertEqual(e.type, "cancel")
        await self.fails(self.pubsub.items(BOB, "news"), "not-allowed", "closed-node")
        await self.affiliate("news", BOB, "member")
        await self.both("news")
        # Leaving the whitelist ends the subscription.
        await self.affiliate("news", BOB, "none")
        self.assertEqual(await self.pubsub.subscriptions_of(BOB), [])
        [event] = self.events_of(SubscriptionChanged)[1:]
        self.assertEqual((event.subscription.state, event.notify), ("none", True))

    async def test_authorize_approve(self) -> None:
        await self.node(access_model="authorize")
        await self.fails(self.pubsub.items(BOB, "news"), "not-authorized", "not-subscribed")
        sub = await self.pubsub.subscribe(BOB, "news", BOB)
        self.assertEqual(sub.state, "pending")
        [event] = self.events_of(SubscriptionPending)
        self.assertEqual(event, SubscriptionPending(SERVICE, "news", sub, ("alice@localhost",)))
        await self.fails(
            self.pubsub.subscribe(BOB, "news", BOB), "not-authorized", "pending-subscription"
        )
        await self.fails(self.pubsub.items(BOB, "news"), "not-authorized", "not-subscribed")
        self.assertEqual(await self.pubsub.list_pending(ALICE, "news"), [sub])
        self.assertEqual(await self.pubsub.pending_nodes(ALICE), ["news"])
        await self.fails(self.pubsub.list_pending(BOB, "news"), "forbidden")
        await self.fails(self.pubsub.authorize_subscription(BOB, "news", BOB, True), "forbidden")
        await self.pubsub.authorize_subscription(ALICE, "news", BOB, True)
        [event] = self.events_of(SubscriptionChanged)
        self.assertEqual(event.subscription.state, "subscribed")
        self.assertEqual((event.subscription.subid, event.notify), (sub.subid, True))
        await self.pubsub.items(BOB, "news")
        self.assertEqual(await self.pubsub.list_pending(ALICE, "news"), [])
        self.assertEqual(await self.pubsub.pending_nodes(ALICE), [])
        await self.fails(
            self.pubsub.authorize_subscription(ALICE, "news", BOB, True),
            "unexpected-request",
            "not-subscribed",
        )

    async def test_authorize_deny(self) -> None:
        await self.node(access_model="authorize")
        sub = await self.pubsub.subscribe(BOB, "news", BOB)
        await self.pubsub.authorize_subscription(ALICE, "news", BOB, False, subid=sub.subid)
        self.assertEqual(await self.pubsub.get_subscriptions(ALICE, "news"), [])
        [event] = self.events_of(SubscriptionChanged)
        self.assertEqual((event.subscription.state, event.notify), ("none", True))
        # Denied, Bob may ask again.
        self.assertEqual((await self.pubsub.subscribe(BOB, "news", BOB)).state, "pending")

    async def test_affiliates_need_no_approval(self) -> None:
        await self.node(access_model="authorize")
        await self.affiliate("news", BOB, "member")
        self.assertEqual((await self.pubsub.subscribe(BOB, "news", BOB)).state, "subscribed")
        await self.pubsub.items(BOB, "news")

    async def test_outcast(self) -> None:
        await self.node()
        await self.pubsub.subscribe(BOB, "news", BOB)
        await self.pubsub.subscribe("bob@localhost/other", "news", "bob@localhost")
        await self.affiliate("news", "bob@localhost/ignored", "outcast")
        self.assertEqual(
            await self.pubsub.get_affiliations(ALICE, "news"),
            {"alice@localhost": "owner", "bob@localhost": "outcast"},
        )
        # The outcast loses the subscriptions of its bare and full JIDs.
        self.assertEqual(await self.pubsub.get_subscriptions(ALICE, "news"), [])
        await self.fails(self.pubsub.subscribe(BOB, "news", BOB), "forbidden")
        await self.fails(self.pubsub.items(BOB, "news"), "forbidden")

    async def test_a_stricter_access_model_cancels_what_it_no_longer_admits(self) -> None:
        await self.node()
        await self.affiliate("news", CAROL, "member")
        await self.pubsub.subscribe(BOB, "news", BOB)
        await self.pubsub.subscribe(CAROL, "news", CAROL)
        await self.pubsub.configure(ALICE, "news", {"pubsub#access_model": "whitelist"})
        subscribers = [s.jid for s in await self.pubsub.get_subscriptions(ALICE, "news")]
        self.assertEqual(subscribers, [CAROL])  # the member stays
        dropped, configured = self.events[-2:]
        self.assertIsInstance(dropped, SubscriptionChanged)
        self.assertEqual((dropped.subscription.jid, dropped.subscription.state), (BOB, "none"))
        # The configuration is notified after, to whom stays subscribed.
        self.assertIsInstance(configured, NodeConfigured)
        self.assertEqual([s.jid for s in configured.subscriptions], [CAROL])

    async def test_fewer_roster_groups_cancel_what_they_no_longer_admit(self) -> None:
        await self.node(access_model="roster", roster_groups_allowed=["friends", "family"])
        self.relations["alice@localhost", "bob@localhost"] = Relation(groups=frozenset({"family"}))
        self.relations["alice@localhost", "carol@localhost"] = Relation(
            groups=frozenset({"friends"})
        )
        await self.pubsub.subscribe(BOB, "news", BOB)
        await self.pubsub.subscribe(CAROL, "news", CAROL)
        await self.pubsub.configure(ALICE, "news", {"pubsub#roster_groups_allowed": ["friends"]})
        subscribers = [s.jid for s in await self.pubsub.get_subscriptions(ALICE, "news")]
        self.assertEqual(subscribers, [CAROL])

    async def test_recheck_access(self) -> None:
        await self.node("friends", access_model="presence")
        await self.node("open")
        self.relations["alice@localhost", "bob@localhost"] = Relation(presence_subscribed=True)
        await self.pubsub.subscribe(BOB, "friends", BOB)
        await self.pubsub.subscribe(BOB, "open", BOB)
        await self.pubsub.recheck_access("bob@localhost")
        self.assertEqual(len(await self.pubsub.subscriptions_of(BOB)), 2)
        del self.relations["alice@localhost", "bob@localhost"]
        await self.pubsub.recheck_access("bob@localhost")
        self.assertEqual([n for n, _ in await self.pubsub.subscriptions_of(BOB)], ["open"])
        event = self.events[-1]
        self.assertEqual(
            (event.node, event.subscription.state, event.notify), ("friends", "none", True)
        )


class SubscriptionTests(Base):
    async def test_subscribe_and_unsubscribe(self) -> None:
        await self.node()
        self.events.clear()
        full = await self.pubsub.subscribe(BOB, "news", BOB)
        bare = await self.pubsub.subscribe(BOB, "news", "bob@localhost")
        self.assertEqual((full.jid, full.state), (BOB, "subscribed"))
        self.assertEqual(bare.jid, "bob@localhost")
        self.assertNotEqual(full.subid, bare.subid)
        self.assertEqual(
            self.events,
            [
                SubscriptionChanged(SERVICE, "news", full, notify=False),
                SubscriptionChanged(SERVICE, "news", bare, notify=False),
            ],
        )
        self.assertEqual(await self.pubsub.subscriptions_of(BOB), [("news", full), ("news", bare)])
        self.assertEqual(await self.pubsub.subscriptions_of(BOB, "other"), [])
        await self.pubsub.unsubscribe(BOB, "news", BOB)
        await self.pubsub.unsubscribe("bob@localhost/other", "news", "bob@localhost")
        self.assertEqual(await self.pubsub.subscriptions_of(BOB), [])
        self.assertEqual(self.events[-1].subscription.state, "none")

    async def test_subscribing_again_gives_the_subscription(self) -> None:
        await self.node()
        first = await self.pubsub.subscribe(BOB, "news", BOB)
        self.assertEqual(await self.pubsub.subscribe(BOB, "news", BOB), first)
        self.assertEqual(await self.pubsub.subscribe(BOB, "news", BOB, {}), first)
        self.assertEqual(len(await self.pubsub.get_subscriptions(ALICE, "news")), 1)

    async def test_subscribe_errors(self) -> None:
        await self.fails(self.pubsub.subscribe(BOB, "news", BOB), "item-not-found")
        await self.node()
        e = await self.fails(
            self.pubsub.subscribe(BOB, "news", CAROL), "bad-request", "invalid-jid"
        )
        self.assertEqual(e.type, "modify")
        await self.fails(self.pubsub.subscribe(BOB, "news", None), "bad-request", "jid-required")
        await self.fails(self.pubsub.subscribe(BOB, "", BOB), "bad-request", "nodeid-required")
        await self.fails(
            self.pubsub.subscribe(BOB, "news", BOB, {"pubsub#deliver": "maybe"}),
            "bad-request",
            "invalid-options",
        )
        await self.affiliate("news", BOB, "publish-only")
        await self.fails(self.pubsub.subscribe(BOB, "news", BOB), "forbidden")
        await self.node("quiet", subscribe=False)
        await self.unsupported(self.pubsub.subscribe(BOB, "quiet", BOB), "subscribe")

    async def test_multiple_subscriptions(self) -> None:
        await self.node()
        everywhere = await self.pubsub.subscribe(BOB, "news", BOB)
        chatty = await self.pubsub.subscribe(BOB, "news", BOB, {"pubsub#show-values": ["chat"]})
        self.assertNotEqual(everywhere.subid, chatty.subid)
        self.assertEqual(chatty.options, {"pubsub#show-values": ["chat"]})
        # The same options again: the same subscription.
        again = await self.pubsub.subscribe(BOB, "news", BOB, {"pubsub#show-values": "chat"})
        self.assertEqual(again, chatty)
        await self.fails(self.pubsub.unsubscribe(BOB, "news", BOB), "bad-request", "subid-required")
        await self.fails(
            self.pubsub.get_subscription_options(BOB, "news", BOB), "bad-request", "subid-required"
        )
        e = await self.fails(
            self.pubsub.unsubscribe(BOB, "news", BOB, "nope"), "not-acceptable", "invalid-subid"
        )
        self.assertEqual(e.type, "modify")
        await self.pubsub.unsubscribe(BOB, "news", BOB, chatty.subid)
        self.assertEqual(await self.pubsub.get_subscriptions(ALICE, "news"), [everywhere])

    async def test_unsubscribe_errors(self) -> None:
        await self.fails(self.pubsub.unsubscribe(BOB, "news", BOB), "item-not-found")
        await self.node()
        e = await self.fails(
            self.pubsub.unsubscribe(BOB, "news", BOB), "unexpected-request", "not-subscribed"
        )
        self.assertEqual(e.type, "cancel")
        await self.pubsub.subscribe(CAROL, "news", CAROL)
        await self.fails(self.pubsub.unsubscribe(BOB, "news", CAROL), "forbidden")
        await self.fails(self.pubsub.unsubscribe(BOB, "news", None), "bad-request", "jid-required")
        # A bare JID's subscription is not one of its full JID's.
        await self.pubsub.subscribe(BOB, "news", "bob@localhost")
        await self.fails(
            self.pubsub.unsubscribe(BOB, "news", BOB), "unexpected-request", "not-subscribed"
        )

    async def test_subscription_options(self) -> None:
        await self.node()
        sub = await self.pubsub.subscribe(BOB, "news", BOB, {"pubsub#deliver": "0"})
        options = await self.pubsub.get_subscription_options(BOB, "news", BOB)
        self.assertEqual(options["pubsub#deliver"], False)
        self.assertEqual(options["pubsub#show-values"], ["away", "chat", "dnd", "online", "xa"])
        await self.pubsub.set_subscription_options(
            BOB, "news", BOB, {"pubsub#deliver": "1", "pubsub#show-values": []}, sub.subid
        )
        options = await self.pubsub.get_subscription_options(BOB, "news", BOB, sub.subid)
        self.assertEqual((options["pubsub#deliver"], options["pubsub#show-values"]), (True, []))
        [stored] = await self.pubsub.get_subscriptions(ALICE, "news")
        self.assertEqual(stored.options, {"pubsub#deliver": True, "pubsub#show-values": []})
        await self.fails(
            self.pubsub.set_subscription_options(BOB, "news", BOB, {"pubsub#deliver": "x"}),
            "bad-request",
            "invalid-options",
        )

    async def test_subscription_options_errors(self) -> None:
        await self.node()
        await self.fails(
            self.pubsub.get_subscription_options(BOB, "news", BOB),
            "unexpected-request",
            "not-subscribed",
        )
        await self.pubsub.subscribe(CAROL, "news", CAROL)
        await self.fails(self.pubsub.get_subscription_options(BOB, "news", CAROL), "forbidden")
        await self.fails(self.pubsub.set_subscription_options(BOB, "news", CAROL, {}), "forbidden")
        await self.fails(
            self.pubsub.get_subscription_options(CAROL, "news", None), "bad-request", "jid-required"
        )
        await self.fails(
            self.pubsub.get_subscription_options(CAROL, "news", CAROL, "nope"),
            "not-acceptable",
            "invalid-subid",
        )
        await self.fails(
            self.pubsub.get_subscription_options(CAROL, "old", CAROL), "item-not-found"
        )


class OwnerSubscriptionTests(Base):
    async def test_get_subscriptions(self) -> None:
        await self.node()
        sub = await self.pubsub.subscribe(BOB, "news", BOB)
        self.assertEqual(await self.pubsub.get_subscriptions(ALICE, "news"), [sub])
        await self.fails(self.pubsub.get_subscriptions(BOB, "news"), "forbidden")
        await self.fails(self.pubsub.set_subscriptions(BOB, "news", []), "forbidden")

    async def test_set_subscriptions(self) -> None:
        await self.node(access_model="authorize")
        pending = await self.pubsub.subscribe(BOB, "news", BOB)
        doomed = await self.pubsub.subscribe(ALICE, "news", ALICE)
        self.events.clear()
        await self.pubsub.set_subscriptions(
            ALICE,
            "news",
            [
                SubscriptionChange(BOB, "subscribed"),  # approves the pending one
                SubscriptionChange(CAROL, "subscribed"),  # a new subscription
                SubscriptionChange(ALICE, "none", doomed.subid),
            ],
        )
        subs = await self.pubsub.get_subscriptions(ALICE, "news")
        self.assertEqual(
            [(s.jid, s.state) for s in subs], [(BOB, "subscribed"), (CAROL, "subscribed")]
        )
        self.assertEqual(subs[0].subid, pending.subid)
        self.assertEqual(
            [(e.subscription.jid, e.subscription.state, e.notify) for e in self.events],
            [(BOB, "subscribed", True), (CAROL, "subscribed", True), (ALICE, "none", True)],
        )

    async def test_refused_entries_are_returned_the_others_applied(self) -> None:
        await self.node()
        bob = await self.pubsub.subscribe(BOB, "news", BOB)
        await self.affiliate("news", "dave@localhost", "outcast")
        with self.assertRaises(PartlyFailed) as raised:
            await self.pubsub.set_subscriptions(
                ALICE,
                "news",
                [
                    SubscriptionChange(BOB, "unconfigured"),
                    SubscriptionChange(BOB, "subscribed", "nope"),
                    SubscriptionChange(BOB, "none", "nope"),
                    SubscriptionChange("dave@localhost", "subscribed"),
                    SubscriptionChange(CAROL, "subscribed"),
                ],
            )
        error = raised.exception
        self.assertEqual((error.condition, error.type), ("not-acceptable", "modify"))
        self.assertEqual(
            error.failed,
            (
                bob,
                PubSubSubscription(BOB, "nope", "none"),
                PubSubSubscription(BOB, "nope", "none"),
                PubSubSubscription("dave@localhost", "", "none"),
            ),
        )
        jids = [s.jid for s in await self.pubsub.get_subscriptions(ALICE, "news")]
        self.assertEqual(jids, [BOB, CAROL])

    async def test_several_subscriptions_need_a_subid(self) -> None:
        await self.node()
        await self.pubsub.subscribe(BOB, "news", BOB)
        await self.pubsub.subscribe(BOB, "news", BOB, {"pubsub#deliver": "0"})
        with self.assertRaises(PartlyFailed):
            await self.pubsub.set_subscriptions(
                ALICE, "news", [SubscriptionChange(BOB, "subscribed")]
            )
        # Removing without subid removes them all.
        await self.pubsub.set_subscriptions(ALICE, "news", [SubscriptionChange(BOB, "none")])
        self.assertEqual(await self.pubsub.get_subscriptions(ALICE, "news"), [])


class AffiliationTests(Base):
    async def test_set_affiliations(self) -> None:
        await self.node()
        self.events.clear()
        await self.pubsub.set_affiliations(
            ALICE, "news", {"bob@localhost": "publisher", CAROL: "member"}
        )
        self.assertEqual(
            await self.pubsub.get_affiliations(ALICE, "news"),
            {"alice@localhost": "owner", "bob@localhost": "publisher", "carol@localhost": "member"},
        )
        self.assertEqual(
            self.events,
            [
                AffiliationChanged(SERVICE, "news", "bob@localhost", "publisher"),
                AffiliationChanged(SERVICE, "news", "carol@localhost", "member"),
            ],
        )
        await self.pubsub.publish(BOB, "news", "1", ENTRY)
        await self.fails(self.pubsub.publish(CAROL, "news", "2", ENTRY), "forbidden")
        self.assertEqual(await self.pubsub.affiliations_of(BOB), {"news": "publisher"})
        await self.pubsub.set_affiliations(ALICE, "news", {"bob@localhost": "none"})
        self.assertNotIn("bob@localhost", await self.pubsub.get_affiliations(ALICE, "news"))
        self.assertEqual(await self.pubsub.affiliations_of(BOB), {})

    async def test_only_owners_manage_affiliations(self) -> None:
        await self.node()
        await self.affiliate("news", BOB, "publisher")
        await self.fails(self.pubsub.get_affiliations(BOB, "news"), "forbidden")
        await self.fails(
            self.pubsub.set_affiliations(BOB, "news", {"bob@localhost": "owner"}), "forbidden"
        )
        await self.fails(self.pubsub.get_affiliations(ALICE, "old"), "item-not-found")

    async def test_the_last_owner_stays(self) -> None:
        await self.node()
        for affiliation in ["none", "publisher", "outcast"]:
            with self.assertRaises(PartlyFailed) as raised:
                await self.pubsub.set_affiliations(ALICE, "news", {ALICE: affiliation})
            self.assertEqual(raised.exception.condition, "not-acceptable")
            self.assertEqual(raised.exception.failed, (("alice@localhost", "owner"),))
        self.assertEqual(
            await self.pubsub.get_affiliations(ALICE, "news"), {"alice@localhost": "owner"}
        )
        self.assertEqual(self.events_of(AffiliationChanged), [])

    async def test_owners_may_be_swapped(self) -> None:
        await self.node()
        await self.pubsub.set_affiliations(
            ALICE, "news", {"alice@localhost": "none", "bob@localhost": "owner"}
        )
        self.assertEqual(
            await self.pubsub.get_affiliations(BOB, "news"), {"bob@localhost": "owner"}
        )
        await self.fails(self.pubsub.configure(ALICE, "news", {}), "forbidden")
        # An owner may resign when another owner remains.
        await self.pubsub.set_affiliations(
            BOB, "news", {"alice@localhost": "owner", "bob@localhost": "member"}
        )
        self.assertEqual(
            await self.pubsub.get_affiliations(ALICE, "news"),
            {"alice@localhost": "owner", "bob@localhost": "member"},
        )

    async def test_unknown_affiliation(self) -> None:
        await self.node()
        with self.assertRaises(PartlyFailed) as raised:
            await self.pubsub.set_affiliations(
                ALICE, "news", {BOB: "admin", "carol@localhost": "member"}
            )
        self.assertEqual(raised.exception.failed, (("bob@localhost", "none"),))
        self.assertEqual(
            await self.pubsub.get_affiliations(ALICE, "news"),
            {"alice@localhost": "owner", "carol@localhost": "member"},
        )


class PepTests(Base):
    """One service per account (XEP-0163): the account's bare JID is the service key."""

    is_pep = True
    service_key = "alice@localhost"
    defaults = PEP_NODE_DEFAULTS

    async def test_publishing_creates_the_node(self) -> None:
        await self.pubsub.publish(ALICE, "urn:xmpp:avatar:data", "a", "<data/>")
        node = await self.pubsub.get_node("urn:xmpp:avatar:data")
        self.assertEqual(node.config, PEP)
        self.assertEqual([type(e) for e in self.events], [NodeCreated, ItemPublished])
        self.assertEqual(self.events[0].owner, "alice@localhost")
        await self.pubsub.publish(ALICE, "urn:xmpp:avatar:data", "b", "<data/>")
        # PEP nodes keep one item.
        [item] = await self.pubsub.items(ALICE, "urn:xmpp:avatar:data")
        self.assertEqual(item.item_id, "b")

    async def test_publish_options_configure_the_created_node(self) -> None:
        options = {
            "FORM_TYPE": "http://jabber.org/protocol/pubsub#publish-options",
            "pubsub#access_model": "open",
        }
        bundles = "eu.siacs.conversations.axolotl.bundles:1"
        await self.pubsub.publish(ALICE, bundles, "current", "<bundle/>", options)
        config = await self.pubsub.get_configuration(ALICE, bundles)
        self.assertEqual(config["pubsub#access_model"], "open")
        await self.pubsub.items(BOB, bundles)  # no presence subscription needed
        await self.pubsub.publish(ALICE, bundles, "current", "<bundle/>", options)
        await self.fails(
            self.pubsub.publish(
                ALICE, bundles, "current", "<bundle/>", {"pubsub#access_model": "presence"}
            ),
            "conflict",
            "precondition-not-met",
        )

    async def test_refused_publications_create_nothing(self) -> None:
        await self.fails(
            self.pubsub.publish(ALICE, "n", "1", "<x/>", {"pubsub#max_items": "1000"}),
            "not-acceptable",
        )
        await self.fails(self.pubsub.get_node("n"), "item-not-found")
        # Nor does a refused publication.
        await self.fails(
            self.pubsub.publish(ALICE, "n", "1", None), "bad-request", "payload-required"
        )
        await self.fails(self.pubsub.get_node("n"), "item-not-found")
        self.assertEqual(self.events, [])

    async def test_only_the_account_creates(self) -> None:
        await self.fails(self.pubsub.publish(BOB, "n", "1", "<x/>"), "item-not-found")
        await self.fails(self.pubsub.create(BOB, "n"), "forbidden")
        await self.pubsub.create("alice@localhost/other", "n")

    async def test_contacts_read_presence_nodes(self) -> None:
        await self.pubsub.publish(ALICE, "tune", "current", "<tune/>")
        await self.fails(
            self.pubsub.items(BOB, "tune"), "not-authorized", "presence-subscription-required"
        )
        self.relations["alice@localhost", "bob@localhost"] = Relation(presence_subscribed=True)
        [item] = await self.pubsub.items(BOB, "tune")
        self.assertEqual(item.payload, "<tune/>")
        self.assertEqual([n.name for n in await self.pubsub.list_nodes(BOB)], ["tune"])
        self.assertEqual(await self.pubsub.list_nodes(CAROL), [])
