"""The installed `twistd mim` command: help text, a bad config, a real start with a login,
failed starts in the foreground and as a daemon, SIGHUP and the log."""

import hashlib
import json
import os
import signal
import socket
import ssl
import sys
import xml.etree.ElementTree as ET

from twisted.internet import defer, error, protocol, reactor
from twisted.internet.endpoints import TCP4ClientEndpoint
from twisted.internet.utils import getProcessOutputAndValue
from twisted.python.failure import Failure
from twisted.trial import unittest

import mim_twisted
from mim_twisted.auth.scram import derive_all
from mim_twisted.storage import migrations, open_database
from mim_twisted.xmpp.tls import SELF_SIGNED_NAME, generate_self_signed, load_certificates
from tests.e2e.harness import (
    STREAM_HEADER,
    Client,
    RawClient,
    eventually,
    free_port,
    require_asyncio_reactor,
    wait_for,
)

TWISTD = os.path.join(os.path.dirname(sys.executable), "twistd")


class ProcessOutput(protocol.ProcessProtocol):
    """Collects a child process's output; `ended` fires with how it ended."""

    def __init__(self) -> None:
        self.output = b""
        self.ended: defer.Deferred = defer.Deferred()

    def text(self) -> str:
        return self.output.decode("utf-8", "replace")

    def outReceived(self, data: bytes) -> None:
        self.output += data

    errReceived = outReceived

    def processEnded(self, reason: Failure) -> None:
        self.ended.callback(reason.value)


async def _wait_until_listening(port: int, process: ProcessOutput, seconds: float = 20.0) -> None:
    endpoint_factory = protocol.Factory.forProtocol(protocol.Protocol)
    for _ in range(int(seconds * 10)):
        if process.ended.called:
            raise AssertionError(f"twistd exited early:\n{process.text()}")
        try:
            connection = await TCP4ClientEndpoint(reactor, "127.0.0.1", port).connect(
                endpoint_factory
            )
            connection.transport.loseConnection()
            return
        except error.ConnectError:
            await _sleep(0.1)
    raise AssertionError(f"twistd did not listen on {port}:\n{process.text()}")


def _sleep(seconds: float) -> defer.Deferred:
    d: defer.Deferred = defer.Deferred()
    reactor.callLater(seconds, d.callback, None)
    return d


class TwistdTests(unittest.TestCase):
    async def test_help_lists_the_options(self) -> None:
        out, err, code = await getProcessOutputAndValue(TWISTD, ["mim", "--help"], env=os.environ)
        self.assertEqual(code, 0, err)
        self.assertIn(b"--config", out)
        self.assertIn(b"--log-traffic", out)

    async def test_bad_config_stops_the_start_with_one_line(self) -> None:
        path = os.path.abspath(self.mktemp())
        with open(path, "w") as f:
            f.write('[storage]\nbackend = "oracle"\n')
        out, err, code = await getProcessOutputAndValue(
            TWISTD, ["-n", "--pidfile=", "mim", "-c", path], env=os.environ
        )
        self.assertNotEqual(code, 0)
        self.assertEqual(
            err.decode().strip(),
            f'mim: {path}: storage.backend: must be one of "sqlite", "postgresql", "mysql"'
            ' (got "oracle")',
        )

    async def test_start_and_login(self) -> None:
        require_asyncio_reactor()
        directory = os.path.abspath(self.mktemp())
        os.makedirs(directory)
        port = free_port()
        config = os.path.join(directory, "mim.toml")
        with open(config, "w") as f:
            f.write(f'[server]\ndata_dir = "data"\n[[listeners]]\nport = {port}\n')
        database = await open_database(
            "sqlite", sqlite_path=os.path.join(directory, "data", "mim.sqlite3"), auto_migrate=True
        )
        await database.accounts.create_account("localhost", "alice", derive_all("wonderland"))
        await database.close()

        process = ProcessOutput()
        transport = reactor.spawnProcess(
            process,
            TWISTD,
            [TWISTD, "-n", "--pidfile=", "mim", "-c", config],
            env=os.environ,
            path=directory,
        )
        self.addCleanup(self._stop, transport, process)
        await _wait_until_listening(port, process)

        client = Client(
            "alice@localhost/cli",
            "wonderland",
            port,
            os.path.join(directory, "data", SELF_SIGNED_NAME),
            "SCRAM-SHA-256",
        )
        self.addCleanup(client.close)
        self.assertEqual(await client.connect(), "session_start")
        self.assertIn(f"Listening for XMPP clients on 127.0.0.1:{port}".encode(), process.output)

    async def _stop(self, transport: object, process: ProcessOutput) -> None:
        if not process.ended.called:
            transport.signalProcess(signal.SIGTERM)
        ended = await process.ended
        # twistd shuts down cleanly, then re-raises the signal so its exit status reports it.
        self.assertIn(getattr(ended, "signal", None), (None, signal.SIGTERM), process.output)


NS_TLS = "urn:ietf:params:xml:ns:xmpp-tls"


def _write_config(directory: str, text: str) -> str:
    os.makedirs(directory, exist_ok=True)
    path = os.path.join(directory, "mim.toml")
    with open(path, "w") as f:
        f.write(text)
    return path


def _read(path: str) -> str:
    with open(path) as f:
        return f.read()


async def _wait_for_file_gone(path: str) -> None:
    for _ in range(100):
        if not os.path.exists(path):
            return
        await _sleep(0.1)
    raise AssertionError(f"{path} is still there")


class StartFailureTests(unittest.TestCase):
    """A start that fails exits with status 1 and one line, in the foreground (what systemd
    sees) and as a daemon (twistd's parent process waits for the child's report)."""

    async def assert_start_fails(self, directory: str, config: str, line: str) -> None:
        out, err, code = await getProcessOutputAndValue(
            TWISTD, ["-n", "--pidfile=", "mim", "-c", config], env=os.environ, path=directory
        )
        self.assertEqual(code, 1, out)
        self.assertEqual(err.decode().splitlines(), [line], out)
        self.assertNotIn(b"Traceback", out)

        pidfile = os.path.join(directory, "twistd.pid")
        logfile = os.path.join(directory, "twistd.log")
        out, err, code = await getProcessOutputAndValue(
            TWISTD,
            [f"--pidfile={pidfile}", f"--logfile={logfile}", "mim", "-c", config],
            env=os.environ,
            path=directory,
        )
        self.assertEqual(code, 1, err)
        # twistd's parent shows what the daemon reported, as a repr cut to its 100-byte pipe read.
        self.assertEqual(
            err.decode().splitlines(),
            [
                f"An error has occurred: {line.encode()[:98]!r}",
                "Please look at log file for more information.",
            ],
        )
        await _wait_for_file_gone(pidfile)
        with open(logfile) as f:
            log = f.read()
        self.assertIn(line.removeprefix("mim: could not start: "), log)
        self.assertNotIn("Traceback", log)

    async def test_port_in_use(self) -> None:
        directory = os.path.abspath(self.mktemp())
        taken = socket.socket()
        self.addCleanup(taken.close)
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        config = _write_config(
            directory, f'[server]\ndata_dir = "data"\n[[listeners]]\nport = {port}\n'
        )
        await self.assert_start_fails(
            directory,
            config,
            f"mim: could not start: Couldn't listen on 127.0.0.1:{port}:"
            " [Errno 98] Address already in use.",
        )

    async def test_unusable_certificate(self) -> None:
        directory = os.path.abspath(self.mktemp())
        os.makedirs(directory)
        certificate = os.path.join(directory, "c.pem")
        with open(certificate, "w") as f:
            f.write("not a certificate\n")
        config = _write_config(
            directory,
            f'[server]\ndata_dir = "data"\n[[listeners]]\nport = {free_port()}\n'
            '[tls]\ncertificate = "c.pem"\nprivate_key = "c.pem"\n',
        )
        await self.assert_start_fails(
            directory,
            config,
            f"mim: could not start: {certificate}: no PEM certificate in the file",
        )

    async def test_unusable_private_key(self) -> None:
        directory = os.path.abspath(self.mktemp())
        os.makedirs(directory)
        generate_self_signed(os.path.join(directory, "c.pem"), ["localhost"])
        key = os.path.join(directory, "k.pem")
        with open(key, "w") as f:
            f.write("-----BEGIN PRIVATE KEY-----\nbroken\n-----END PRIVATE KEY-----\n")
        config = _write_config(
            directory,
            f'[server]\ndata_dir = "data"\n[[listeners]]\nport = {free_port()}\n'
            '[tls]\ncertificate = "c.pem"\nprivate_key = "k.pem"\n',
        )
        await self.assert_start_fails(
            directory,
            config,
            f"mim: could not start: {key}: no unencrypted PEM private key in the file",
        )

    async def test_postgresql_unreachable(self) -> None:
        directory = os.path.abspath(self.mktemp())
        config = _write_config(
            directory,
            f'[server]\ndata_dir = "data"\n[[listeners]]\nport = {free_port()}\n'
            '[storage]\nbackend = "postgresql"\n'
            f'[storage.postgresql]\ndsn = "host=127.0.0.1 port={free_port()} dbname=mim"\n',
        )
        await self.assert_start_fails(
            directory,
            config,
            "mim: could not start: postgresql storage: Connection refused"
            " Is the server running on that host and accepting TCP/IP connections?",
        )

    async def test_mysql_unreachable(self) -> None:
        directory = os.path.abspath(self.mktemp())
        port = free_port()
        config = _write_config(
            directory,
            f'[server]\ndata_dir = "data"\n[[listeners]]\nport = {free_port()}\n'
            f'[storage]\nbackend = "mysql"\n[storage.mysql]\nport = {port}\n',
        )
        await self.assert_start_fails(
            directory,
            config,
            "mim: could not start: mysql storage: Can't connect to MySQL server on '127.0.0.1'"
            " ([Errno 111] Connection refused) (error 2003)",
        )

    async def test_schema_needs_migration(self) -> None:
        directory = os.path.abspath(self.mktemp())
        config = _write_config(
            directory,
            f'[server]\ndata_dir = "data"\n[[listeners]]\nport = {free_port()}\n'
            "[storage]\nauto_migrate = false\n",
        )
        await self.assert_start_fails(
            directory,
            config,
            "mim: could not start: the database schema is at version 0, this code needs"
            f" version {migrations.newest_version()}: run `mimctl migrate`",
        )


class DaemonTests(unittest.TestCase):
    async def test_daemon_reports_success_once_listening(self) -> None:
        directory = os.path.abspath(self.mktemp())
        port = free_port()
        config = _write_config(
            directory, f'[server]\ndata_dir = "data"\n[[listeners]]\nport = {port}\n'
        )
        pidfile = os.path.join(directory, "twistd.pid")
        out, err, code = await getProcessOutputAndValue(
            TWISTD,
            [f"--pidfile={pidfile}", "--logfile=twistd.log", "mim", "-c", config],
            env=os.environ,
            path=directory,
        )
        self.assertEqual((code, err), (0, b""))
        with open(pidfile) as f:
            pid = int(f.read())
        self.addCleanup(self._stop, pid, pidfile)
        # The parent exits only after the report: the server listens already.
        with socket.create_connection(("127.0.0.1", port), timeout=5):
            pass

        # SIGHUP reloads the daemon rather than ending it (and leaving its pidfile behind).
        os.kill(pid, signal.SIGHUP)
        logfile = os.path.join(directory, "twistd.log")
        await eventually(lambda: "Reloaded" in _read(logfile))
        os.kill(pid, 0)
        with socket.create_connection(("127.0.0.1", port), timeout=5):
            pass

    async def _stop(self, pid: int, pidfile: str) -> None:
        os.kill(pid, signal.SIGTERM)
        await _wait_for_file_gone(pidfile)


async def _server_certificate(port: int) -> bytes:
    """The DER certificate that the server presents on STARTTLS."""
    client = RawClient(port)
    await client.connect()
    try:
        await client.send(STREAM_HEADER)
        parser = ET.XMLPullParser(events=("end",))
        await _read_element(client, parser, f"{{{NS_TLS}}}starttls")
        await client.send(f"<starttls xmlns='{NS_TLS}'/>".encode())
        await _read_element(client, parser, f"{{{NS_TLS}}}proceed")
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
        await client.starttls(context)
        return client.writer.get_extra_info("ssl_object").getpeercert(binary_form=True)
    finally:
        client.close()


async def _read_element(client: RawClient, parser: ET.XMLPullParser, name: str) -> None:
    """Read until an element with the qualified ``name`` has ended."""
    while True:
        for _, element in parser.read_events():
            if element.tag == name:
                return
        data = await wait_for(client.reader.read(65536))
        if not data:
            raise AssertionError(f"connection closed before {name}")
        parser.feed(data)


def _fingerprint(der: bytes) -> str:
    return hashlib.sha256(der).hexdigest()


def _file_fingerprint(path: str) -> str:
    from cryptography.hazmat.primitives.serialization import Encoding

    return _fingerprint(load_certificates(path)[0].public_bytes(Encoding.DER))


class RunningServerTests(unittest.TestCase):
    """A foreground twistd: SIGHUP reloads the certificate and the log level; the log's format."""

    async def start(self, directory: str, extra_config: str = "") -> tuple[int, ProcessOutput]:
        require_asyncio_reactor()
        port = free_port()
        config = _write_config(
            directory,
            f'[server]\ndata_dir = "data"\n[[listeners]]\nport = {port}\n' + extra_config,
        )
        process = ProcessOutput()
        transport = reactor.spawnProcess(
            process,
            TWISTD,
            [TWISTD, "-n", "--pidfile=", "mim", "-c", config],
            env=os.environ,
            path=directory,
        )
        self.transport = transport
        self.addCleanup(self._stop, transport, process)
        await _wait_until_listening(port, process)
        return port, process

    async def _stop(self, transport: object, process: ProcessOutput) -> None:
        if not process.ended.called:
            transport.signalProcess(signal.SIGTERM)
        await process.ended

    async def test_sighup_reloads_certificate_and_log_level(self) -> None:
        directory = os.path.abspath(self.mktemp())
        os.makedirs(directory)
        certificate = os.path.join(directory, "server.pem")
        generate_self_signed(certificate, ["localhost"])
        port, process = await self.start(
            directory, '[tls]\ncertificate = "server.pem"\nprivate_key = "server.pem"\n'
        )
        before = _fingerprint(await _server_certificate(port))
        self.assertEqual(before, _file_fingerprint(certificate))
        # At the default level "info", a connection's debug line is not written.
        await _sleep(0.3)
        self.assertNotIn("disconnected", process.text())

        generate_self_signed(certificate, ["localhost"])
        with open(os.path.join(directory, "mim.toml"), "a") as f:
            f.write('[log]\nlevel = "debug"\n[limits]\nmax_stanza_size = 2048\n')
        self.transport.signalProcess(signal.SIGHUP)
        await eventually(lambda: "Reloaded" in process.text())

        after = _fingerprint(await _server_certificate(port))
        self.assertNotEqual(after, before)
        self.assertEqual(after, _file_fingerprint(certificate))
        self.assertIn(
            "Reloaded TLS certificate, key and client CAs, log level debug", process.text()
        )
        self.assertIn(
            "Changed in the config file, applied only after a restart: limits.max_stanza_size",
            process.text(),
        )
        await eventually(lambda: "disconnected" in process.text())
        self.assertFalse(process.ended.called)

    async def test_sighup_with_a_broken_config_keeps_running(self) -> None:
        directory = os.path.abspath(self.mktemp())
        port, process = await self.start(directory)
        with open(os.path.join(directory, "mim.toml"), "a") as f:
            f.write('[log]\nlevel = "loud"\n')
        self.transport.signalProcess(signal.SIGHUP)
        await eventually(lambda: "Reload refused" in process.text())
        self.assertIn(
            "Reload refused, the running configuration stays: "
            f'{os.path.join(directory, "mim.toml")}: log.level: must be one of "debug", "info",'
            ' "warn", "error" (got "loud")',
            process.text(),
        )
        await _server_certificate(port)
        self.assertFalse(process.ended.called)

    async def test_sighup_with_an_unusable_certificate_keeps_the_running_one(self) -> None:
        directory = os.path.abspath(self.mktemp())
        os.makedirs(directory)
        certificate = os.path.join(directory, "server.pem")
        generate_self_signed(certificate, ["localhost"])
        port, process = await self.start(
            directory, '[tls]\ncertificate = "server.pem"\nprivate_key = "server.pem"\n'
        )
        before = await _server_certificate(port)
        with open(certificate, "w") as f:
            f.write("half-written\n")
        self.transport.signalProcess(signal.SIGHUP)
        await eventually(lambda: "Reloaded" in process.text())
        self.assertIn(
            f"Reload: TLS files kept as they were: {certificate}: no PEM certificate in the file",
            process.text(),
        )
        self.assertEqual(await _server_certificate(port), before)
        self.assertNotIn("Traceback", process.text())

    async def test_json_log_lines_starting_with_the_version(self) -> None:
        directory = os.path.abspath(self.mktemp())
        port, process = await self.start(directory, '[log]\nformat = "json"\n')
        await eventually(lambda: "Listening" in process.text())
        events = [json.loads(line) for line in process.text().splitlines()]
        self.assertEqual(
            events[0]["text"],
            f"mim-twisted {mim_twisted.__version__} starting with {directory}/mim.toml",
        )
        self.assertEqual(events[0]["log_namespace"], "mim_twisted.tap")
        self.assertIn(
            f"Listening for XMPP clients on 127.0.0.1:{port} (domains: localhost)",
            [event["text"] for event in events],
        )


# Runs the rest of the command line as the named console script in an interpreter where the
# modules of the "postgresql", "mysql" and "rabbitmq" extras cannot be imported, as after
# `pip install .`.
WITHOUT_EXTRAS = (
    "import sys\n"
    "for name in ('psycopg2', 'txpostgres', 'pymysql', 'pika'):\n"
    "    sys.modules[name] = None\n"
    "script = sys.argv.pop(1)\n"
    "if script == 'twistd':\n"
    "    from twisted.scripts.twistd import run\n"
    "else:\n"
    "    from mim_twisted.ctl import main as run\n"
    "sys.argv[0] = script\n"
    "sys.exit(run())\n"
)


class VersionAndExtrasTests(unittest.TestCase):
    async def test_mimctl_version(self) -> None:
        out, err, code = await getProcessOutputAndValue(
            os.path.join(os.path.dirname(sys.executable), "mimctl"), ["--version"], env=os.environ
        )
        self.assertEqual(
            (code, out.decode(), err), (0, f"mim-twisted {mim_twisted.__version__}\n", b"")
        )

    async def test_embedded_server_without_the_extras(self) -> None:
        require_asyncio_reactor()
        directory = os.path.abspath(self.mktemp())
        port = free_port()
        config = _write_config(
            directory, f'[server]\ndata_dir = "data"\n[[listeners]]\nport = {port}\n'
        )
        out, err, code = await getProcessOutputAndValue(
            sys.executable,
            ["-c", WITHOUT_EXTRAS, "mimctl", "-c", config, "check-config"],
            env=os.environ,
            path=directory,
        )
        self.assertEqual(code, 0, err)
        process = ProcessOutput()
        transport = reactor.spawnProcess(
            process,
            sys.executable,
            [
                sys.executable,
                "-c",
                WITHOUT_EXTRAS,
                "twistd",
                "-n",
                "--pidfile=",
                "mim",
                "-c",
                config,
            ],
            env=os.environ,
            path=directory,
        )
        self.addCleanup(self._stop, transport, process)
        await _wait_until_listening(port, process)

    async def _stop(self, transport: object, process: ProcessOutput) -> None:
        if not process.ended.called:
            transport.signalProcess(signal.SIGTERM)
        await process.ended

    async def test_postgresql_without_its_driver_is_a_config_error(self) -> None:
        directory = os.path.abspath(self.mktemp())
        config = _write_config(directory, '[storage]\nbackend = "postgresql"\n')
        expected = (
            f'{config}: storage.backend: "postgresql" needs psycopg2, txpostgres, which are not'
            " installed: pip install 'mim-twisted[postgresql]'"
        )
        for script, arguments, prefix in (
            ("twistd", ["-n", "--pidfile=", "mim", "-c", config], "mim"),
            ("mimctl", ["-c", config, "check-config"], "mimctl"),
        ):
            out, err, code = await getProcessOutputAndValue(
                sys.executable,
                ["-c", WITHOUT_EXTRAS, script, *arguments],
                env=os.environ,
                path=directory,
            )
            self.assertEqual((code, err.decode()), (1, f"{prefix}: {expected}\n"), out)
