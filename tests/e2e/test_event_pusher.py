"""The event pusher against the local RabbitMQ: what MongooseIM 3.3's consumers read, outages.

Each test has its own exchanges (unique names, deleted afterwards) and an exclusive queue bound
to them, so that test runs sharing the broker do not see each other's events. The server
reaches the broker through a relay on loopback (tests.rabbitsupport.BrokerRelay) that a test
can pause or cut.
"""

import asyncio
import os
import statistics
import time

from twisted.internet import ssl, utils
from twisted.internet.interfaces import ISSLTransport
from twisted.logger import formatEvent, globalLogPublisher
from twisted.words.protocols.jabber.jid import JID

from mim_twisted.admin import server_counters
from tests.certfactory import Authority
from tests.e2e.harness import Client, ServerTestCase, eventually, wait_for
from tests.rabbitsupport import BrokerRelay, Consumer, require_broker, unique

PASSWORD = "correct horse"


def exchanges_config(presence: str, chat: str, groupchat: str) -> str:
    return (
        f'presence_exchange = {{ name = "{presence}" }}\n'
        f'chat_msg_exchange = {{ name = "{chat}" }}\n'
        f'groupchat_msg_exchange = {{ name = "{groupchat}" }}\n'
    )


class EventPusherTestCase(ServerTestCase):
    max_buffered_events = 100000
    broker_up_at_start = True

    async def setUp(self) -> None:
        require_broker()
        self.presence = unique("presence")
        self.chat = unique("chat_msg")
        self.groupchat = unique("groupchat_msg")
        self.consumer = await Consumer().start()
        self.addCleanup(self.consumer.stop)
        await self.bind_consumer()
        await self.consumer.consume()
        self.relay = self.make_relay()
        self.addCleanup(self.relay.close)
        self.relay.refusing = not self.broker_up_at_start
        await self.start_server(self.pusher_config())
        self.pusher = self.server.event_pusher
        for user in ("alice", "bob", "carol"):
            await self.register(user, PASSWORD)

    def make_relay(self) -> BrokerRelay:
        return BrokerRelay()

    async def bind_consumer(self) -> None:
        for exchange in (self.presence, self.chat, self.groupchat):
            await self.consumer.bind(exchange)

    def pusher_config(self) -> str:
        return (
            "[event_pusher.rabbit]\nenabled = true\n"
            f"port = {self.relay.port}\nmax_buffered_events = {self.max_buffered_events}\n"
            + exchanges_config(self.presence, self.chat, self.groupchat)
        )

    async def online(self, jid: str) -> Client:
        client = self.client(jid, PASSWORD)
        self.assertEqual(await client.connect(), "session_start")
        client.xmpp.send_presence()
        await eventually(lambda: self._available(jid))
        return client

    def _available(self, jid: str) -> bool:
        bare, resource = jid.split("/")
        for session in self.server.core.sessions.sessions_of(JID(bare)):
            if session.jid.resource == resource and session.presence is not None:
                return True
        return False

    def received(self) -> list[tuple[str, str, dict]]:
        return [(d.exchange, d.routing_key, d.json) for d in self.consumer.deliveries]

    async def send_chats(self, alice: Client, bob: Client, count: int, prefix: str) -> None:
        """`count` messages from alice to bob, all delivered to bob."""
        last = bob.next_event("message", lambda m: m["body"] == f"{prefix} {count - 1}")
        for index in range(count):
            alice.xmpp.send_message(
                mto="bob@localhost/phone", mbody=f"{prefix} {index}", mtype="chat"
            )
        await wait_for(last)

    def chat_bodies(self) -> list[tuple[str, str]]:
        return [
            (key, body["message"])
            for exchange, key, body in self.received()
            if exchange == self.chat
        ]

    def expected(self, prefix: str, count: int) -> list[tuple[str, str]]:
        pairs = []
        for index in range(count):
            pairs.append(("alice@localhost.chat_msg_sent", f"{prefix} {index}"))
            pairs.append(("bob@localhost.chat_msg_recv", f"{prefix} {index}"))
        return pairs


class EventTests(EventPusherTestCase):
    async def test_online_offline_and_no_event_for_show_changes(self) -> None:
        alice = await self.online("alice@localhost/home")
        await self.consumer.wait_for(1)
        alice.xmpp.send_presence(pshow="away")
        alice.xmpp.send_presence(pshow="dnd", pstatus="busy")
        alice.xmpp.send_presence(ptype="unavailable")
        await self.consumer.wait_for(2)
        alice.xmpp.send_presence()
        await self.consumer.wait_for(3)
        # The stream goes without an unavailable presence: an "offline" event all the same.
        alice.xmpp.transport.abort()
        await self.consumer.wait_for(4)
        online = (
            self.presence,
            "alice@localhost",
            {"user_id": "alice@localhost/home", "present": True},
        )
        offline = (
            self.presence,
            "alice@localhost",
            {"user_id": "alice@localhost/home", "present": False},
        )
        await self.consumer.quiet()
        self.assertEqual(self.received(), [online, offline, online, offline])

    async def test_chat_sent_before_received_and_none_received_offline(self) -> None:
        alice = await self.online("alice@localhost/home")
        bob = await self.online("bob@localhost/phone")
        await self.consumer.wait_for(2)
        got = bob.next_event("message")
        alice.xmpp.send_message(mto="Bob@localhost", mbody="hi Bob", mtype="chat")
        await wait_for(got)
        alice.xmpp.send_message(mto="carol@localhost", mbody="stored for Carol", mtype="chat")
        # Routed once the server has read Carol's block list: only then is it "sent", and a
        # message to Bob sent meanwhile may be routed (and published) first.
        await self.consumer.wait_for(5)
        alice.xmpp.send_message(mto="bob@localhost", mbody="not a chat", mtype="normal")
        alice.xmpp.send_message(mto="bob@localhost/phone", mbody="last", mtype="chat")
        await self.consumer.wait_for(7)
        await self.consumer.quiet()
        messages = [d for d in self.received() if d[0] == self.chat]

        def sent(to: str, text: str) -> tuple:
            body = {"from_user_id": "alice@localhost/home", "to_user_id": to, "message": text}
            return (self.chat, "alice@localhost.chat_msg_sent", body)

        def received(text: str) -> tuple:
            body = {
                "from_user_id": "alice@localhost/home",
                "to_user_id": "bob@localhost/phone",
                "message": text,
            }
            return (self.chat, "bob@localhost.chat_msg_recv", body)

        self.assertEqual(
            messages,
            [
                sent("bob@localhost", "hi Bob"),
                received("hi Bob"),
                sent("carol@localhost", "stored for Carol"),  # offline: sent, never received
                sent("bob@localhost/phone", "last"),
                received("last"),
            ],
        )
        self.assertEqual(len(self.received()), 7)  # and the two "online" events

    async def test_counters(self) -> None:
        await self.online("alice@localhost/home")
        await self.consumer.wait_for(1)
        await eventually(lambda: len(self.pusher.buffer) == 0)
        buffer = self.pusher.buffer
        self.assertEqual((buffer.published, buffer.confirmed, buffer.dropped), (1, 1, 0))
        # As `mimctl stats` shows them.
        counters = server_counters(self.server)
        self.assertEqual(
            {key: value for key, value in counters.items() if key.startswith("event_pusher")},
            {
                "event_pusher_buffered": 0,
                "event_pusher_confirmed": 1,
                "event_pusher_dropped": 0,
                "event_pusher_published": 1,
            },
        )


class CustomExchangeTests(EventPusherTestCase):
    """Other names, types and topics, as in MongooseIM's suite (which uses `headers`)."""

    async def bind_consumer(self) -> None:
        await self.consumer.bind(self.presence, "", exchange_type="headers")
        await self.consumer.bind(self.chat, "alice@localhost.said", exchange_type="direct")
        await self.consumer.bind(self.chat, "bob@localhost.heard", exchange_type="direct")
        await self.consumer.bind(self.groupchat, "", exchange_type="fanout")

    def pusher_config(self) -> str:
        return (
            "[event_pusher.rabbit]\nenabled = true\n"
            f"port = {self.relay.port}\n"
            f'presence_exchange = {{ name = "{self.presence}", type = "headers" }}\n'
            f'chat_msg_exchange = {{ name = "{self.chat}", type = "direct",'
            ' sent_topic = "said", recv_topic = "heard" }\n'
            f'groupchat_msg_exchange = {{ name = "{self.groupchat}", type = "fanout" }}\n'
        )

    async def test_custom_names_types_and_topics(self) -> None:
        alice = await self.online("alice@localhost/home")
        bob = await self.online("bob@localhost/phone")
        got = bob.next_event("message")
        alice.xmpp.send_message(mto="bob@localhost", mbody="hello", mtype="chat")
        await wait_for(got)
        await self.consumer.wait_for(4)
        await self.consumer.quiet()
        self.assertEqual(
            [(exchange, key) for exchange, key, _ in self.received()],
            [
                (self.presence, "alice@localhost"),
                (self.presence, "bob@localhost"),
                (self.chat, "alice@localhost.said"),
                (self.chat, "bob@localhost.heard"),
            ],
        )


class OutageTests(EventPusherTestCase):
    async def test_events_made_while_the_broker_is_away_are_all_delivered(self) -> None:
        alice = await self.online("alice@localhost/home")
        bob = await self.online("bob@localhost/phone")
        await self.consumer.wait_for(2)
        await self.send_chats(alice, bob, 50, "before")
        # Cut in the middle of a stream of events, and keep the broker away for a while.
        self.relay.cut()
        await self.send_chats(alice, bob, 200, "during")
        await wait_for(asyncio.sleep(0.5))
        self.assertGreaterEqual(len(self.pusher.buffer), 400)
        self.relay.restore()
        await self.send_chats(alice, bob, 50, "after")
        expected = (
            self.expected("before", 50) + self.expected("during", 200) + self.expected("after", 50)
        )
        await self.consumer.wait_for(2 + len(expected))
        await self.consumer.quiet()
        bodies = self.chat_bodies()
        # Confirms allow an event that was in flight when the connection went to come twice;
        # nothing is lost, and the first copies keep the order in which things happened.
        first_copies = list(dict.fromkeys(bodies))
        self.assertEqual(first_copies, expected)
        buffer = self.pusher.buffer
        self.assertLessEqual(len(bodies) - len(expected), buffer.published - len(expected))
        self.assertEqual((buffer.dropped, len(buffer)), (0, 0))
        self.assertGreaterEqual(self.relay.accepted, 2)  # it did reconnect

    async def test_rabbitmqctl_close_connection(self) -> None:
        alice = await self.online("alice@localhost/home")
        bob = await self.online("bob@localhost/phone")
        await self.consumer.wait_for(2)
        await eventually(lambda: self.pusher.connected)
        # The relay's connection to the broker is the one the broker sees.
        [broker_side] = [
            s for s in self.relay.sides if s.peer is not None and s.transport.getPeer().port == 5672
        ]
        local = broker_side.transport.getHost()
        name = f"{local.host}:{local.port} -> 127.0.0.1:5672"
        listing = await utils.getProcessOutput(
            "rabbitmqctl", ["-q", "list_connections", "pid", "name", "client_properties"]
        )
        # Tab-separated: the pid that close_connection takes, the name, the client's properties.
        rows = [row.split("\t") for row in listing.decode().splitlines()]
        [(pid, _, properties)] = [row for row in rows if len(row) == 3 and row[1] == name]
        self.assertIn(f'"connection_name","{self.pusher.connection_name}"', properties)
        output, _, code = await utils.getProcessOutputAndValue(
            "rabbitmqctl", ["close_connection", pid, "closed by a test"]
        )
        self.assertEqual(code, 0, output)
        await self.send_chats(alice, bob, 20, "meanwhile")
        await self.consumer.wait_for(2 + 40)
        await self.consumer.quiet()
        self.assertEqual(list(dict.fromkeys(self.chat_bodies())), self.expected("meanwhile", 20))
        self.assertEqual(self.pusher.buffer.dropped, 0)


class OutageWithDropsTests(EventPusherTestCase):
    """benchmarks/broker_outage.py in small: more events while the broker is away than the
    buffer holds."""

    max_buffered_events = 300

    async def test_what_an_outage_drops_beyond_the_buffer_is_counted_exactly(self) -> None:
        alice = await self.online("alice@localhost/home")
        bob = await self.online("bob@localhost/phone")
        buffer = self.pusher.buffer
        await self.send_chats(alice, bob, 20, "before")
        await eventually(lambda: len(buffer) == 0)
        self.relay.cut()
        await eventually(lambda: not self.pusher.connected)
        await self.send_chats(alice, bob, 400, "during")
        self.assertEqual((len(buffer), buffer.dropped), (300, 500))
        self.relay.restore()
        await eventually(lambda: len(buffer) == 0)
        await self.send_chats(alice, bob, 10, "after")
        await self.consumer.wait_for(2 + 40 + 300 + 20)
        await self.consumer.quiet()
        received = list(dict.fromkeys(self.chat_bodies()))
        produced = (
            self.expected("before", 20) + self.expected("during", 400) + self.expected("after", 10)
        )
        self.assertEqual(len(produced) - len(received), buffer.dropped)
        # The oldest went: of the outage, its newest 300 events came, in order.
        self.assertEqual(
            received,
            self.expected("before", 20)
            + self.expected("during", 400)[500:]
            + self.expected("after", 10),
        )


class PublisherProcessTests(EventPusherTestCase):
    async def test_a_killed_publisher_process_is_started_again_and_nothing_is_lost(self) -> None:
        alice = await self.online("alice@localhost/home")
        bob = await self.online("bob@localhost/phone")
        await self.consumer.wait_for(2)
        await self.send_chats(alice, bob, 50, "before")
        first = self.pusher.process
        first.transport.signalProcess("KILL")
        await self.send_chats(alice, bob, 200, "during")
        await eventually(lambda: self.pusher.process not in (None, first))
        await self.send_chats(alice, bob, 50, "after")
        expected = (
            self.expected("before", 50) + self.expected("during", 200) + self.expected("after", 50)
        )
        await self.consumer.wait_for(2 + len(expected))
        await self.consumer.quiet()
        # What the killed process had written and not seen confirmed may come twice; nothing
        # is lost, and the first copies keep their order.
        self.assertEqual(list(dict.fromkeys(self.chat_bodies())), expected)
        buffer = self.pusher.buffer
        self.assertEqual((buffer.dropped, len(buffer)), (0, 0))
        self.assertGreaterEqual(self.relay.accepted, 2)

    async def test_a_signal_to_the_process_group_leaves_the_process_to_the_server(self) -> None:
        # Ctrl-C in a terminal, or a SIGTERM to the whole group: the server stops it after the
        # last events are confirmed.
        alice = await self.online("alice@localhost/home")
        bob = await self.online("bob@localhost/phone")
        await eventually(lambda: self.pusher.connected)
        first = self.pusher.process
        for name in ("INT", "TERM"):
            first.transport.signalProcess(name)
        await self.send_chats(alice, bob, 10, "after the signals")
        await self.consumer.wait_for(2 + 20)
        self.assertIs(self.pusher.process, first)
        self.assertEqual(self.relay.accepted, 1)

    async def test_the_process_ends_with_the_server(self) -> None:
        await self.online("alice@localhost/home")
        await self.consumer.wait_for(1)
        process = self.pusher.process
        await self.server.stopService()
        self.assertTrue(process.ended.called)
        self.assertIsNone(self.pusher.process)


class AmqpsTestCase(EventPusherTestCase):
    """`tls = true` against a TLS port (a relay terminating TLS in front of the broker, whose
    configuration stays as it is), its certificate checked for the broker's host name against
    the CAs OpenSSL trusts by default: here a test CA, named by SSL_CERT_FILE."""

    trusted = True

    async def setUp(self) -> None:
        authority = Authority()
        self.server_certificate = authority.issue_server("localhost")
        trusted = authority if self.trusted else Authority("another CA")
        # Read by OpenSSL in the publisher process, which inherits the environment.
        os.environ["SSL_CERT_FILE"] = trusted.write_pem(self.mktemp())
        self.addCleanup(os.environ.pop, "SSL_CERT_FILE")
        self.logged: list[str] = []
        observer = lambda event: self.logged.append(formatEvent(event))  # noqa: E731
        globalLogPublisher.addObserver(observer)
        self.addCleanup(globalLogPublisher.removeObserver, observer)
        await super().setUp()

    def make_relay(self) -> BrokerRelay:
        certificate, key = self.server_certificate.write_pem(self.mktemp(), "broker")
        with open(certificate, "rb") as cert_file, open(key, "rb") as key_file:
            pem = cert_file.read() + key_file.read()
        return BrokerRelay(tls=ssl.PrivateCertificate.loadPEM(pem).options())

    def pusher_config(self) -> str:
        return super().pusher_config() + 'host = "localhost"\ntls = true\n'


class AmqpsTests(AmqpsTestCase):
    async def test_events_go_over_tls(self) -> None:
        alice = await self.online("alice@localhost/home")
        bob = await self.online("bob@localhost/phone")
        await self.send_chats(alice, bob, 10, "secret")
        await self.consumer.wait_for(2 + 20)
        await self.consumer.quiet()
        self.assertEqual(self.chat_bodies(), self.expected("secret", 10))
        tls_sides = [side for side in self.relay.sides if ISSLTransport.providedBy(side.transport)]
        self.assertEqual(len(tls_sides), 1)


class AmqpsUntrustedTests(AmqpsTestCase):
    trusted = False

    async def test_a_broker_with_an_untrusted_certificate_gets_nothing(self) -> None:
        await self.online("alice@localhost/home")
        await eventually(lambda: any("not usable (attempt" in line for line in self.logged))
        self.assertFalse(self.pusher.connected)
        self.assertEqual(len(self.pusher.buffer), 1)
        self.assertEqual(self.consumer.deliveries, [])
        [line] = [line for line in self.logged if "not usable" in line]
        self.assertIn("certificate verify failed", line)


class BlockedBrokerTests(EventPusherTestCase):
    max_buffered_events = 500

    async def latency(self, alice: Client, bob: Client, probes: int) -> float:
        """The median time from alice's send to bob's receipt over `probes` messages."""
        times = []
        for index in range(probes):
            body = f"probe {index} {time.monotonic()}"
            got = bob.next_event("message", lambda m, body=body: m["body"] == body)
            started = time.monotonic()
            alice.xmpp.send_message(mto="bob@localhost/phone", mbody=body, mtype="chat")
            await wait_for(got)
            times.append(time.monotonic() - started)
        return statistics.median(times)

    async def test_a_burst_with_the_broker_blocked(self) -> None:
        alice = await self.online("alice@localhost/home")
        bob = await self.online("bob@localhost/phone")
        await self.consumer.wait_for(2)
        probes = 20
        unblocked = await self.latency(alice, bob, probes)
        await self.consumer.wait_for(2 + 2 * probes)
        await eventually(lambda: len(self.pusher.buffer) == 0)
        before = len(self.consumer.deliveries)

        self.relay.pause()
        burst = 10000
        last = bob.next_event("message", lambda m: m["body"] == f"burst {burst - 1}")
        alice.xmpp.send_raw(
            "".join(
                f"<message to='bob@localhost/phone' type='chat'><body>burst {i}</body></message>"
                for i in range(burst)
            )
        )
        await wait_for(last, timeout=60)
        blocked = await self.latency(alice, bob, probes)
        produced = 2 * (burst + probes)  # a "sent" and a "recv" event per message
        buffer = self.pusher.buffer
        self.assertEqual(len(buffer), 500)
        self.assertEqual(buffer.dropped, produced - 500)
        self.assertLess(blocked, 2 * unblocked + 0.05)

        self.relay.resume()
        await self.consumer.wait_for(before + 500)
        await eventually(lambda: len(buffer) == 0)
        await self.consumer.quiet()
        self.assertEqual(len(self.consumer.deliveries), before + 500)
        self.assertEqual(buffer.dropped, produced - 500)
        # What was in flight when the buffer filled, then the newest events: in the order in
        # which they happened, the last message's "recv" event last.
        bodies = [body for _, body in self.chat_bodies()[2 * probes :]]
        burst_numbers = [int(body.split()[1]) for body in bodies if body.startswith("burst ")]
        self.assertEqual(burst_numbers, sorted(burst_numbers))
        self.assertTrue(bodies[-1].startswith(f"probe {probes - 1} "), bodies[-1])


class BrokerDownAtStartTests(EventPusherTestCase):
    broker_up_at_start = False

    async def test_the_server_starts_and_sends_the_events_once_the_broker_is_up(self) -> None:
        alice = await self.online("alice@localhost/home")
        bob = await self.online("bob@localhost/phone")
        await self.send_chats(alice, bob, 10, "early")
        self.assertFalse(self.pusher.connected)
        self.assertEqual(len(self.pusher.buffer), 2 + 20)
        self.relay.restore()
        await self.consumer.wait_for(2 + 20)
        await self.consumer.quiet()
        self.assertEqual(self.chat_bodies(), self.expected("early", 10))
        self.assertEqual(len(self.consumer.deliveries), 22)


class WrongCredentialsTests(EventPusherTestCase):
    async def setUp(self) -> None:
        # Before the server starts: its first attempt may fail at once.
        self.logged: list[str] = []
        observer = lambda event: self.logged.append(formatEvent(event))  # noqa: E731
        globalLogPublisher.addObserver(observer)
        self.addCleanup(globalLogPublisher.removeObserver, observer)
        await super().setUp()

    def pusher_config(self) -> str:
        return super().pusher_config() + 'password = "not the password"\n'

    async def test_the_server_runs_and_holds_the_events(self) -> None:
        logged = self.logged
        await self.online("alice@localhost/home")
        await eventually(lambda: any("not usable (attempt" in line for line in logged))
        self.assertFalse(self.pusher.connected)
        self.assertEqual(len(self.pusher.buffer), 1)
        [line] = [line for line in logged if "not usable" in line]
        self.assertIn("username, password, virtual_host?", line)
