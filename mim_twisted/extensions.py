"""Extensions: what a third-party package adds to the server, and how the server finds it.

An extension is an object providing IMimExtension, made available by a twisted.plugin dropin
module in the ``mim_twisted.plugins`` package (a separate distribution ships
``mim_twisted/plugins/<its name>.py``; see that package). The server finds every installed one
with ``getPlugins`` and installs those the configuration enables with an ``[extensions.NAME]``
table, passing that table as the settings.

``install(server, settings)`` registers through the public methods of ServerRegistry: hooks,
IQ handlers, service discovery entries, SASL mechanisms, SASL EXTERNAL verification methods,
child services and PubSub event observers. It only registers: the configuration is checked by
installing the enabled extensions into a scratch registry first (to learn the names of their
mechanisms and methods), so ``install`` may run more than once and must not start anything.
"""

import json
from collections.abc import Callable, Iterable, Mapping
from typing import Any

from twisted.application.service import IService
from twisted.plugin import IPlugin, getPlugins
from zope.interface import Attribute

from mim_twisted import hooks
from mim_twisted.auth import certs
from mim_twisted.xmpp import sasl
from mim_twisted.xmpp.sasl.mechanism import ISaslMechanism, SaslContext

# `handler(session, iq, target)`, as the router calls it (see mim_twisted.im.router).
IqHandler = Callable[..., Any]
# `observer(event)` for each PubSub event (published, retracted, purged, deleted, ...).
PubSubObserver = Callable[[object], None]


class IMimExtension(IPlugin):
    """An extension of the server, enabled by an ``[extensions.NAME]`` table of the config."""

    name = Attribute("The name that the config's [extensions.NAME] table enables it by.")

    # zope.interface methods are declared without self.
    def install(server, settings):  # noqa: N805
        """Register what the extension adds through ``server``'s ServerRegistry methods.

        ``settings`` is the extension's config table as a dict. Raise ValueError (with a
        message naming the setting) when it is not usable: the start stops with that message
        after the file name and ``extensions.NAME``.
        """


class ExtensionError(Exception):
    """An enabled extension cannot be installed; ``key`` is the config key to blame."""

    def __init__(self, key: str, message: str) -> None:
        super().__init__(f"{key}: {message}")
        self.key = key


class ServerRegistry:
    """What one server is made of beyond its fixed core: the registration API of the server.

    Built-in SASL mechanisms and EXTERNAL verification methods are registered from the start;
    extensions add theirs, and everything else, through the ``add_*`` methods. The service
    maker reads the registrations when it wires the server.
    """

    def __init__(self) -> None:
        # (hook name, handler, priority), added to the hook table of each IM core built.
        self.hook_handlers: list[tuple[str, hooks.Handler, int]] = []
        self.server_iq_handlers: dict[tuple[str, str], IqHandler] = {}
        self.account_iq_handlers: dict[tuple[str, str], IqHandler] = {}
        self.server_features: list[str] = []
        self.account_features: list[str] = []
        self.server_identities: list[tuple[str, str, str | None]] = []
        self.account_identities: list[tuple[str, str, str | None]] = []
        self.sasl_mechanisms: dict[str, type] = dict(sasl.BUILTIN_MECHANISMS)
        self.verification_methods: dict[str, certs.VerificationMethod] = dict(
            certs.BUILTIN_VERIFICATION_METHODS
        )
        self.extension_services: list[IService] = []
        self.pubsub_observers: list[PubSubObserver] = []

    # -- the IM core -------------------------------------------------------------------------

    def add_hook(self, name: str, handler: hooks.Handler, priority: int = 50) -> None:
        """Run ``handler`` on the named hook (see mim_twisted.hooks for names and arguments);
        lower priorities run first, the built-in handlers have 50."""
        self.hook_handlers.append((name, handler, priority))

    def add_server_iq_handler(self, namespace: str, name: str, handler: IqHandler) -> None:
        """Answer IQ requests to a served domain whose payload is ``{namespace}name``."""
        _add_unique(self.server_iq_handlers, (namespace, name), handler, "server IQ handler")

    def add_account_iq_handler(self, namespace: str, name: str, handler: IqHandler) -> None:
        """Answer IQ requests to a local account's bare JID (or without 'to') whose payload is
        ``{namespace}name``."""
        _add_unique(self.account_iq_handlers, (namespace, name), handler, "account IQ handler")

    def add_server_feature(self, namespace: str) -> None:
        """Advertise ``namespace`` in the disco#info of the served domains."""
        self.server_features.append(namespace)

    def add_account_feature(self, namespace: str) -> None:
        """Advertise ``namespace`` in the disco#info of accounts."""
        self.account_features.append(namespace)

    def add_server_identity(self, category: str, type: str, name: str | None = None) -> None:
        self.server_identities.append((category, type, name))

    def add_account_identity(self, category: str, type: str, name: str | None = None) -> None:
        self.account_identities.append((category, type, name))

    # -- authentication ----------------------------------------------------------------------

    def add_sasl_mechanism(self, mechanism_class: type) -> None:
        """Make a SASL mechanism available to ``auth.mechanisms`` under its ``name``: a class
        called with a SaslContext for each attempt, whose instances provide ISaslMechanism."""
        if not ISaslMechanism.implementedBy(mechanism_class):
            raise TypeError(f"{mechanism_class!r} does not implement ISaslMechanism")
        _add_unique(self.sasl_mechanisms, mechanism_class.name, mechanism_class, "SASL mechanism")

    def add_verification_method(self, name: str, method: certs.VerificationMethod) -> None:
        """Make a SASL EXTERNAL verification method available to ``auth.sasl_external``; see
        mim_twisted.auth.certs for what ``method(claim)`` returns or raises."""
        _add_unique(self.verification_methods, name, method, "SASL EXTERNAL verification method")

    def create_sasl_mechanism(self, name: str, context: SaslContext) -> ISaslMechanism:
        """A fresh mechanism for one attempt; invalid-mechanism if ``name`` is unknown."""
        return sasl.create_mechanism(self.sasl_mechanisms, name, context)

    # -- services and events -----------------------------------------------------------------

    def add_child_service(self, child: IService) -> None:
        """Run ``child`` as a service of the server: started once storage is open and before
        the IM core and the listeners start, stopped after the client connections are closed
        and their work is done, before storage closes."""
        self.extension_services.append(child)

    def add_pubsub_observer(self, observer: PubSubObserver) -> None:
        """Call ``observer(event)`` with every event of the pubsub.<domain> services
        (mim_twisted.pubsub.core: NodeCreated, ItemPublished, ItemsRetracted, NodePurged, ...)."""
        self.pubsub_observers.append(observer)


def _add_unique(table: dict, key: Any, value: Any, what: str) -> None:
    if key in table:
        raise ValueError(f"a {what} {key!r} is already registered")
    table[key] = value


def installed_extensions() -> dict[str, list[IMimExtension]]:
    """Every extension whose dropin is installed, by name (a list: names may clash)."""
    from mim_twisted import plugins

    found: dict[str, list[IMimExtension]] = {}
    for extension in getPlugins(IMimExtension, plugins):
        found.setdefault(extension.name, []).append(extension)
    return found


def install_extensions(
    server: ServerRegistry,
    enabled: Mapping[str, Mapping[str, Any]],
    available: Mapping[str, list[IMimExtension]] | None = None,
) -> None:
    """Install each extension named in ``enabled`` (name -> settings) into ``server``.

    ``available`` is what installed_extensions() returns (found now when None). Raises
    ExtensionError naming the ``extensions.NAME`` key of a missing or unusable extension.
    """
    if not enabled:
        return
    if available is None:
        available = installed_extensions()
    for name, settings in enabled.items():
        key = f"extensions.{name}"
        candidates = available.get(name, [])
        if not candidates:
            raise ExtensionError(
                key, f"no extension {json.dumps(name)} is installed{_listing(available)}"
            )
        if len(candidates) > 1:
            modules = ", ".join(sorted(type(c).__module__ for c in candidates))
            raise ExtensionError(
                key, f"several installed extensions are named {json.dumps(name)}: {modules}"
            )
        try:
            candidates[0].install(server, dict(settings))
        except ValueError as error:
            raise ExtensionError(key, str(error)) from None


def _listing(available: Iterable[str]) -> str:
    names = ", ".join(json.dumps(name) for name in sorted(available))
    return f" (installed: {names})" if names else " (none is installed)"
