"""Extensions for the tests, and a way to make dropins visible to getPlugins for one test.

`add_dropin` writes a dropin module into a directory of the test's own and adds that directory
to the ``mim_twisted.plugins`` package, as twisted.plugin's path extension does for a dropin
that a separate distribution installed elsewhere on ``sys.path``.
"""

import os
import sys
from typing import Any

from twisted.application import service
from twisted.internet.defer import Deferred, fail, succeed
from twisted.trial import unittest
from zope.interface import implementer

from mim_twisted import hooks, plugins
from mim_twisted.auth import certs
from mim_twisted.auth.errors import SaslError
from mim_twisted.extensions import IMimExtension, ServerRegistry
from mim_twisted.xmpp.sasl.mechanism import ISaslMechanism, SaslContext, Success

EXAMPLE = os.path.join(os.path.dirname(os.path.dirname(__file__)), "examples", "mim-entity-time")


def add_plugin_directory(case: unittest.TestCase, directory: str) -> None:
    """Make the dropins in ``directory`` part of mim_twisted.plugins for this test."""
    case.patch(plugins, "__path__", [*plugins.__path__, directory])


def add_dropin(case: unittest.TestCase, module: str, source: str) -> None:
    """A dropin module ``mim_twisted.plugins.<module>`` holding ``source``, for this test."""
    directory = os.path.abspath(case.mktemp())
    os.makedirs(directory)
    with open(os.path.join(directory, f"{module}.py"), "w") as f:
        f.write(source)
    add_plugin_directory(case, directory)
    # Another test may have imported a module of that name from its own directory.
    case.addCleanup(sys.modules.pop, f"mim_twisted.plugins.{module}", None)


def add_example_extension(case: unittest.TestCase) -> None:
    """examples/mim-entity-time as if installed: its package importable, its dropin found."""
    case.patch(sys, "path", [*sys.path, EXAMPLE])
    add_plugin_directory(case, os.path.join(EXAMPLE, "mim_twisted", "plugins"))


# -- a SASL mechanism: X-OAUTH2 as slixmpp sends it, "\0username\0token" -----------------------


@implementer(ISaslMechanism)
class TokenMechanism:
    """Accepts ``\\0username\\0token`` when ``tokens[username] == token``."""

    name = "X-OAUTH2"
    tokens: dict[str, str] = {}

    def __init__(self, context: SaslContext) -> None:
        self.username: str | None = None

    def start(self, initial_response: bytes | None) -> Deferred:
        _, username, token = (initial_response or b"").decode().split("\0")
        self.username = username
        if self.tokens.get(username) != token:
            return fail(SaslError("not-authorized"))
        return succeed(Success(username))

    def respond(self, response: bytes) -> Deferred:
        return fail(SaslError("malformed-request", "X-OAUTH2 takes one message"))


@implementer(IMimExtension)
class TokenLogin:
    name = "token_login"

    def install(self, server: ServerRegistry, settings: dict[str, Any]) -> None:
        class ConfiguredTokenMechanism(TokenMechanism):
            tokens = dict(settings["tokens"])

        server.add_sasl_mechanism(ConfiguredTokenMechanism)


# -- a SASL EXTERNAL verification method: employee numbers in the CN ----------------------------


@implementer(IMimExtension)
class EmployeeNumbers:
    """``employee_number``: a certificate whose CN is ``employee-N`` is the account that the
    settings' ``accounts`` table gives for N."""

    name = "employee_numbers"

    def install(self, server: ServerRegistry, settings: dict[str, Any]) -> None:
        accounts = dict(settings.get("accounts", {}))

        def employee_number(claim: certs.ExternalClaim) -> certs.Identity | None:
            number = (claim.identities.common_name or "").removeprefix("employee-")
            if number not in accounts:
                return None
            return certs.Identity(accounts[number], claim.domain)

        server.add_verification_method("employee_number", employee_number)


# -- everything else: a hook, an IQ handler, disco entries, a child service, PubSub events -----

NS_RECORDER = "urn:example:recorder"


class RecorderService(service.Service):
    """Notes when it starts and stops: "started" once storage is open and before any client
    connects, "stopped" after the clients' sessions have ended and before storage closes."""

    def __init__(self, server: Any) -> None:
        self.server = server
        self.events: list[str] = []

    def startService(self) -> None:
        super().startService()
        early = self.server.database is None or self.server.ports
        self.events.append("started too early or late" if early else "started")

    def stopService(self) -> None:
        super().stopService()
        core = self.server.core
        done = self.server.database is not None and core is not None and not len(core.sessions)
        self.events.append("stopped" if done else "stopped too early or late")


@implementer(IMimExtension)
class Recorder:
    """Records what the server tells extensions; ``last`` is the latest installation."""

    name = "recorder"
    last: "Recorder | None" = None

    def install(self, server: ServerRegistry, settings: dict[str, Any]) -> None:
        Recorder.last = self
        self.available: list[str] = []
        self.pubsub_events: list[object] = []
        self.service = RecorderService(server)
        server.add_hook(hooks.USER_AVAILABLE, self.user_available)
        server.add_account_iq_handler(NS_RECORDER, "query", self.answer)
        server.add_account_feature(NS_RECORDER)
        server.add_server_identity("automation", "recorder", "Recorder")
        server.add_child_service(self.service)
        server.add_pubsub_observer(self.pubsub_events.append)

    def user_available(self, session: Any) -> None:
        self.available.append(session.jid.full())

    def answer(self, session: Any, iq: Any, target: Any) -> None:
        """An empty result."""


DROPIN = """from tests.extensionsupport import {name}

extension = {name}()
"""
