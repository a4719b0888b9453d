"""The metrics' parts without a server: the collector over stand-in state, the storage timer.

tests/e2e/test_metrics.py scrapes a running server after known traffic.
"""

from collections import Counter
from types import SimpleNamespace

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families
from twisted.internet import defer
from twisted.trial import unittest

from mim_twisted.events.buffer import EventBuffer
from mim_twisted.metrics import ServerCollector, StorageTimer
from mim_twisted.storage.interfaces import AccountNotFound


def stream(*, username: str | None = None, jid: str | None = None):
    return SimpleNamespace(
        username=username, jid=jid and SimpleNamespace(host="localhost"), closed=False
    )


def session(*, available: bool = False):
    return SimpleNamespace(presence=object() if available else None)


def samples(registry: CollectorRegistry) -> dict[tuple[str, frozenset], float]:
    text = generate_latest(registry).decode()
    return {
        (sample.name, frozenset(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


class CollectorTests(unittest.TestCase):
    def test_reads_the_counters_and_the_live_state(self) -> None:
        factory = SimpleNamespace(
            streams=[
                stream(),
                stream(username="alice"),
                stream(username="bob", jid="bob@localhost/a"),
                stream(username="carol", jid="carol@localhost/a"),
            ],
            stanzas_in=Counter(message=3, iq=1),
            stanzas_out=Counter({"message": 2, None: 7}),
            logins=Counter({("PLAIN", "success"): 2, ("none", "failure"): 1}),
            tls_failures=4,
        )
        server = SimpleNamespace(
            factories=[factory, factory],  # two listeners: their counts add up
            core=SimpleNamespace(
                # The IM sessions of the bound streams above, on both listeners.
                sessions=SimpleNamespace(
                    live_sessions=lambda: [session(available=True), session()] * 2
                ),
                router=SimpleNamespace(
                    messages=SimpleNamespace(outcomes=Counter(delivered=5)),
                    stream_management=SimpleNamespace(
                        resumptions=3, failed_resumptions=1, timeouts=2
                    ),
                    components={"pubsub.localhost": SimpleNamespace(results=Counter(ok=2))},
                ),
            ),
            pubsub=SimpleNamespace(
                services={"pubsub.localhost": None},
                pool=SimpleNamespace(pending=lambda: [0, 3]),
                pep=SimpleNamespace(results=Counter(ok=1, error=1)),
            ),
            event_pusher=None,
        )
        registry = CollectorRegistry()
        collector = ServerCollector(server)
        collector.offline_messages = 6
        registry.register(collector)
        values = samples(registry)

        def value(name: str, **labels: str) -> float:
            return values[name, frozenset(labels.items())]

        self.assertEqual(value("mim_connections", state="connected"), 2)
        self.assertEqual(value("mim_connections", state="authenticated"), 2)
        self.assertEqual(value("mim_connections", state="bound"), 4)
        self.assertEqual(value("mim_sessions", state="available"), 2)
        self.assertEqual(value("mim_sessions", state="unavailable"), 2)
        self.assertEqual(value("mim_stanzas_total", direction="in", kind="message"), 6)
        self.assertEqual(value("mim_stanzas_total", direction="in", kind="presence"), 0)
        self.assertEqual(value("mim_stanzas_total", direction="out", kind="message"), 4)
        self.assertEqual(value("mim_logins_total", mechanism="PLAIN", result="success"), 4)
        self.assertEqual(value("mim_logins_total", mechanism="none", result="failure"), 2)
        self.assertEqual(value("mim_tls_handshake_failures_total"), 8)
        self.assertEqual(value("mim_messages_routed_total", outcome="delivered"), 5)
        self.assertEqual(value("mim_messages_routed_total", outcome="bounced"), 0)
        self.assertEqual(value("mim_stream_resumptions_total", result="resumed"), 3)
        self.assertEqual(value("mim_stream_resumptions_total", result="failed"), 1)
        self.assertEqual(value("mim_stream_resumption_timeouts_total"), 2)
        self.assertEqual(value("mim_pubsub_requests_total", result="ok"), 3)  # PEP's too
        self.assertEqual(value("mim_pubsub_requests_total", result="error"), 1)
        self.assertEqual(value("mim_pubsub_queue_length", queue="1"), 3)
        self.assertEqual(value("mim_offline_messages"), 6)

    def test_a_server_not_started_yet(self) -> None:
        registry = CollectorRegistry()
        server = SimpleNamespace(factories=[], core=None, pubsub=None, event_pusher=None)
        registry.register(ServerCollector(server))
        values = samples(registry)
        self.assertEqual(values["mim_connections", frozenset({("state", "bound")})], 0)
        self.assertNotIn(("mim_offline_messages", frozenset()), values)
        self.assertNotIn(("mim_event_pusher_buffered", frozenset()), values)

    def test_event_pusher_counters(self) -> None:
        buffer: EventBuffer[str] = EventBuffer(limit=3, window=1)
        for event in "abcde":
            buffer.add(event)  # "a" and "b" dropped
        sequences, _ = buffer.take_batch()
        buffer.confirm(sequences)
        buffer.take_batch()  # in flight
        pusher = SimpleNamespace(buffer=buffer, connected=True)
        server = SimpleNamespace(factories=[], core=None, pubsub=None, event_pusher=pusher)
        registry = CollectorRegistry()
        registry.register(ServerCollector(server))
        values = samples(registry)
        self.assertEqual(values["mim_event_pusher_published_total", frozenset()], 2)
        self.assertEqual(values["mim_event_pusher_confirmed_total", frozenset()], 1)
        self.assertEqual(values["mim_event_pusher_dropped_total", frozenset()], 2)
        self.assertEqual(values["mim_event_pusher_buffered", frozenset()], 2)
        self.assertEqual(values["mim_event_pusher_connected", frozenset()], 1)


class StorageTimerTests(unittest.TestCase):
    def setUp(self) -> None:
        self.registry = CollectorRegistry()
        self.timer = StorageTimer(self.registry)
        self.store = SimpleNamespace(_run=lambda outcome: outcome)
        database = SimpleNamespace(
            accounts=self.store, rosters=SimpleNamespace(), offline=None, pubsub=None
        )
        self.timer.install(database)

    def value(self, name: str) -> float:
        return samples(self.registry)[name, frozenset()]

    def test_times_each_transaction(self) -> None:
        self.assertEqual(self.successResultOf(self.store._run(defer.succeed(1))), 1)
        self.failureResultOf(self.store._run(defer.fail(OSError("gone"))), OSError)
        self.assertEqual(self.value("mim_storage_seconds_count"), 2)
        self.assertEqual(self.value("mim_storage_errors_total"), 1)

    def test_a_store_answer_is_no_error(self) -> None:
        self.failureResultOf(self.store._run(defer.fail(AccountNotFound("a"))), AccountNotFound)
        self.assertEqual(self.value("mim_storage_errors_total"), 0)
