"""The admin socket: what mimctl asks the running server (status, sessions, kick, stats).

A UNIX socket, in the data directory unless `admin.socket` says otherwise, created with mode
0600: whoever can open it is the server's own user (or root), which is its only authentication,
so no other kind of endpoint is offered. The protocol is one JSON object per line each way:
``{"command": "kick", "jid": "alice@localhost", "condition": "policy-violation"}`` is answered
``{"ok": true, "result": ...}`` or ``{"ok": false, "error": "one line"}``.
"""

import json
import os
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from twisted.application import service
from twisted.internet import defer, endpoints, protocol
from twisted.internet.interfaces import IListeningPort, IReactorTime
from twisted.logger import Logger
from twisted.protocols.basic import LineReceiver
from twisted.words.protocols.jabber.jid import JID, InvalidFormat

import mim_twisted
from mim_twisted.auth.credentialcache import CredentialCache
from mim_twisted.config import MAX_UNIX_SOCKET_PATH
from mim_twisted.listeners import describe_address
from mim_twisted.xmpp.jids import parse_jid

if TYPE_CHECKING:
    from mim_twisted.tap import MimService
    from mim_twisted.xmpp.c2s import C2SStream

log = Logger()

# Seconds the database gets to answer a cheap query before it counts as not answering.
STORAGE_PROBE_TIMEOUT = 5.0

# Stream errors (RFC 6120 §4.9.3) that end sessions from the admin socket: an operator's kick is
# a local service policy, a deleted account is no longer authorised, and a changed password
# invalidates the credentials the stream was authenticated with, as `reset` describes.
KICK_CONDITIONS = {
    "policy-violation": "Disconnected by the server administrator",
    "not-authorized": "The account was deleted",
    "reset": "The account's password was changed",
}

# A request is a short command; a longer line is not one of mimctl's.
MAX_REQUEST_LENGTH = 65536


class AdminError(Exception):
    """A request that cannot be done; str() is the line sent back."""


async def probe_storage(
    database: Any, clock: IReactorTime, timeout: float = STORAGE_PROBE_TIMEOUT
) -> str | None:
    """None while the database answers a cheap query within ``timeout``, else why not."""
    if database is None:
        return "not open"
    try:
        await defer.maybeDeferred(database.schema_version).addTimeout(timeout, clock)
    except defer.TimeoutError:
        return f"no answer within {timeout:g} s"
    except Exception as error:
        return " ".join(str(error).split()) or type(error).__name__
    return None


def bound_streams(server: "MimService") -> list["C2SStream"]:
    """The open client streams that have bound a resource (live sessions)."""
    return [
        stream
        for factory in server.factories
        for stream in factory.streams
        if stream.jid is not None and not stream.closed
    ]


def _session_summary(stream: "C2SStream") -> dict[str, Any]:
    peer = stream.peer
    return {
        "jid": stream.jid.full(),
        "peer": describe_address(peer),
        "since": datetime.fromtimestamp(stream.bound_at, UTC).isoformat(timespec="seconds"),
        "tls": stream.secure,
        "mechanism": stream.sasl.mechanism_name,
    }


def _target(text: Any) -> JID:
    if not isinstance(text, str):
        raise AdminError("a JID is needed")
    try:
        address = parse_jid(text)
    except (InvalidFormat, UnicodeError, ValueError):
        raise AdminError(f"{text!r} is not a JID") from None
    if address.user is None:
        raise AdminError(f"{text!r} is not the JID of an account")
    return address


class AdminCommands:
    """The commands of the admin socket, on one running server."""

    def __init__(self, server: "MimService", clock: IReactorTime) -> None:
        self.server = server
        self.clock = clock
        self.started_at = clock.seconds()
        self.table: dict[str, Callable[[dict[str, Any]], Awaitable[Any]]] = {
            "status": self.status,
            "sessions": self.sessions,
            "kick": self.kick,
            "stats": self.stats,
        }

    async def status(self, request: dict[str, Any]) -> dict[str, Any]:
        problem = await probe_storage(self.server.database, self.clock)
        return {
            "version": mim_twisted.__version__,
            "uptime": self.clock.seconds() - self.started_at,
            "sessions": len(bound_streams(self.server)),
            "connections": sum(len(factory.streams) for factory in self.server.factories),
            "storage": {
                "backend": self.server.config.storage.backend,
                "answering": problem is None,
                "problem": problem,
            },
        }

    async def sessions(self, request: dict[str, Any]) -> list[dict[str, Any]]:
        domain = request.get("domain")
        streams = [s for s in bound_streams(self.server) if domain in (None, s.jid.host)]
        return [_session_summary(s) for s in sorted(streams, key=lambda s: s.jid.full())]

    async def kick(self, request: dict[str, Any]) -> list[str]:
        """End the sessions of a bare JID, or the one of a full JID; the full JIDs ended."""
        target = _target(request.get("jid"))
        condition = request.get("condition", "policy-violation")
        if condition not in KICK_CONDITIONS:
            raise AdminError(f"{condition!r} is not one of {', '.join(KICK_CONDITIONS)}")
        core = self.server.core
        if core is None:
            return []
        if isinstance(core.accounts, CredentialCache):
            # mimctl kicks after it changed the password or removed the account: the next
            # login must read the credentials from the database.
            core.accounts.forget(target.host, target.user)
        # This process's own: each node (or worker) of a cluster is asked for its own.
        local = core.sessions.local
        if target.resource is None:
            sessions = local.sessions_of(target)
        else:
            sessions = [s for s in [local.session(target)] if s is not None]
        ended = []
        for session in sessions:
            ended.append(session.jid.full())
            log.info(
                "admin: ending the session of {jid} ({condition})",
                jid=session.jid.full(),
                condition=condition,
            )
            session.stream_error(condition, KICK_CONDITIONS[condition])
        return ended

    async def stats(self, request: dict[str, Any]) -> dict[str, int]:
        return server_counters(self.server)


def server_counters(server: "MimService") -> dict[str, int]:
    """The server's counters as flat "name label=value" keys, for `mimctl stats`."""
    counters: dict[str, int] = {}
    for factory in server.factories:
        for kind, count in factory.stanzas_in.items():
            _add(counters, f"stanzas_in kind={kind}", count)
        for kind, count in factory.stanzas_out.items():
            if kind is not None:
                _add(counters, f"stanzas_out kind={kind}", count)
        for (mechanism, result), count in factory.logins.items():
            _add(counters, f"logins mechanism={mechanism} result={result}", count)
        _add(counters, "tls_handshake_failures", factory.tls_failures)
    if server.core is not None:
        for outcome, count in server.core.router.messages.outcomes.items():
            _add(counters, f"messages outcome={outcome}", count)
    for component in pubsub_components(server):
        for result, count in component.results.items():
            _add(counters, f"pubsub_requests result={result}", count)
    pusher = server.event_pusher
    if pusher is not None:
        buffer = pusher.buffer
        for name in ("published", "confirmed", "dropped"):
            _add(counters, f"event_pusher_{name}", getattr(buffer, name))
        _add(counters, "event_pusher_buffered", len(buffer))
    return dict(sorted(counters.items()))


def pubsub_components(server: "MimService") -> list[Any]:
    if server.core is None or server.pubsub is None:
        return []
    components = [server.core.router.components[host] for host in server.pubsub.services]
    if server.pubsub.pep is not None:
        components.append(server.pubsub.pep)  # its accounts' requests are counted together
    return components


def _add(counters: dict[str, int], key: str, count: int) -> None:
    counters[key] = counters.get(key, 0) + count


class AdminProtocol(LineReceiver):
    """One mimctl connection: a JSON request per line, answered in order."""

    delimiter = b"\n"
    MAX_LENGTH = MAX_REQUEST_LENGTH

    def __init__(self, commands: AdminCommands) -> None:
        self.commands = commands
        self._previous: defer.Deferred = defer.succeed(None)

    def lineReceived(self, line: bytes) -> None:
        # Answers keep the order of the requests even when a command waits on the database.
        self._previous = self._previous.addCallback(
            lambda _: defer.ensureDeferred(self._answer(line))
        )

    async def _answer(self, line: bytes) -> None:
        try:
            request = json.loads(line)
            if not isinstance(request, dict):
                raise AdminError("a request is a JSON object")
            command = self.commands.table.get(request.get("command"))
            if command is None:
                raise AdminError(f"unknown command {request.get('command')!r}")
            response = {"ok": True, "result": await command(request)}
        except (AdminError, ValueError) as error:
            response = {"ok": False, "error": str(error)}
        except Exception as error:
            log.failure("admin request {line!r}", line=line)
            response = {"ok": False, "error": f"internal error: {error}"}
        if self.transport is not None:
            self.sendLine(json.dumps(response).encode())

    def lineLengthExceeded(self, line: bytes) -> None:
        self.transport.loseConnection()


class AdminService(service.Service):
    """Listens on the admin socket while the server runs; `listening` fires once it does."""

    def __init__(self, server: "MimService", path: str, reactor: Any) -> None:
        self.path = path
        self.reactor = reactor
        self.commands = AdminCommands(server, reactor)
        self.port: IListeningPort | None = None
        self.listening: defer.Deferred = defer.Deferred()

    def startService(self) -> defer.Deferred:
        super().startService()
        if len(os.fsencode(self.path)) > MAX_UNIX_SOCKET_PATH:
            # Only the default can be too long (a configured path is checked with the config):
            # the server runs without its admin socket rather than not at all.
            log.warn(
                "No admin socket: {path} is too long for a UNIX socket; set admin.socket",
                path=self.path,
            )
            self.listening = defer.succeed(None)
            return self.listening
        factory = protocol.Factory.forProtocol(lambda: AdminProtocol(self.commands))
        # wantPID: a lock file beside the socket tells a stale socket (removed) from one that a
        # running server holds (the start fails).
        endpoint = endpoints.UNIXServerEndpoint(self.reactor, self.path, mode=0o600, wantPID=True)
        # The socket is created by bind() and only then given its mode: without the umask it
        # would be reachable by others in between.
        umask = os.umask(0o177)
        try:
            self.listening = endpoint.listen(factory)
        finally:
            os.umask(umask)
        self.listening.addCallback(self._listening)
        return self.listening

    def _listening(self, port: IListeningPort) -> IListeningPort:
        self.port = port
        log.info("Admin socket: {path}", path=self.path)
        return port

    def stopService(self) -> defer.Deferred:
        super().stopService()
        port, self.port = self.port, None
        # Closing the port removes the socket file.
        return defer.maybeDeferred(port.stopListening) if port is not None else defer.succeed(None)
