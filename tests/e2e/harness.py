"""End-to-end harness: a real server on a free loopback port, driven by slixmpp clients.

Tests run under trial's asyncio reactor (`trial --reactor=asyncio`), so the server (Twisted) and
the clients (slixmpp, asyncio) share one event loop while talking over real sockets.
"""

import asyncio
import json
import os
import socket
import ssl
from typing import Any

import slixmpp
from twisted.internet import defer, reactor
from twisted.trial import unittest

from mim_twisted.auth.scram import derive_all
from mim_twisted.config import load_config
from mim_twisted.tap import MimService
from mim_twisted.xmpp.tls import SELF_SIGNED_NAME
from tests import mysqlsupport, pgsupport
from tests.ci import unavailable

TIMEOUT = 15.0


def require_asyncio_reactor() -> None:
    if not reactor.__class__.__name__.startswith("AsyncioSelectorReactor"):
        unavailable("end-to-end tests need the asyncio reactor", "trial --reactor=asyncio")


async def wait_for(awaitable: Any, timeout: float = TIMEOUT) -> Any:
    """Await an asyncio awaitable from a Twisted coroutine."""
    return await defer.Deferred.fromFuture(
        asyncio.ensure_future(asyncio.wait_for(awaitable, timeout))
    )


class ServerTestCase(unittest.TestCase):
    """Starts a server per test; `extra_config` is TOML appended to the generated config.

    `storage` picks the backend: "sqlite", or "postgresql" or "mysql" in a database made for
    the test.
    """

    extra_config = ""
    domain = "localhost"
    storage = "sqlite"

    async def start_server(self, extra_config: str | None = None) -> MimService:
        require_asyncio_reactor()
        directory = os.path.abspath(self.mktemp())
        os.makedirs(directory)
        path = os.path.join(directory, "mim.toml")
        with open(path, "w") as f:
            f.write(self.server_config(directory) + (extra_config or self.extra_config))
        self.server = MimService(load_config(path))
        self.server.startService()
        self.addCleanup(self.server.stopService)
        await self.server.ready
        self.port = self.server.ports[0].getHost().port
        self.certificate = os.path.join(directory, "data", SELF_SIGNED_NAME)
        return self.server

    def server_config(self, directory: str) -> str:
        config = (
            f'[server]\ndomains = ["{self.domain}"]\ndata_dir = "data"\n'
            '[[listeners]]\naddress = "127.0.0.1"\nport = 0\n'
            "[auth]\nfailure_delay = 0.0\n"
        )
        if self.storage == "postgresql":
            dsn = pgsupport.create_temp_database(self)
            config += (
                '[storage]\nbackend = "postgresql"\nauto_migrate = true\n'
                f"[storage.postgresql]\ndsn = {json.dumps(dsn)}\npool_size = 2\n"
            )
        elif self.storage == "mysql":
            options = mysqlsupport.create_temp_database(self)
            config += '[storage]\nbackend = "mysql"\nauto_migrate = true\n[storage.mysql]\n'
            config += "".join(f"{key} = {json.dumps(value)}\n" for key, value in options.items())
            config += "pool_size = 2\n"
        return config

    async def register(self, user: str, password: str) -> None:
        await self.server.database.accounts.create_account(
            self.domain, user, derive_all(password, 4096)
        )

    def client(
        self,
        jid: str,
        password: str,
        mechanism: str | None = None,
        *,
        client_certificate: tuple[str, str] | None = None,
        authzid: str | None = None,
    ) -> "Client":
        """A slixmpp client; ``client_certificate`` is a (certificate, key) pair of PEM files it
        presents on STARTTLS, ``authzid`` the authorisation identity it sends with EXTERNAL."""
        client = Client(jid, password, self.port, self.certificate, mechanism)
        if client_certificate is not None:
            client.xmpp.ssl_context.load_cert_chain(*client_certificate)
        if authzid is not None:
            client.xmpp.credentials["authzid"] = authzid
        self.addCleanup(client.close)
        return client

    def raw(self) -> "RawClient":
        raw = RawClient(self.port)
        self.addCleanup(raw.close)
        return raw


class Client:
    """A slixmpp client that trusts the test server's self-signed certificate."""

    def __init__(
        self, jid: str, password: str, port: int, cafile: str, mechanism: str | None
    ) -> None:
        plugin_config = {"feature_mechanisms": {"use_mech": mechanism}} if mechanism else {}
        self.xmpp = slixmpp.ClientXMPP(jid, password, plugin_config=plugin_config)
        self.xmpp.register_plugin("xep_0203")  # delayed delivery stamps
        self.xmpp.enable_direct_tls = False
        self.xmpp.enable_plaintext = False
        self.xmpp.ssl_context = ssl.create_default_context(cafile=cafile)
        self.port = port
        self.outcome: asyncio.Future = asyncio.get_event_loop().create_future()
        self.xmpp.add_event_handler("session_start", self._settle("session_start"))
        self.xmpp.add_event_handler("failed_all_auth", self._settle("failed_auth"))
        self.xmpp.add_event_handler("disconnected", self._settle("disconnected"))

    def _settle(self, outcome: str):
        def handler(*args: object) -> None:
            if not self.outcome.done():
                self.outcome.set_result(outcome)

        return handler

    async def connect(self) -> str:
        """Connect and log in; returns "session_start", "failed_auth" or "disconnected"."""
        self.xmpp.connect("127.0.0.1", self.port)
        return await wait_for(self.outcome)

    def next_event(self, name: str, matches: Any = lambda _: True) -> asyncio.Future:
        """A future for the next `name` event whose argument satisfies `matches`."""
        future = asyncio.get_event_loop().create_future()

        def handler(argument: Any) -> None:
            if not future.done() and matches(argument):
                future.set_result(argument)

        self.xmpp.add_event_handler(name, handler)
        future.add_done_callback(lambda _: self.xmpp.del_event_handler(name, handler))
        return future

    @property
    def bound_jid(self) -> str:
        return self.xmpp.boundjid.full

    async def close(self) -> None:
        self.xmpp.cancel_connection_attempt()
        # slixmpp leaves its outgoing filter task running after a disconnect.
        if self.xmpp._run_out_filters is not None:
            self.xmpp._run_out_filters.cancel()
        if self.xmpp.transport is not None:
            await wait_for(self.xmpp.disconnect(wait=0))


class RawClient:
    """A plain socket client for the cases no well-behaved library sends."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None

    async def connect(self) -> None:
        self.reader, self.writer = await wait_for(asyncio.open_connection("127.0.0.1", self.port))

    async def send(self, data: bytes) -> None:
        self.writer.write(data)
        await wait_for(self.writer.drain())

    async def starttls(self, context: ssl.SSLContext) -> None:
        """Upgrade the connection (after <proceed/>) with ``context``, for host "localhost"."""
        await wait_for(self.writer.start_tls(context, server_hostname="localhost"))

    async def read_until_closed(self) -> bytes:
        """Everything the server sends until it closes the connection."""
        return await wait_for(self.reader.read(-1))

    async def read_until(self, marker: bytes) -> bytes:
        data = b""
        while marker not in data:
            chunk = await wait_for(self.reader.read(65536))
            if not chunk:
                break
            data += chunk
        return data

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


async def eventually(condition: Any, timeout: float = TIMEOUT) -> None:
    """Wait until condition() is true, checking every 20 ms."""
    loop = asyncio.get_event_loop()
    deadline = loop.time() + timeout
    while not condition():
        if loop.time() > deadline:
            raise AssertionError("condition not met in time")
        await wait_for(asyncio.sleep(0.02))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


STREAM_HEADER = (
    b"<?xml version='1.0'?><stream:stream xmlns='jabber:client' "
    b"xmlns:stream='http://etherx.jabber.org/streams' to='localhost' version='1.0'>"
)
