"""The server configuration: a TOML file read into frozen dataclasses, checked key by key.

Each key is declared once, as a dataclass field made with ``option(default, check)``; one loader
walks those declarations, so a new key is one line. The embedded default is the empty document,
so every default passes through the same checks (and path resolution) as a value from a file.
Problems are reported as a ConfigError whose text is one line: the file, the dotted key, what
is wrong.

The extensions that ``[extensions.NAME]`` tables enable are installed (into a scratch registry)
before anything else is checked, so that ``auth.mechanisms`` and ``auth.sasl_external`` accept
the names of the SASL mechanisms and verification methods they add.
"""

import dataclasses
import importlib.util
import ipaddress
import json
import math
import os
import re
import socket
import tomllib
from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

from cryptography import x509
from twisted.internet import endpoints
from twisted.words.protocols.jabber import jid

from mim_twisted import listeners
from mim_twisted.extensions import ExtensionError, ServerRegistry, install_extensions
from mim_twisted.xmpp import tls
from mim_twisted.xmpp.sasl.negotiation import CERTIFICATE_MECHANISMS

# The default of auth.mechanisms.
SASL_MECHANISMS = ("SCRAM-SHA-256", "SCRAM-SHA-1", "PLAIN")


class ConfigError(Exception):
    """A configuration that cannot be used; str() is one line naming the file and the key."""


class _CheckError(ValueError):
    """What is wrong with a value. The loader adds the key; a check spanning several keys of
    one table (in __post_init__) names the offending one in ``key``."""

    def __init__(self, message: str, key: str = "") -> None:
        super().__init__(message)
        self.key = key


class _KeyedError(Exception):
    """What is wrong, already naming the dotted key; load_config adds the file name."""


class _Where(NamedTuple):
    key: str  # dotted key of the value being checked, for messages and nested keys
    base: str  # directory that relative paths are resolved against
    # What the built-ins and the enabled extensions registered: the names checks accept.
    registry: ServerRegistry


_Check = Callable[[Any, _Where], Any]


def option(default: Any, check: _Check) -> Any:
    """Declare a key: its default, written as it would be in the file (or a function of the
    table's keys declared before it), and the check that validates and converts the value."""
    return dataclasses.field(metadata={"default": default, "check": check})


def _show(value: Any) -> str:
    """A value as TOML would write it, on one line (json escapes newlines in strings)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return json.dumps(value, ensure_ascii=False)
    if isinstance(value, list):
        return "[" + ", ".join(map(_show, value)) + "]"
    if isinstance(value, dict):
        return "a table"
    return str(value)


def _join(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name


def _make(cls: type, raw: Mapping[str, Any], where: _Where, **extra: Any) -> Any:
    """Build dataclass ``cls`` from the TOML table ``raw`` according to its declared options."""
    declared = {f.name: f for f in dataclasses.fields(cls) if "check" in f.metadata}
    for name in raw:
        if name not in declared:
            raise _KeyedError(f"unknown key {_show(_join(where.key, name))}")
    values: dict[str, Any] = {}
    for name, field in declared.items():
        key = _join(where.key, name)
        default = field.metadata["default"]
        if name in raw:
            value = raw[name]
        elif callable(default):
            value = default(values)
        else:
            value = default
        try:
            values[name] = field.metadata["check"](value, where._replace(key=key))
        except _CheckError as error:
            raise _KeyedError(f"{key}: {error} (got {_show(value)})") from None
    try:
        return cls(**values, **extra)
    except _CheckError as error:
        raise _KeyedError(f"{_join(where.key, error.key)}: {error}") from None


# Checks: each takes the raw TOML value and where it is, and returns the converted value or
# raises _CheckError saying what the value must be.


def boolean(value: Any, where: _Where) -> bool:
    if not isinstance(value, bool):
        raise _CheckError("must be true or false")
    return value


def text(value: Any, where: _Where) -> str:
    if not isinstance(value, str):
        raise _CheckError("must be a string")
    return value


def integer(low: int, high: int | None = None) -> _Check:
    wanted = f"an integer >= {low}" if high is None else f"an integer {low}..{high}"

    def check(value: Any, where: _Where) -> int:
        # bool is a subclass of int in Python, but `true` is not a size.
        if (
            isinstance(value, bool)
            or not isinstance(value, int)
            or value < low
            or (high is not None and value > high)
        ):
            raise _CheckError(f"must be {wanted}")
        return value

    return check


def number(low: float, *, inclusive: bool) -> _Check:
    wanted = f"a number {'>=' if inclusive else '>'} {low:g}"

    def check(value: Any, where: _Where) -> float:
        if (
            isinstance(value, bool)
            or not isinstance(value, int | float)
            or not math.isfinite(value)
            or value < low
            or (value == low and not inclusive)
        ):
            raise _CheckError(f"must be {wanted}")
        return float(value)

    return check


def one_of(*allowed: str) -> _Check:
    wanted = ", ".join(map(_show, allowed))

    def check(value: Any, where: _Where) -> str:
        if value not in allowed:
            raise _CheckError(f"must be one of {wanted}")
        return value

    return check


def subset_of(*allowed: str) -> _Check:
    """A non-empty list of distinct names from ``allowed``, kept in the order written."""
    wanted = ", ".join(map(_show, allowed))

    def check(value: Any, where: _Where) -> tuple[str, ...]:
        if (
            not isinstance(value, list)
            or not value
            or any(item not in allowed for item in value)
            or len(set(value)) != len(value)
        ):
            raise _CheckError(f"must be a non-empty list of distinct values from {wanted}")
        return tuple(value)

    return check


def local_path(*, optional: bool = False, existing_file: bool = False) -> _Check:
    """A filesystem path, returned absolute; "" is kept as "" (meaning "use the default") when
    ``optional``."""

    def check(value: Any, where: _Where) -> str:
        if not isinstance(value, str) or not (value or optional):
            raise _CheckError("must be a path" if optional else "must be a non-empty path")
        if not value:
            return value
        resolved = os.path.abspath(os.path.join(where.base, value))
        if existing_file and not os.path.isfile(resolved):
            raise _CheckError(f"file not found: {resolved}")
        return resolved

    return check


def certificate_files(value: Any, where: _Where) -> tuple[str, ...]:
    """A list of PEM files holding at least one certificate each, returned absolute."""
    if not isinstance(value, list):
        raise _CheckError("must be a list of PEM certificate files")
    paths = []
    for item in value:
        path = local_path(existing_file=True)(item, where)
        try:
            with open(path, "rb") as f:
                x509.load_pem_x509_certificates(f.read())
        except (OSError, ValueError):
            raise _CheckError(f"no PEM certificate in {path}") from None
        paths.append(path)
    return tuple(paths)


def sasl_mechanism_names(value: Any, where: _Where) -> tuple[str, ...]:
    """SASL mechanisms: built-in ones and those extensions registered. EXTERNAL is not listed:
    tls.verify_peer decides whether it is offered."""
    known = [name for name in where.registry.sasl_mechanisms if name not in CERTIFICATE_MECHANISMS]
    return subset_of(*known)(value, where)


def verification_methods(value: Any, where: _Where) -> tuple[str, ...]:
    """SASL EXTERNAL verification methods: built-in ones and those extensions registered."""
    return subset_of(*where.registry.verification_methods)(value, where)


def extension_tables(value: Any, where: _Where) -> dict[str, dict[str, Any]]:
    """[extensions.NAME] tables: the settings of each enabled extension, by name."""
    if not isinstance(value, dict):
        raise _CheckError("must be a table of [extensions.NAME] tables")
    for name, settings in value.items():
        if not isinstance(settings, dict):
            key = _join(where.key, name)
            raise _KeyedError(f"{key}: must be a table, written [{key}] (got {_show(settings)})")
    return value


def cipher_string(value: Any, where: _Where) -> str:
    """An OpenSSL cipher string (TLS 1.2 suites) that selects at least one suite."""
    if not isinstance(value, str):
        raise _CheckError("must be an OpenSSL cipher string")
    try:
        tls.check_ciphers(value)
    except ValueError as error:
        raise _CheckError(str(error)) from None
    return value


def _domain(value: Any) -> str:
    # RFC 7622 3.2: a final dot is not part of the domain; nameprep also folds case.
    if not isinstance(value, str):
        raise _CheckError("must be a list of domain names")
    try:
        return jid.prep(None, value.removesuffix("."), None)[1]
    except (jid.InvalidFormat, ValueError, IndexError):  # IndexError: empty label, as in "a..b"
        raise _CheckError(f"{_show(value)} is not a valid domain name") from None


def domain_list(value: Any, where: _Where) -> tuple[str, ...]:
    if not isinstance(value, list) or not value:
        raise _CheckError("must be a non-empty list of domain names")
    domains: list[str] = []
    for item in value:
        domain = _domain(item)
        if domain in domains:
            raise _CheckError(f"{_show(domain)} is listed twice")
        domains.append(domain)
    return tuple(domains)


def ip_address(value: Any, where: _Where) -> str:
    message = 'must be an IPv4 or IPv6 address, or "localhost"'
    if not isinstance(value, str):  # ipaddress would take the integer 1 as 0.0.0.1
        raise _CheckError(message)
    if value == "localhost":
        return value
    try:
        return str(ipaddress.ip_address(value))
    except ValueError:
        raise _CheckError(message) from None


def table(cls: type) -> _Check:
    """A sub-table such as [storage.sqlite], built into dataclass ``cls``."""

    def check(value: Any, where: _Where) -> Any:
        if not isinstance(value, dict):
            raise _CheckError("must be a table")
        return _make(cls, value, where)

    return check


def array_of_tables(cls: type) -> _Check:
    """A non-empty [[array]] of tables, each built into dataclass ``cls``."""

    def check(value: Any, where: _Where) -> tuple[Any, ...]:
        if not isinstance(value, list) or not value or not all(isinstance(v, dict) for v in value):
            raise _CheckError(f"must be a non-empty array of tables, written [[{where.key}]]")
        return tuple(
            _make(cls, item, where._replace(key=f"{where.key}[{index}]"))
            for index, item in enumerate(value)
        )

    return check


# The keys. Dataclass fields without option() are not keys (Config.source).


@dataclasses.dataclass(frozen=True, kw_only=True)
class ServerConfig:
    domains: tuple[str, ...] = option(["localhost"], domain_list)
    data_dir: str = option("mim-data", local_path())


def listener_endpoint(value: Any, where: _Where) -> str:
    """A client listener's endpoint string; a backlog is added where it can have one."""
    wanted = ", ".join(f'"{kind}:..."' for kind in listeners.LISTENER_TYPES)
    if not isinstance(value, str):
        raise _CheckError(f"must be an endpoint string: {wanted}")
    kind, *arguments = listeners.endpoint_arguments(value)
    if kind not in listeners.LISTENER_TYPES or not arguments:
        raise _CheckError(f"must be an endpoint string: {wanted}")
    if kind != "systemd":
        # Parsing makes the endpoint object without listening (no reactor is needed for that);
        # systemd's parser would look up the inherited sockets, which only exist under systemd.
        try:
            endpoints.serverFromString(None, value)
        except (ValueError, TypeError) as error:
            raise _CheckError(f"is not a valid endpoint string ({error})") from None
    return listeners.with_default_backlog(value)


def _endpoint_of_address(listener: Mapping[str, Any]) -> str:
    return listeners.tcp_endpoint(listener["address"], listener["port"])


@dataclasses.dataclass(frozen=True, kw_only=True)
class ListenerConfig:
    address: str = option("127.0.0.1", ip_address)
    port: int = option(5222, integer(0, 65535))
    starttls: str = option("required", one_of("required", "optional"))
    # The old address and port keys are the default: "tcp:PORT:interface=ADDRESS:backlog=1024".
    endpoint: str = option(_endpoint_of_address, listener_endpoint)

    def __post_init__(self) -> None:
        moved = (self.address, self.port) != ("127.0.0.1", 5222)
        if moved and self.endpoint != listeners.tcp_endpoint(self.address, self.port):
            raise _CheckError("names the address and port: do not set those too", key="endpoint")


@dataclasses.dataclass(frozen=True, kw_only=True)
class TLSConfig:
    certificate: str = option("", local_path(optional=True, existing_file=True))
    private_key: str = option("", local_path(optional=True, existing_file=True))
    verify_peer: bool = option(False, boolean)
    client_ca: tuple[str, ...] = option([], certificate_files)
    allow_self_signed_client: bool = option(False, boolean)
    client_cert_failure: str = option("no_external", one_of("no_external", "disconnect"))
    ciphers: str = option(tls.DEFAULT_CIPHERS, cipher_string)

    def __post_init__(self) -> None:
        # Both empty means a generated self-signed pair; half a pair is always a mistake.
        if self.certificate and not self.private_key:
            raise _CheckError("must be set when tls.certificate is set", key="private_key")
        if self.private_key and not self.certificate:
            raise _CheckError("must be set when tls.private_key is set", key="certificate")
        if self.verify_peer and not (self.client_ca or self.allow_self_signed_client):
            raise _CheckError(
                "must name a CA file when tls.verify_peer is true"
                " (unless tls.allow_self_signed_client is true)",
                key="client_ca",
            )


@dataclasses.dataclass(frozen=True, kw_only=True)
class CommonNameConfig:
    prefix: str = option("", text)
    suffix: str = option("", text)


@dataclasses.dataclass(frozen=True, kw_only=True)
class AuthConfig:
    mechanisms: tuple[str, ...] = option(list(SASL_MECHANISMS), sasl_mechanism_names)
    allow_plain_without_tls: bool = option(False, boolean)
    scram_iterations: int = option(4096, integer(4096))
    max_failures: int = option(3, integer(1))
    failure_delay: float = option(1.0, number(0, inclusive=True))
    address_failure_budget: int = option(20, integer(0))
    account_failure_budget: int = option(10, integer(0))
    failure_window: float = option(600.0, number(0, inclusive=False))
    sasl_external: tuple[str, ...] = option(["standard"], verification_methods)
    cert_accounts: str = option("existing", one_of("existing", "auto"))
    sasl_external_common_name: CommonNameConfig = option({}, table(CommonNameConfig))


@dataclasses.dataclass(frozen=True, kw_only=True)
class RegistrationConfig:
    enabled: bool = option(False, boolean)


@dataclasses.dataclass(frozen=True, kw_only=True)
class SQLiteConfig:
    path: str = option("", local_path(optional=True))


@dataclasses.dataclass(frozen=True, kw_only=True)
class PostgreSQLConfig:
    dsn: str = option("host=127.0.0.1 dbname=mim", text)
    pool_size: int = option(8, integer(1, 100))


def non_empty_text(value: Any, where: _Where) -> str:
    if not isinstance(value, str) or not value:
        raise _CheckError("must be a non-empty string")
    return value


@dataclasses.dataclass(frozen=True, kw_only=True)
class MySQLConfig:
    host: str = option("127.0.0.1", non_empty_text)
    port: int = option(3306, integer(1, 65535))
    # When set, the server is reached through this socket and host and port are not used.
    unix_socket: str = option("", local_path(optional=True))
    database: str = option("mim", non_empty_text)
    user: str = option("mim", non_empty_text)
    password: str = option("", text)
    pool_size: int = option(4, integer(1, 100))

    def connect_options(self) -> dict[str, Any]:
        """PyMySQL's connect() keyword arguments for this database."""
        options: dict[str, Any] = {
            "database": self.database,
            "user": self.user,
            "password": self.password,
        }
        if self.unix_socket:
            options["unix_socket"] = self.unix_socket
        else:
            options.update(host=self.host, port=self.port)
        return options


def _migrate_embedded_only(storage: Mapping[str, Any]) -> bool:
    # The embedded database belongs to this server alone; a shared PostgreSQL or MySQL schema is
    # upgraded only when an operator says so (mimctl migrate).
    return storage["backend"] == "sqlite"


# The modules of each database server's extra (pip install 'mim-twisted[postgresql]').
DRIVERS = {"postgresql": ("psycopg2", "txpostgres"), "mysql": ("pymysql",)}


@dataclasses.dataclass(frozen=True, kw_only=True)
class StorageConfig:
    backend: str = option("sqlite", one_of("sqlite", "postgresql", "mysql"))
    auto_migrate: bool = option(_migrate_embedded_only, boolean)
    sqlite: SQLiteConfig = option({}, table(SQLiteConfig))
    postgresql: PostgreSQLConfig = option({}, table(PostgreSQLConfig))
    mysql: MySQLConfig = option({}, table(MySQLConfig))

    def __post_init__(self) -> None:
        driver = DRIVERS.get(self.backend, ())
        missing = [name for name in driver if importlib.util.find_spec(name) is None]
        if missing:
            raise _CheckError(
                f'"{self.backend}" needs {", ".join(missing)}, which are not installed:'
                f" pip install 'mim-twisted[{self.backend}]'",
                key="backend",
            )

    @property
    def pool_size(self) -> int:
        """The connection pool size of the backend in use (1 for SQLite's one connection)."""
        if self.backend == "mysql":
            return self.mysql.pool_size
        if self.backend == "postgresql":
            return self.postgresql.pool_size
        return 1


@dataclasses.dataclass(frozen=True, kw_only=True)
class LimitsConfig:
    max_stanza_size: int = option(262144, integer(1024))
    auth_timeout: float = option(30.0, number(0, inclusive=False))
    max_outgoing_buffer: int = option(4194304, integer(65536))
    max_offline_messages: int = option(100, integer(0))
    max_read_rate: int = option(1048576, integer(0))
    max_unbound_per_address: int = option(100, integer(1))
    stanza_timeout: float = option(60.0, number(0, inclusive=False))


@dataclasses.dataclass(frozen=True, kw_only=True)
class PubSubConfig:
    enabled: bool = option(True, boolean)
    pep: bool = option(True, boolean)
    workers: int = option(64, integer(1, 256))
    max_queue_length: int = option(1000, integer(1))
    sync_broadcast: bool = option(False, boolean)
    max_items_limit: int = option(1000, integer(1))
    max_payload_size: int = option(60000, integer(1))


@dataclasses.dataclass(frozen=True, kw_only=True)
class ModulesConfig:
    """One switch per IM extension that clients ask for at login; all on by default."""

    carbons: bool = option(True, boolean)  # XEP-0280 Message Carbons
    blocking: bool = option(True, boolean)  # XEP-0191 Blocking Command
    last: bool = option(True, boolean)  # XEP-0012 Last Activity
    stream_management: bool = option(True, boolean)  # XEP-0198 Stream Management
    private: bool = option(True, boolean)  # XEP-0049 Private XML Storage
    csi: bool = option(True, boolean)  # XEP-0352 Client State Indication
    vcard: bool = option(True, boolean)  # XEP-0054 vcard-temp


@dataclasses.dataclass(frozen=True, kw_only=True)
class StreamManagementConfig:
    resume_timeout: float = option(300.0, number(0, inclusive=False))
    max_unacked: int = option(1000, integer(1))


@dataclasses.dataclass(frozen=True, kw_only=True)
class PrivateConfig:
    # Bytes of serialised XML all of an account's fragments take together.
    max_size: int = option(65536, integer(1))


@dataclasses.dataclass(frozen=True, kw_only=True)
class VCardConfig:
    # Bytes of one serialised <vCard/>, its photo included.
    max_size: int = option(131072, integer(1))


@dataclasses.dataclass(frozen=True, kw_only=True)
class LogConfig:
    traffic: bool = option(False, boolean)
    level: str = option("info", one_of("debug", "info", "warn", "error"))
    format: str = option("text", one_of("text", "json"))


# sockaddr_un holds 108 bytes with the final NUL: longer paths would fail only at bind time.
MAX_UNIX_SOCKET_PATH = 107


def unix_socket_path(value: Any, where: _Where) -> str:
    """An optional path (see local_path) short enough for a UNIX socket address."""
    path = local_path(optional=True)(value, where)
    if len(os.fsencode(path)) > MAX_UNIX_SOCKET_PATH:
        raise _CheckError(f"is too long for a UNIX socket (at most {MAX_UNIX_SOCKET_PATH} bytes)")
    return path


def endpoint_description(value: Any, where: _Where) -> str:
    """A Twisted server endpoint string such as "tcp:9090:interface=127.0.0.1"."""
    if not isinstance(value, str) or ":" not in value:
        raise _CheckError('must be an endpoint string such as "tcp:9090:interface=127.0.0.1"')
    return value


@dataclasses.dataclass(frozen=True, kw_only=True)
class AdminConfig:
    enabled: bool = option(True, boolean)
    socket: str = option("", unix_socket_path)


@dataclasses.dataclass(frozen=True, kw_only=True)
class MetricsConfig:
    enabled: bool = option(False, boolean)
    endpoint: str = option("tcp:9090:interface=127.0.0.1", endpoint_description)


def amqp_name(value: Any, where: _Where) -> str:
    """An AMQP short string: an exchange name, type or topic (1 to 255 bytes of UTF-8)."""
    if not isinstance(value, str) or not value or len(value.encode("utf-8")) > 255:
        raise _CheckError("must be a non-empty string of at most 255 bytes")
    return value


def host_name(value: Any, where: _Where) -> str:
    if not isinstance(value, str) or not value or any(c.isspace() for c in value):
        raise _CheckError("must be a host name or an IP address")
    return value


# The exchanges of MongooseIM 3.3's mod_event_pusher_rabbit, with its option names and defaults.


@dataclasses.dataclass(frozen=True, kw_only=True)
class PresenceExchangeConfig:
    name: str = option("presence", amqp_name)
    type: str = option("topic", amqp_name)


@dataclasses.dataclass(frozen=True, kw_only=True)
class ChatExchangeConfig:
    name: str = option("chat_msg", amqp_name)
    type: str = option("topic", amqp_name)
    sent_topic: str = option("chat_msg_sent", amqp_name)
    recv_topic: str = option("chat_msg_recv", amqp_name)


@dataclasses.dataclass(frozen=True, kw_only=True)
class GroupchatExchangeConfig:
    name: str = option("groupchat_msg", amqp_name)
    type: str = option("topic", amqp_name)
    sent_topic: str = option("groupchat_msg_sent", amqp_name)
    recv_topic: str = option("groupchat_msg_recv", amqp_name)


def _require_pika(what: str) -> None:
    """For `enabled = true` of a part that talks to RabbitMQ."""
    if importlib.util.find_spec("pika") is None:
        raise _CheckError(
            f"{what} needs pika, which is not installed: pip install 'mim-twisted[rabbitmq]'",
            key="enabled",
        )


@dataclasses.dataclass(frozen=True, kw_only=True)
class BrokerConfig:
    """Where a RabbitMQ broker is and how to log in: the event pusher's and the cluster's."""

    host: str = option("127.0.0.1", host_name)
    port: int = option(5672, integer(1, 65535))
    virtual_host: str = option("/", text)
    username: str = option("guest", text)
    password: str = option("guest", text)
    tls: bool = option(False, boolean)


@dataclasses.dataclass(frozen=True, kw_only=True)
class RabbitConfig(BrokerConfig):
    enabled: bool = option(False, boolean)
    confirms: bool = option(True, boolean)
    max_buffered_events: int = option(100000, integer(1))
    presence_exchange: PresenceExchangeConfig = option({}, table(PresenceExchangeConfig))
    chat_msg_exchange: ChatExchangeConfig = option({}, table(ChatExchangeConfig))
    groupchat_msg_exchange: GroupchatExchangeConfig = option({}, table(GroupchatExchangeConfig))

    def __post_init__(self) -> None:
        if self.enabled:
            _require_pika("the event pusher")


@dataclasses.dataclass(frozen=True, kw_only=True)
class EventPusherConfig:
    rabbit: RabbitConfig = option({}, table(RabbitConfig))


def _default_node_name(values: Mapping[str, Any]) -> str:
    # Unique on the host, readable in `rabbitmqctl list_queues` and the session table.
    return f"{socket.gethostname()}.{os.getpid()}"


@dataclasses.dataclass(frozen=True, kw_only=True)
class ClusterConfig:
    """Several nodes serving the same domains (issue 15): sessions in PostgreSQL, stanzas
    between nodes over RabbitMQ."""

    enabled: bool = option(False, boolean)
    # The cluster's name on the broker: clusters sharing a virtual host (staging beside
    # production, test runs) must not hear each other's sessions.
    name: str = option("mim", amqp_name)
    node: str = option(_default_node_name, amqp_name)
    rabbit: BrokerConfig = option({}, table(BrokerConfig))
    # Messages for other nodes held while the broker is away; beyond, stanzas are answered as
    # undeliverable (RFC 6121: messages stored offline, the rest service-unavailable).
    max_buffered_messages: int = option(10000, integer(1))
    # Seconds without a heartbeat after which a node is taken for dead and its sessions ended.
    node_timeout: float = option(30.0, number(0, inclusive=False))
    heartbeat_interval: float = option(
        lambda values: values["node_timeout"] / 3, number(0, inclusive=False)
    )
    # Processes on this machine sharing the listeners, each a node (mim_twisted.workers).
    workers: int = option(1, integer(1, 64))

    def __post_init__(self) -> None:
        if self.enabled:
            _require_pika("the cluster")
        if self.workers > 1 and not self.enabled:
            raise _CheckError("needs cluster.enabled = true (each worker is a node)", key="workers")
        if self.heartbeat_interval >= self.node_timeout:
            raise _CheckError(
                f"must be less than node_timeout ({_show(self.node_timeout)})",
                key="heartbeat_interval",
            )


@dataclasses.dataclass(frozen=True, kw_only=True)
class Config:
    source: str | None  # the file it was read from, None for the embedded default
    server: ServerConfig = option({}, table(ServerConfig))
    listeners: tuple[ListenerConfig, ...] = option([{}], array_of_tables(ListenerConfig))
    tls: TLSConfig = option({}, table(TLSConfig))
    auth: AuthConfig = option({}, table(AuthConfig))
    registration: RegistrationConfig = option({}, table(RegistrationConfig))
    storage: StorageConfig = option({}, table(StorageConfig))
    limits: LimitsConfig = option({}, table(LimitsConfig))
    pubsub: PubSubConfig = option({}, table(PubSubConfig))
    modules: ModulesConfig = option({}, table(ModulesConfig))
    stream_management: StreamManagementConfig = option({}, table(StreamManagementConfig))
    private: PrivateConfig = option({}, table(PrivateConfig))
    vcard: VCardConfig = option({}, table(VCardConfig))
    log: LogConfig = option({}, table(LogConfig))
    admin: AdminConfig = option({}, table(AdminConfig))
    metrics: MetricsConfig = option({}, table(MetricsConfig))
    event_pusher: EventPusherConfig = option({}, table(EventPusherConfig))
    cluster: ClusterConfig = option({}, table(ClusterConfig))
    extensions: dict[str, dict[str, Any]] = option({}, extension_tables)

    def __post_init__(self) -> None:
        if self.cluster.enabled and self.storage.backend != "postgresql":
            # The session table is shared by every node: the embedded SQLite file is not.
            raise _CheckError(
                f'needs storage.backend = "postgresql" (got {_show(self.storage.backend)})',
                key="cluster.enabled",
            )

    @property
    def data_dir(self) -> str:
        return self.server.data_dir

    @property
    def sqlite_path(self) -> str:
        return self.storage.sqlite.path or os.path.join(self.server.data_dir, "mim.sqlite3")

    @property
    def admin_socket(self) -> str:
        return self.admin.socket or os.path.join(self.server.data_dir, "admin.sock")


_TOML_POSITION = re.compile(r"(.*) \(at line (\d+), column (\d+)\)$")


def _read(path: str) -> dict[str, Any]:
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as error:
        raise ConfigError(f"{path}: cannot read file ({error.strerror})") from None
    try:
        return tomllib.loads(data.decode("utf-8"))
    except UnicodeDecodeError as error:
        raise ConfigError(f"{path}: invalid TOML (not UTF-8 at byte {error.start})") from None
    except tomllib.TOMLDecodeError as error:
        # tomllib puts the position at the end of its message; editors want it first.
        position = _TOML_POSITION.match(str(error))
        if position is None:
            raise ConfigError(f"{path}: invalid TOML ({error})") from None
        message, line, column = position.groups()
        raise ConfigError(
            f"{path}: line {line}, column {column}: invalid TOML ({message})"
        ) from None


def load_config(path: str | None) -> Config:
    """Read the TOML file at ``path`` into a checked Config; None gives the embedded default.

    Relative paths are resolved against the file's directory (the current directory for the
    default). The enabled extensions are installed into a scratch registry first, so that the
    names they register are known to the checks. Raises ConfigError, whose text is one line
    naming the file and the key.
    """
    registry = ServerRegistry()
    if path is None:
        return _make(Config, {}, _Where("", os.getcwd(), registry), source=None)
    document = _read(path)
    where = _Where("", os.path.dirname(os.path.abspath(path)), registry)
    try:
        enabled = _check_value(
            extension_tables, document.get("extensions", {}), where, "extensions"
        )
        install_extensions(registry, enabled)
        return _make(Config, document, where, source=path)
    except (_KeyedError, ExtensionError) as error:
        raise ConfigError(f"{path}: {error}") from None


def _check_value(check: _Check, value: Any, where: _Where, key: str) -> Any:
    """``check`` of the value of one top-level key, outside _make."""
    try:
        return check(value, where._replace(key=key))
    except _CheckError as error:
        raise _KeyedError(f"{key}: {error} (got {_show(value)})") from None


def changed_keys(old: Any, new: Any, prefix: str = "") -> list[str]:
    """The dotted keys whose values differ between two configs (or two of their tables)."""
    changed = []
    for field in dataclasses.fields(old):
        if "check" not in field.metadata:
            continue
        key = _join(prefix, field.name)
        before, after = getattr(old, field.name), getattr(new, field.name)
        if dataclasses.is_dataclass(before):
            changed.extend(changed_keys(before, after, key))
        elif before != after:
            changed.append(key)
    return changed
