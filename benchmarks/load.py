#!/usr/bin/env python3
"""A light XMPP load generator: asyncio, raw sockets, ssl, expat. No XMPP library.

    python benchmarks/load.py SCENARIO --host 127.0.0.1 --port 5222 [--clients N]
                              [--duration S] [--runs R] ...

Scenarios (see benchmarks/README.md):

login
    N clients log in concurrently (at most --concurrency at a time): TCP connect, stream
    header, STARTTLS, SASL (SCRAM-SHA-256 by default), resource binding, initial presence.
    Figures: logins/s and the latency from TCP connect to the bind result.
messages
    N/2 pairs of logged-in clients send chat messages to each other; each sender keeps at most
    --window messages that its partner has not yet received. Figures: messages delivered/s and
    the latency from the send to the partner's receipt.
pubsub-fanout
    One publisher creates a node on pubsub.<domain>, N subscribers subscribe, then --items
    items are published with at most --window items not yet delivered to every subscriber.
    With --publishers P, P publishers (the owner makes the others publishers of the node) each
    publish --items items with --window in flight each. Figures: notifications delivered/s and
    the latency from publish to the last (and first) subscriber's notification, per item.

pep
    N users in a ring, each with --contacts K mutual contacts (its K/2 neighbours on each side)
    made through real subscription exchanges, each announcing entity caps (XEP-0115, a correct
    sha-1 ver) with urn:xmpp:omemo:2:devices+notify and answering the server's disco#info;
    then every user publishes its OMEMO device list flat out (--window publishes in flight
    each). Figures: publishes/s, notifications/s and the latency from publish to notification.

Accounts are <prefix><i>@<domain> for i = --first-user .. with one --password; create them
before (benchmarks/bench.py does). Every run prints one JSON line; with --runs R the runs are
repeated and a last JSON line gives the median, min and max of every figure. Every phase has a
deadline, so a run always ends by itself. Only loopback addresses are accepted as --host.
"""

import argparse
import asyncio
import base64
import contextlib
import hashlib
import hmac
import ipaddress
import json
import math
import os
import re
import resource
import secrets
import shlex
import socket
import ssl
import statistics
import sys
import time
import xml.etree.ElementTree as ET
from collections import deque
from collections.abc import Awaitable, Callable
from xml.sax.saxutils import escape, quoteattr

NS_CLIENT = "jabber:client"
NS_STREAMS = "http://etherx.jabber.org/streams"
NS_TLS = "urn:ietf:params:xml:ns:xmpp-tls"
NS_SASL = "urn:ietf:params:xml:ns:xmpp-sasl"
NS_BIND = "urn:ietf:params:xml:ns:xmpp-bind"
NS_PUBSUB = "http://jabber.org/protocol/pubsub"
NS_PUBSUB_OWNER = "http://jabber.org/protocol/pubsub#owner"
NS_EVENT = "http://jabber.org/protocol/pubsub#event"

TAG_FEATURES = f"{{{NS_STREAMS}}}features"
TAG_STREAM_ERROR = f"{{{NS_STREAMS}}}error"
TAG_MESSAGE = f"{{{NS_CLIENT}}}message"
TAG_IQ = f"{{{NS_CLIENT}}}iq"
TAG_PRESENCE = f"{{{NS_CLIENT}}}presence"
NS_REGISTER = "jabber:iq:register"
NS_ROSTER = "jabber:iq:roster"
NS_CAPS = "http://jabber.org/protocol/caps"
NS_DISCO_INFO = "http://jabber.org/protocol/disco#info"
NS_OMEMO = "urn:xmpp:omemo:2"
OMEMO_DEVICES = "urn:xmpp:omemo:2:devices"
PATH_EVENT_ITEM = f"{{{NS_EVENT}}}event/{{{NS_EVENT}}}items/{{{NS_EVENT}}}item"

now = time.perf_counter
# Bytes asked at once of a socket and of TLS (see read_directly); below the size from which
# each buffer would be a mapping of its own.
DIRECT_READ = 65536
TLS_READ = 16384  # the largest TLS record


class XmppError(Exception):
    """The server refused something or the stream broke."""


# -- the stream ------------------------------------------------------------------------------


class StreamParser:
    """Incremental parser of one XML stream: returns the complete top-level elements.

    ElementTree's pull parser builds the elements in C; only the events are looked at here.
    """

    def __init__(self) -> None:
        self._parser = ET.XMLPullParser(events=("start", "end"))
        self._depth = 0
        self._root: ET.Element | None = None
        self.header: dict[str, str] | None = None
        self.ended = False

    def feed(self, data: bytes) -> list[ET.Element]:
        self._parser.feed(data)
        out = []
        depth = self._depth
        for event, element in self._parser.read_events():
            if event == "start":
                if depth == 0:
                    self._root = element
                    self.header = dict(element.attrib)
                depth += 1
            else:
                depth -= 1
                if depth == 1:
                    out.append(element)
                elif depth == 0:
                    self.ended = True
        self._depth = depth
        if out:
            # Forget the stanzas handed out (an element still being built stays referenced by
            # the tree builder and still ends with its own event).
            del self._root[:]
        return out


class XmppConnection(asyncio.Protocol):
    """One client connection: bytes in -> top-level elements out, to a queue or a handler."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.parser = StreamParser()
        self.inbox: deque[ET.Element] = deque()
        self.waiter: asyncio.Future | None = None
        self.handler: Callable[[ET.Element], None] | None = None
        self.lost = asyncio.get_running_loop().create_future()
        self.error: Exception | None = None
        # Once set, every byte received goes to it instead of the parser (see NotificationScanner).
        self.scanner: NotificationScanner | PepScanner | None = None
        self._direct: tuple | None = None  # see read_directly

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        if self.scanner is not None:
            self.scanner.feed(data)
            return
        try:
            elements = self.parser.feed(data)
        except ET.ParseError as e:
            self._fail(XmppError(f"not well-formed: {e}"))
            self.transport.abort()
            return
        handler = self.handler
        for element in elements:
            if handler is not None:
                handler(element)
            else:
                self.inbox.append(element)
        if self.parser.ended:
            self._fail(XmppError("the server closed the stream"))
        elif self.inbox and self.waiter is not None and not self.waiter.done():
            self.waiter.set_result(None)

    def eof_received(self) -> bool:
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self._fail(XmppError(f"connection lost: {exc}" if exc else "connection closed"))
        if not self.lost.done():
            self.lost.set_result(None)

    def _fail(self, error: Exception) -> None:
        if self.error is None:
            self.error = error
        if self.waiter is not None and not self.waiter.done():
            self.waiter.set_result(None)

    def send(self, data: str | bytes) -> None:
        if isinstance(data, str):
            data = data.encode("utf-8")
        self.transport.write(data)

    def restart(self, domain: str) -> None:
        """Open a new stream (at the start, after STARTTLS and after SASL)."""
        self.parser = StreamParser()
        self.send(
            "<?xml version='1.0'?>"
            f"<stream:stream xmlns='{NS_CLIENT}' xmlns:stream='{NS_STREAMS}'"
            f" to={quoteattr(domain)} version='1.0' xml:lang='en'>"
        )

    async def next(self) -> ET.Element:
        """The next top-level element received (during negotiation, before a handler is set)."""
        while not self.inbox:
            if self.error is not None:
                raise self.error
            self.waiter = asyncio.get_running_loop().create_future()
            await self.waiter
            self.waiter = None
        element = self.inbox.popleft()
        if element.tag == TAG_STREAM_ERROR:
            conditions = [child.tag.split("}")[-1] for child in element]
            raise XmppError(f"stream error: {' '.join(conditions)}")
        return element

    def read_directly(self, scanner: "NotificationScanner | PepScanner") -> None:
        """From now on, hand every byte received to `scanner`, read by a callback of the event
        loop's own straight from the socket and through the TLS object of the connection.

        asyncio's TLS transport runs through several layers of Python for every read (about
        two thirds of the load generator's CPU once the stanzas are only scanned), and a
        subscriber gets one read per notification. The transport's own socket, TLS object and
        buffer are used, so that `give_back` leaves it as if it had read all this itself.
        Where the transport is not built as on CPython 3.11+, its own reads go on.
        """
        self.scanner = scanner
        transport = self.transport
        ssl_protocol = getattr(transport, "_ssl_protocol", None)
        if ssl_protocol is None:
            raw, tls = transport, None
        else:
            raw = getattr(ssl_protocol, "_transport", None)
            tls = tuple(
                getattr(ssl_protocol, name, None) for name in ("_sslobj", "_incoming", "_outgoing")
            )
            if None in tls:
                return
        sock = getattr(raw, "_sock", None)
        loop = asyncio.get_running_loop()
        # The selector loop's own reader registration, as its transports use it (the public
        # one refuses a socket that belongs to a transport).
        if sock is None or raw.is_closing() or not hasattr(loop, "_add_reader"):
            return
        raw.pause_reading()
        loop._add_reader(sock.fileno(), self._read_direct)
        self._direct = (raw, sock, tls)

    def _read_direct(self) -> None:
        raw, sock, tls = self._direct
        try:
            data = sock.recv(DIRECT_READ)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            data = b""
        if not data:
            self.give_back()  # the transport reads the end, or the error, itself
            return
        if tls is None:
            self.scanner.feed(data)
            return
        tls_object, incoming, outgoing = tls
        incoming.write(data)
        chunks = []
        chunk = b"-"
        try:
            # Until a record is incomplete, or none is left: then without asking once more
            # for the SSLWantReadError that would say so.
            while chunk:
                chunk = tls_object.read(TLS_READ)
                chunks.append(chunk)
                if not (incoming.pending or tls_object.pending()):
                    break
        except ssl.SSLWantReadError:
            chunk = b"-"
        except ssl.SSLError as e:
            self._fail(XmppError(f"TLS: {e}"))
            self.give_back()
            raw.abort()
            return
        if outgoing.pending:  # e.g. an answer to a TLS 1.3 key update
            raw.write(outgoing.read())
        if chunks:
            self.scanner.feed(b"".join(chunks))
        if not chunk:
            self.give_back()  # close_notify: the transport ends the connection

    def give_back(self) -> None:
        """The transport reads its socket again (see `read_directly`)."""
        if self._direct is None:
            return
        raw, sock, _ = self._direct
        self._direct = None
        asyncio.get_running_loop()._remove_reader(sock.fileno())
        raw.resume_reading()

    def close(self) -> None:
        self.give_back()
        if self.transport is not None and not self.transport.is_closing():
            with contextlib.suppress(Exception):
                self.transport.write(b"</stream:stream>")
            self.transport.close()


# -- SASL ------------------------------------------------------------------------------------

_SALTED_CACHE: dict[tuple[str, str, bytes, int], bytes] = {}


def _saslname(name: str) -> str:
    return name.replace("=", "=3D").replace(",", "=2C")


class ScramClient:
    """The client side of SCRAM-SHA-1 / SCRAM-SHA-256 (RFC 5802, RFC 7677), without channel
    binding. The salted password is cached per (password, salt, iterations), as real clients
    do, unless `cache` is false: PBKDF2 is the client's cost, not the server's."""

    def __init__(self, mechanism: str, username: str, password: str, cache: bool = True) -> None:
        self.hash = {"SCRAM-SHA-1": "sha1", "SCRAM-SHA-256": "sha256"}[mechanism]
        self.password = password
        self.cache = cache
        self.nonce = base64.b64encode(secrets.token_bytes(18)).decode()
        self.first_bare = f"n={_saslname(username)},r={self.nonce}"
        self.server_signature = b""

    def first(self) -> bytes:
        return ("n,," + self.first_bare).encode()

    def final(self, challenge: bytes) -> bytes:
        server_first = challenge.decode()
        fields = dict(item.split("=", 1) for item in server_first.split(","))
        nonce, salt, iterations = fields["r"], base64.b64decode(fields["s"]), int(fields["i"])
        if not nonce.startswith(self.nonce):
            raise XmppError("SCRAM: the server's nonce does not extend ours")
        key = (self.hash, self.password, salt, iterations)
        salted = _SALTED_CACHE.get(key) if self.cache else None
        if salted is None:
            salted = hashlib.pbkdf2_hmac(self.hash, self.password.encode(), salt, iterations)
            if self.cache:
                _SALTED_CACHE[key] = salted
        client_key = hmac.digest(salted, b"Client Key", self.hash)
        stored_key = hashlib.new(self.hash, client_key).digest()
        without_proof = f"c=biws,r={nonce}"
        auth_message = f"{self.first_bare},{server_first},{without_proof}".encode()
        signature = hmac.digest(stored_key, auth_message, self.hash)
        proof = bytes(a ^ b for a, b in zip(client_key, signature, strict=True))
        server_key = hmac.digest(salted, b"Server Key", self.hash)
        self.server_signature = hmac.digest(server_key, auth_message, self.hash)
        return f"{without_proof},p={base64.b64encode(proof).decode()}".encode()

    def verify(self, success: bytes) -> None:
        fields = dict(item.split("=", 1) for item in success.decode().split(",") if "=" in item)
        if base64.b64decode(fields.get("v", "")) != self.server_signature:
            raise XmppError("SCRAM: wrong server signature")


def _sasl_element(name: str, data: bytes | None, mechanism: str | None = None) -> str:
    attrs = f" mechanism='{mechanism}'" if mechanism else ""
    text = "" if data is None else (base64.b64encode(data).decode() or "=")
    return f"<{name} xmlns='{NS_SASL}'{attrs}>{text}</{name}>"


def _sasl_data(element: ET.Element) -> bytes:
    text = (element.text or "").strip()
    return b"" if text in ("", "=") else base64.b64decode(text)


def _sasl_failure(element: ET.Element) -> XmppError:
    conditions = [child.tag.split("}")[-1] for child in element]
    return XmppError(f"SASL failure: {' '.join(conditions) or element.tag}")


async def authenticate(conn: XmppConnection, opts: argparse.Namespace, username: str) -> None:
    mechanism = opts.mechanism
    if mechanism == "PLAIN":
        message = f"\0{username}\0{opts.password}".encode()
        conn.send(_sasl_element("auth", message, mechanism))
        answer = await conn.next()
        if answer.tag != f"{{{NS_SASL}}}success":
            raise _sasl_failure(answer)
        return
    scram = ScramClient(mechanism, username, opts.password, cache=not opts.no_scram_cache)
    conn.send(_sasl_element("auth", scram.first(), mechanism))
    challenge = await conn.next()
    if challenge.tag != f"{{{NS_SASL}}}challenge":
        raise _sasl_failure(challenge)
    conn.send(_sasl_element("response", scram.final(_sasl_data(challenge))))
    answer = await conn.next()
    if answer.tag == f"{{{NS_SASL}}}challenge":  # RFC 6120 allows v=... as a last challenge
        scram.verify(_sasl_data(answer))
        conn.send(_sasl_element("response", b""))
        answer = await conn.next()
        if answer.tag != f"{{{NS_SASL}}}success":
            raise _sasl_failure(answer)
        return
    if answer.tag != f"{{{NS_SASL}}}success":
        raise _sasl_failure(answer)
    scram.verify(_sasl_data(answer))


# -- a logged-in client ----------------------------------------------------------------------


class Client:
    """A bound session. After login every stanza goes to `on_stanza`; IQ results are matched
    to `iq()` calls by id first."""

    def __init__(self, conn: XmppConnection, jid: str, index: int, login_time: float) -> None:
        self.conn = conn
        self.jid = jid
        self.bare = jid.split("/", 1)[0]
        self.index = index
        self.login_time = login_time
        self.on_stanza: Callable[[ET.Element], None] = _ignore
        self._iq_waiters: dict[str, asyncio.Future] = {}
        self._iq_counter = 0
        conn.handler = self._dispatch
        for element in list(conn.inbox):
            self._dispatch(element)
        conn.inbox.clear()

    def _dispatch(self, element: ET.Element) -> None:
        if element.tag == TAG_IQ:
            waiter = self._iq_waiters.pop(element.get("id", ""), None)
            if waiter is not None:
                if not waiter.done():
                    waiter.set_result(element)
                return
        self.on_stanza(element)

    def send(self, data: str | bytes) -> None:
        self.conn.send(data)

    def iq(self, kind: str, to: str | None, payload: str) -> asyncio.Future:
        """Send an IQ request; the future gets the reply <iq/> (result or error)."""
        self._iq_counter += 1
        iq_id = f"q{self._iq_counter}"
        future = asyncio.get_running_loop().create_future()
        self._iq_waiters[iq_id] = future
        to_attr = f" to={quoteattr(to)}" if to else ""
        self.send(f"<iq type='{kind}' id='{iq_id}'{to_attr}>{payload}</iq>")
        return future

    def close(self) -> None:
        self.conn.close()


def _ignore(element: ET.Element) -> None:
    pass


def _iq_error(reply: ET.Element) -> str | None:
    if reply.get("type") == "result":
        return None
    error = reply.find(f"{{{NS_CLIENT}}}error")
    if error is None:
        return "error"
    return " ".join(child.tag.split("}")[-1] for child in error) or "error"


def make_tls_context(opts: argparse.Namespace) -> ssl.SSLContext:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    if opts.cafile:
        context.load_verify_locations(opts.cafile)
        context.check_hostname = True
    else:
        # The server's certificate is self-signed: accept it (a benchmark on loopback).
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    return context


async def login(
    opts: argparse.Namespace, index: int, resource_name: str, presence: bool = True
) -> Client:
    """Connect and log in user number `index`; the latency is from TCP connect to bind."""
    return await asyncio.wait_for(_login(opts, index, resource_name, presence), opts.timeout)


async def _login(
    opts: argparse.Namespace, index: int, resource_name: str, presence: bool
) -> Client:
    loop = asyncio.get_running_loop()
    username = f"{opts.user_prefix}{index}"
    domain = opts.domain
    started = now()
    _, conn = await loop.create_connection(XmppConnection, opts.host, opts.port)
    try:
        conn.restart(domain)
        features = await conn.next()
        if features.tag != TAG_FEATURES:
            raise XmppError(f"expected stream features, got {features.tag}")
        if features.find(f"{{{NS_TLS}}}starttls") is not None and not opts.no_tls:
            conn.send(f"<starttls xmlns='{NS_TLS}'/>")
            proceed = await conn.next()
            if proceed.tag != f"{{{NS_TLS}}}proceed":
                raise XmppError("STARTTLS refused")
            conn.transport = await loop.start_tls(
                conn.transport, conn, opts.tls_context, server_hostname=domain
            )
            conn.restart(domain)
            features = await conn.next()
        if opts.register:
            await register(conn, username, opts.password)
        offered = [m.text for m in features.iter(f"{{{NS_SASL}}}mechanism")]
        if opts.mechanism not in offered:
            raise XmppError(f"{opts.mechanism} not offered (offered: {offered})")
        await authenticate(conn, opts, username)
        conn.restart(domain)
        features = await conn.next()
        if features.find(f"{{{NS_BIND}}}bind") is None:
            raise XmppError("no resource binding offered")
        conn.send(
            f"<iq type='set' id='bind'><bind xmlns='{NS_BIND}'>"
            f"<resource>{escape(resource_name)}</resource></bind></iq>"
        )
        while True:
            reply = await conn.next()
            if reply.tag == TAG_IQ and reply.get("id") == "bind":
                break
        if reply.get("type") != "result":
            raise XmppError(f"bind failed: {_iq_error(reply)}")
        jid = reply.findtext(f"{{{NS_BIND}}}bind/{{{NS_BIND}}}jid")
        elapsed = now() - started
        client = Client(conn, jid, index, elapsed)
        if presence:
            client.send("<presence/>")
        return client
    except BaseException:
        conn.close()
        raise


async def register(conn: XmppConnection, username: str, password: str) -> None:
    """XEP-0077 in-band registration before SASL (for servers whose accounts are not made by
    bench.py); an existing account (conflict) is fine."""
    conn.send(
        f"<iq type='set' id='reg'><query xmlns='{NS_REGISTER}'>"
        f"<username>{escape(username)}</username><password>{escape(password)}</password>"
        "</query></iq>"
    )
    while True:
        reply = await conn.next()
        if reply.tag == TAG_IQ and reply.get("id") == "reg":
            break
    error = _iq_error(reply)
    if error and "conflict" not in error:
        raise XmppError(f"registration of {username} failed: {error}")


async def login_many(
    opts: argparse.Namespace, indexes: list[int], resource_name: str, presence: bool = True
) -> tuple[list[Client], list[str]]:
    """Log in many clients, at most opts.concurrency at a time; the clients and the errors."""
    semaphore = asyncio.Semaphore(opts.concurrency)
    clients: list[Client | None] = [None] * len(indexes)
    errors: list[str] = []

    async def one(position: int, index: int) -> None:
        async with semaphore:
            try:
                clients[position] = await login(opts, index, resource_name, presence)
            except (OSError, XmppError, TimeoutError, ssl.SSLError) as e:
                errors.append(f"{opts.user_prefix}{index}: {type(e).__name__}: {e}")

    await asyncio.gather(*(one(p, i) for p, i in enumerate(indexes)))
    return [c for c in clients if c is not None], errors


async def close_all(clients: list[Client], timeout: float = 10.0) -> None:
    for client in clients:
        client.close()
    if clients:
        await asyncio.wait([c.conn.lost for c in clients], timeout=timeout)


# -- measurement helpers ---------------------------------------------------------------------


def percentiles(samples: list[float], scale: float = 1000.0) -> dict[str, float | None]:
    """p50/p95/p99/max of `samples` (seconds) in milliseconds, nearest-rank."""
    if not samples:
        return {"p50": None, "p95": None, "p99": None, "max": None}
    ordered = sorted(samples)

    def rank(q: float) -> float:
        return round(ordered[max(0, math.ceil(q * len(ordered)) - 1)] * scale, 2)

    return {"p50": rank(0.50), "p95": rank(0.95), "p99": rank(0.99), "max": rank(1.0)}


def _process_cpu(pid: int, ticks: int) -> float | None:
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return (int(fields[11]) + int(fields[12])) / ticks


def _pids_named(names: list[str]) -> list[int]:
    """The processes with these names (/proc/PID/comm); a name of digits is a pid."""
    pids = [int(name) for name in names if name.isdigit()]
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/comm") as f:
                    if f.read().strip() in names:
                        pids.append(int(entry))
            except OSError:
                pass
    return pids


class CpuMeter:
    """CPU used over a wall interval by this process, the server (if its pids are given: one,
    or a supervisor and its workers), the database processes (by name, e.g. postgres) and
    everything else on the machine (from /proc/stat: e.g. a test suite someone runs meanwhile,
    which would skew the figures)."""

    def __init__(
        self,
        server_pids: list[int] | None,
        db_processes: list[str] | None = None,
        publisher_pid: int | None = None,
    ) -> None:
        self.server_pids = server_pids or []
        self.publisher_pid = publisher_pid
        self.ticks = os.sysconf("SC_CLK_TCK")
        self.db_pids = _pids_named(db_processes) if db_processes else []
        self._start = self._sample()

    def _machine_busy(self) -> float | None:
        try:
            with open("/proc/stat") as f:
                fields = [int(x) for x in f.readline().split()[1:]]
        except (OSError, ValueError):
            return None
        # user nice system idle iowait irq softirq steal ...: all but idle and iowait.
        return (sum(fields[:8]) - fields[3] - fields[4]) / self.ticks

    def _sample(self) -> tuple:
        usage = resource.getrusage(resource.RUSAGE_SELF)
        client = usage.ru_utime + usage.ru_stime
        server = {pid: _process_cpu(pid, self.ticks) for pid in self.server_pids}
        db = {pid: _process_cpu(pid, self.ticks) for pid in self.db_pids}
        publisher = _process_cpu(self.publisher_pid, self.ticks) if self.publisher_pid else None
        return now(), client, server, db, publisher, self._machine_busy()

    def figures(self) -> dict[str, float | None]:
        wall0, client0, server0, db0, publisher0, busy0 = self._start
        wall1, client1, server1, db1, publisher1, busy1 = self._sample()
        wall = max(wall1 - wall0, 1e-9)
        client = (client1 - client0) / wall
        each = [
            (server1[p] - server0[p]) / wall
            for p in server0
            if server0[p] is not None and server1.get(p) is not None
        ]
        server = sum(each) if each else None
        db = None
        if self.db_pids:
            db = sum(db1[p] - db0[p] for p in db0 if db0[p] is not None and db1[p] is not None)
            db /= wall
        publisher = None
        if publisher0 is not None and publisher1 is not None:
            publisher = (publisher1 - publisher0) / wall
        other = None
        if busy0 is not None and busy1 is not None:
            other = (busy1 - busy0) / wall - client - (server or 0.0) - (db or 0.0)
            other -= publisher or 0.0
            other = max(0.0, other)

        def pct(value: float | None) -> float | None:
            return None if value is None else round(100 * value, 1)

        figures = {"client_cpu_pct": pct(client), "server_cpu_pct": pct(server)}
        if self.publisher_pid:
            figures["publisher_cpu_pct"] = pct(publisher)
        if len(self.server_pids) > 1:
            # Each process of the server by its place in the order given ("0": the first).
            figures["server_cpu_pct_each"] = {str(i): pct(value) for i, value in enumerate(each)}
        if self.db_pids:
            figures["db_cpu_pct"] = pct(db)
        figures["other_cpu_pct"] = pct(other)
        return figures


# -- scenario: login -------------------------------------------------------------------------


async def scenario_login(opts: argparse.Namespace, run: int) -> dict:
    indexes = list(range(opts.first_user, opts.first_user + opts.clients))
    resource_name = f"login-{run}-{secrets.token_hex(3)}"
    meter = CpuMeter(opts.server_pid, opts.db_process, opts.publisher_pid)
    started = now()
    clients, errors = await login_many(opts, indexes, resource_name)
    elapsed = now() - started
    cpu = meter.figures()
    await close_all(clients)
    return {
        "scenario": "login",
        "clients": opts.clients,
        "concurrency": opts.concurrency,
        "mechanism": opts.mechanism,
        "ok": len(clients),
        "failed": len(errors),
        "seconds": round(elapsed, 3),
        "logins_per_s": round(len(clients) / elapsed, 1),
        "latency_ms": percentiles([c.login_time for c in clients]),
        **cpu,
        **({"first_error": errors[0]} if errors else {}),
    }


# -- scenario: messages ----------------------------------------------------------------------


class MessageFlow:
    """One sender's stream of chat messages to its partner, with a window of undelivered ones.

    Every delivery or bounce frees a slot; freed slots are refilled once per event-loop turn,
    all in one write.
    """

    def __init__(
        self,
        sender: Client,
        to: str,
        window: int,
        body: str,
        stats: "Deliveries",
        numbered: bool = False,
    ):
        self.sender = sender
        self.window = window
        self.stats = stats
        self.pending: dict[str, float] = {}
        self.seq = 0
        self.running = False
        self._scheduled = False
        self._head = f"<message type='chat' to={quoteattr(to)} id='"
        self._tail = f"'><body>{escape(body)}</body></message>"
        # Each body ending with the message's number: every message (and event) distinct.
        self._numbered = numbered
        self._body = f"'><body>{escape(body)} #"

    def fill(self) -> None:
        self._scheduled = False
        if not self.running:
            return
        free = self.window - len(self.pending)
        if free <= 0:
            return
        sent_at = now()
        parts = []
        for _ in range(free):
            self.seq += 1
            message_id = str(self.seq)
            self.pending[message_id] = sent_at
            if self._numbered:
                parts.append(f"{self._head}{message_id}{self._body}{message_id}</body></message>")
            else:
                parts.append(self._head + message_id + self._tail)
        self.stats.sent += free
        self.sender.send("".join(parts))

    def _refill_soon(self) -> None:
        if self.running and not self._scheduled:
            self._scheduled = True
            asyncio.get_running_loop().call_soon(self.fill)

    def delivered(self, message_id: str | None) -> None:
        sent_at = self.pending.pop(message_id, None)
        if sent_at is None:
            self.stats.unexpected += 1
            return
        self.stats.record(sent_at, now())
        self._refill_soon()

    def bounced(self, message_id: str | None) -> None:
        if self.pending.pop(message_id, None) is not None:
            self.stats.errors += 1
            self._refill_soon()


class Deliveries:
    """Counts deliveries and keeps latencies inside the measurement window only."""

    def __init__(self) -> None:
        self.window_start = math.inf
        self.window_end = math.inf
        self.count = 0
        self.latencies: list[float] = []
        self.sent = 0
        self.errors = 0
        self.unexpected = 0
        self.total = 0

    def record(self, sent_at: float, received_at: float) -> None:
        self.total += 1
        if self.window_start <= received_at < self.window_end:
            self.count += 1
            self.latencies.append(received_at - sent_at)


def _message_handler(client: Client, inbound: MessageFlow, outbound: MessageFlow):
    def on_stanza(element: ET.Element) -> None:
        if element.tag != TAG_MESSAGE:
            return
        if element.get("type") == "error":
            outbound.bounced(element.get("id"))
        else:
            inbound.delivered(element.get("id"))

    return on_stanza


async def scenario_messages(opts: argparse.Namespace, run: int) -> dict:
    count = opts.clients - opts.clients % 2
    if count < 2:
        raise SystemExit("messages: --clients must be at least 2")
    indexes = list(range(opts.first_user, opts.first_user + count))
    clients, errors = await login_many(opts, indexes, f"msg-{run}-{secrets.token_hex(3)}")
    try:
        if errors:
            raise XmppError(f"{len(errors)} logins failed, first: {errors[0]}")
        await asyncio.sleep(opts.settle)  # let the initial presences settle
        stats = Deliveries()
        body = (opts.body * (opts.body_size // len(opts.body) + 1))[: opts.body_size]
        flows = {}
        for a, b in zip(clients[0::2], clients[1::2], strict=True):
            for sender, receiver in ((a, b), (b, a)):
                to = receiver.jid if opts.to_full_jid else receiver.bare
                flows[sender.index] = MessageFlow(
                    sender, to, opts.window, body, stats, opts.numbered_bodies
                )
        for a, b in zip(clients[0::2], clients[1::2], strict=True):
            a.on_stanza = _message_handler(a, flows[b.index], flows[a.index])
            b.on_stanza = _message_handler(b, flows[a.index], flows[b.index])
        for flow in flows.values():
            flow.running = True
            flow.fill()
        await asyncio.sleep(opts.warmup)
        meter = CpuMeter(opts.server_pid, opts.db_process, opts.publisher_pid)
        stats.window_start = now()
        stats.window_end = stats.window_start + opts.duration
        await asyncio.sleep(opts.duration)
        cpu = meter.figures()
        for flow in flows.values():
            flow.running = False
        deadline = now() + opts.drain
        while any(f.pending for f in flows.values()) and now() < deadline:
            await asyncio.sleep(0.05)
        lost = sum(len(f.pending) for f in flows.values())
    finally:
        await close_all(clients)
    return {
        "scenario": "messages",
        "clients": count,
        "pairs": count // 2,
        "window": opts.window,
        "body_bytes": opts.body_size,
        "seconds": opts.duration,
        "messages_per_s": round(stats.count / opts.duration, 1),
        "latency_ms": percentiles(stats.latencies),
        "sent": stats.sent,
        "delivered": stats.total,
        "errors": stats.errors,
        "undelivered_after_drain": lost,
        **cpu,
    }


# -- scenario: pubsub-fanout -----------------------------------------------------------------


class Fanout:
    """Per-item delivery bookkeeping for the subscribers of one node. Item ids are
    "<publisher>-<n>"; each publisher has its own window (``slots``)."""

    def __init__(self, subscribers: int, items: int, window: int, publishers: int = 1) -> None:
        self.subscribers = subscribers
        self.published_at: dict[str, float] = {}
        self.first_at: dict[str, float] = {}
        self.received: dict[str, int] = {}
        self.complete_latencies: list[float] = []
        self.first_latencies: list[float] = []
        self.notifications = 0
        self.last_delivery = 0.0
        self.slots = [asyncio.Semaphore(window) for _ in range(publishers)]
        self.items = items * publishers
        self.completed = 0
        self.all_done = asyncio.get_running_loop().create_future()
        self.verified = 0  # notifications parsed in full (see NotificationScanner)
        self.malformed: list[str] = []

    def notified(self, item_id: str | None) -> None:
        published = self.published_at.get(item_id)
        if published is None:
            return
        arrived = now()
        self.notifications += 1
        self.last_delivery = arrived
        got = self.received.get(item_id, 0) + 1
        self.received[item_id] = got
        if got == 1:
            self.first_latencies.append(arrived - published)
        if got == self.subscribers:
            self.complete_latencies.append(arrived - published)
            self.completed += 1
            self.slots[int(item_id.partition("-")[0])].release()
            if self.completed == self.items and not self.all_done.done():
                self.all_done.set_result(None)


# The start tag of an <item/> with its id (either quote), not of <items/>.
ITEM_ID = re.compile(rb"<item\s[^>]*?\bid=(?:'([^']*)'|\"([^\"]*)\")")
MESSAGE_START = b"<message"
MESSAGE_END = b"</message>"
# What a stanza cut out of the stream is parsed in: the stream's default namespace.
STANZA_OPEN = f"<stream xmlns='{NS_CLIENT}'>".encode()
STANZA_CLOSE = b"</stream>"
NS_LOAD = "urn:mim-twisted:load"


def parse_cut_out(stanza: bytes) -> ET.Element:
    """A stanza cut out of the stream, parsed with namespaces in the stream's default one;
    ET.ParseError if it is not well-formed."""
    return ET.fromstring(STANZA_OPEN + stanza + STANZA_CLOSE)[0]


def not_well_formed(error: ET.ParseError, stanza: bytes) -> str:
    return f"not well-formed: {error}: {stanza[:200]!r}"


class Sample:
    """Which notifications a scanner parses in full: the first, then every `every`-th."""

    def __init__(self, every: int) -> None:
        self.every = every
        self.countdown = 1

    def due(self) -> bool:
        self.countdown -= 1
        if self.countdown:
            return False
        self.countdown = self.every
        return True


class NotificationScanner:
    """A subscriber's receiving end while items are published: the item ids of the
    notifications are found in the received bytes, without building an element per stanza
    (parsing every notification cost the load generator more CPU than the server spent on it).

    What the scanner takes as notifications is checked: the first one and then every
    `verify_every`-th is cut out of the stream (from its <message to its </message>) and parsed
    with namespaces, and must be a <message/> from the service, to this subscriber, with an
    <event/> of that node whose <item/> has the id found and the payload published. Anything
    else is counted in `fanout.malformed`. Only complete <message/>s are looked at; the rest
    waits for the next bytes.
    """

    def __init__(
        self, fanout: "Fanout", client: "Client", expected: "ExpectedNotification", every: int
    ) -> None:
        self.fanout = fanout
        self.client = client
        self.expected = expected
        self.sample = Sample(every)
        self.rest = b""

    def feed(self, data: bytes) -> None:
        data = self.rest + data if self.rest else data
        end = data.rfind(MESSAGE_END)
        if end < 0:
            self.rest = data
            return
        end += len(MESSAGE_END)
        self.rest = data[end:]
        notified = self.fanout.notified
        for match in ITEM_ID.finditer(data, 0, end):
            item_id = (match[1] if match[1] is not None else match[2]).decode()
            if self.sample.due():
                self.verify(data, match.start(), item_id)
            notified(item_id)

    def verify(self, data: bytes, at: int, item_id: str) -> None:
        start = data.rfind(MESSAGE_START, 0, at)
        stop = data.find(MESSAGE_END, at)
        problem = None
        if start < 0 or stop < 0:
            problem = "an <item/> outside a <message/>"
        else:
            stanza = data[start : stop + len(MESSAGE_END)]
            try:
                problem = self.expected.problem(parse_cut_out(stanza), self.client, item_id)
            except ET.ParseError as e:
                problem = not_well_formed(e, stanza)
        self.fanout.verified += 1
        if problem is not None:
            self.fanout.malformed.append(problem)


class ExpectedNotification:
    """What a notification of an item published in the scenario must be (XEP-0060 §7.1.2.1)."""

    def __init__(self, service: str, node: str, payload: str) -> None:
        self.service = service
        self.node = node
        self.payload = payload

    def problem(self, message: ET.Element, client: "Client", item_id: str) -> str | None:
        """What is wrong with `message` as the notification of `item_id` to `client`."""
        if message.tag != TAG_MESSAGE:
            return f"{message.tag} instead of {TAG_MESSAGE}"
        if message.get("from") != self.service:
            return f"from {message.get('from')!r} instead of {self.service!r}"
        if message.get("to") not in (client.bare, client.jid):
            return f"to {message.get('to')!r} instead of {client.bare!r}"
        items = message.find(f"{{{NS_EVENT}}}event/{{{NS_EVENT}}}items")
        if items is None or items.get("node") != self.node:
            return f"no <event><items node={self.node!r}/></event>"
        item = items.find(f"{{{NS_EVENT}}}item[@id='{item_id}']")
        if item is None:
            return f"no <item id={item_id!r}/> in the event"
        entry = item.find(f"{{{NS_LOAD}}}entry")
        if entry is None or entry.text != self.payload:
            return f"item {item_id!r} without the payload published"
        return None


async def _bounded(limit: int, calls: list[Callable[[], Awaitable]]) -> list:
    semaphore = asyncio.Semaphore(limit)

    async def one(call: Callable[[], Awaitable]):
        async with semaphore:
            return await call()

    return await asyncio.gather(*(one(c) for c in calls))


async def scenario_pubsub(opts: argparse.Namespace, run: int) -> dict:
    service = opts.pubsub or f"pubsub.{opts.domain}"
    indexes = list(range(opts.first_user, opts.first_user + opts.clients + opts.publishers))
    clients, errors = await login_many(opts, indexes, f"ps-{run}-{secrets.token_hex(3)}")
    node = f"load-{run}-{secrets.token_hex(4)}"
    publisher = None
    try:
        if errors:
            raise XmppError(f"{len(errors)} logins failed, first: {errors[0]}")
        clients.sort(key=lambda c: c.index)
        publishers, subscribers = clients[: opts.publishers], clients[opts.publishers :]
        publisher = publishers[0]
        reply = await asyncio.wait_for(
            publisher.iq(
                "set", service, f"<pubsub xmlns='{NS_PUBSUB}'><create node='{node}'/></pubsub>"
            ),
            opts.timeout,
        )
        if _iq_error(reply):
            raise XmppError(f"create node: {_iq_error(reply)}")
        if len(publishers) > 1:
            affiliations = "".join(
                f"<affiliation jid={quoteattr(other.bare)} affiliation='publisher'/>"
                for other in publishers[1:]
            )
            reply = await asyncio.wait_for(
                publisher.iq(
                    "set",
                    service,
                    f"<pubsub xmlns='{NS_PUBSUB_OWNER}'><affiliations node='{node}'>"
                    f"{affiliations}</affiliations></pubsub>",
                ),
                opts.timeout,
            )
            if _iq_error(reply):
                raise XmppError(f"publisher affiliations: {_iq_error(reply)}")
        fanout = Fanout(len(subscribers), opts.items, opts.window, len(publishers))

        def subscribe(subscriber: Client) -> Callable[[], Awaitable]:
            payload = (
                f"<pubsub xmlns='{NS_PUBSUB}'>"
                f"<subscribe node='{node}' jid={quoteattr(subscriber.bare)}/></pubsub>"
            )
            return lambda: asyncio.wait_for(subscriber.iq("set", service, payload), opts.timeout)

        subscribe_started = now()
        replies = await _bounded(opts.concurrency, [subscribe(s) for s in subscribers])
        subscribe_seconds = now() - subscribe_started
        refused = [_iq_error(r) for r in replies if _iq_error(r)]
        if refused:
            raise XmppError(f"{len(refused)} subscriptions refused, first: {refused[0]}")
        # Let the subscriptions' tail pass: right after an exchange, a server that keeps Nagle's
        # algorithm on (Twisted's and Prosody's default) holds the next small write until the
        # client's delayed ACK, up to 40 ms, which would land on the first items.
        await asyncio.sleep(opts.settle)

        payload = (opts.body * (opts.payload_size // len(opts.body) + 1))[: opts.payload_size]
        entry = f"<entry xmlns='{NS_LOAD}'>{escape(payload)}</entry>"
        expected = ExpectedNotification(service, node, payload)
        for subscriber in subscribers:
            subscriber.conn.read_directly(
                NotificationScanner(fanout, subscriber, expected, opts.verify_every)
            )
        publish_replies: list[float] = []
        publish_errors: list[str] = []

        def replied(future: asyncio.Future, sent_at: float) -> None:
            if future.cancelled():
                return
            error = _iq_error(future.result())
            if error:
                publish_errors.append(error)
            else:
                publish_replies.append(now() - sent_at)

        async def publish_all(index: int, client: Client) -> None:
            for k in range(opts.items):
                try:
                    await asyncio.wait_for(fanout.slots[index].acquire(), opts.timeout)
                except TimeoutError:
                    return  # an item never reached every subscriber: reported as missing
                item_id = f"{index}-{k}"
                sent_at = now()
                fanout.published_at[item_id] = sent_at
                future = client.iq(
                    "set",
                    service,
                    f"<pubsub xmlns='{NS_PUBSUB}'><publish node='{node}'>"
                    f"<item id='{item_id}'>{entry}</item></publish></pubsub>",
                )
                future.add_done_callback(lambda f, t=sent_at: replied(f, t))

        meter = CpuMeter(opts.server_pid, opts.db_process, opts.publisher_pid)
        started = now()
        await asyncio.gather(*(publish_all(i, c) for i, c in enumerate(publishers)))
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(asyncio.shield(fanout.all_done), opts.timeout)
        elapsed = max(fanout.last_delivery - started, 1e-9)
        cpu = meter.figures()
        if fanout.malformed:
            raise XmppError(
                f"{len(fanout.malformed)} of {fanout.verified} notifications checked are wrong,"
                f" first: {fanout.malformed[0]}"
            )
    finally:
        cleanup_error = None
        if publisher is not None:
            delete = f"<pubsub xmlns='{NS_PUBSUB_OWNER}'><delete node='{node}'/></pubsub>"
            try:
                reply = await asyncio.wait_for(publisher.iq("set", service, delete), opts.timeout)
                cleanup_error = _iq_error(reply)
            except (XmppError, TimeoutError) as e:
                cleanup_error = f"{type(e).__name__}: {e}"
        await close_all(clients)
    expected_count = fanout.items * len(subscribers)
    return {
        "scenario": "pubsub-fanout",
        "subscribers": len(subscribers),
        "publishers": len(publishers),
        "items": opts.items,
        "window": opts.window,
        "payload_bytes": opts.payload_size,
        "subscribe_per_s": round(len(subscribers) / subscribe_seconds, 1),
        "seconds": round(elapsed, 3),
        "notifications_per_s": round(fanout.notifications / elapsed, 1),
        "items_per_s": round(fanout.completed / elapsed, 2),
        "publish_to_last_ms": percentiles(fanout.complete_latencies),
        "publish_to_first_ms": percentiles(fanout.first_latencies),
        "publish_reply_ms": percentiles(publish_replies),
        "delivered": fanout.notifications,
        "missing": expected_count - fanout.notifications,
        "verified": fanout.verified,
        "publish_errors": len(publish_errors),
        **cpu,
        **({"delete_node_error": cleanup_error} if cleanup_error else {}),
    }


# -- PEP: a ring of contacts publishing OMEMO device lists ------------------------------------

CAPS_IDENTITY = "client/bot//load.py"
CAPS_FEATURES = (NS_CAPS, NS_DISCO_INFO, OMEMO_DEVICES + "+notify")


def caps_ver() -> str:
    """The XEP-0115 sha-1 ver of the load client's disco#info (CAPS_IDENTITY, CAPS_FEATURES)."""
    text = CAPS_IDENTITY + "<" + "".join(f"{feature}<" for feature in sorted(CAPS_FEATURES))
    return base64.b64encode(hashlib.sha1(text.encode()).digest()).decode()


class PepRing:
    """What the PEP scenario counts: subscriptions approved, publishes answered, notifications
    received while measuring, and the latency from each publish to each of its notifications."""

    def __init__(self) -> None:
        self.approved = 0
        self.online: set[str] = set()
        self.measuring = False
        self.published = 0
        self.publish_errors: list[str] = []
        self.notifications = 0
        self.latencies: list[float] = []
        self.sent_at: dict[str, float] = {}
        self.verified = 0  # notifications parsed in full (see PepScanner)
        self.malformed: list[str] = []

    def notified(self, label: str | None) -> None:
        sent_at = self.sent_at.get(label or "")
        if sent_at is None or not self.measuring:
            return
        self.notifications += 1
        self.latencies.append(now() - sent_at)


def _pep_handler(client: Client, ring: PepRing, caps_node: str) -> Callable[[ET.Element], None]:
    def on_stanza(element: ET.Element) -> None:
        tag, kind = element.tag, element.get("type")
        if tag == TAG_MESSAGE:
            device = element.find(f"{PATH_EVENT_ITEM}/{{{NS_OMEMO}}}devices/{{{NS_OMEMO}}}device")
            if device is not None:
                ring.notified(device.get("label"))
        elif tag == TAG_PRESENCE and kind == "subscribe":
            client.send(f"<presence type='subscribed' to={quoteattr(element.get('from', ''))}/>")
        elif tag == TAG_PRESENCE and kind == "subscribed":
            ring.approved += 1
        elif tag == TAG_PRESENCE and kind is None and element.get("from") == client.jid:
            ring.online.add(client.jid)  # the server has handled its initial presence
        elif tag == TAG_IQ and kind in ("get", "set"):
            _answer_iq(client, element, caps_node)

    return on_stanza


DEVICE_LABEL = re.compile(rb"<device\s[^>]*?\blabel=(?:'([^']*)'|\"([^\"]*)\")")
STANZA_NAME = re.compile(rb"<([A-Za-z][\w:.-]*)")


class PepScanner:
    """A PEP user's receiving end while the users publish: the labels of the device lists
    notified are found in the received bytes, as `NotificationScanner` finds item ids
    (parsing each notification cost the load generator about as much CPU as the server
    spent on it). Every other top-level stanza (the replies to the user's publications, a
    presence, a request) is cut out, parsed with namespaces and handled as before.

    The first notification and then every `verify_every`-th are parsed too and must be a
    <message/> whose <event/> item holds a device list with the label found; anything else
    is counted in `ring.malformed`. What is not complete yet waits for the next bytes.
    """

    def __init__(self, client: "Client", ring: PepRing, every: int) -> None:
        self.client = client
        self.ring = ring
        self.sample = Sample(every)
        self.rest = b""

    def feed(self, data: bytes) -> None:
        data = self.rest + data if self.rest else data
        at = 0
        while True:
            start = data.find(b"<", at)
            if start < 0:
                at = len(data)
                break
            if data.startswith(MESSAGE_START, start):
                end = data.find(MESSAGE_END, start)
                if end >= 0:
                    end += len(MESSAGE_END)
                    self._message(data, start, end)
            else:
                end = self._other(data, start)
            if end < 0:
                at = start
                break
            at = end
        self.rest = data[at:]

    def _message(self, data: bytes, start: int, end: int) -> None:
        match = DEVICE_LABEL.search(data, start, end)
        if match is None:
            self._handle(data[start:end])
            return
        label = (match[1] if match[1] is not None else match[2]).decode()
        if self.sample.due():
            self._verify(data[start:end], label)
        self.ring.notified(label)

    def _other(self, data: bytes, start: int) -> int:
        """Where the top-level element at `start` ends (-1: not received whole yet), having
        handled it."""
        name = STANZA_NAME.match(data, start)
        close = data.find(b">", start)
        if name is None or close < 0:
            if data.startswith(b"</stream:stream", start):
                self.client.conn._fail(XmppError("the server closed the stream"))
                return len(data)
            return -1
        if name[1].startswith(b"stream:"):
            self.client.conn._fail(XmppError(f"stream error: {data[start : start + 300]!r}"))
            return len(data)
        if data[close - 1 : close] == b"/":
            end = close + 1
        else:
            tail = b"</" + name[1] + b">"
            end = data.find(tail, close)
            if end < 0:
                return -1
            end += len(tail)
        self._handle(data[start:end])
        return end

    def _parse(self, stanza: bytes) -> ET.Element | None:
        try:
            return parse_cut_out(stanza)
        except ET.ParseError as e:
            self.ring.malformed.append(not_well_formed(e, stanza))
            return None

    def _handle(self, stanza: bytes) -> None:
        element = self._parse(stanza)
        if element is not None:
            self.client._dispatch(element)

    def _verify(self, stanza: bytes, label: str) -> None:
        self.ring.verified += 1
        message = self._parse(stanza)
        if message is None:
            return
        device = message.find(f"{PATH_EVENT_ITEM}/{{{NS_OMEMO}}}devices/{{{NS_OMEMO}}}device")
        if message.tag != TAG_MESSAGE or device is None or device.get("label") != label:
            self.ring.malformed.append(f"not the notification of {label}: {stanza[:300]!r}")


def _answer_iq(client: Client, iq: ET.Element, caps_node: str) -> None:
    """The server's disco#info query (entity caps) and roster pushes; anything else: an error."""
    to = quoteattr(iq.get("from") or client.bare)
    iq_id = quoteattr(iq.get("id", ""))
    query = iq.find(f"{{{NS_DISCO_INFO}}}query")
    if query is not None and iq.get("type") == "get":
        node = query.get("node")
        node_attr = f" node={quoteattr(node)}" if node else ""
        category, kind, _, name = CAPS_IDENTITY.split("/")
        features = "".join(f"<feature var={quoteattr(f)}/>" for f in CAPS_FEATURES)
        client.send(
            f"<iq type='result' id={iq_id} to={to}><query xmlns='{NS_DISCO_INFO}'{node_attr}>"
            f"<identity category='{category}' type='{kind}' name='{name}'/>{features}"
            "</query></iq>"
        )
    elif iq.find(f"{{{NS_ROSTER}}}query") is not None and iq.get("type") == "set":
        client.send(f"<iq type='result' id={iq_id} to={to}/>")
    else:
        client.send(
            f"<iq type='error' id={iq_id} to={to}><error type='cancel'>"
            "<service-unavailable xmlns='urn:ietf:params:xml:ns:xmpp-stanzas'/></error></iq>"
        )


def _device_list_publish(index: int, label: str, options: bool) -> str:
    publish_options = ""
    if options:
        # What OMEMO clients send: the device list is readable by anyone (XEP-0384 §5.3.2).
        publish_options = (
            "<publish-options><x xmlns='jabber:x:data' type='submit'>"
            "<field var='FORM_TYPE' type='hidden'>"
            "<value>http://jabber.org/protocol/pubsub#publish-options</value></field>"
            "<field var='pubsub#access_model'><value>open</value></field></x></publish-options>"
        )
    return (
        f"<pubsub xmlns='{NS_PUBSUB}'><publish node='{OMEMO_DEVICES}'><item id='current'>"
        f"<devices xmlns='{NS_OMEMO}'><device id='{index}' label='{label}'/></devices>"
        f"</item></publish>{publish_options}</pubsub>"
    )


def _emptying_roster(client: Client, timeout: float) -> Callable[[], Awaitable]:
    async def empty() -> None:
        roster = await asyncio.wait_for(
            client.iq("get", None, f"<query xmlns='{NS_ROSTER}'/>"), timeout
        )
        for item in roster.iter(f"{{{NS_ROSTER}}}item"):
            remove = f"<query xmlns='{NS_ROSTER}'><item jid={quoteattr(item.get('jid', ''))}"
            remove += " subscription='remove'/></query>"
            await asyncio.wait_for(client.iq("set", None, remove), timeout)

    return empty


async def _start_on_measure(opts: argparse.Namespace) -> "asyncio.subprocess.Process | None":
    if not opts.on_measure:
        return None
    return await asyncio.create_subprocess_exec(*shlex.split(opts.on_measure), stdout=sys.stderr)


async def scenario_pep(opts: argparse.Namespace, run: int) -> dict:
    users, half = opts.clients, opts.contacts // 2
    if users <= opts.contacts:
        raise XmppError("--clients must exceed --contacts")
    indexes = list(range(opts.first_user, opts.first_user + users))
    clients, errors = await login_many(
        opts, indexes, f"pep-{run}-{secrets.token_hex(3)}", presence=False
    )
    try:
        if errors:
            raise XmppError(f"{len(errors)} logins failed, first: {errors[0]}")
        clients.sort(key=lambda c: c.index)
        # An earlier run left contacts (a server answers a request for a subscription it has
        # with no 'subscribed'): every run starts from empty rosters.
        await _bounded(opts.concurrency, [_emptying_roster(c, opts.timeout) for c in clients])
        ring = PepRing()
        caps_node = "urn:mim-twisted:load"
        ver = caps_ver()
        for client in clients:
            client.on_stanza = _pep_handler(client, ring, caps_node)
            client.send(
                f"<presence><c xmlns='{NS_CAPS}' hash='sha-1' node='{caps_node}' ver='{ver}'/>"
                "</presence>"
            )
        # A request reaches a client live only once the server has handled its initial
        # presence (which it echoes); otherwise it waits for the next login.
        deadline = now() + opts.timeout
        while len(ring.online) < users and now() < deadline:
            await asyncio.sleep(0.05)
        # Each user asks its K/2 neighbours on each side; their clients approve: K mutual
        # contacts each, through the servers' subscription handling.
        exchange_started = now()
        for position, client in enumerate(clients):
            for step in range(1, half + 1):
                for other in (clients[(position + step) % users], clients[position - step]):
                    client.send(f"<presence type='subscribe' to={quoteattr(other.bare)}/>")
        expected = users * 2 * half
        # Thousands of exchanges take a while on any server: at least 50 a second is asked.
        deadline = now() + max(opts.timeout, expected / 50)
        last_change, seen = now(), 0
        while ring.approved < expected and now() < deadline:
            await asyncio.sleep(0.05)
            if ring.approved != seen:
                last_change, seen = now(), ring.approved
            elif now() - last_change > 5 and ring.approved >= 0.99 * expected:
                break  # a server may lose an approval in a crossing exchange: reported
        if ring.approved < 0.99 * expected:
            raise XmppError(f"only {ring.approved} of {expected} subscriptions approved")
        exchange_seconds = now() - exchange_started
        await asyncio.sleep(opts.settle)
        # The streams are quiet now: from here on their bytes are scanned (see PepScanner).
        for client in clients:
            client.conn.read_directly(PepScanner(client, ring, opts.verify_every))

        def publish_loop(client: Client) -> Callable[[], Awaitable]:
            async def loop() -> None:
                sequence = 0
                while not stop.is_set():
                    sequence += 1
                    label = f"{client.index}.{sequence}"
                    ring.sent_at[label] = now()
                    reply = await asyncio.wait_for(
                        client.iq(
                            "set", None, _device_list_publish(client.index, label, opts.options)
                        ),
                        opts.timeout,
                    )
                    error = _iq_error(reply)
                    if error:
                        ring.publish_errors.append(error)
                    elif ring.measuring:
                        ring.published += 1

            return loop

        stop = asyncio.Event()
        tasks = [
            asyncio.ensure_future(publish_loop(client)())
            for client in clients
            for _ in range(opts.window)
        ]
        await asyncio.sleep(opts.warmup)
        meter = CpuMeter(opts.server_pid, opts.db_process, opts.publisher_pid)
        on_measure = await _start_on_measure(opts)
        ring.measuring = True
        started = now()
        await asyncio.sleep(opts.duration)
        ring.measuring = False
        elapsed = now() - started
        cpu = meter.figures()
        if on_measure is not None:
            await on_measure.wait()
        stop.set()
        done, pending = await asyncio.wait(tasks, timeout=opts.timeout)
        for task in pending:
            task.cancel()
        failures = [t.exception() for t in done if not t.cancelled() and t.exception()]
        if failures:
            raise XmppError(f"{len(failures)} publishers failed, first: {failures[0]!r}")
        if ring.malformed:
            raise XmppError(
                f"{len(ring.malformed)} of {ring.verified} notifications checked are wrong,"
                f" first: {ring.malformed[0]}"
            )
    finally:
        await close_all(clients)
    return {
        "scenario": "pep",
        "clients": users,
        "contacts": opts.contacts,
        "window": opts.window,
        "subscriptions_per_s": round(ring.approved / exchange_seconds, 1),
        "subscriptions_unanswered": expected - ring.approved,
        "seconds": round(elapsed, 3),
        "publishes_per_s": round(ring.published / elapsed, 1),
        "notifications_per_s": round(ring.notifications / elapsed, 1),
        "notifications_per_publish": round(ring.notifications / max(ring.published, 1), 2),
        "publish_to_notification_ms": percentiles(ring.latencies),
        "publish_errors": len(ring.publish_errors),
        "verified": ring.verified,
        **cpu,
    }


SCENARIOS = {
    "login": scenario_login,
    "messages": scenario_messages,
    "pubsub-fanout": scenario_pubsub,
    "pep": scenario_pep,
}


# -- runs and summary ------------------------------------------------------------------------


def _flatten(figures: dict, prefix: str = "") -> dict[str, float]:
    flat = {}
    for key, value in figures.items():
        if isinstance(value, dict):
            flat.update(_flatten(value, f"{prefix}{key}."))
        elif isinstance(value, int | float) and not isinstance(value, bool):
            flat[prefix + key] = value
    return flat


def _nest(flat: dict[str, float]) -> dict:
    nested: dict = {}
    for key, value in flat.items():
        *parents, last = key.split(".")
        target = nested
        for parent in parents:
            target = target.setdefault(parent, {})
        target[last] = value
    return nested


# What a run was asked to do rather than what it measured: copied, not summarised.
PARAMETERS = (
    "clients", "concurrency", "mechanism", "pairs", "window", "body_bytes", "payload_bytes",
    "items", "subscribers", "contacts",
)  # fmt: skip


def summarise(results: list[dict]) -> dict:
    """Median, min and max of every numeric figure over the runs."""
    flats = [_flatten(r) for r in results]
    keys = [
        k
        for k in flats[0]
        if k not in PARAMETERS and k != "run" and all(f.get(k) is not None for f in flats)
    ]
    out: dict = {"scenario": results[0]["scenario"], "runs": len(results)}
    out.update({k: results[0][k] for k in PARAMETERS if k in results[0]})
    for name, pick in (("median", statistics.median), ("min", min), ("max", max)):
        out[name] = _nest({k: round(pick([f[k] for f in flats]), 2) for k in keys})
    return out


async def main_async(opts: argparse.Namespace) -> int:
    scenario = SCENARIOS[opts.scenario]
    results = []
    for run in range(1, opts.runs + 1):
        try:
            result = await asyncio.wait_for(scenario(opts, run), opts.run_timeout)
        except (OSError, XmppError, TimeoutError, ssl.SSLError) as e:
            error = f"{type(e).__name__}: {e}"
            print(json.dumps({"scenario": opts.scenario, "run": run, "error": error}), flush=True)
            return 1
        result = {**result, "run": run}
        results.append(result)
        print(json.dumps(result), flush=True)
        if run < opts.runs:
            await asyncio.sleep(opts.pause)
    if opts.runs > 1:
        print(json.dumps(summarise(results)), flush=True)
    return 0


def _check_loopback(host: str) -> None:
    try:
        addresses = {info[4][0] for info in socket.getaddrinfo(host, None)}
    except socket.gaierror as e:
        raise SystemExit(f"cannot resolve {host}: {e}") from e
    for address in addresses:
        if not ipaddress.ip_address(address.split("%")[0]).is_loopback:
            raise SystemExit(f"{host} ({address}) is not a loopback address: not a target")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("scenario", choices=sorted(SCENARIOS))
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=5222)
    parser.add_argument("--domain", default="localhost", help="the XMPP domain (stream 'to')")
    parser.add_argument("--pubsub", help="the PubSub service JID (default pubsub.<domain>)")
    parser.add_argument("--clients", type=int, default=100, help="clients (pubsub: subscribers)")
    parser.add_argument("--concurrency", type=int, default=50, help="logins in progress at once")
    parser.add_argument("--duration", type=float, default=10.0, help="messages: seconds measured")
    parser.add_argument("--warmup", type=float, default=2.0, help="messages: seconds before")
    parser.add_argument("--settle", type=float, default=0.5, help="seconds idle before measuring")
    parser.add_argument("--drain", type=float, default=10.0, help="seconds to wait for stragglers")
    parser.add_argument(
        "--window", type=int, default=None, help="undelivered messages per sender (default 10) or "
        "pubsub items not yet delivered to all (default 1)"
    )  # fmt: skip
    parser.add_argument("--items", type=int, default=100, help="pubsub: items published")
    parser.add_argument(
        "--publishers", type=int, default=1, help="pubsub: publishers, each publishing --items"
    )
    parser.add_argument(
        "--verify-every", type=int, default=64, help="pubsub, pep: parse the first notification of"
        " each subscriber and then every Nth in full, checking it (1: every notification)"
    )  # fmt: skip
    parser.add_argument("--body-size", type=int, default=64, help="messages: body characters")
    parser.add_argument("--payload-size", type=int, default=128, help="pubsub: payload characters")
    parser.add_argument("--body", default="The quick brown fox jumps over the lazy dog. ")
    parser.add_argument("--to-full-jid", action="store_true", help="address full JIDs, not bare")
    parser.add_argument(
        "--numbered-bodies", action="store_true", help="messages: end each body with ' #<number>'"
        " (per sender), so that each message is distinct"
    )  # fmt: skip
    parser.add_argument("--contacts", type=int, default=10, help="pep: contacts per user (even)")
    parser.add_argument(
        "--no-options", dest="options", action="store_false",
        help="pep: publish without publish-options (access model open)",
    )  # fmt: skip
    parser.add_argument(
        "--register", action="store_true", help="register each account in-band (XEP-0077) first"
    )
    parser.add_argument("--runs", type=int, default=1)
    parser.add_argument("--pause", type=float, default=1.0, help="seconds between runs")
    parser.add_argument("--user-prefix", default="load")
    parser.add_argument("--first-user", type=int, default=1)
    parser.add_argument("--password", default="load-password")
    parser.add_argument(
        "--mechanism", default="SCRAM-SHA-256", choices=["SCRAM-SHA-256", "SCRAM-SHA-1", "PLAIN"]
    )
    parser.add_argument(
        "--no-scram-cache", action="store_true", help="run PBKDF2 on every login (client cost)"
    )
    parser.add_argument("--cafile", help="verify the server certificate against this CA file")
    parser.add_argument("--no-tls", action="store_true", help="skip STARTTLS even if offered")
    parser.add_argument("--timeout", type=float, default=60.0, help="seconds for any one step")
    parser.add_argument("--run-timeout", type=float, default=600.0, help="seconds for one run")
    parser.add_argument(
        "--server-pid", type=int, action="append", help="report the server's CPU use too;"
        " repeatable (a supervisor and its workers: their sum, and each as server_cpu_pct_each)"
    )  # fmt: skip
    parser.add_argument(
        "--publisher-pid", type=int, help="the server's event publisher process: its CPU use is"
        " reported as publisher_cpu_pct"
    )  # fmt: skip
    parser.add_argument(
        "--db-process", action="append", help="name or pid of a database process (e.g. postgres)"
        " whose CPU use is reported as db_cpu_pct; repeatable"
    )  # fmt: skip
    parser.add_argument(
        "--on-measure", help="pep: a command started when the measured seconds begin (e.g. a"
        " profiler attached to the server for --duration seconds), waited for at their end"
    )  # fmt: skip
    opts = parser.parse_args(argv)
    if opts.window is None:
        opts.window = 1 if opts.scenario in ("pubsub-fanout", "pep") else 10
    counts = (opts.clients, opts.concurrency, opts.window, opts.runs, opts.items, opts.verify_every)
    if min(counts) < 1:
        parser.error(
            "--clients, --concurrency, --window, --runs, --items and --verify-every must be"
            " positive"
        )
    _check_loopback(opts.host)
    return opts


def _raise_file_limit() -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or soft < hard:
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def main(argv: list[str] | None = None) -> int:
    opts = parse_args(argv)
    opts.tls_context = make_tls_context(opts)
    _raise_file_limit()
    return asyncio.run(main_async(opts))


if __name__ == "__main__":
    sys.exit(main())
