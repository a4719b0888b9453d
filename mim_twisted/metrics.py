"""Prometheus metrics: `/metrics` (text exposition) and `/health` on the `[metrics]` endpoint.

The server's parts count in plain ``collections.Counter`` objects and attributes (no metrics
library on the hot paths); `ServerCollector` reads them, and the live state (connections,
sessions, queues), at each scrape. Every server owns its registry, so that several servers in
one process (the tests) do not share numbers. Storage latency and errors are measured around
the SQL stores' one entry point; the offline store's size is asked of the database per scrape.
"""

import time
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any

from prometheus_client import CollectorRegistry, Counter, Histogram, ProcessCollector
from prometheus_client.exposition import CONTENT_TYPE_LATEST, generate_latest
from prometheus_client.metrics_core import CounterMetricFamily, GaugeMetricFamily, Metric
from twisted.application import service
from twisted.internet import defer, endpoints
from twisted.internet.interfaces import IListeningPort
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web import resource, server

import mim_twisted
from mim_twisted.admin import STORAGE_PROBE_TIMEOUT, probe_storage, pubsub_components
from mim_twisted.storage.interfaces import (
    AccountExists,
    AccountNotFound,
    NodeExists,
    NodeNotFound,
)

if TYPE_CHECKING:
    from mim_twisted.tap import MimService
    from mim_twisted.xmpp.c2s import C2SStream

log = Logger()

# Outcomes a store reports by raising: answers, not storage errors.
STORE_OUTCOMES = (AccountExists, AccountNotFound, NodeExists, NodeNotFound)


def connection_state(stream: "C2SStream") -> str:
    if stream.jid is not None:
        return "bound"
    if stream.username is not None:
        return "authenticated"
    return "connected"


class ServerCollector:
    """Reads the counters and the live state of one server at each scrape."""

    def __init__(self, server: "MimService") -> None:
        self.server = server
        self.offline_messages: int | None = None  # refreshed by MetricsPage before a scrape

    def collect(self) -> Iterator[Metric]:
        server = self.server
        info = GaugeMetricFamily("mim_info", "The server's version", labels=["version"])
        info.add_metric([mim_twisted.__version__], 1)
        yield info

        connections = GaugeMetricFamily(
            "mim_connections", "Client connections by state", labels=["state"]
        )
        states = {"connected": 0, "authenticated": 0, "bound": 0}
        for factory in server.factories:
            for stream in factory.streams:
                states[connection_state(stream)] += 1
        for state, count in states.items():
            connections.add_metric([state], count)
        yield connections

        sessions = GaugeMetricFamily(
            "mim_sessions", "Bound sessions by presence state", labels=["state"]
        )
        bound = list(server.core.sessions.live_sessions()) if server.core is not None else []
        available = sum(1 for session in bound if session.presence is not None)
        sessions.add_metric(["available"], available)
        sessions.add_metric(["unavailable"], len(bound) - available)
        yield sessions

        yield from self._stream_counters()
        yield from self._routing()
        yield from self._pubsub()
        yield from self._event_pusher()
        if self.offline_messages is not None:
            yield GaugeMetricFamily(
                "mim_offline_messages", "Messages in offline storage", value=self.offline_messages
            )

    def _stream_counters(self) -> Iterator[Metric]:
        factories = self.server.factories
        stanzas = CounterMetricFamily(
            "mim_stanzas", "Stanzas by direction and kind", labels=["direction", "kind"]
        )
        for direction in ("in", "out"):
            totals = {"message": 0, "presence": 0, "iq": 0}
            for factory in factories:
                counts = factory.stanzas_in if direction == "in" else factory.stanzas_out
                for kind in totals:
                    totals[kind] += counts[kind]
            for kind, count in totals.items():
                stanzas.add_metric([direction, kind], count)
        yield stanzas
        logins = CounterMetricFamily(
            "mim_logins", "SASL logins by mechanism and result", labels=["mechanism", "result"]
        )
        totals: dict[tuple[str, str], int] = {}
        for factory in factories:
            for key, count in factory.logins.items():
                totals[key] = totals.get(key, 0) + count
        for key, count in sorted(totals.items()):
            logins.add_metric(list(key), count)
        yield logins
        yield CounterMetricFamily(
            "mim_tls_handshake_failures",
            "TLS handshakes that did not complete",
            value=sum(factory.tls_failures for factory in factories),
        )

    def _routing(self) -> Iterator[Metric]:
        messages = CounterMetricFamily(
            "mim_messages_routed",
            "Messages between local users by outcome (delivered: per session written to)",
            labels=["outcome"],
        )
        core = self.server.core
        outcomes = core.router.messages.outcomes if core is not None else {}
        for outcome in ("delivered", "offline", "bounced"):
            messages.add_metric([outcome], outcomes.get(outcome, 0))
        yield messages
        management = core.router.stream_management if core is not None else None
        if management is not None:
            resumptions = CounterMetricFamily(
                "mim_stream_resumptions",
                "XEP-0198 resumptions by result (failed: unknown, expired or refused)",
                labels=["result"],
            )
            resumptions.add_metric(["resumed"], management.resumptions)
            resumptions.add_metric(["failed"], management.failed_resumptions)
            yield resumptions
            yield CounterMetricFamily(
                "mim_stream_resumption_timeouts",
                "Detached sessions that ended because their client did not resume them in time",
                value=management.timeouts,
            )

    def _pubsub(self) -> Iterator[Metric]:
        requests = CounterMetricFamily(
            "mim_pubsub_requests",
            "PubSub requests by result (refused: resource-constraint, queue or session full)",
            labels=["result"],
        )
        totals = {"ok": 0, "error": 0, "refused": 0}
        for component in pubsub_components(self.server):
            for result in totals:
                totals[result] += component.results[result]
        for result, count in totals.items():
            requests.add_metric([result], count)
        yield requests
        queues = GaugeMetricFamily(
            "mim_pubsub_queue_length", "PubSub requests waiting per worker queue", labels=["queue"]
        )
        pubsub = self.server.pubsub
        for index, length in enumerate(pubsub.pool.pending() if pubsub is not None else []):
            queues.add_metric([str(index)], length)
        yield queues

    def _event_pusher(self) -> Iterator[Metric]:
        pusher = self.server.event_pusher
        if pusher is None:
            return
        buffer = pusher.buffer
        yield CounterMetricFamily(
            "mim_event_pusher_published",
            "Events handed to the broker (sent again after a nack or a lost connection included)",
            value=buffer.published,
        )
        yield CounterMetricFamily(
            "mim_event_pusher_confirmed",
            "Events the broker confirmed (every event written, without confirms)",
            value=buffer.confirmed,
        )
        yield CounterMetricFamily(
            "mim_event_pusher_dropped",
            "Events dropped, oldest first, because the buffer was full",
            value=buffer.dropped,
        )
        yield GaugeMetricFamily(
            "mim_event_pusher_buffered",
            "Events held for the broker: not yet sent, or sent and not yet confirmed",
            value=len(buffer),
        )
        yield GaugeMetricFamily(
            "mim_event_pusher_connected",
            "1 while the publisher process has a channel to the broker open",
            value=int(pusher.connected),
        )


class StorageTimer:
    """Times each database transaction of the SQL stores and counts the failed ones."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.latency = Histogram(
            "mim_storage_seconds",
            "Time taken by database transactions",
            registry=registry,
            buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
        )
        self.errors = Counter(
            "mim_storage_errors", "Database transactions that failed", registry=registry
        )

    def install(self, database: Any) -> None:
        for store in (database.accounts, database.rosters, database.offline, database.pubsub):
            # The SQL stores run every transaction through `_run` (sql._SQLStore); the memory
            # backend has no database to time.
            run = getattr(store, "_run", None)
            if run is not None:
                store._run = self.timed(run)

    def timed(self, run: Callable[..., defer.Deferred]) -> Callable[..., defer.Deferred]:
        def timed_run(*args: Any, **kwargs: Any) -> defer.Deferred:
            started = time.monotonic()
            running = run(*args, **kwargs)
            running.addBoth(self._finished, started)
            return running

        return timed_run

    def _finished(self, result: Any, started: float) -> Any:
        self.latency.observe(time.monotonic() - started)
        if isinstance(result, Failure) and not result.check(*STORE_OUTCOMES):
            self.errors.inc()
        return result


class MetricsPage(resource.Resource):
    """`/metrics`: refreshes what must be asked of the database, then renders the registry."""

    isLeaf = True

    def __init__(self, metrics: "MetricsService") -> None:
        super().__init__()
        self.metrics = metrics

    def render_GET(self, request: server.Request) -> int:
        refreshing = defer.ensureDeferred(self.metrics.refresh())
        refreshing.addBoth(lambda _: _finish(request, 200, generate_latest(self.metrics.registry)))
        request.setHeader(b"Content-Type", CONTENT_TYPE_LATEST.encode())
        return server.NOT_DONE_YET


class HealthPage(resource.Resource):
    """`/health`: 200 while the database answers a cheap query in time, 503 otherwise."""

    isLeaf = True

    def __init__(self, metrics: "MetricsService") -> None:
        super().__init__()
        self.metrics = metrics

    def render_GET(self, request: server.Request) -> int:
        request.setHeader(b"Content-Type", b"text/plain; charset=utf-8")
        probing = defer.ensureDeferred(self.metrics.probe_storage())
        probing.addCallback(self._answer, request)
        return server.NOT_DONE_YET

    @staticmethod
    def _answer(problem: str | None, request: server.Request) -> None:
        if problem is None:
            _finish(request, 200, b"ok\n")
        else:
            _finish(request, 503, f"storage: {problem}\n".encode())


def _finish(request: server.Request, code: int, body: bytes) -> None:
    if request.finished or request.channel is None:  # the scraper has gone
        return
    request.setResponseCode(code)
    request.write(body)
    request.finish()


class QuietSite(server.Site):
    """No access log: a scrape every few seconds would fill the server's log."""

    noisy = False

    def log(self, request: server.Request) -> None:
        pass


class MetricsService(service.Service):
    """Serves the metrics of one server on an endpoint; `listening` fires once it does."""

    def __init__(self, server: "MimService", description: str, reactor: Any) -> None:
        self.server = server
        self.description = description
        self.reactor = reactor
        self.registry = CollectorRegistry()
        self.collector = ServerCollector(server)
        self.registry.register(self.collector)
        ProcessCollector(registry=self.registry)
        self.storage = StorageTimer(self.registry)
        self.probe_timeout = STORAGE_PROBE_TIMEOUT
        self.port: IListeningPort | None = None
        self.listening: defer.Deferred = defer.Deferred()

    async def probe_storage(self) -> str | None:
        return await probe_storage(self.server.database, self.reactor, self.probe_timeout)

    async def refresh(self) -> None:
        database = self.server.database
        if database is None:
            return
        try:
            counting = database.offline.count_all().addTimeout(self.probe_timeout, self.reactor)
            self.collector.offline_messages = await counting
        except Exception as error:
            # Counted among the storage errors; the scrape goes on with the last known size.
            log.warn("metrics: offline store size unknown: {error}", error=error)

    def startService(self) -> defer.Deferred:
        super().startService()
        if self.server.database is not None:
            self.storage.install(self.server.database)
        root = resource.Resource()
        root.putChild(b"metrics", MetricsPage(self))
        root.putChild(b"health", HealthPage(self))
        site = QuietSite(root)
        endpoint = endpoints.serverFromString(self.reactor, self.description)
        self.listening = endpoint.listen(site)
        self.listening.addCallback(self._listening)
        return self.listening

    def _listening(self, port: IListeningPort) -> IListeningPort:
        self.port = port
        log.info("Metrics on {address} (/metrics, /health)", address=port.getHost())
        return port

    def stopService(self) -> defer.Deferred:
        super().stopService()
        port, self.port = self.port, None
        return defer.maybeDeferred(port.stopListening) if port is not None else defer.succeed(None)
