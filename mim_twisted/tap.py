"""The service maker behind `twistd mim`: builds the server's MultiService from a Config.

This is the one place where the parts are wired together. Each part is a child service of
MimService (storage, the IM core, PubSub, the admin socket, metrics, one per client listener):
the database is opened (and, where allowed, migrated) before any listener accepts a connection,
and closed after the work that the closed connections left has finished.
"""

import dataclasses
import os
import sqlite3
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from functools import partial
from typing import Any

from OpenSSL import SSL
from twisted.application import service
from twisted.internet import defer, ssl
from twisted.internet.error import CannotListenError
from twisted.internet.interfaces import IListeningPort, IStreamServerEndpoint
from twisted.logger import ILogObserver, Logger
from twisted.python import usage
from twisted.python.failure import Failure

import mim_twisted
from mim_twisted import gctuning, hooks, storage
from mim_twisted.admin import AdminService
from mim_twisted.auth.certs import ExternalSettings
from mim_twisted.auth.credentialcache import CredentialCache
from mim_twisted.auth.throttle import AuthFailureBudget, FailureBudgetSettings
from mim_twisted.cluster import coherence
from mim_twisted.config import Config, ConfigError, ListenerConfig, changed_keys, load_config
from mim_twisted.extensions import ServerRegistry, install_extensions
from mim_twisted.im import caps, client_state, ping, roster, stream_management, version
from mim_twisted.im.blocking import BlockingService
from mim_twisted.im.caps import CapsService
from mim_twisted.im.carbons import Carbons
from mim_twisted.im.disco import FEATURE_MSGOFFLINE, DiscoService
from mim_twisted.im.last import LastActivityService
from mim_twisted.im.locks import KeyedLock
from mim_twisted.im.messages import MessageRouter
from mim_twisted.im.offline import OfflineDelivery
from mim_twisted.im.presence import PresenceService
from mim_twisted.im.private import PrivateStorage
from mim_twisted.im.register import RegistrationService
from mim_twisted.im.roster import RosterService
from mim_twisted.im.rostercache import RosterCache
from mim_twisted.im.router import Router
from mim_twisted.im.sessions import SessionManager
from mim_twisted.im.stream_management import StreamManagement, StreamManagementSettings
from mim_twisted.im.vcard import VCards
from mim_twisted.listeners import ClientListener, describe_address
from mim_twisted.logs import LogOutput
from mim_twisted.metrics import MetricsService
from mim_twisted.pubsub.broadcast import Broadcaster
from mim_twisted.pubsub.config import GENERIC_NODE_DEFAULTS, ServiceLimits
from mim_twisted.pubsub.core import PubSubService, Relation
from mim_twisted.pubsub.nodecache import NodeCache
from mim_twisted.pubsub.observers import PubSubObservers
from mim_twisted.pubsub.pep import PepService
from mim_twisted.pubsub.protocol import PubSubComponent
from mim_twisted.pubsub.purge import OfflinePurge
from mim_twisted.pubsub.queues import WorkerPool
from mim_twisted.signals import ReloadOnHangup
from mim_twisted.startreport import StartReport
from mim_twisted.storage import permissions
from mim_twisted.storage.interfaces import IDatabase, SchemaOutdated, SchemaTooNew
from mim_twisted.workers import (
    FIRST_LISTENER_FD,
    STATUS_FD,
    WorkerStartFailed,
    WorkerSupervisor,
    adopted_endpoint,
    check_workers,
    end_with_parent,
    worker_command,
    worker_config,
)
from mim_twisted.xmpp import tls
from mim_twisted.xmpp.c2s import C2SFactory, C2SSettings
from mim_twisted.xmpp.jids import parse_jid

log = Logger()

# Seconds that clients get to read the shutdown stream error before their connections are cut.
SHUTDOWN_GRACE = 2.0

# Seconds that the presence work left by the closed connections (unavailable presence, roster
# writes) gets to finish before the database is closed under it.
PRESENCE_STOP_TIMEOUT = 10.0


class TLSFilesError(Exception):
    """The certificate, key or client CA files cannot be used; str() names the file."""


def _database_errors() -> tuple[type[Exception], ...]:
    # psycopg2 and PyMySQL are installed only with the "postgresql" and "mysql" extras.
    errors: list[type[Exception]] = [sqlite3.Error]
    try:
        import psycopg2

        errors.append(psycopg2.Error)
    except ImportError:
        pass
    try:
        import pymysql

        errors.append(pymysql.err.MySQLError)
    except ImportError:
        pass
    return tuple(errors)


DATABASE_ERRORS = _database_errors()

# What the start log calls a database server (SQLite is named by its file).
STORAGE_NAMES = {"postgresql": "PostgreSQL", "mysql": "MySQL"}

# Start failures an operator can fix from the message alone: no traceback for these.
EXPECTED_START_ERRORS = (
    SchemaOutdated,
    SchemaTooNew,
    CannotListenError,
    OSError,
    ValueError,
    TLSFilesError,
    *DATABASE_ERRORS,
)

# What a SIGHUP applies to the running server; any other changed key needs a restart.
RELOADABLE_KEYS = frozenset({"tls.certificate", "tls.private_key", "tls.client_ca", "log.level"})


def _worker_count(value: str) -> int:
    count = int(value)
    if count < 1:
        raise ValueError("must be at least 1")
    return count


class Options(usage.Options):
    synopsis = "[-c mim.toml] [--log-traffic]"
    longdesc = (
        "Runs the mim-twisted XMPP server. Without a config file it serves the domain "
        "'localhost' on 127.0.0.1:5222 with a SQLite database and a self-signed certificate "
        "under ./mim-data/."
    )
    optParameters = [
        ["config", "c", None, "Path of the TOML config file (see mim.toml.example)."],
        [
            "workers",
            None,
            None,
            "Worker processes sharing the listeners, each a cluster node (default:"
            " cluster.workers, 1 = this process serves alone).",
            _worker_count,
        ],
        ["worker", None, None, "Internal: run as this worker of a supervisor.", _worker_count],
        ["cluster-node", None, None, "Internal: the supervisor's cluster node name."],
    ]
    optFlags = [["log-traffic", None, "Log every stanza sent and received."]]


def secure_sqlite_directory(config: Config) -> None:
    """Make the data directory private when the SQLite database is in it (mimctl may be first)."""
    if config.storage.backend != "sqlite":
        return
    if os.path.dirname(os.path.abspath(config.sqlite_path)) == os.path.abspath(config.data_dir):
        permissions.secure_data_directory(config.data_dir)


def load_tls_options(config: Config) -> ssl.CertificateOptions:
    """The STARTTLS options from the configured files (generating a self-signed pair on first
    start); TLSFilesError naming the file if they cannot be used."""
    certificate, key, generated = tls.ensure_certificate(
        config.tls.certificate,
        config.tls.private_key,
        config.data_dir,
        list(config.server.domains),
    )
    if generated:
        log.info("Generated a self-signed certificate in {path}", path=certificate)
    client_ca = config.tls.client_ca if config.tls.verify_peer else ()
    try:
        options = tls.server_tls_options(certificate, key, client_ca, config.tls.ciphers)
        # Made now rather than at the first STARTTLS, so that a key that does not match the
        # certificate stops the start (or the reload).
        options.getContext()
    except OSError as error:
        raise TLSFilesError(f"cannot read {error.filename}: {error.strerror}") from None
    except ValueError as error:
        raise TLSFilesError(str(error)) from None
    except SSL.Error:
        raise TLSFilesError(f"{key}: the private key does not match {certificate}") from None
    return options


def open_storage(config: Config) -> defer.Deferred:
    """Open the configured database, migrating it where the config allows."""
    secure_sqlite_directory(config)
    return storage.open_database(
        config.storage.backend,
        sqlite_path=config.sqlite_path,
        postgresql_dsn=config.storage.postgresql.dsn,
        mysql_options=config.storage.mysql.connect_options(),
        pool_size=config.storage.pool_size,
        auto_migrate=config.storage.auto_migrate,
    )


@dataclass
class ImCore:
    """The IM core of one server: what every C2S listener hands its bound sessions to."""

    sessions: SessionManager
    hooks: hooks.Hooks
    router: Router
    roster: RosterService
    presence: PresenceService
    disco: DiscoService
    caps: CapsService
    registration: RegistrationService
    blocking: BlockingService | None = None  # None when the module is off
    # What logins read credentials from: the store, or a CredentialCache in front of it.
    accounts: Any = None

    def install(self, factory: C2SFactory) -> None:
        """Offer the core's stream features and pre-authentication requests on a listener."""
        factory.bound_features.extend(roster.stream_features())
        factory.bound_features.append(caps.server_caps_element(self.disco.server_info()))
        if self.router.stream_management is not None:
            factory.bound_features.append(stream_management.stream_feature())
        if self.router.client_state_indication:
            factory.bound_features.append(client_state.stream_feature())
        self.registration.install_stream(factory)


def build_im_core(
    config: Config,
    database: IDatabase,
    clock: object,
    registry: ServerRegistry | None = None,
    sessions: Any = None,
) -> ImCore:
    """The IM core, with what the extensions in ``registry`` added to it, on ``sessions``
    (a cluster node's table) or on a table of its own."""
    registry = registry or ServerRegistry()
    domains = frozenset(config.server.domains)
    if sessions is None:
        sessions = SessionManager()
    hook_table = hooks.Hooks()
    for name, handler, priority in registry.hook_handlers:
        hook_table.add(name, handler, priority)
    # A cluster's other nodes keep messages for this node's users too: only one process may
    # remember which users have none.
    offline = OfflineDelivery(
        database.offline,
        config.limits.max_offline_messages,
        remember_empty=not config.cluster.enabled,
    )
    rosters: Any = database.rosters
    if not config.cluster.enabled:
        # Every roster read and write of the server goes through it: the online accounts'
        # rosters are read once, not on each presence and PEP event. Not in a cluster, where
        # another node changes this node's accounts' rosters too (a subscription of one of its
        # users).
        rosters = RosterCache(database.rosters, sessions)
        hook_table.add(hooks.SESSION_ENDED, rosters.session_ended)
    # One lock per account for the roster items that the roster protocol and presence change.
    roster_locks = KeyedLock()
    roster_service = RosterService(rosters, sessions, locks=roster_locks)
    presence = PresenceService(
        domains,
        sessions,
        database.accounts,
        rosters,
        roster_service,
        offline,
        hook_table,
        locks=roster_locks,
        clock=clock,
    )
    roster_service.on_remove = presence.roster_item_removed
    messages = MessageRouter(sessions, database.accounts, offline, hook_table)
    router = Router(domains, sessions, clock, presence, messages, hook_table)
    router.client_state_indication = config.modules.csi
    if config.modules.stream_management:
        router.stream_management = StreamManagement(
            StreamManagementSettings(
                resume_timeout=config.stream_management.resume_timeout,
                max_unacked=config.stream_management.max_unacked,
                max_unacked_bytes=config.limits.max_outgoing_buffer,
            ),
            sessions,
            messages,
            clock,
            router.routing,
        )
    router.account_iq[roster.NS_ROSTER, "query"] = roster_service.handle_iq
    disco = DiscoService(database.accounts, rosters)
    disco.install(router)
    disco.add_server_feature(FEATURE_MSGOFFLINE)  # offline storage is part of every IM core
    ping.install(router, disco)
    version.install(router, disco)
    accounts: Any = database.accounts
    if not config.cluster.enabled and config.admin.enabled:
        # Logins read no credentials from the database for accounts that logged in lately.
        # Only where every password change is seen: this process's own (registration) and
        # mimctl's, which it tells the admin socket of (see credentialcache.py).
        accounts = CredentialCache(database.accounts, clock)
    registration = RegistrationService(
        accounts,
        sessions,
        clock,
        enabled=config.registration.enabled,
        iterations=config.auth.scram_iterations,
    )
    registration.install(router, disco)
    if config.modules.carbons:
        Carbons(sessions).install(router, messages, disco, hook_table)
    blocking = None
    if config.modules.blocking:
        blocking = BlockingService(domains, database.block_lists, rosters, sessions, presence)
        blocking.install(router, disco, hook_table)
    if config.modules.last:
        last = LastActivityService(database.last_activity, rosters, sessions, clock)
        last.install(router, disco, hook_table)
    if config.modules.private:
        PrivateStorage(database.private, config.private.max_size).install(router, disco)
    if config.modules.vcard:
        VCards(database.vcards, config.vcard.max_size).install(router, disco)
    caps_service = CapsService(router)
    presence.caps_listeners.append(caps_service.presence_received)
    hook_table.add(hooks.SESSION_ENDED, caps_service.session_ended)
    add_extension_handlers(registry, router, disco)
    return ImCore(
        sessions,
        hook_table,
        router,
        roster_service,
        presence,
        disco,
        caps_service,
        registration,
        blocking,
        accounts,
    )


def add_extension_handlers(registry: ServerRegistry, router: Router, disco: DiscoService) -> None:
    """The IQ handlers and disco entries that extensions registered. An extension may not
    take over a request that the server answers itself (ValueError, which stops the start)."""
    for table, handlers in (
        (router.server_iq, registry.server_iq_handlers),
        (router.account_iq, registry.account_iq_handlers),
    ):
        for (namespace, name), handler in handlers.items():
            if (namespace, name) in table:
                raise ValueError(
                    f"an extension's IQ handler for {{{namespace}}}{name} would"
                    " replace the server's own"
                )
            table[namespace, name] = handler
    for namespace in registry.server_features:
        disco.add_server_feature(namespace)
    for namespace in registry.account_features:
        disco.add_account_feature(namespace)
    for identity in registry.server_identities:
        disco.add_server_identity(*identity)
    for identity in registry.account_identities:
        disco.add_account_identity(*identity)


@dataclass
class PubSub:
    """The XEP-0060 services (`pubsub.<domain>`), their worker pool and their broadcaster."""

    pool: WorkerPool
    broadcaster: Broadcaster
    services: dict[str, PubSubService]
    purge: OfflinePurge
    pep: PepService | None
    observers: PubSubObservers
    node_cache: NodeCache


def build_pubsub(
    config: Config,
    database: IDatabase,
    core: ImCore,
    clock: object,
    observers: PubSubObservers | None = None,
) -> PubSub:
    """The PubSub services; their events go to ``observers`` (made here if not given), after
    the offline purge and the broadcaster have been added to them."""
    settings = config.pubsub
    if observers is None:
        observers = PubSubObservers()
    pool = WorkerPool(settings.workers, settings.max_queue_length)
    broadcaster = Broadcaster(
        core.sessions,
        core.presence.offline,
        clock,
        sync=settings.sync_broadcast,
        domains=frozenset(config.server.domains),
    )
    limits = ServiceLimits(settings.max_items_limit, settings.max_payload_size)
    # One store for both: what a publication reads of a node is kept in memory.
    store = NodeCache(database.pubsub)
    rosters = core.roster.rosters  # the IM core's, with the online accounts' rosters held
    services: dict[str, PubSubService] = {}
    purge = OfflinePurge(services, pool, core.sessions)
    # The purge first: it must know of a node before the notifications of it are written.
    observers.add(purge.observe)
    observers.add(broadcaster)

    async def relation(owner: str, requester: str) -> Relation:
        """What the owner's roster says about the requester (presence and roster models)."""
        owner_jid = parse_jid(owner)
        if owner_jid.user is None or owner_jid.host not in config.server.domains:
            return Relation()
        item = await rosters.get_item(owner_jid.host, owner_jid.user, requester)
        if item is None:
            return Relation()
        return Relation(item.subscription in ("from", "both"), frozenset(item.groups))

    for domain in config.server.domains:
        host = f"pubsub.{domain}"
        services[host] = PubSubService(
            store,
            service_key=host,
            defaults=GENERIC_NODE_DEFAULTS,
            limits=limits,
            broadcaster=observers,
            relation=relation,
        )
        core.router.components[host] = PubSubComponent(host, services[host], pool)
        core.disco.add_server_item(domain, host, "Publish-Subscribe")
    core.hooks.add(hooks.USER_UNAVAILABLE, purge.user_unavailable)
    pep = None
    if settings.pep:
        # Same store and worker pool: a PEP node is keyed by its owner's bare JID.
        pep = PepService(
            domains=frozenset(config.server.domains),
            store=store,
            rosters=rosters,
            sessions=core.sessions,
            caps=core.caps,
            pool=pool,
            broadcaster=broadcaster,
            limits=limits,
            relation=relation,
            blocking=core.blocking,
            held_rosters=rosters.held_items if isinstance(rosters, RosterCache) else None,
        )
        pep.install(core.router, core.disco, core.hooks)
    return PubSub(pool, broadcaster, services, purge, pep, observers, store)


class StorageService(service.Service):
    """Opens the database when it starts (first of the server's parts) and closes it when it
    stops (last); `database` is None while it is not open."""

    def __init__(self, config: Config) -> None:
        self.config = config
        self.database: IDatabase | None = None

    def startService(self) -> defer.Deferred:
        super().startService()
        return defer.ensureDeferred(self._open())

    async def _open(self) -> None:
        config = self.config
        self.database = await open_storage(config)
        log.info(
            "Storage: {backend} ({where})",
            backend=config.storage.backend,
            where=STORAGE_NAMES.get(config.storage.backend, config.sqlite_path),
        )

    def stopService(self) -> defer.Deferred:
        super().stopService()
        database, self.database = self.database, None
        return database.close() if database is not None else defer.succeed(None)


class ImCoreService(service.Service):
    """The IM core (sessions, routing, presence, offline storage), built on the open database.

    It owns the client connections of every listener attached to it: stopping closes them with
    <system-shutdown/>, then lets the work they leave (unavailable presence, roster writes,
    messages kept for users now offline) finish before the database goes away.
    """

    def __init__(
        self,
        config: Config,
        storage: StorageService | None,
        clock: object,
        registry: ServerRegistry | None = None,
        cluster: Any = None,
    ) -> None:
        self.config = config
        self.storage = storage
        self.clock = clock
        self.registry = registry
        self.cluster = cluster  # a ClusterNode, started before this
        self.core: ImCore | None = None
        self.factories: list[C2SFactory] = []

    def startService(self) -> None:
        super().startService()
        cluster = self.cluster
        self.core = build_im_core(
            self.config,
            self.storage.database,
            self.clock,
            self.registry,
            sessions=cluster.sessions if cluster is not None else None,
        )
        if cluster is not None:
            cluster.attach(self.core)
        if cluster is not None and self.core.blocking is not None:
            coherence.share_block_lists(cluster.bus, self.core.blocking.lists)

    def attach(self, factory: C2SFactory) -> None:
        """Offer the core on a listener's connections, and close them when the core stops."""
        self.core.install(factory)
        self.factories.append(factory)

    def stopService(self) -> defer.Deferred:
        super().stopService()
        return defer.ensureDeferred(self._drain())

    async def _drain(self) -> None:
        factories, self.factories = self.factories, []
        await defer.gatherResults([f.disconnect_all(SHUTDOWN_GRACE) for f in factories])
        if self.core is not None and self.core.router.stream_management is not None:
            # Sessions waiting to be resumed end too; their unacknowledged messages are stored.
            self.core.router.stream_management.stop()
        if self.core is not None:
            # Bounded: work stuck on the database must not keep the server up for ever.
            routing = self.core.router.routing.idle()
            routing.addTimeout(PRESENCE_STOP_TIMEOUT, self.clock, onTimeoutCancel=_gave_up)
            await routing
            await self.core.presence.idle(timeout=PRESENCE_STOP_TIMEOUT)
            # What the last presence work started (PEP's last items, say) reads the store too.
            routing = self.core.router.routing.idle()
            routing.addTimeout(PRESENCE_STOP_TIMEOUT, self.clock, onTimeoutCancel=_gave_up)
            await routing


def _gave_up(result: object, timeout: float) -> None:
    log.warn("Stopping: messages still being routed after {timeout} s are left", timeout=timeout)


class PubSubHost(service.Service):
    """The `pubsub.<domain>` services with their worker pool, broadcaster and offline purge.

    Stopping (before the IM core closes the client connections) refuses clients' new requests
    and lets the workers answer the queued ones over the connections still open. The workers
    and the broadcaster go on for what the closing sessions leave (offline purges,
    notifications): `PubSubWorkers` ends them once the IM core has stopped.
    """

    def __init__(
        self,
        config: Config,
        storage: StorageService,
        im: ImCoreService,
        clock: object,
        registry: ServerRegistry | None = None,
        *,
        bus: Any = None,
    ) -> None:
        self.config = config
        self.storage = storage
        self.im = im
        self.clock = clock
        self.registry = registry
        self.bus = bus  # the cluster bus, when this is a cluster node
        self.pubsub: PubSub | None = None

    def startService(self) -> defer.Deferred:
        super().startService()
        return defer.ensureDeferred(self._start())

    async def _start(self) -> None:
        # New observers at each start: a restarted server must not keep the stopped
        # broadcaster and purge of its previous run.
        self.pubsub = build_pubsub(self.config, self.storage.database, self.im.core, self.clock)
        # After the purge and the broadcaster: what extensions registered.
        for observer in self.registry.pubsub_observers if self.registry else ():
            self.pubsub.observers.add(observer)
        if self.bus is not None:
            coherence.share_pubsub_nodes(self.bus, self.pubsub.node_cache, self.pubsub.purge)
        await self.pubsub.purge.load()
        self.pubsub.pool.start()

    def stopService(self) -> defer.Deferred:
        super().stopService()
        if self.pubsub is None:
            return defer.succeed(None)
        return self.pubsub.pool.refuse_requests()


class PubSubWorkers(service.Service):
    """The end of PubSub's stop. A child before the IM core, so that it stops after the IM core
    has closed the connections and finished their work: the offline purges and notifications
    that work submitted have run on the workers, which then end, then the broadcaster finishes
    the notifications under way. Nothing to do at start: `PubSubHost` starts the workers."""

    def __init__(self, host: PubSubHost) -> None:
        self.host = host

    def stopService(self) -> defer.Deferred:
        super().stopService()
        return defer.ensureDeferred(self._drain())

    async def _drain(self) -> None:
        pubsub = self.host.pubsub
        if pubsub is None:
            return
        await pubsub.pool.stop()
        await pubsub.broadcaster.stop()


class MimService(service.MultiService, ServerRegistry):
    """The whole server: storage, the IM core, PubSub, the operator services and the client
    listeners, each a child service, on one reactor.

    The enabled extensions are installed into it first (its ServerRegistry methods are the
    extension API), the built-in event pusher before the others; their child services come
    right after storage, so they run before the IM core starts and until it has finished with
    the clients' work.

    The children start in that order, each once the one before it has started (the IM core
    needs the open database, PubSub and a listener the IM core), and stop in the reverse order,
    each once the one after it has stopped: listeners stop accepting, PubSub refuses clients'
    new requests and answers the queued ones while the connections are open, the IM core
    closes the connections and finishes their work, PubSub's workers (a child of their own,
    just before the IM core) run what that work left and end, and the database closes last.
    Twisted's MultiService starts its children without waiting and stops them all at once,
    which is why both loops are written here.

    `ready` fires with the service once every listener accepts connections; `ports` holds the
    listening ports (tests read the port number that port 0 was given).
    """

    def __init__(
        self,
        config: Config,
        *,
        log_traffic: bool = False,
        reactor: object = None,
        inherited_listeners: Sequence[IStreamServerEndpoint] = (),
    ) -> None:
        service.MultiService.__init__(self)
        ServerRegistry.__init__(self)
        if reactor is None:
            from twisted.internet import reactor
        self.reactor = reactor
        self.config = config
        self.event_pusher: Any = None  # a RabbitPublisher when [event_pusher.rabbit] is enabled
        if config.event_pusher.rabbit.enabled:
            # pika is an optional extra: imported only when the pusher is wanted.
            from mim_twisted.events.rabbit import RabbitEventPusher

            # Installed first: its service starts before the other extensions' and stops after
            # them, once the IM core has closed the connections and made their "offline" events.
            pusher = RabbitEventPusher(reactor)
            pusher.install(self, config.event_pusher.rabbit)
            self.event_pusher = pusher.publisher
        install_extensions(self, config.extensions)
        self.log_traffic = log_traffic or config.log.traffic
        self.storage = StorageService(config)
        self.storage.setServiceParent(self)
        self.cluster_bus: Any = None  # a ClusterBus when [cluster] is enabled
        if config.cluster.enabled:
            from mim_twisted.cluster.bus import ClusterBus

            # After storage and before the IM core: up before the first session, and until the
            # last one has ended and told the other nodes.
            self.cluster_bus = ClusterBus(config.cluster, reactor)
            self.cluster_bus.setServiceParent(self)
        for child in self.extension_services:
            child.setServiceParent(self)
        self.cluster: Any = None  # a ClusterNode when [cluster] is enabled
        if config.cluster.enabled:
            from mim_twisted.cluster.node import ClusterNode

            self.cluster = ClusterNode(config.cluster, self.cluster_bus, self.storage, reactor)
            self.cluster.setServiceParent(self)
        self.im = ImCoreService(config, self.storage, reactor, self, self.cluster)
        self.pubsub_host: PubSubHost | None = None
        if config.pubsub.enabled:
            self.pubsub_host = PubSubHost(
                config, self.storage, self.im, reactor, self, bus=self.cluster_bus
            )
            # Before the IM core, to stop after it (see PubSubWorkers).
            PubSubWorkers(self.pubsub_host).setServiceParent(self)
        self.im.setServiceParent(self)
        if self.pubsub_host is not None:
            self.pubsub_host.setServiceParent(self)
        self.admin: AdminService | None = None
        if config.admin.enabled:
            self.admin = AdminService(self, config.admin_socket, reactor)
            self.admin.setServiceParent(self)
        self.metrics: MetricsService | None = None
        if config.metrics.enabled:
            self.metrics = MetricsService(self, config.metrics.endpoint, reactor)
            self.metrics.setServiceParent(self)
        # One failure budget for every listener: a guesser gains nothing by switching ports.
        self.auth_failures = AuthFailureBudget(failure_budget_settings(config))
        self.listeners: list[ClientListener] = []
        # A worker accepts on the sockets its supervisor bound, in the listeners' order.
        listener_endpoints = list(inherited_listeners) or [None] * len(config.listeners)
        for listener, endpoint in zip(config.listeners, listener_endpoints, strict=True):
            client_listener = ClientListener(
                listener.endpoint, partial(self._client_factory, listener), reactor, endpoint
            )
            client_listener.setServiceParent(self)
            self.listeners.append(client_listener)
        self.tls_options: ssl.CertificateOptions | None = None  # loaded at start, for listeners
        self.ready: defer.Deferred = defer.Deferred()
        self._starting: defer.Deferred | None = None
        # Under twistd nobody waits on `ready`: the start is reported to twistd and the exit
        # status instead, and the log goes through `log_output`.
        self.start_report: StartReport | None = None
        self.log_output: LogOutput | None = None

    @property
    def database(self) -> IDatabase | None:
        return self.storage.database

    @property
    def core(self) -> ImCore | None:
        return self.im.core

    @property
    def pubsub(self) -> PubSub | None:
        return self.pubsub_host.pubsub if self.pubsub_host is not None else None

    @property
    def ports(self) -> list[IListeningPort]:
        return [listener.port for listener in self.listeners if listener.port is not None]

    @property
    def factories(self) -> list[C2SFactory]:
        return list(self.im.factories)

    def setServiceParent(self, parent: service.IServiceCollection) -> None:
        super().setServiceParent(parent)
        if self.log_output is not None:
            # twistd asks its application for a log observer before making its own.
            parent.setComponent(ILogObserver, self.log_output.observer)

    def startService(self) -> None:
        if self.start_report is not None:
            self.start_report.claim()
        service.Service.startService(self)
        self.ready = defer.Deferred()
        self._starting = defer.ensureDeferred(self._start())
        self._starting.addCallbacks(self._started, self._start_failed)

    def _started(self, result: "MimService") -> None:
        if self.start_report is not None:
            self.start_report.started()
            # Under twistd the process is the server's alone: its garbage collector is too.
            gctuning.tune_for_server()
        self.ready.callback(result)

    async def _start(self) -> "MimService":
        config = self.config
        # It holds the database and the self-signed certificate's key: owner only.
        permissions.secure_data_directory(config.data_dir)
        self.tls_options = load_tls_options(config)
        if config.tls.verify_peer and config.tls.allow_self_signed_client:
            log.warn(
                "tls.allow_self_signed_client: anyone can make a self-signed certificate for"
                " any JID; SASL EXTERNAL trusts them"
            )
        for child in list(self):
            if not self.running:
                break  # stopped while starting: the rest stays stopped
            await defer.maybeDeferred(child.startService)
        if not self.running:
            return self
        for listener in self.listeners:
            log.info(
                "Listening for XMPP clients on {address} (domains: {domains})",
                address=describe_address(listener.port.getHost()),
                domains=", ".join(config.server.domains),
            )
        return self

    def _client_factory(self, listener: ListenerConfig) -> C2SFactory:
        core = self.core
        factory = C2SFactory(
            self._c2s_settings(listener, self.tls_options),
            accounts=core.accounts,
            im=core.router,
            clock=self.reactor,
            mechanism_factory=self.create_sasl_mechanism,
            auth_failures=self.auth_failures,
        )
        self.im.attach(factory)
        return factory

    def _c2s_settings(self, listener: ListenerConfig, tls_options: object) -> C2SSettings:
        config = self.config
        mechanisms = tuple(config.auth.mechanisms)
        client_certificates = None
        if config.tls.verify_peer:
            # EXTERNAL first: a client that presented a certificate should prefer it (XEP-0178).
            # A stream is offered it only with a verified certificate.
            mechanisms = ("EXTERNAL", *mechanisms)
            client_certificates = tls.ClientCertificatePolicy(
                allow_self_signed=config.tls.allow_self_signed_client,
                disconnect_on_failure=config.tls.client_cert_failure == "disconnect",
            )
        common_name = config.auth.sasl_external_common_name
        return C2SSettings(
            domains=frozenset(config.server.domains),
            tls_options=tls_options,
            starttls_required=listener.starttls == "required",
            mechanisms=mechanisms,
            allow_plain_without_tls=config.auth.allow_plain_without_tls,
            max_failures=config.auth.max_failures,
            failure_delay=config.auth.failure_delay,
            max_stanza_size=config.limits.max_stanza_size,
            auth_timeout=config.limits.auth_timeout,
            max_outgoing_buffer=config.limits.max_outgoing_buffer,
            log_traffic=self.log_traffic,
            scram_iterations=config.auth.scram_iterations,
            max_read_rate=config.limits.max_read_rate,
            max_unbound_per_address=config.limits.max_unbound_per_address,
            stanza_timeout=config.limits.stanza_timeout,
            client_certificates=client_certificates,
            sasl_external=ExternalSettings(
                methods=config.auth.sasl_external,
                common_name_prefix=common_name.prefix,
                common_name_suffix=common_name.suffix,
                require_account=config.auth.cert_accounts == "existing",
                verifiers=self.verification_methods,
            ),
            failure_budget=failure_budget_settings(config),
        )

    def _start_failed(self, failure: Failure) -> None:
        if failure.check(*EXPECTED_START_ERRORS):
            # Some messages span lines (psycopg2's "...\n\tIs the server running...").
            reason = " ".join(failure.getErrorMessage().split())
            if failure.check(*DATABASE_ERRORS):
                reason = f"{self.config.storage.backend} storage: {reason}"
            log.error("mim-twisted could not start: {reason}", reason=reason)
        else:
            reason = f"{failure.type.__name__}: {failure.getErrorMessage()} (see the log)"
            log.failure("mim-twisted could not start", failure)
        if self.start_report is not None:
            self.start_report.failed(f"mim: could not start: {reason}")
        else:
            self.ready.errback(failure)

    def reload(self) -> None:
        """Re-read the config file and apply what can change while running (on SIGHUP): the TLS
        certificate, key and client CAs for new STARTTLS handshakes, and the log level."""
        try:
            new = load_config(self.config.source)
        except ConfigError as error:
            log.error("Reload refused, the running configuration stays: {error}", error=error)
            return
        running = self.config
        reloaded = []
        # Only the files change: whether client certificates are asked for stays as running.
        candidate = dataclasses.replace(
            running,
            tls=dataclasses.replace(
                running.tls,
                certificate=new.tls.certificate,
                private_key=new.tls.private_key,
                client_ca=new.tls.client_ca,
            ),
        )
        try:
            tls_options = load_tls_options(candidate)
        except EXPECTED_START_ERRORS as error:
            log.error("Reload: TLS files kept as they were: {error}", error=error)
        else:
            for factory in self.factories:
                # A stream keeps the settings it was made with: sessions already open are
                # unaffected, new connections get the new certificate.
                factory.settings = dataclasses.replace(factory.settings, tls_options=tls_options)
            running = candidate
            reloaded.append("TLS certificate, key and client CAs")
        if self.log_output is not None:
            self.log_output.set_level(new.log.level)
        running = dataclasses.replace(
            running, log=dataclasses.replace(running.log, level=new.log.level)
        )
        reloaded.append(f"log level {new.log.level}")
        self.config = running
        log.info("Reloaded {what}", what=", ".join(reloaded))
        restart = [key for key in changed_keys(running, new) if key not in RELOADABLE_KEYS]
        if restart:
            log.warn(
                "Changed in the config file, applied only after a restart: {keys}",
                keys=", ".join(restart),
            )

    def stopService(self) -> defer.Deferred:
        return defer.ensureDeferred(self._stop())

    async def _stop(self) -> None:
        service.Service.stopService(self)
        if self._starting is not None and not self._starting.called:
            # A child half started would be stopped before it is up: let the start settle
            # (it starts no further child once the server is no longer running).
            settled: defer.Deferred = defer.Deferred()
            self._starting.addBoth(lambda result: (settled.callback(None), result)[1])
            await settled
        for child in reversed(list(self)):
            if child.running:
                await defer.maybeDeferred(child.stopService)


def failure_budget_settings(config: Config) -> FailureBudgetSettings:
    return FailureBudgetSettings(
        address_failures=config.auth.address_failure_budget,
        account_failures=config.auth.account_failure_budget,
        window=config.auth.failure_window,
    )


def makeService(options: Options) -> MimService | WorkerSupervisor:
    try:
        config = load_config(options["config"])
        workers = options["workers"] or config.cluster.workers
        if options["worker"] is None:
            check_workers(config, workers)
    except ConfigError as e:
        # One line naming the file, key and reason, never a traceback.
        sys.exit(f"mim: {e}")
    if options["worker"] is not None:
        return _make_worker(options, config)
    # Logged before twistd starts its log, so it comes first when that log begins.
    log.info(
        "mim-twisted {version} starting with {config}",
        version=mim_twisted.__version__,
        config=config.source or "the embedded default configuration",
    )
    twistd_options = options.parent
    if workers > 1:
        supervisor = WorkerSupervisor(
            config,
            workers,
            partial(worker_command, options, config),
            prepare=partial(prepare_workers, config),
        )
        if twistd_options is not None:
            supervisor.start_report = StartReport(twistd_options, supervisor.reactor)
            supervisor.log_output = LogOutput(twistd_options, config.log.level, config.log.format)
            ReloadOnHangup(supervisor.reload).setServiceParent(supervisor)
        return supervisor
    server = MimService(config, log_traffic=options["log-traffic"])
    if twistd_options is not None:
        server.start_report = StartReport(twistd_options, server.reactor)
        server.log_output = LogOutput(twistd_options, config.log.level, config.log.format)
        ReloadOnHangup(server.reload).setServiceParent(server)
    return server


def prepare_workers(config: Config) -> None:
    """The data directory and the TLS files, made and checked once by the supervisor: workers
    starting together would each generate a self-signed certificate over the others'."""
    permissions.secure_data_directory(config.data_dir)
    try:
        load_tls_options(config)
    except TLSFilesError as error:
        raise WorkerStartFailed(f"mim: could not start: {error}") from None


def _make_worker(options: Options, config: Config) -> MimService:
    """One worker of a supervisor: its own node name, admin socket and metrics endpoint, the
    supervisor's sockets, its log in JSON lines for the supervisor to read, its start reported
    on the status pipe (see mim_twisted.workers)."""
    from twisted.internet import reactor

    end_with_parent()
    index = options["worker"]
    config = worker_config(config, index, options["cluster-node"] or config.cluster.node)
    inherited = [
        adopted_endpoint(reactor, FIRST_LISTENER_FD + offset)
        for offset in range(len(config.listeners))
    ]
    server = MimService(config, log_traffic=options["log-traffic"], inherited_listeners=inherited)
    twistd_options = options.parent
    if twistd_options is not None:
        server.start_report = StartReport(twistd_options, reactor, status_pipe=STATUS_FD)
        server.log_output = LogOutput(twistd_options, config.log.level, "json")
        ReloadOnHangup(server.reload).setServiceParent(server)
    return server
