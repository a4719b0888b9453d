"""The server as Twisted services: which children it has, the order they start and stop in, and
client listeners on endpoint strings (TCP with its backlog, a UNIX socket, a systemd socket).

A real server on real sockets (loopback and a UNIX socket in the test's directory) with SQLite.
"""

import os
import socket
import tempfile
from typing import Any

from twisted.internet import defer, endpoints, protocol, reactor
from twisted.internet.address import UNIXAddress
from twisted.trial import unittest

from mim_twisted.admin import AdminService
from mim_twisted.config import load_config
from mim_twisted.listeners import DEFAULT_BACKLOG, ClientListener
from mim_twisted.pubsub import core
from mim_twisted.tap import ImCoreService, MimService, PubSubHost, PubSubWorkers, StorageService
from tests.ci import unavailable
from tests.wire import STREAM_FEATURES, STREAMS, parse_server_output

STREAM_HEADER = (
    b"<?xml version='1.0'?><stream:stream to='localhost' version='1.0'"
    b" xmlns='jabber:client' xmlns:stream='http://etherx.jabber.org/streams'>"
)
NS_TLS = "urn:ietf:params:xml:ns:xmpp-tls"


class StreamStart(protocol.Protocol):
    """Sends a stream header and collects what comes back until the stream features end."""

    def __init__(self) -> None:
        self.received = b""
        self.features: defer.Deferred = defer.Deferred()

    def connectionMade(self) -> None:
        self.transport.write(STREAM_HEADER)

    def dataReceived(self, data: bytes) -> None:
        self.received += data
        if b"features>" in self.received and not self.features.called:
            self.features.callback(parse_server_output(self.received))


class ServerServicesTestCase(unittest.TestCase):
    listeners = '[[listeners]]\naddress = "127.0.0.1"\nport = 0\n'

    def setUp(self) -> None:
        self.directory = os.path.abspath(self.mktemp())
        os.makedirs(self.directory)

    def make_server(self, listeners: str | None = None) -> MimService:
        path = os.path.join(self.directory, "mim.toml")
        with open(path, "w") as f:
            f.write('[server]\ndomains = ["localhost"]\ndata_dir = "data"\n')
            f.write(self.listeners if listeners is None else listeners)
        return MimService(load_config(path))

    async def start(self, server: MimService) -> MimService:
        server.startService()
        self.addCleanup(lambda: server.stopService() if server.running else None)
        return await server.ready

    async def stream_features(self, endpoint: Any) -> Any:
        client = StreamStart()
        connected = await endpoints.connectProtocol(endpoint, client)
        self.addCleanup(connected.transport.loseConnection)
        return await client.features.addTimeout(10, reactor)


class OrderTests(ServerServicesTestCase):
    def test_children(self) -> None:
        server = self.make_server(self.listeners * 2)
        self.assertEqual(
            [type(child) for child in server],
            [
                StorageService,
                PubSubWorkers,
                ImCoreService,
                PubSubHost,
                AdminService,
                ClientListener,
                ClientListener,
            ],
        )

    async def test_start_and_stop_order(self) -> None:
        """Each child starts once the one before it has started, and stops once the one after
        it has stopped; the database is open while the others start and stop."""
        server = self.make_server(self.listeners * 2)
        events: list[tuple[str, str, bool]] = []

        def watched(child: Any, name: str) -> None:
            start, stop = child.startService, child.stopService

            def watched_start() -> defer.Deferred:
                events.append(("start", name, server.database is not None))
                return defer.maybeDeferred(start).addCallback(
                    lambda result: events.append(("started", name, True)) or result
                )

            def watched_stop() -> defer.Deferred:
                events.append(("stop", name, server.database is not None))
                return defer.maybeDeferred(stop).addCallback(
                    lambda result: events.append(("stopped", name, True)) or result
                )

            child.startService, child.stopService = watched_start, watched_stop

        names = ["storage", "pubsub workers", "im", "pubsub", "admin", "listener 1", "listener 2"]
        for child, name in zip(server, names, strict=True):
            watched(child, name)
        await self.start(server)
        self.assertEqual(len(server.ports), 2)
        await server.stopService()
        expected_start = [
            event
            for name in names
            for event in (("start", name, name != "storage"), ("started", name, True))
        ]
        expected_stop = [
            event
            for name in reversed(names)
            for event in (("stop", name, True), ("stopped", name, True))
        ]
        self.assertEqual(events, expected_start + expected_stop)
        self.assertEqual([child.running for child in server], [0] * len(names))

    async def test_pubsub_work_left_by_the_closing_connections_still_runs(self) -> None:
        """When the IM core closes the connections, clients' PubSub requests are refused but
        the server's own PubSub work (an offline purge at a session's end) still runs; the
        workers end after the IM core."""
        server = await self.start(self.make_server())
        pool, im_stop = server.pubsub.pool, server.im.stopService
        seen: list[object] = []

        async def purge() -> str:
            return "ran"

        def watched_im_stop() -> defer.Deferred:
            seen.append((pool.refusing_requests, pool.stopped))
            ran = pool.submit("pubsub.localhost", "news", purge)
            return defer.maybeDeferred(im_stop).addCallback(lambda _: ran)

        server.im.stopService = watched_im_stop
        await server.stopService()
        self.assertEqual(seen, [(True, False)])
        self.assertTrue(pool.stopped)

    async def test_a_failed_start_starts_nothing_after_it(self) -> None:
        # The port is taken: the listener fails, and the children after it are not started.
        taken = socket.socket()
        self.addCleanup(taken.close)
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        server = self.make_server(
            "[[listeners]]\nport = 0\n"
            f'[[listeners]]\nendpoint = "tcp:{port}:interface=127.0.0.1"\n'
            "[[listeners]]\nport = 0\n"
        )
        server.startService()
        with self.assertRaises(Exception) as caught:
            await server.ready
        self.assertIn("Address already in use", str(caught.exception))
        self.assertEqual([bool(child.running) for child in server], [True] * 7 + [False])
        await server.stopService()
        self.assertIsNone(server.database)
        self.assertEqual(server.ports, [])

    async def test_stopped_while_starting(self) -> None:
        server = self.make_server()
        server.startService()
        stopped = server.stopService()  # the database is still being opened
        await stopped
        self.assertEqual([child.running for child in server], [0] * 6)
        self.assertIsNone(server.database)


class EndpointTests(ServerServicesTestCase):
    async def test_tcp_listener_has_the_default_backlog(self) -> None:
        server = await self.start(self.make_server())
        [port] = server.ports
        self.assertEqual(port.backlog, DEFAULT_BACKLOG)
        address = port.getHost()
        endpoint = endpoints.TCP4ClientEndpoint(reactor, address.host, address.port)
        features = (await self.stream_features(endpoint)).elements[0]
        self.assertEqual(features.tag, STREAM_FEATURES)
        self.assertIsNotNone(features.find(f"{{{NS_TLS}}}starttls"))

    async def test_backlog_from_the_endpoint_string(self) -> None:
        server = self.make_server(
            '[[listeners]]\nendpoint = "tcp:0:interface=127.0.0.1:backlog=2048"\n'
        )
        await self.start(server)
        self.assertEqual(server.ports[0].backlog, 2048)

    async def test_ipv6_listener(self) -> None:
        if not socket.has_ipv6:
            unavailable("no IPv6 on this machine", "enable IPv6 on the loopback interface")
        server = await self.start(self.make_server('[[listeners]]\naddress = "::1"\nport = 0\n'))
        address = server.ports[0].getHost()
        self.assertEqual(address.host, "::1")
        endpoint = endpoints.TCP6ClientEndpoint(reactor, "::1", address.port)
        features = await self.stream_features(endpoint)
        self.assertEqual(features.headers[0].tag, f"{{{STREAMS}}}stream")

    async def test_unix_socket_listener(self) -> None:
        # A short path: trial's directories are too deep for a UNIX socket address.
        directory = tempfile.mkdtemp(prefix="mim-c2s-")
        self.addCleanup(os.rmdir, directory)
        path = os.path.join(directory, "c2s.sock")
        server = self.make_server(f'[[listeners]]\nendpoint = "unix:{path}:mode=600"\n')
        await self.start(server)
        [port] = server.ports
        self.assertEqual(port.getHost(), UNIXAddress(path))
        self.assertEqual(port.backlog, DEFAULT_BACKLOG)
        self.assertEqual(os.stat(path).st_mode & 0o777, 0o600)
        output = await self.stream_features(endpoints.UNIXClientEndpoint(reactor, path))
        self.assertEqual(output.headers[0].get("from"), "localhost")
        [features] = output.elements
        self.assertEqual(features.tag, STREAM_FEATURES)
        self.assertIsNotNone(features.find(f"{{{NS_TLS}}}starttls"))
        await server.stopService()
        self.assertFalse(os.path.exists(path))  # stopping the listener removes the socket

    async def test_systemd_socket(self) -> None:
        """`systemd:domain=INET:index=0` adopts the first socket systemd passed."""
        inherited = socket.socket()
        self.addCleanup(inherited.close)
        inherited.bind(("127.0.0.1", 0))
        inherited.listen(16)
        # The endpoint closes the descriptor it adopts, as it would close systemd's.
        passed = os.dup(inherited.fileno())
        parser = endpoints._SystemdParser
        self.patch(parser, "_sddaemon", endpoints.ListenFDs([passed]))
        server = self.make_server('[[listeners]]\nendpoint = "systemd:domain=INET:index=0"\n')
        await self.start(server)
        port = inherited.getsockname()[1]
        self.assertEqual(server.ports[0].getHost().port, port)
        endpoint = endpoints.TCP4ClientEndpoint(reactor, "127.0.0.1", port)
        features = (await self.stream_features(endpoint)).elements[0]
        self.assertEqual(features.tag, STREAM_FEATURES)


class PubSubObserverTests(ServerServicesTestCase):
    async def test_an_observer_added_before_the_start_hears_the_services(self) -> None:
        server = self.make_server()
        heard: list[object] = []
        server.add_pubsub_observer(heard.append)
        await self.start(server)
        service = server.pubsub.services["pubsub.localhost"]
        await service.create("alice@localhost", "news")
        self.assertEqual([type(event) for event in heard], [core.NodeCreated])
