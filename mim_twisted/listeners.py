"""Client listeners: one Twisted service per `[[listeners]]` table, listening on an endpoint string.

Twisted's own endpoint parsers read the string, so a listener can be TCP (`tcp:5222:...`), IPv6
(`tcp6:5222:interface=\\:\\:1`), a UNIX socket (`unix:/run/mim/c2s.sock`) or a socket that
systemd opened (`systemd:domain=INET:index=0`). Twisted's default listen backlog is 50: a burst of
logins larger than that waits for SYN retries (seconds each), so a listener that names no
backlog gets DEFAULT_BACKLOG.
"""

import ipaddress
import re
from collections.abc import Callable

from twisted.application import service
from twisted.internet import defer, endpoints
from twisted.internet.address import IPv4Address, IPv6Address, UNIXAddress
from twisted.internet.interfaces import IListeningPort, IStreamServerEndpoint
from twisted.internet.protocol import ServerFactory
from twisted.logger import Logger

log = Logger()

DEFAULT_BACKLOG = 1024

# The endpoint types a client listener may use: the stream is plain XMPP with STARTTLS.
LISTENER_TYPES = ("tcp", "tcp6", "unix", "systemd")

# The types whose backlog the string sets (systemd's socket unit sets its own, Backlog=).
_BACKLOG_TYPES = ("tcp", "tcp6", "unix")

# Endpoint strings separate their arguments with ":"; "\:" is a colon inside an argument.
_ARGUMENT_SEPARATOR = re.compile(r"(?<!\\):")


def endpoint_arguments(description: str) -> list[str]:
    """The type and the arguments of an endpoint string, as written (escapes kept)."""
    return _ARGUMENT_SEPARATOR.split(description)


def with_default_backlog(description: str) -> str:
    """The endpoint string, with `backlog=DEFAULT_BACKLOG` added where it can have one and
    names none."""
    kind, *arguments = endpoint_arguments(description)
    if kind not in _BACKLOG_TYPES or any(a.startswith("backlog=") for a in arguments):
        return description
    return f"{description}:backlog={DEFAULT_BACKLOG}"


def tcp_endpoint(address: str, port: int) -> str:
    """The endpoint string for the old `address` and `port` keys of a listener."""
    ipv6 = address != "localhost" and ipaddress.ip_address(address).version == 6
    kind = "tcp6" if ipv6 else "tcp"
    interface = endpoints.quoteStringArgument(address)
    return f"{kind}:{port}:interface={interface}:backlog={DEFAULT_BACKLOG}"


def describe_address(address: object) -> str:
    """Where a port listens, for the log: host:port, [host]:port or the socket's path."""
    if isinstance(address, IPv6Address):
        return f"[{address.host}]:{address.port}"
    if isinstance(address, IPv4Address):
        return f"{address.host}:{address.port}"
    if isinstance(address, UNIXAddress):
        # A client of a UNIX socket has no name of its own.
        name = address.name or "a UNIX socket"
        return name.decode(errors="replace") if isinstance(name, bytes) else name
    return str(address)


def ip_address_of(address: object) -> str | None:
    """A peer's IP address, None for a peer that has none (a UNIX socket's clients are all
    alike): limits kept per address apply only to peers with one."""
    if isinstance(address, (IPv4Address, IPv6Address)):
        return address.host
    return None


class ClientListener(service.Service):
    """Listens on one endpoint with a factory made when the service starts (once the IM core
    it hands sessions to exists); stopping stops listening and leaves open connections alone.
    ``endpoint``, when given, is used instead of the description's (a socket that a worker
    inherited, see mim_twisted.workers).

    `startService` returns a Deferred that fires once the endpoint listens, or fails with why not.
    """

    def __init__(
        self,
        description: str,
        make_factory: Callable[[], ServerFactory],
        reactor: object,
        endpoint: IStreamServerEndpoint | None = None,
    ) -> None:
        self.description = description
        self.make_factory = make_factory
        self.reactor = reactor
        self.endpoint = endpoint
        self.factory: ServerFactory | None = None
        self.port: IListeningPort | None = None

    def startService(self) -> defer.Deferred:
        super().startService()
        self.factory = self.make_factory()
        endpoint = self.endpoint or endpoints.serverFromString(self.reactor, self.description)
        listening = endpoint.listen(self.factory)
        listening.addCallback(self._listening)
        return listening

    def _listening(self, port: IListeningPort) -> IListeningPort:
        self.port = port
        return port

    def stopService(self) -> defer.Deferred:
        super().stopService()
        port, self.port = self.port, None
        if port is None:
            return defer.succeed(None)
        return defer.maybeDeferred(port.stopListening)
