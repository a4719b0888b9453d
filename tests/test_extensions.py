"""Finding extensions, enabling them in the config, and what the config accepts once they are in."""

import os

from twisted.internet.task import Clock
from twisted.trial import unittest
from zope.interface.verify import verifyObject

from mim_twisted.config import ConfigError, changed_keys, load_config
from mim_twisted.extensions import (
    ExtensionError,
    IMimExtension,
    ServerRegistry,
    install_extensions,
    installed_extensions,
)
from mim_twisted.storage.memory import MemoryDatabase
from mim_twisted.tap import ImCore, build_im_core
from tests.extensionsupport import (
    DROPIN,
    NS_RECORDER,
    add_dropin,
    add_example_extension,
)


def write(case: unittest.TestCase, content: str) -> str:
    path = os.path.abspath(case.mktemp()) + ".toml"
    with open(path, "w") as f:
        f.write(content)
    return path


class DiscoveryTests(unittest.TestCase):
    def test_none_installed(self) -> None:
        self.assertEqual(installed_extensions(), {})

    def test_a_dropin_elsewhere_on_the_path(self) -> None:
        add_dropin(self, "token_dropin", DROPIN.format(name="TokenLogin"))
        [extension] = installed_extensions()["token_login"]
        self.assertTrue(verifyObject(IMimExtension, extension))

    def test_the_example(self) -> None:
        add_example_extension(self)
        [extension] = installed_extensions()["entity_time"]
        self.assertTrue(verifyObject(IMimExtension, extension))

    def test_two_extensions_of_one_name(self) -> None:
        add_dropin(self, "token_one", DROPIN.format(name="TokenLogin"))
        add_dropin(self, "token_two", DROPIN.format(name="TokenLogin"))
        error = self.assertRaises(
            ExtensionError, install_extensions, ServerRegistry(), {"token_login": {}}
        )
        self.assertEqual(error.key, "extensions.token_login")
        self.assertIn("several installed extensions are named", str(error))


class ConfigTests(unittest.TestCase):
    def setUp(self) -> None:
        add_dropin(self, "token_dropin", DROPIN.format(name="TokenLogin"))
        add_dropin(self, "employee_dropin", DROPIN.format(name="EmployeeNumbers"))

    def refused(self, content: str) -> str:
        path = write(self, content)
        error = self.assertRaises(ConfigError, load_config, path)
        message = str(error)
        self.assertNotIn("\n", message)
        prefix = f"{path}: "
        self.assertTrue(message.startswith(prefix), message)
        return message[len(prefix) :]

    def test_an_extension_that_is_not_installed(self) -> None:
        self.assertEqual(
            self.refused("[extensions.entity_tme]\n"),
            'extensions.entity_tme: no extension "entity_tme" is installed'
            ' (installed: "employee_numbers", "token_login")',
        )

    def test_nothing_installed(self) -> None:
        self.patch(__import__("mim_twisted.plugins").plugins, "__path__", [])
        self.assertEqual(
            self.refused("[extensions.entity_time]\n"),
            'extensions.entity_time: no extension "entity_time" is installed (none is installed)',
        )

    def test_settings_must_be_a_table(self) -> None:
        self.assertEqual(
            self.refused("[extensions]\ntoken_login = 1\n"),
            "extensions.token_login: must be a table, written [extensions.token_login] (got 1)",
        )
        self.assertEqual(
            self.refused('extensions = "token_login"\n'),
            'extensions: must be a table of [extensions.NAME] tables (got "token_login")',
        )

    def test_settings_an_extension_refuses(self) -> None:
        add_example_extension(self)
        self.assertEqual(
            self.refused('[extensions.entity_time]\nutc_offset = "CET"\n'),
            "extensions.entity_time: utc_offset: must be an offset such as \"+01:00\" (got 'CET')",
        )
        self.assertEqual(
            self.refused("[extensions.entity_time]\nzone = 1\n"),
            "extensions.entity_time: unknown setting 'zone'",
        )

    def test_mechanisms_of_an_enabled_extension(self) -> None:
        config = load_config(
            write(
                self,
                '[auth]\nmechanisms = ["X-OAUTH2", "SCRAM-SHA-1"]\n'
                '[extensions.token_login]\ntokens = { alice = "t" }\n',
            )
        )
        self.assertEqual(config.auth.mechanisms, ("X-OAUTH2", "SCRAM-SHA-1"))
        self.assertEqual(config.extensions, {"token_login": {"tokens": {"alice": "t"}}})

    def test_mechanisms_of_an_extension_that_is_not_enabled(self) -> None:
        self.assertEqual(
            self.refused('[auth]\nmechanisms = ["X-OAUTH2"]\n'),
            "auth.mechanisms: must be a non-empty list of distinct values from"
            ' "SCRAM-SHA-256", "SCRAM-SHA-1", "PLAIN" (got ["X-OAUTH2"])',
        )

    def test_external_is_not_a_mechanism_to_list(self) -> None:
        self.assertIn("auth.mechanisms:", self.refused('[auth]\nmechanisms = ["EXTERNAL"]\n'))

    def test_verification_methods_of_an_enabled_extension(self) -> None:
        config = load_config(
            write(
                self,
                '[auth]\nsasl_external = ["employee_number", "standard"]\n'
                "[extensions.employee_numbers]\n",
            )
        )
        self.assertEqual(config.auth.sasl_external, ("employee_number", "standard"))
        self.assertIn(
            "auth.sasl_external:", self.refused('[auth]\nsasl_external = ["employee_number"]\n')
        )

    def test_changed_extensions_need_a_restart(self) -> None:
        path = write(self, "[extensions.employee_numbers]\n")
        old = load_config(path)
        with open(path, "a") as f:
            f.write("accounts = { 7 = 'x' }\n")
        new = load_config(path)
        self.assertEqual(changed_keys(old, new), ["extensions"])

    def test_each_load_has_its_own_registry(self) -> None:
        # Loading a config installs into a scratch registry, never into shared state.
        load_config(write(self, "[extensions.token_login]\ntokens = {}\n"))
        self.assertNotIn("X-OAUTH2", ServerRegistry().sasl_mechanisms)


class CoreTests(unittest.TestCase):
    """What extensions registered, in the IM core that build_im_core wires."""

    def setUp(self) -> None:
        self.registry = ServerRegistry()

    def core(self) -> ImCore:
        return build_im_core(load_config(None), MemoryDatabase(), Clock(), self.registry)

    def test_handlers_and_disco(self) -> None:
        def handler(session: object, iq: object, target: object) -> None:
            """An empty result."""

        self.registry.add_server_iq_handler("urn:example:x", "x", handler)
        self.registry.add_account_iq_handler(NS_RECORDER, "query", handler)
        self.registry.add_server_feature("urn:example:x")
        self.registry.add_server_identity("automation", "x")
        core = self.core()
        self.assertIs(core.router.server_iq["urn:example:x", "x"], handler)
        self.assertIs(core.router.account_iq[NS_RECORDER, "query"], handler)
        info = core.disco.server_info()
        self.assertIn("urn:example:x", info.features)
        self.assertIn(("automation", "x"), info.identities)
        self.assertIn(("server", "im"), info.identities)

    async def test_hooks_in_each_core(self) -> None:
        called: list[str] = []
        self.registry.add_hook("user_available", called.append)
        first = self.core()
        # A restarted server builds a new core: its hook table holds the extension's handler
        # once, and none of the handlers of the first core.
        second = self.core()
        self.assertIsNot(first.hooks, second.hooks)
        await second.hooks.run("user_available", "session")
        self.assertEqual(called, ["session"])
        self.assertFalse(second.hooks.has_handlers("no such hook"))

    def test_a_handler_may_not_replace_the_servers_own(self) -> None:
        self.registry.add_server_iq_handler("urn:xmpp:ping", "ping", print)
        error = self.assertRaises(ValueError, self.core)
        self.assertIn("{urn:xmpp:ping}ping", str(error))

    def test_handlers_are_unique(self) -> None:
        self.registry.add_server_iq_handler("urn:example:x", "x", print)
        self.assertRaises(
            ValueError, self.registry.add_server_iq_handler, "urn:example:x", "x", print
        )
