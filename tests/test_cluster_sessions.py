"""The cluster's session table without a broker or a database: the outbox's batching, remote
sessions, the table's view of both kinds, and what a node drops of what others send it."""

import json
from dataclasses import replace
from types import SimpleNamespace

from twisted.internet import defer
from twisted.internet.task import Clock
from twisted.trial import unittest
from twisted.words.protocols.jabber.jid import JID
from twisted.words.xish import domish

from mim_twisted.cluster.node import ClusterNode
from mim_twisted.cluster.sessions import (
    ClusterSessions,
    Outbox,
    RemoteSession,
    SessionTable,
    record_of,
    unpack_stanzas,
    wanted,
)
from mim_twisted.config import load_config
from mim_twisted.im.stream_management import parse_stanza
from mim_twisted.inflight import InFlight
from mim_twisted.pubsub import broadcast
from mim_twisted.pubsub.broadcast import Notification
from mim_twisted.storage import open_database
from tests import pgsupport
from tests.test_pubsub_protocol import published


class FakeBus:
    def __init__(self) -> None:
        self.sent: list[tuple[str, str, object]] = []
        self.broadcasts: list[tuple[str, object]] = []
        self.handlers: dict[str, object] = {}
        self.full = False

    def on(self, kind, handler) -> None:
        self.handlers[kind] = handler

    def send(self, node, kind, payload, undeliverable=None) -> None:
        if self.full and undeliverable is not None:
            undeliverable()
            return
        self.sent.append((node, kind, payload))

    def broadcast(self, kind, payload) -> None:
        self.broadcasts.append((kind, payload))


class FakeStore:
    def __init__(self) -> None:
        self.rows: dict[str, tuple[str, list]] = {}
        self.writing = InFlight()

    def save(self, record, node) -> None:
        self.rows[record[0]] = (node, record)

    def claim(self, record, node) -> defer.Deferred:
        holder = self.rows.get(record[0], (None,))[0]
        self.save(record, node)
        return defer.succeed(holder)

    def remove(self, jid, node) -> None:
        if self.rows.get(jid, (None,))[0] == node:
            del self.rows[jid]


class FakeSession:
    """The attributes of a local Session the table reads."""

    def __init__(self, jid: str) -> None:
        self.jid = JID(jid)
        self.full_jid = self.jid.full()
        self.closed = False
        self.ended = False
        self.presence = None
        self.message_priority = None
        self.caps_features = None
        self.roster_requested = False
        self.block_list_requested = False
        self.carbons = False
        self.replaced_count = 0

    def replaced(self) -> None:
        self.replaced_count += 1


def presence(priority: int) -> domish.Element:
    return parse_stanza(f"<presence><priority>{priority}</priority></presence>")


class OutboxTests(unittest.TestCase):
    def setUp(self) -> None:
        self.bus = FakeBus()
        self.clock = Clock()
        self.refused: list[list[tuple[str, str]]] = []
        self.outbox = Outbox(self.bus, self.clock, self.refused.append)

    def test_one_message_per_node_and_turn_each_payload_once(self) -> None:
        shared = "<presence from='a@localhost/x'/>"
        self.outbox.deliver("n2", "b@localhost/1", shared)
        self.outbox.deliver("n2", "b@localhost/2", shared)
        self.outbox.deliver("n3", "c@localhost/1", b"<message/>")
        self.assertEqual(self.bus.sent, [])
        self.clock.advance(0)
        self.assertEqual(
            self.bus.sent,
            [
                ("n2", "stanzas", [[shared], [["b@localhost/1", 0], ["b@localhost/2", 0]]]),
                ("n3", "stanzas", [["<message/>"], [["c@localhost/1", 0]]]),
            ],
        )
        self.assertEqual(
            unpack_stanzas(self.bus.sent[0][2]),
            [("b@localhost/1", shared), ("b@localhost/2", shared)],
        )

    def test_copies_differing_in_their_recipient_are_carried_once(self) -> None:
        for jid in ("b@localhost/1", "c@localhost/2"):
            self.outbox.deliver("n2", jid, f"<message to='{jid}'><event/></message>")
        self.outbox.deliver("n2", "d@localhost/3", "<message to='d@localhost'/>")
        self.clock.advance(0)
        [(_, _, payload)] = self.bus.sent
        self.assertEqual(
            payload,
            [
                ["<message to='\x00'><event/></message>", "<message to='d@localhost'/>"],
                [["b@localhost/1", 0], ["c@localhost/2", 0], ["d@localhost/3", 1]],
            ],
        )
        self.assertEqual(
            unpack_stanzas(payload),
            [
                ("b@localhost/1", "<message to='b@localhost/1'><event/></message>"),
                ("c@localhost/2", "<message to='c@localhost/2'><event/></message>"),
                ("d@localhost/3", "<message to='d@localhost'/>"),
            ],
        )

    def test_what_the_bus_refuses_comes_back(self) -> None:
        self.bus.full = True
        self.outbox.deliver("n2", "b@localhost/1", "<message/>")
        self.clock.advance(0)
        self.assertEqual(self.refused, [[("b@localhost/1", "<message/>")]])

    def test_a_notification_is_carried_once_with_each_address(self) -> None:
        message = domish.Element((None, "message"))
        message["from"] = "pubsub.localhost"
        message.addElement(("http://jabber.org/protocol/pubsub#event", "event"))
        notification = Notification(message)
        self.outbox.deliver("n2", "a@localhost/0", "<presence/>")
        for jid, address in (
            ("b@localhost/1", "b@localhost"),
            ("b@localhost/2", "b@localhost"),
            ("c'o@localhost/3", "c'o@localhost/3"),
        ):
            self.outbox.notify("n2", jid, notification, address)
        self.clock.advance(0)
        [(_, _, payload)] = self.bus.sent
        texts, deliveries = payload
        self.assertEqual(texts[0], "<presence/>")
        self.assertEqual(texts[1], notification.template("\x00"))
        self.assertEqual(texts[1].count("\x00"), 1)
        self.assertEqual(
            deliveries,
            [
                ["a@localhost/0", 0],
                ["b@localhost/1", 1, "b@localhost"],
                ["b@localhost/2", 1, "b@localhost"],
                ["c'o@localhost/3", 1],
            ],
        )
        self.assertEqual(
            unpack_stanzas(payload),
            [
                ("a@localhost/0", "<presence/>"),
                ("b@localhost/1", notification.to("b@localhost").decode()),
                ("b@localhost/2", notification.to("b@localhost").decode()),
                ("c'o@localhost/3", notification.to("c'o@localhost/3").decode()),
            ],
        )
        self.assertIn("to='c&apos;o@localhost/3'", unpack_stanzas(payload)[3][1])

    def test_a_refused_notification_comes_back_addressed(self) -> None:
        self.bus.full = True
        notification = Notification(domish.Element((None, "message")))
        self.outbox.notify("n2", "b@localhost/1", notification, "b@localhost")
        self.clock.advance(0)
        self.assertEqual(
            self.refused, [[("b@localhost/1", notification.to("b@localhost").decode())]]
        )


class RecordTests(unittest.TestCase):
    def test_a_record_makes_the_same_session_remotely(self) -> None:
        local = FakeSession("a@localhost/x")
        self.assertEqual(record_of(local), ["a@localhost/x", None, None, None])
        local.presence = presence(5)
        local.message_priority = 5
        local.caps_features = frozenset({"b", "a"})
        record = record_of(local)
        self.assertEqual(record[:2], ["a@localhost/x", 5])
        self.assertEqual(record[3], ["a", "b"])
        remote = RemoteSession(JID("a@localhost/x"), "n2", None)
        remote.update(record)
        self.assertEqual((remote.priority, remote.message_priority), (5, 5))
        self.assertEqual(remote.presence.name, "presence")
        self.assertEqual(remote.caps_features, frozenset({"a", "b"}))


class WantedTests(unittest.TestCase):
    def test_pushes_only_to_sessions_that_asked(self) -> None:
        session = FakeSession("a@localhost/x")
        roster_push = parse_stanza("<iq type='set'><query xmlns='jabber:iq:roster'/></iq>")
        block_push = parse_stanza("<iq type='set'><block xmlns='urn:xmpp:blocking'/></iq>")
        carbon = parse_stanza("<message><sent xmlns='urn:xmpp:carbons:2'/></message>")
        plain = parse_stanza("<message><body>hi</body></message>")
        self.assertEqual(
            [wanted(session, s) for s in (roster_push, block_push, carbon, plain)],
            [False, False, False, True],
        )
        session.roster_requested = session.block_list_requested = session.carbons = True
        self.assertTrue(all(wanted(session, s) for s in (roster_push, block_push, carbon)))


class ClusterSessionsTests(unittest.TestCase):
    def setUp(self) -> None:
        self.bus = FakeBus()
        self.store = FakeStore()
        self.clock = Clock()
        self.sessions = ClusterSessions(
            "n1", self.bus, Outbox(self.bus, self.clock, lambda _: None), self.store
        )

    def test_the_changes_of_one_turn_are_announced_once(self) -> None:
        local = FakeSession("a@localhost/here")
        self.sessions.bind(local)
        self.bus.broadcasts.clear()
        # An available presence whose caps are known: the presence and the caps, one turn.
        local.presence, local.message_priority = presence(5), 5
        self.sessions.announce(local)
        local.caps_features = frozenset({"urn:xmpp:omemo:2:devices+notify"})
        self.sessions.announce(local)
        self.assertEqual(self.bus.broadcasts, [])
        self.clock.advance(0)
        self.assertEqual(self.bus.broadcasts, [("session", record_of(local))])
        self.assertEqual(self.store.rows["a@localhost/here"], ("n1", record_of(local)))

    def test_a_change_of_a_session_gone_in_the_same_turn_is_not_announced(self) -> None:
        local = FakeSession("a@localhost/here")
        self.sessions.bind(local)
        self.sessions.announce(local)
        self.sessions.unbind(local)
        self.bus.broadcasts.clear()
        self.clock.advance(0)
        self.assertEqual(self.bus.broadcasts, [])
        self.assertNotIn("a@localhost/here", self.store.rows)

    def test_local_and_remote_sessions_side_by_side(self) -> None:
        local = FakeSession("a@localhost/here")
        self.sessions.bind(local)
        self.assertEqual(self.store.rows["a@localhost/here"][0], "n1")
        self.assertEqual(self.bus.broadcasts, [("session", record_of(local))])
        self.bus.handlers["session"]("n2", ["a@localhost/there", 3, None, None])
        remote = self.sessions.session(JID("a@localhost/there"))
        self.assertIsInstance(remote, RemoteSession)
        self.assertEqual((remote.node, remote.message_priority), ("n2", 3))
        self.assertEqual(
            {s.jid.full() for s in self.sessions.sessions_of(JID("a@localhost"))},
            {"a@localhost/here", "a@localhost/there"},
        )
        self.assertEqual(len(self.sessions), 1)  # this node's
        self.assertTrue(self.sessions.has_remote_sessions(JID("a@localhost/elsewhere")))
        self.assertFalse(self.sessions.has_remote_sessions(JID("b@localhost")))
        remote.send("<message/>")
        self.clock.advance(0)
        self.assertEqual(self.bus.sent[-1][:2], ("n2", "stanzas"))
        self.bus.handlers["unbound"]("n3", "a@localhost/there")  # not its node: ignored
        self.assertIs(self.sessions.session(JID("a@localhost/there")), remote)
        self.bus.handlers["unbound"]("n2", "a@localhost/there")
        self.assertIsNone(self.sessions.session(JID("a@localhost/there")))
        self.assertTrue(remote.closed)

    def test_binding_a_full_jid_bound_elsewhere_replaces_that_session(self) -> None:
        self.bus.handlers["session"]("n2", ["a@localhost/same", None, None, None])
        self.sessions.bind(FakeSession("a@localhost/same"))
        self.assertIn(("n2", "replace", "a@localhost/same"), self.bus.sent)
        self.assertNotIsInstance(self.sessions.session(JID("a@localhost/same")), RemoteSession)

    def test_replaced_from_elsewhere(self) -> None:
        local = FakeSession("a@localhost/same")
        self.sessions.bind(local)
        self.bus.handlers["replace"]("n2", "a@localhost/same")
        self.assertEqual(local.replaced_count, 1)

    def test_ended_from_elsewhere_with_the_condition_given(self) -> None:
        local = FakeSession("a@localhost/x")
        errors = []
        local.stream_error = lambda condition, text=None: errors.append((condition, text))
        self.sessions.bind(local)
        remote = RemoteSession(JID("b@localhost/y"), "n2", self.sessions.outbox)
        remote.stream_error("not-authorized", "Account removed")
        self.assertEqual(
            self.bus.sent[-1], ("n2", "end", ["b@localhost/y", "not-authorized", "Account removed"])
        )
        self.bus.handlers["end"]("n2", ["a@localhost/x", "not-authorized", "Account removed"])
        self.assertEqual(errors, [("not-authorized", "Account removed")])

    def test_a_replaced_session_unbinding_leaves_the_new_ones_row(self) -> None:
        older, newer = FakeSession("a@localhost/same"), FakeSession("a@localhost/same")
        self.sessions.bind(older)
        self.sessions.bind(newer)
        broadcasts = len(self.bus.broadcasts)
        self.sessions.unbind(older)
        self.assertEqual(len(self.bus.broadcasts), broadcasts)
        self.assertIn("a@localhost/same", self.store.rows)
        self.sessions.unbind(newer)
        self.assertEqual(self.bus.broadcasts[-1], ("unbound", "a@localhost/same"))
        self.assertNotIn("a@localhost/same", self.store.rows)

    def test_forget_node_and_reload(self) -> None:
        self.bus.handlers["session"]("n2", ["a@localhost/1", 0, None, None])
        self.bus.handlers["session"]("n3", ["b@localhost/1", 0, None, None])
        self.assertEqual(self.sessions.nodes(), {"n2", "n3"})
        [gone] = self.sessions.forget_node("n2")
        self.assertEqual(gone.jid.full(), "a@localhost/1")
        self.assertEqual(self.sessions.nodes(), {"n3"})
        self.sessions.replace_all(
            [("n4", ["c@localhost/1", None, None, None]), ("n1", ["d@localhost/1", 0, None, None])]
        )
        self.assertEqual(self.sessions.nodes(), {"n4"})  # its own rows are not remote

    def test_a_claim_finding_another_node_replaces_its_session(self) -> None:
        # Bound there at the same moment: not yet announced here, but in the table.
        self.store.rows["a@localhost/same"] = ("n2", ["a@localhost/same", None, None, None])
        local = FakeSession("a@localhost/same")
        self.sessions.bind(local)
        self.assertEqual(self.bus.sent, [("n2", "replace", "a@localhost/same")])
        self.assertEqual(self.bus.broadcasts[-1], ("session", record_of(local)))

    def test_listeners_are_told_of_local_and_remote_changes(self) -> None:
        changed: list[str] = []
        self.sessions.on_sessions_changed.append(changed.append)
        local = FakeSession("a@localhost/here")
        self.sessions.bind(local)
        self.sessions.sessions_changed("a@localhost")  # as presence and caps handling do
        self.assertEqual(changed, ["a@localhost"] * 2)
        changed.clear()
        announced = self.bus.handlers["session"]
        announced("n2", ["b@localhost/1", None, None, None])  # bound there
        announced("n2", ["b@localhost/1", 3, "<presence/>", None])  # available
        announced("n2", ["b@localhost/1", 5, "<presence><show>away</show></presence>", None])
        announced("n2", ["b@localhost/1", 5, "<presence/>", ["x+notify"]])  # caps
        announced("n2", ["b@localhost/1", 5, "<presence/>", ["x+notify"]])
        self.assertEqual(changed, ["b@localhost"] * 3)
        self.bus.handlers["unbound"]("n2", "b@localhost/1")
        self.assertEqual(changed, ["b@localhost"] * 4)
        announced("n2", ["c@localhost/1", None, None, None])
        self.sessions.replace_all([("n3", ["d@localhost/1", None, None, None])])
        self.assertEqual(changed[4:], ["c@localhost", "c@localhost", "d@localhost"])
        self.assertEqual(
            [s.full_jid for s in self.sessions.bound_sessions_of(JID("d@localhost"))],
            ["d@localhost/1"],
        )


class SessionTableRaceTests(unittest.TestCase):
    """Two nodes binding one full JID at once, on one PostgreSQL database: the table decides."""

    async def node(self, dsn: str, name: str) -> tuple[ClusterSessions, FakeBus, SessionTable]:
        database = await open_database("postgresql", postgresql_dsn=dsn, auto_migrate=True)
        self.addCleanup(database.close)
        bus = FakeBus()
        table = SessionTable(database)
        return ClusterSessions(name, bus, Outbox(bus, Clock(), lambda _: None), table), bus, table

    async def test_the_later_claim_replaces_the_other_session(self) -> None:
        dsn = pgsupport.create_temp_database(self)
        nodes = [await self.node(dsn, name) for name in ("n1", "n2")]
        bound = [FakeSession("a@localhost/same") for _ in nodes]
        for (sessions, _, _), session in zip(nodes, bound, strict=True):
            sessions.bind(session)  # neither has heard of the other's
        for _, _, table in nodes:
            await table.writing.idle()
        replaces = [
            (index, sent)
            for index, (_, bus, _) in enumerate(nodes)
            for sent in bus.sent
            if sent[1] == "replace"
        ]
        self.assertEqual(len(replaces), 1)
        [(winner, (loser_name, _, jid))] = replaces
        loser = 1 - winner
        self.assertEqual((loser_name, jid), (nodes[loser][0].node, "a@localhost/same"))
        [(node, *_)] = await nodes[0][2].load()
        self.assertEqual(node, nodes[winner][0].node)
        # The loser's node ends its session; its unbinding leaves the winner's row.
        nodes[loser][1].handlers["replace"](nodes[winner][0].node, jid)
        self.assertEqual(bound[loser].replaced_count, 1)
        self.assertEqual(bound[winner].replaced_count, 0)
        nodes[loser][0].unbind(bound[loser])
        await nodes[loser][2].writing.idle()
        [(node, *_)] = await nodes[0][2].load()
        self.assertEqual(node, nodes[winner][0].node)


class SessionTableTurnTests(unittest.TestCase):
    """With a reactor, the table's writes of one turn go in one statement per kind."""

    async def test_the_writes_of_a_turn_go_together(self) -> None:
        dsn = pgsupport.create_temp_database(self)
        database = await open_database("postgresql", postgresql_dsn=dsn, auto_migrate=True)
        self.addCleanup(database.close)
        runs = []
        run = database.run

        def counted(body, alone: bool = False) -> defer.Deferred:
            runs.append(alone)
            return run(body, alone=alone)

        database.run = counted
        clock, bus = Clock(), FakeBus()
        table = SessionTable(database, clock)
        sessions = ClusterSessions("n1", bus, Outbox(bus, clock, lambda _: None), table)
        bound = [FakeSession(f"u{index}@localhost/r") for index in range(3)]
        for session in bound:
            sessions.bind(session)
        self.assertEqual(runs, [])
        clock.advance(0)
        await table.writing.idle()
        self.assertEqual(runs, [True])  # one insert for the three claims
        for session in bound:
            session.presence, session.message_priority = presence(5), 5
            sessions.announce(session)
        clock.advance(0)
        await table.writing.idle()
        rows = sorted((await table.load()), key=lambda row: row[1][0])
        self.assertEqual(
            [(node, record[0], record[1]) for node, record in rows],
            [("n1", f"u{index}@localhost/r", 5) for index in range(3)],
        )
        for session in bound:
            sessions.unbind(session)
        clock.advance(0)
        await table.writing.idle()
        # The claims' insert, the saves, the load above, the removals: one statement each.
        self.assertEqual(runs, [True, True, False, True])
        self.assertEqual(await table.load(), [])


class FakeDatabase:
    """`run(body)` answers with the Deferreds a test holds, or with no rows."""

    def __init__(self) -> None:
        self.waiting: list[defer.Deferred] = []
        self.hold = False

    def run(self, body, alone: bool = False) -> defer.Deferred:
        if self.hold:
            self.waiting.append(defer.Deferred())
            return self.waiting[-1]
        return defer.succeed([])


class ClusterNodeTests(unittest.TestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.bus = FakeBus()
        self.bus.connected = True
        self.bus.connected_listeners = []
        self.bus.lost_listeners = []
        self.database = FakeDatabase()
        settings = load_config(None).cluster
        self.node = ClusterNode(
            settings, self.bus, SimpleNamespace(database=self.database), self.clock
        )

    def test_heartbeats_while_running(self) -> None:
        self.node.startService()
        self.assertEqual(self.bus.broadcasts[:2], [("started", None), ("heartbeat", None)])
        self.clock.advance(self.node.settings.heartbeat_interval)
        self.assertEqual(self.bus.broadcasts[-1], ("heartbeat", None))
        self.node.stopService()
        self.assertEqual(self.bus.broadcasts[-1], ("stopped", None))
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_stopped_while_starting_starts_nothing_more(self) -> None:
        self.database.hold = True
        self.node.startService()  # waits for the table
        stopping = self.node.stopService()
        self.database.hold = False
        for answer in self.database.waiting:  # the start's read of the table, the stop's delete
            answer.callback([])
        self.successResultOf(stopping)
        self.assertEqual(self.clock.getDelayedCalls(), [])
        self.assertEqual(self.bus.connected_listeners, [])


class DeliveredSession(FakeSession):
    """A local session that keeps what it is sent."""

    def __init__(self, jid: str) -> None:
        super().__init__(jid)
        self.presence = presence(0)
        self.message_priority = 0
        self.held_messages = None
        self.received: list[bytes | str] = []

    def send(self, stanza) -> None:
        self.received.append(stanza)


class ClusterFanoutTests(unittest.TestCase):
    """A PubSub notification from the node's owner to subscribers on two nodes: each node's
    sessions get the same bytes as on one server, the other node's through one bus message
    with the notification once."""

    def setUp(self) -> None:
        self.clock = Clock()
        self.buses = {"n1": FakeBus(), "n2": FakeBus()}
        self.tables = {
            name: ClusterSessions(name, bus, Outbox(bus, self.clock, list), FakeStore())
            for name, bus in self.buses.items()
        }
        self.sessions: dict[str, DeliveredSession] = {}
        for name, jid in (
            ("n1", "bob@localhost/desk"),
            ("n2", "bob@localhost/phone"),
            ("n2", "carol@localhost/home"),
            ("n2", "dave@localhost/away"),
        ):
            session = self.sessions[jid] = DeliveredSession(jid)
            self.tables[name].local.bind(session)
            for other, table in self.tables.items():
                if other != name:
                    table.remember(name, record_of(session))
        self.broadcaster = broadcast.Broadcaster(
            self.tables["n1"], None, self.clock, domains={"localhost"}, sync=True
        )
        settings = load_config(None).cluster
        self.receiver = ClusterNode(
            settings, self.buses["n2"], SimpleNamespace(database=FakeDatabase()), self.clock
        )
        self.receiver.sessions = self.tables["n2"]

    def test_each_session_gets_its_copy_and_the_payload_crosses_once(self) -> None:
        event = published("bob@localhost", "carol@localhost/home", "dave@localhost")
        event = replace(
            event, config={}, subscriptions=(*event.subscriptions, *event.subscriptions[2:])
        )
        self.broadcaster(event)
        self.clock.advance(0)
        [(node, kind, payload)] = self.buses["n1"].sent
        self.assertEqual((node, kind), ("n2", "stanzas"))
        texts, deliveries = payload
        self.assertEqual(len(texts), 2)  # the notification, and dave's with its SubIds
        self.assertEqual(
            [d[0] for d in deliveries],
            ["bob@localhost/phone", "carol@localhost/home", "dave@localhost/away"],
        )
        self.receiver._stanzas("n1", json.loads(json.dumps(payload)))
        # As on one server: bob's session here got it from the broadcaster itself.
        [here] = self.sessions["bob@localhost/desk"].received
        self.assertIn(b"to='bob@localhost'", here)
        self.assertEqual(self.sessions["bob@localhost/phone"].received, [here])
        self.assertEqual(
            self.sessions["carol@localhost/home"].received,
            [here.replace(b"to='bob@localhost'", b"to='carol@localhost/home'")],
        )
        [dave] = self.sessions["dave@localhost/away"].received
        self.assertIn(b"to='dave@localhost'", dave)
        self.assertEqual(dave.count(b"name='SubId'"), 2)

    def test_a_session_gone_meanwhile_is_not_sent_anything(self) -> None:
        self.broadcaster(published("carol@localhost"))
        self.clock.advance(0)
        [(_, _, payload)] = self.buses["n1"].sent
        carol = self.sessions["carol@localhost/home"]
        self.tables["n2"].local.unbind(carol)
        self.receiver._stanzas("n1", payload)  # a headline: nothing to keep or bounce
        self.assertEqual(carol.received, [])

    def test_one_bus_message_for_a_large_fan_out_written_in_steps(self) -> None:
        users = [f"user{n}@localhost" for n in range(600)]
        for n, user in enumerate(users):
            name = ("n1", "n2")[n % 2]
            session = self.sessions[user] = DeliveredSession(f"{user}/r")
            self.tables[name].local.bind(session)
            self.tables[("n2", "n1")[n % 2]].remember(name, record_of(session))
        broadcaster = broadcast.Broadcaster(self.tables["n1"], None, self.clock)
        broadcaster(published(*users))
        for _ in range(10):  # the fan-out's steps, and the outbox's turn
            self.clock.advance(0)
        [(node, _, payload)] = self.buses["n1"].sent
        self.assertEqual((node, len(payload[0]), len(payload[1])), ("n2", 1, 300))
        self.receiver._stanzas("n1", payload)
        self.assertTrue(all(len(self.sessions[user].received) == 1 for user in users))
