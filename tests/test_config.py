"""Tests for mim_twisted.config: defaults, the example file, and one-line errors."""

import dataclasses
import os
import socket

from cryptography.hazmat.primitives import serialization
from twisted.trial import unittest

from mim_twisted import config as config_module
from mim_twisted.config import Config, ConfigError, changed_keys, load_config
from tests.certfactory import Authority

# A CA certificate for tls.client_ca (any PEM certificate will do).
CA_PEM = Authority().certificate.public_bytes(serialization.Encoding.PEM)

EXAMPLE = os.path.join(
    os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "mim.toml.example"
)


class DefaultTests(unittest.TestCase):
    def test_no_file(self) -> None:
        config = load_config(None)
        data_dir = os.path.join(os.getcwd(), "mim-data")
        self.assertIsNone(config.source)
        self.assertEqual(config.server.domains, ("localhost",))
        self.assertEqual(config.data_dir, data_dir)
        self.assertEqual(len(config.listeners), 1)
        listener = config.listeners[0]
        self.assertEqual(
            (listener.address, listener.port, listener.starttls), ("127.0.0.1", 5222, "required")
        )
        self.assertEqual((config.tls.certificate, config.tls.private_key), ("", ""))
        self.assertFalse(config.tls.verify_peer)
        self.assertEqual(config.tls.client_ca, ())
        self.assertFalse(config.tls.allow_self_signed_client)
        self.assertEqual(config.tls.client_cert_failure, "no_external")
        self.assertEqual(config.auth.mechanisms, ("SCRAM-SHA-256", "SCRAM-SHA-1", "PLAIN"))
        self.assertFalse(config.auth.allow_plain_without_tls)
        self.assertEqual(config.auth.scram_iterations, 4096)
        self.assertEqual(config.auth.max_failures, 3)
        self.assertEqual(config.auth.failure_delay, 1.0)
        self.assertEqual(config.auth.sasl_external, ("standard",))
        self.assertEqual(config.auth.cert_accounts, "existing")
        common_name = config.auth.sasl_external_common_name
        self.assertEqual((common_name.prefix, common_name.suffix), ("", ""))
        self.assertFalse(config.registration.enabled)
        self.assertEqual(config.storage.backend, "sqlite")
        self.assertTrue(config.storage.auto_migrate)
        self.assertEqual(config.storage.sqlite.path, "")
        self.assertEqual(config.sqlite_path, os.path.join(data_dir, "mim.sqlite3"))
        self.assertEqual(config.storage.postgresql.dsn, "host=127.0.0.1 dbname=mim")
        self.assertEqual(config.storage.postgresql.pool_size, 8)
        self.assertEqual(
            config.storage.mysql.connect_options(),
            {"host": "127.0.0.1", "port": 3306, "database": "mim", "user": "mim", "password": ""},
        )
        self.assertEqual(config.storage.mysql.pool_size, 4)
        self.assertEqual(config.limits.max_stanza_size, 262144)
        self.assertEqual(config.limits.auth_timeout, 30.0)
        self.assertEqual(config.limits.max_outgoing_buffer, 4194304)
        self.assertFalse(config.log.traffic)
        self.assertEqual((config.log.level, config.log.format), ("info", "text"))

    def test_example_documents_the_defaults(self) -> None:
        example = load_config(EXAMPLE)
        self.assertEqual(example.source, EXAMPLE)
        self.assertEqual(example.data_dir, os.path.join(os.path.dirname(EXAMPLE), "mim-data"))
        # Apart from where relative paths point, the example is the embedded default.
        default = load_config(None)
        server = dataclasses.replace(example.server, data_dir=default.data_dir)
        self.assertEqual(dataclasses.replace(example, source=None, server=server), default)

    def test_frozen(self) -> None:
        config = load_config(None)
        with self.assertRaises(dataclasses.FrozenInstanceError):
            config.limits.max_stanza_size = 1  # type: ignore[misc]
        changed = dataclasses.replace(
            config, limits=dataclasses.replace(config.limits, max_stanza_size=2048)
        )
        self.assertEqual(changed.limits.max_stanza_size, 2048)


def write(test: unittest.TestCase, content: str | bytes, name: str = "mim.toml") -> str:
    """Write content to a new file under a fresh temporary directory; return its path."""
    directory = test.mktemp()
    os.makedirs(directory)
    path = os.path.join(directory, name)
    with open(path, "wb") as f:
        f.write(content.encode() if isinstance(content, str) else content)
    return path


class ValueTests(unittest.TestCase):
    def load(self, content: str) -> Config:
        return load_config(write(self, content))

    def test_domains_normalised(self) -> None:
        config = self.load('[server]\ndomains = ["Example.COM", "example.org.", "MÜNCHEN.de"]\n')
        self.assertEqual(config.server.domains, ("example.com", "example.org", "münchen.de"))

    def test_listeners(self) -> None:
        config = self.load(
            '[[listeners]]\nport = 0\n\n[[listeners]]\naddress = "::0001"\nstarttls = "optional"\n'
            '\n[[listeners]]\naddress = "localhost"\n'
        )
        self.assertEqual(
            [(item.address, item.port, item.starttls) for item in config.listeners],
            [
                ("127.0.0.1", 0, "required"),
                ("::1", 5222, "optional"),
                ("localhost", 5222, "required"),
            ],
        )
        # The address and port keys are the short form of an endpoint string with a backlog.
        self.assertEqual(
            [item.endpoint for item in config.listeners],
            [
                "tcp:0:interface=127.0.0.1:backlog=1024",
                "tcp6:5222:interface=\\:\\:1:backlog=1024",
                "tcp:5222:interface=localhost:backlog=1024",
            ],
        )

    def test_listener_endpoints(self) -> None:
        config = self.load(
            '[[listeners]]\nendpoint = "tcp:5222:interface=127.0.0.1"\n'
            '[[listeners]]\nendpoint = "unix:/tmp/mim.sock:mode=600"\n'
            '[[listeners]]\nendpoint = "tcp6:5223:backlog=4096"\n'
            '[[listeners]]\nendpoint = "systemd:domain=INET:index=0"\n'
        )
        self.assertEqual(
            [item.endpoint for item in config.listeners],
            [
                # The same string as the default address and port give.
                "tcp:5222:interface=127.0.0.1:backlog=1024",
                "unix:/tmp/mim.sock:mode=600:backlog=1024",
                "tcp6:5223:backlog=4096",  # a backlog written stays
                "systemd:domain=INET:index=0",  # systemd's unit sets its backlog
            ],
        )

    def test_mechanism_order_kept(self) -> None:
        config = self.load('[auth]\nmechanisms = ["PLAIN", "SCRAM-SHA-1"]\n')
        self.assertEqual(config.auth.mechanisms, ("PLAIN", "SCRAM-SHA-1"))

    def test_integer_accepted_for_seconds(self) -> None:
        config = self.load("[limits]\nauth_timeout = 5\n[auth]\nfailure_delay = 0\n")
        self.assertEqual(config.limits.auth_timeout, 5.0)
        self.assertIsInstance(config.limits.auth_timeout, float)
        self.assertEqual(config.auth.failure_delay, 0.0)

    def test_client_certificates(self) -> None:
        ca = os.path.abspath(write(self, CA_PEM, name="ca.pem"))
        config = self.load(
            f'[tls]\nverify_peer = true\nclient_ca = ["{ca}"]\nclient_cert_failure = "disconnect"\n'
            '[auth]\nsasl_external = ["common_name", "standard"]\ncert_accounts = "auto"\n'
            '[auth.sasl_external_common_name]\nprefix = "cert-"\n'
        )
        self.assertEqual(config.tls.client_ca, (ca,))
        self.assertEqual(config.tls.client_cert_failure, "disconnect")
        self.assertEqual(config.auth.sasl_external, ("common_name", "standard"))
        self.assertEqual(config.auth.cert_accounts, "auto")
        self.assertEqual(config.auth.sasl_external_common_name.prefix, "cert-")

    def test_self_signed_clients_need_no_ca(self) -> None:
        config = self.load("[tls]\nverify_peer = true\nallow_self_signed_client = true\n")
        self.assertEqual(config.tls.client_ca, ())

    def test_auto_migrate_follows_backend(self) -> None:
        self.assertFalse(self.load('[storage]\nbackend = "postgresql"\n').storage.auto_migrate)
        self.assertFalse(self.load('[storage]\nbackend = "mysql"\n').storage.auto_migrate)
        config = self.load('[storage]\nbackend = "postgresql"\nauto_migrate = true\n')
        self.assertTrue(config.storage.auto_migrate)
        self.assertFalse(self.load("[storage]\nauto_migrate = false\n").storage.auto_migrate)

    def test_mysql_over_a_unix_socket(self) -> None:
        config = self.load(
            '[storage]\nbackend = "mysql"\n'
            '[storage.mysql]\nunix_socket = "/run/mysqld/mysqld.sock"\n'
            'database = "chat"\nuser = "mim"\npassword = "secret"\npool_size = 8\n'
        )
        self.assertEqual(
            config.storage.mysql.connect_options(),
            {
                "unix_socket": "/run/mysqld/mysqld.sock",
                "database": "chat",
                "user": "mim",
                "password": "secret",
            },
        )
        self.assertEqual(config.storage.pool_size, 8)


class PathTests(unittest.TestCase):
    def test_relative_to_config_file(self) -> None:
        directory = os.path.abspath(self.mktemp())
        os.makedirs(directory)
        # The key is given as an absolute path, which is kept as it is.
        key = os.path.join(self.mktemp(), "key.pem")
        os.makedirs(os.path.dirname(key))
        for name in (os.path.join(directory, "cert.pem"), key):
            with open(name, "w"):
                pass
        path = os.path.join(directory, "mim.toml")
        with open(path, "w") as f:
            f.write(
                '[server]\ndata_dir = "data"\n[storage.sqlite]\npath = "db/mim.db"\n'
                f'[tls]\ncertificate = "cert.pem"\nprivate_key = "{os.path.abspath(key)}"\n'
            )
        # Loaded through a relative path, from another directory than the file's.
        config = load_config(os.path.relpath(path))
        self.assertEqual(config.data_dir, os.path.join(directory, "data"))
        self.assertEqual(config.sqlite_path, os.path.join(directory, "db", "mim.db"))
        self.assertEqual(config.tls.certificate, os.path.join(directory, "cert.pem"))
        self.assertEqual(config.tls.private_key, os.path.abspath(key))

    def test_default_sqlite_path_in_data_dir(self) -> None:
        path = write(self, '[server]\ndata_dir = "/srv/./mim"\n')
        self.assertEqual(load_config(path).sqlite_path, "/srv/mim/mim.sqlite3")


class ErrorTests(unittest.TestCase):
    def assertError(self, content: str | bytes, expected: str) -> None:
        """Loading content fails with exactly one line: the file name, then expected."""
        path = write(self, content)
        with self.assertRaises(ConfigError) as caught:
            load_config(path)
        self.assertEqual(str(caught.exception), f"{path}: {expected}")
        self.assertNotIn("\n", str(caught.exception))

    def test_unknown_key_top_level(self) -> None:
        self.assertError("bogus = 1\n", 'unknown key "bogus"')
        self.assertError("[bogus]\n", 'unknown key "bogus"')

    def test_unknown_key_nested(self) -> None:
        self.assertError('[storage]\nbakend = "sqlite"\n', 'unknown key "storage.bakend"')
        self.assertError('[storage.sqlite]\npaht = "x"\n', 'unknown key "storage.sqlite.paht"')
        self.assertError(
            "[[listeners]]\nport = 1\n[[listeners]]\nprot = 2\n", 'unknown key "listeners[1].prot"'
        )

    def test_listener_endpoint(self) -> None:
        wanted = 'must be an endpoint string: "tcp:...", "tcp6:...", "unix:...", "systemd:..."'
        self.assertError(
            '[[listeners]]\nendpoint = "ssl:5223"\n',
            f'listeners[0].endpoint: {wanted} (got "ssl:5223")',
        )
        self.assertError(
            "[[listeners]]\nendpoint = 5222\n", f"listeners[0].endpoint: {wanted} (got 5222)"
        )
        self.assertError(
            '[[listeners]]\nendpoint = "tcp:http"\n',
            "listeners[0].endpoint: is not a valid endpoint string (invalid literal for int()"
            " with base 10: 'http') (got \"tcp:http\")",
        )
        self.assertError(
            '[[listeners]]\nport = 5223\nendpoint = "tcp:5222"\n',
            "listeners[0].endpoint: names the address and port: do not set those too",
        )

    def test_wrong_type(self) -> None:
        self.assertError(
            '[limits]\nmax_stanza_size = "big"\n',
            'limits.max_stanza_size: must be an integer >= 1024 (got "big")',
        )
        self.assertError(
            "[limits]\nmax_stanza_size = true\n",
            "limits.max_stanza_size: must be an integer >= 1024 (got true)",
        )
        self.assertError(
            '[log]\ntraffic = "yes"\n', 'log.traffic: must be true or false (got "yes")'
        )
        self.assertError("storage = 5\n", "storage: must be a table (got 5)")
        self.assertError(
            "[listeners]\nport = 1\n",
            "listeners: must be a non-empty array of tables, written [[listeners]] (got a table)",
        )
        self.assertError(
            "[[listeners]]\naddress = 1\n",
            'listeners[0].address: must be an IPv4 or IPv6 address, or "localhost" (got 1)',
        )

    def test_bad_enum(self) -> None:
        self.assertError(
            '[storage]\nbackend = "oracle"\n',
            'storage.backend: must be one of "sqlite", "postgresql", "mysql" (got "oracle")',
        )
        self.assertError(
            '[auth]\nmechanisms = ["PLAIN", "DIGEST-MD5"]\n',
            'auth.mechanisms: must be a non-empty list of distinct values from "SCRAM-SHA-256", '
            '"SCRAM-SHA-1", "PLAIN" (got ["PLAIN", "DIGEST-MD5"])',
        )
        self.assertError(
            '[auth]\nmechanisms = ["PLAIN", "PLAIN"]\n',
            'auth.mechanisms: must be a non-empty list of distinct values from "SCRAM-SHA-256", '
            '"SCRAM-SHA-1", "PLAIN" (got ["PLAIN", "PLAIN"])',
        )

    def test_bad_log_settings(self) -> None:
        self.assertError(
            '[log]\nlevel = "trace"\n',
            'log.level: must be one of "debug", "info", "warn", "error" (got "trace")',
        )
        self.assertError(
            '[log]\nformat = "xml"\n', 'log.format: must be one of "text", "json" (got "xml")'
        )

    def test_out_of_range(self) -> None:
        self.assertError(
            "[[listeners]]\nport = 70000\n",
            "listeners[0].port: must be an integer 0..65535 (got 70000)",
        )
        self.assertError(
            "[auth]\nscram_iterations = 1000\n",
            "auth.scram_iterations: must be an integer >= 4096 (got 1000)",
        )
        self.assertError(
            "[limits]\nauth_timeout = 0\n", "limits.auth_timeout: must be a number > 0 (got 0)"
        )
        self.assertError(
            "[auth]\nfailure_delay = -0.5\n",
            "auth.failure_delay: must be a number >= 0 (got -0.5)",
        )
        self.assertError(
            "[limits]\nauth_timeout = inf\n", "limits.auth_timeout: must be a number > 0 (got inf)"
        )
        self.assertError(
            "[storage.postgresql]\npool_size = 101\n",
            "storage.postgresql.pool_size: must be an integer 1..100 (got 101)",
        )
        self.assertError(
            "[storage.mysql]\npool_size = 0\n",
            "storage.mysql.pool_size: must be an integer 1..100 (got 0)",
        )
        self.assertError(
            "[storage.mysql]\nport = 0\n", "storage.mysql.port: must be an integer 1..65535 (got 0)"
        )
        self.assertError(
            '[storage.mysql]\ndatabase = ""\n',
            'storage.mysql.database: must be a non-empty string (got "")',
        )

    def test_bad_domain(self) -> None:
        self.assertError(
            '[server]\ndomains = ["localhost", "a b"]\n',
            'server.domains: "a b" is not a valid domain name (got ["localhost", "a b"])',
        )
        self.assertError(
            '[server]\ndomains = ["a..b"]\n',
            'server.domains: "a..b" is not a valid domain name (got ["a..b"])',
        )
        self.assertError(
            "[server]\ndomains = []\n",
            "server.domains: must be a non-empty list of domain names (got [])",
        )

    def test_duplicate_domain(self) -> None:
        self.assertError(
            '[server]\ndomains = ["example.com", "Example.COM."]\n',
            'server.domains: "example.com" is listed twice (got ["example.com", "Example.COM."])',
        )

    def test_bad_address(self) -> None:
        self.assertError(
            '[[listeners]]\naddress = "example.com"\n',
            'listeners[0].address: must be an IPv4 or IPv6 address, or "localhost" '
            '(got "example.com")',
        )

    def test_bad_toml_syntax(self) -> None:
        self.assertError(
            '[server]\ndomains = ["localhost"]\ndata_dir = \n',
            "line 3, column 12: invalid TOML (Invalid value)",
        )
        self.assertError(
            "x = 1\nx = 2\n", "line 2, column 6: invalid TOML (Cannot overwrite a value)"
        )
        self.assertError('x = "open\n', "line 1, column 10: invalid TOML (Illegal character '\\n')")

    def test_bad_toml_at_end(self) -> None:
        self.assertError('x = "open', "invalid TOML (Unterminated string (at end of document))")

    def test_not_utf8(self) -> None:
        self.assertError(b'x = "\xff"\n', "invalid TOML (not UTF-8 at byte 5)")

    def test_missing_file(self) -> None:
        path = os.path.join(os.path.abspath(self.mktemp()), "mim.toml")
        with self.assertRaises(ConfigError) as caught:
            load_config(path)
        self.assertEqual(
            str(caught.exception), f"{path}: cannot read file (No such file or directory)"
        )

    def test_certificate_without_key(self) -> None:
        path = os.path.abspath(write(self, "", name="cert.pem"))
        self.assertError(
            f'[tls]\ncertificate = "{path}"\n',
            "tls.private_key: must be set when tls.certificate is set",
        )
        self.assertError(
            f'[tls]\nprivate_key = "{path}"\n',
            "tls.certificate: must be set when tls.private_key is set",
        )

    def test_client_ca_required_with_verify_peer(self) -> None:
        self.assertError(
            "[tls]\nverify_peer = true\n",
            "tls.client_ca: must name a CA file when tls.verify_peer is true"
            " (unless tls.allow_self_signed_client is true)",
        )

    def test_client_ca_not_a_certificate(self) -> None:
        path = os.path.abspath(write(self, "not a certificate", name="ca.pem"))
        self.assertError(
            f'[tls]\nclient_ca = ["{path}"]\n',
            f'tls.client_ca: no PEM certificate in {path} (got ["{path}"])',
        )
        self.assertError(
            f'[tls]\nclient_ca = "{path}"\n',
            f'tls.client_ca: must be a list of PEM certificate files (got "{path}")',
        )

    def test_client_cert_failure(self) -> None:
        self.assertError(
            '[tls]\nclient_cert_failure = "ignore"\n',
            'tls.client_cert_failure: must be one of "no_external", "disconnect" (got "ignore")',
        )

    def test_unknown_verification_method(self) -> None:
        self.assertError(
            '[auth]\nsasl_external = ["standard", "use_common_name"]\n',
            "auth.sasl_external: must be a non-empty list of distinct values from "
            '"standard", "common_name", "auth_id" (got ["standard", "use_common_name"])',
        )

    def test_cert_accounts(self) -> None:
        self.assertError(
            '[auth]\ncert_accounts = "pki"\n',
            'auth.cert_accounts: must be one of "existing", "auto" (got "pki")',
        )

    def test_certificate_file_missing(self) -> None:
        path = write(self, "", name="key.pem")
        missing = os.path.join(os.path.dirname(os.path.abspath(path)), "cert.pem")
        self.assertError(
            f'[tls]\ncertificate = "{missing}"\nprivate_key = "{path}"\n',
            f'tls.certificate: file not found: {missing} (got "{missing}")',
        )


class ChangedKeysTests(unittest.TestCase):
    """What a reload reports: the dotted keys whose values differ."""

    def test_same_config(self) -> None:
        self.assertEqual(changed_keys(load_config(None), load_config(None)), [])

    def test_nested_and_listener_keys(self) -> None:
        old = load_config(None)
        new = load_config(
            write(
                self,
                '[log]\nlevel = "debug"\n[storage.postgresql]\npool_size = 2\n'
                "[[listeners]]\nport = 5223\n[server]\ndata_dir = 'elsewhere'\n",
            )
        )
        self.assertEqual(
            changed_keys(old, new),
            ["server.data_dir", "listeners", "storage.postgresql.pool_size", "log.level"],
        )


class OperatorConfigTests(unittest.TestCase):
    """[admin] and [metrics]."""

    assertError = ErrorTests.assertError

    def test_defaults(self) -> None:
        config = load_config(None)
        self.assertTrue(config.admin.enabled)
        self.assertEqual(config.admin_socket, os.path.join(os.getcwd(), "mim-data", "admin.sock"))
        self.assertFalse(config.metrics.enabled)
        self.assertEqual(config.metrics.endpoint, "tcp:9090:interface=127.0.0.1")

    def test_admin_socket_path(self) -> None:
        config = load_config(write(self, '[admin]\nsocket = "/run/mim/admin.sock"\n'))
        self.assertEqual(config.admin_socket, "/run/mim/admin.sock")

    def test_admin_socket_too_long(self) -> None:
        long_path = "/" + "x" * 107
        self.assertError(
            f'[admin]\nsocket = "{long_path}"\n',
            f'admin.socket: is too long for a UNIX socket (at most 107 bytes) (got "{long_path}")',
        )

    def test_metrics_endpoint_not_an_endpoint(self) -> None:
        self.assertError(
            '[metrics]\nendpoint = "9090"\n',
            'metrics.endpoint: must be an endpoint string such as "tcp:9090:interface=127.0.0.1"'
            ' (got "9090")',
        )


class ClusterConfigTests(unittest.TestCase):
    """[cluster]: off by default; on, it needs the shared PostgreSQL database."""

    assertError = ErrorTests.assertError

    def test_defaults(self) -> None:
        cluster = load_config(None).cluster
        self.assertFalse(cluster.enabled)
        self.assertEqual(cluster.node, f"{socket.gethostname()}.{os.getpid()}")
        self.assertEqual((cluster.rabbit.host, cluster.rabbit.port), ("127.0.0.1", 5672))
        self.assertEqual((cluster.node_timeout, cluster.heartbeat_interval), (30.0, 10.0))
        self.assertEqual(cluster.max_buffered_messages, 10000)

    def test_broker_keys_are_the_event_pushers(self) -> None:
        config = load_config(
            write(
                self,
                '[storage]\nbackend = "postgresql"\n[cluster]\nenabled = true\nnode = "n1"\n'
                'node_timeout = 3\nrabbit = { port = 5673, username = "u", tls = true }\n',
            )
        )
        cluster = config.cluster
        self.assertEqual((cluster.node, cluster.heartbeat_interval), ("n1", 1.0))
        self.assertEqual((cluster.rabbit.port, cluster.rabbit.username), (5673, "u"))
        self.assertTrue(cluster.rabbit.tls)

    def test_needs_postgresql(self) -> None:
        self.assertError(
            "[cluster]\nenabled = true\n",
            'cluster.enabled: needs storage.backend = "postgresql" (got "sqlite")',
        )

    def test_wrong_values_name_the_key(self) -> None:
        self.assertError(
            "[cluster]\nrabbit = { port = 0 }\n",
            "cluster.rabbit.port: must be an integer 1..65535 (got 0)",
        )
        self.assertError(
            "[cluster]\nrabbit = { confirms = true }\n",
            'unknown key "cluster.rabbit.confirms"',
        )
        self.assertError(
            "[cluster]\nnode_timeout = 5\nheartbeat_interval = 5\n",
            "cluster.heartbeat_interval: must be less than node_timeout (5.0)",
        )


class EventPusherConfigTests(unittest.TestCase):
    """[event_pusher.rabbit], with MongooseIM's option names and defaults."""

    assertError = ErrorTests.assertError

    def test_defaults(self) -> None:
        rabbit = load_config(None).event_pusher.rabbit
        self.assertFalse(rabbit.enabled)
        self.assertEqual((rabbit.host, rabbit.port, rabbit.virtual_host), ("127.0.0.1", 5672, "/"))
        self.assertEqual((rabbit.username, rabbit.password), ("guest", "guest"))
        self.assertFalse(rabbit.tls)
        self.assertTrue(rabbit.confirms)
        self.assertEqual(rabbit.max_buffered_events, 100000)
        self.assertEqual(
            (rabbit.presence_exchange.name, rabbit.presence_exchange.type), ("presence", "topic")
        )
        chat, group = rabbit.chat_msg_exchange, rabbit.groupchat_msg_exchange
        self.assertEqual(
            (chat.name, chat.type, chat.sent_topic, chat.recv_topic),
            ("chat_msg", "topic", "chat_msg_sent", "chat_msg_recv"),
        )
        self.assertEqual(
            (group.name, group.type, group.sent_topic, group.recv_topic),
            ("groupchat_msg", "topic", "groupchat_msg_sent", "groupchat_msg_recv"),
        )

    def test_one_exchange_key_changed(self) -> None:
        config = load_config(
            write(self, '[event_pusher.rabbit]\nchat_msg_exchange = { type = "direct" }\n')
        )
        chat = config.event_pusher.rabbit.chat_msg_exchange
        self.assertEqual(
            (chat.name, chat.type, chat.sent_topic), ("chat_msg", "direct", "chat_msg_sent")
        )

    def test_wrong_values_name_the_key(self) -> None:
        self.assertError(
            "[event_pusher.rabbit]\nport = 0\n",
            "event_pusher.rabbit.port: must be an integer 1..65535 (got 0)",
        )
        self.assertError(
            "[event_pusher.rabbit]\nmax_buffered_events = 0\n",
            "event_pusher.rabbit.max_buffered_events: must be an integer >= 1 (got 0)",
        )
        self.assertError(
            '[event_pusher.rabbit]\ngroupchat_msg_exchange = { name = "" }\n',
            "event_pusher.rabbit.groupchat_msg_exchange.name: must be a non-empty string of at"
            ' most 255 bytes (got "")',
        )
        self.assertError(
            '[event_pusher.rabbit]\npresence_exchange = { sent_topic = "x" }\n',
            'unknown key "event_pusher.rabbit.presence_exchange.sent_topic"',
        )
        self.assertError(
            '[event_pusher.rabbit]\nenabled = "yes"\n',
            'event_pusher.rabbit.enabled: must be true or false (got "yes")',
        )

    def test_enabled_without_pika(self) -> None:
        real_find_spec = config_module.importlib.util.find_spec

        def find_spec(name: str, *args: object) -> object:
            return None if name == "pika" else real_find_spec(name, *args)

        self.patch(config_module.importlib.util, "find_spec", find_spec)
        self.assertError(
            "[event_pusher.rabbit]\nenabled = true\n",
            "event_pusher.rabbit.enabled: the event pusher needs pika, which is not installed:"
            " pip install 'mim-twisted[rabbitmq]'",
        )


class DriverTests(unittest.TestCase):
    def test_postgresql_without_its_driver(self) -> None:
        self.patch(config_module, "DRIVERS", {"postgresql": ("psycopg2", "mim_no_such_driver")})
        path = write(self, '[storage]\nbackend = "postgresql"\n')
        with self.assertRaises(ConfigError) as caught:
            load_config(path)
        self.assertEqual(
            str(caught.exception),
            f'{path}: storage.backend: "postgresql" needs mim_no_such_driver, which are not'
            " installed: pip install 'mim-twisted[postgresql]'",
        )

    def test_mysql_without_its_driver(self) -> None:
        self.patch(config_module, "DRIVERS", {"mysql": ("mim_no_such_driver",)})
        path = write(self, '[storage]\nbackend = "mysql"\n')
        with self.assertRaises(ConfigError) as caught:
            load_config(path)
        self.assertEqual(
            str(caught.exception),
            f'{path}: storage.backend: "mysql" needs mim_no_such_driver, which are not'
            " installed: pip install 'mim-twisted[mysql]'",
        )

    def test_sqlite_needs_no_driver(self) -> None:
        self.patch(
            config_module,
            "DRIVERS",
            {"postgresql": ("mim_no_such_driver",), "mysql": ("mim_no_such_driver",)},
        )
        self.assertEqual(load_config(None).storage.backend, "sqlite")


class ModulesConfigTests(unittest.TestCase):
    """[modules]: one switch per IM extension, all on by default."""

    assertError = ErrorTests.assertError

    def test_defaults(self) -> None:
        modules = load_config(None).modules
        self.assertEqual((modules.carbons, modules.blocking, modules.last), (True, True, True))

    def test_switched_off(self) -> None:
        path = write(self, "[modules]\ncarbons = false\nlast = false\n")
        modules = load_config(path).modules
        self.assertEqual((modules.carbons, modules.blocking, modules.last), (False, True, False))

    def test_not_a_boolean(self) -> None:
        self.assertError(
            '[modules]\nblocking = "yes"\n', 'modules.blocking: must be true or false (got "yes")'
        )


class PrivateAndVCardConfigTests(unittest.TestCase):
    """[modules] private and vcard, and the size limits of their tables."""

    assertError = ErrorTests.assertError

    def test_defaults(self) -> None:
        config = load_config(None)
        self.assertEqual((config.modules.private, config.modules.vcard), (True, True))
        self.assertEqual((config.private.max_size, config.vcard.max_size), (65536, 131072))

    def test_switched_off_and_limits_set(self) -> None:
        path = write(
            self,
            "[modules]\nprivate = false\nvcard = false\n"
            "[private]\nmax_size = 1000\n[vcard]\nmax_size = 2000\n",
        )
        config = load_config(path)
        self.assertEqual((config.modules.private, config.modules.vcard), (False, False))
        self.assertEqual((config.private.max_size, config.vcard.max_size), (1000, 2000))

    def test_a_limit_is_a_positive_integer(self) -> None:
        self.assertError(
            "[vcard]\nmax_size = 0\n", "vcard.max_size: must be an integer >= 1 (got 0)"
        )
        self.assertError(
            '[private]\nmax_size = "64k"\n',
            'private.max_size: must be an integer >= 1 (got "64k")',
        )
