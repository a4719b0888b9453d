"""mimctl, the admin console: accounts, a config check, schema migration and the live server.

``main`` parses the command line, loads the config (the file ``twistd mim -c`` reads) and runs
the command on the reactor; ``run`` is the command itself, which tests await under trial.
Account commands work on the database; they also end the sessions of the account when the server
is running, through its admin socket (mim_twisted.admin), which the live commands (status,
sessions, kick, stats) need.
Exit status: 0 done, 1 an operational error (one line on stderr, after "mimctl: "), 2 a usage
error (from argparse).
"""

import argparse
import getpass
import json
import os
import sys
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine
from contextlib import asynccontextmanager
from typing import Any, TextIO

from twisted.internet import endpoints, error
from twisted.internet.defer import Deferred
from twisted.protocols.basic import LineReceiver
from twisted.python.failure import Failure
from twisted.words.protocols.jabber import jid

import mim_twisted
from mim_twisted import storage, tap
from mim_twisted.auth.scram import derive_all
from mim_twisted.config import MAX_UNIX_SOCKET_PATH, Config, ConfigError, load_config
from mim_twisted.storage.interfaces import (
    AccountExists,
    AccountNotFound,
    IDatabase,
    SchemaOutdated,
    SchemaTooNew,
)
from mim_twisted.tap import open_storage, secure_sqlite_directory
from mim_twisted.workers import worker_admin_socket

# Failures an admin can act on from their message alone: one line, no traceback.
DATABASE_ERRORS = tap.DATABASE_ERRORS
EXPECTED_ERRORS = (SchemaOutdated, SchemaTooNew, OSError, *DATABASE_ERRORS)


class CommandError(Exception):
    """A command that cannot be done; str() is the line to print after "mimctl: "."""


class ServerNotRunning(CommandError):
    """Nothing answers on the admin socket."""


# Seconds the server gets to answer on its admin socket (status waits up to 5 s on storage).
ADMIN_TIMEOUT = 15.0


def _one_line(error: Exception) -> str:
    # psycopg2 messages span lines ("... failed: Connection refused\n\tIs the server running").
    return " ".join(str(error).split())


# Argument types: argparse turns their ArgumentTypeError into a usage error (exit status 2).


def _parse_jid(text: str) -> jid.JID | None:
    try:
        return jid.JID(text)  # nodeprep and nameprep
    except (jid.InvalidFormat, ValueError, IndexError):  # IndexError: empty label, as in "a..b"
        return None


def _bare_jid(text: str) -> jid.JID:
    address = _parse_jid(text)
    if address is None or address.user is None or address.resource is not None:
        raise argparse.ArgumentTypeError(f"{text!r} is not a bare JID (user@domain)")
    return address


def _account_jid(text: str) -> jid.JID:
    address = _parse_jid(text)
    if address is None or address.user is None:
        raise argparse.ArgumentTypeError(f"{text!r} is not a JID (user@domain[/resource])")
    return address


def _domain(text: str) -> str:
    address = _parse_jid(text)
    if address is None or address.user is not None or address.resource is not None:
        raise argparse.ArgumentTypeError(f"{text!r} is not a domain name")
    return address.host


def _served(config: Config, domain: str) -> str:
    if domain not in config.server.domains:
        served = ", ".join(config.server.domains)
        raise CommandError(f"{domain} is not a domain of this server (it serves {served})")
    return domain


def _credentials(config: Config, args: argparse.Namespace, stdin: TextIO) -> dict[str, str]:
    """The credentials of the password given on stdin or, twice, at the terminal."""
    try:
        if args.password_stdin:
            password = stdin.readline().rstrip("\r\n")
        else:
            password = getpass.getpass("Password: ")
            if getpass.getpass("Password (again): ") != password:
                raise CommandError("the passwords do not match")
    except EOFError:
        raise CommandError("no password given") from None
    try:
        return derive_all(password, config.auth.scram_iterations)
    except ValueError as error:  # empty, or refused by SASLprep
        raise CommandError(f"unusable password: {error}") from None


class _AdminClient(LineReceiver):
    """Sends one request on the admin socket; `answer` fires with the response line."""

    delimiter = b"\n"
    MAX_LENGTH = 64 * 1024 * 1024  # a busy server's session list is long

    def __init__(self) -> None:
        self.answer: Deferred[bytes] = Deferred()

    def lineReceived(self, line: bytes) -> None:
        self.answer.callback(line)
        self.transport.loseConnection()

    def connectionLost(self, reason: Failure = None) -> None:
        if not self.answer.called:
            self.answer.errback(reason)


async def ask_server(config: Config, command: str, **arguments: Any) -> Any:
    """Send ``command`` to the running server; its result. ServerNotRunning if none answers.

    With `cluster.workers` above 1 every worker is asked on its own socket and the answers are
    merged (see ``MERGES``): each worker holds its own sessions and counters.
    """
    if not config.admin.enabled:
        raise ServerNotRunning(f"{config.source}: admin.enabled is false: no admin socket")
    paths = admin_sockets(config)
    answers, missing = [], []
    for path in paths:
        try:
            answers.append(await _ask_socket(path, command, arguments))
        except ServerNotRunning as not_running:
            missing.append(not_running)
    if not answers:
        raise missing[0]
    if missing:
        # A worker being restarted: what the others answered would be part of the truth.
        raise CommandError(f"a worker {_one_line(missing[0]).removeprefix('mim-twisted ')}")
    return answers[0] if len(answers) == 1 else MERGES[command](answers)


def admin_sockets(config: Config) -> list[str]:
    """The running server's admin sockets: its own, or one per worker (mim_twisted.workers)."""
    if config.cluster.workers == 1:
        return [config.admin_socket]
    return [worker_admin_socket(config, index) for index in range(1, config.cluster.workers + 1)]


async def _ask_socket(path: str, command: str, arguments: dict[str, Any]) -> Any:
    from twisted.internet import reactor

    if len(os.fsencode(path)) > MAX_UNIX_SOCKET_PATH:
        raise ServerNotRunning(f"no admin socket: {path} is too long, set admin.socket")
    endpoint = endpoints.UNIXClientEndpoint(reactor, path, timeout=ADMIN_TIMEOUT)
    try:
        client = await endpoints.connectProtocol(endpoint, _AdminClient())
    except (error.ConnectError, OSError) as failure:
        # A socket file left by a server that died refuses connections like no file at all.
        if not os.path.exists(path) or isinstance(failure, error.ConnectionRefusedError):
            raise ServerNotRunning(
                f"mim-twisted is not running (no admin socket at {path})"
            ) from None
        raise CommandError(f"cannot use the admin socket {path}: {_one_line(failure)}") from None
    client.sendLine(json.dumps({"command": command, **arguments}).encode())
    try:
        line = await client.answer.addTimeout(ADMIN_TIMEOUT, reactor)
    except Exception as failure:
        raise CommandError(f"no answer on the admin socket {path}: {failure}") from None
    try:
        response = json.loads(line)
    except ValueError:
        raise CommandError(f"not an answer on the admin socket {path}: {line[:80]!r}") from None
    if not response["ok"]:
        raise CommandError(response["error"])
    return response["result"]


def _merge_status(answers: list[dict[str, Any]]) -> dict[str, Any]:
    # The storage as the first worker that finds it not answering sees it.
    storage_states = [a["storage"] for a in answers]
    troubled = [state for state in storage_states if not state["answering"]]
    return {
        "version": answers[0]["version"],
        "uptime": max(a["uptime"] for a in answers),
        "sessions": sum(a["sessions"] for a in answers),
        "connections": sum(a["connections"] for a in answers),
        "storage": (troubled or storage_states)[0],
        "workers": len(answers),
    }


def _merge_counters(answers: list[dict[str, int]]) -> dict[str, int]:
    merged: dict[str, int] = {}
    for counters in answers:
        for name, value in counters.items():
            merged[name] = merged.get(name, 0) + value
    return dict(sorted(merged.items()))


def _merge_sessions(answers: list[list[dict[str, Any]]]) -> list[dict[str, Any]]:
    return sorted((s for sessions in answers for s in sessions), key=lambda s: s["jid"])


# How the workers' answers to each command make one.
MERGES: dict[str, Callable[[list[Any]], Any]] = {
    "status": _merge_status,
    "sessions": _merge_sessions,
    "kick": lambda answers: [full_jid for ended in answers for full_jid in ended],
    "stats": _merge_counters,
}


async def _end_sessions(config: Config, address: jid.JID, condition: str, out: TextIO) -> None:
    """End the live sessions of an account whose credentials changed; nothing if not running."""
    try:
        ended = await ask_server(config, "kick", jid=address.userhost(), condition=condition)
    except ServerNotRunning:
        return
    if ended:
        print(f"ended {len(ended)} live session(s) ({condition})", file=out)


@asynccontextmanager
async def _opened(opening: Awaitable[IDatabase]) -> AsyncIterator[IDatabase]:
    """The database ``opening`` fires with, closed when the block is left."""
    database = await opening
    try:
        yield database
    finally:
        await database.close()


# The commands.


async def register(config: Config, args: argparse.Namespace, stdin: TextIO, out: TextIO) -> None:
    domain = _served(config, args.jid.host)
    credentials = _credentials(config, args, stdin)
    async with _opened(open_storage(config)) as database:
        try:
            await database.accounts.create_account(domain, args.jid.user, credentials)
        except AccountExists:
            raise CommandError(f"{args.jid.userhost()} is already registered") from None
    print(f"registered {args.jid.userhost()}", file=out)


async def unregister(config: Config, args: argparse.Namespace, stdin: TextIO, out: TextIO) -> None:
    domain = _served(config, args.jid.host)
    async with _opened(open_storage(config)) as database:
        try:
            await database.accounts.remove_account(domain, args.jid.user)
        except AccountNotFound:
            raise CommandError(f"{args.jid.userhost()} is not registered") from None
    print(f"unregistered {args.jid.userhost()}", file=out)
    await _end_sessions(config, args.jid, "not-authorized", out)


async def passwd(config: Config, args: argparse.Namespace, stdin: TextIO, out: TextIO) -> None:
    domain = _served(config, args.jid.host)
    credentials = _credentials(config, args, stdin)
    async with _opened(open_storage(config)) as database:
        try:
            await database.accounts.set_credentials(domain, args.jid.user, credentials)
        except AccountNotFound:
            raise CommandError(f"{args.jid.userhost()} is not registered") from None
    print(f"changed the password of {args.jid.userhost()}", file=out)
    await _end_sessions(config, args.jid, "reset", out)


async def list_users(config: Config, args: argparse.Namespace, stdin: TextIO, out: TextIO) -> None:
    domain = _served(config, args.domain)
    async with _opened(open_storage(config)) as database:
        usernames = await database.accounts.list_accounts(domain)
    for username in usernames:
        print(f"{username}@{domain}", file=out)


def _listener(address: str, port: int) -> str:
    return f"[{address}]:{port}" if ":" in address else f"{address}:{port}"


def _storage_location(config: Config) -> str:
    if config.storage.backend == "sqlite":
        return config.sqlite_path
    if config.storage.backend == "mysql":
        # The summary may end up in a ticket or a chat: never show the password.
        options = config.storage.mysql.connect_options()
        options.pop("password")
        return " ".join(f"{key}={value}" for key, value in options.items())
    # Only with the "postgresql" extra installed, which the config check has made sure of.
    import psycopg2
    from psycopg2.extensions import parse_dsn

    try:
        parameters = parse_dsn(config.storage.postgresql.dsn)
    except psycopg2.ProgrammingError as error:
        raise CommandError(
            f"{config.source or 'embedded default'}: storage.postgresql.dsn: {_one_line(error)}"
        ) from None
    # The summary may end up in a ticket or a chat: never show the password.
    parameters.pop("password", None)
    return " ".join(f"{key}={value}" for key, value in parameters.items())


async def check_config(
    config: Config, args: argparse.Namespace, stdin: TextIO, out: TextIO
) -> None:
    location = _storage_location(config)
    listeners = ", ".join(
        f"{_listener(listener.address, listener.port)} (STARTTLS {listener.starttls})"
        for listener in config.listeners
    )
    print(f"mimctl: {config.source or 'embedded default'}: OK", file=out)
    print(f"  domains: {', '.join(config.server.domains)}", file=out)
    print(f"  listeners: {listeners}", file=out)
    print(f"  storage: {config.storage.backend}, {location}", file=out)
    if config.extensions:
        print(f"  extensions: {', '.join(config.extensions)}", file=out)


async def migrate(config: Config, args: argparse.Namespace, stdin: TextIO, out: TextIO) -> None:
    # Opened without the schema check of open_storage: migrating an outdated schema is the point.
    secure_sqlite_directory(config)
    connecting = storage.connect_database(
        config.storage.backend,
        config.sqlite_path,
        config.storage.postgresql.dsn,
        config.storage.pool_size,
        mysql_options=config.storage.mysql.connect_options(),
    )
    async with _opened(connecting) as database:
        installed = await database.schema_version()
        migrated = await database.migrate()
    if migrated == installed:
        print(f"schema is up to date (version {migrated})", file=out)
    else:
        print(f"schema version {installed} -> {migrated}", file=out)


def _duration(seconds: float) -> str:
    minutes, second = divmod(int(seconds), 60)
    hours, minute = divmod(minutes, 60)
    days, hour = divmod(hours, 24)
    clock = f"{hour:02d}:{minute:02d}:{second:02d}"
    return f"{days}d {clock}" if days else clock


async def status(config: Config, args: argparse.Namespace, stdin: TextIO, out: TextIO) -> None:
    state = await ask_server(config, "status")
    storage_state = state["storage"]
    answering = (
        "answering" if storage_state["answering"] else f"NOT answering ({storage_state['problem']})"
    )
    workers = f" in {state['workers']} workers" if "workers" in state else ""
    print(
        f"mim-twisted {state['version']} running{workers}, up {_duration(state['uptime'])}",
        file=out,
    )
    print(f"  sessions: {state['sessions']} (connections: {state['connections']})", file=out)
    print(f"  storage: {storage_state['backend']}, {answering}", file=out)


async def sessions(config: Config, args: argparse.Namespace, stdin: TextIO, out: TextIO) -> None:
    domain = None if args.domain is None else _served(config, args.domain)
    for session in await ask_server(config, "sessions", domain=domain):
        columns = (
            session["jid"],
            session["peer"],
            session["since"],
            "TLS" if session["tls"] else "no-TLS",
            session["mechanism"] or "-",
        )
        print("\t".join(columns), file=out)


async def kick(config: Config, args: argparse.Namespace, stdin: TextIO, out: TextIO) -> None:
    ended = await ask_server(config, "kick", jid=args.jid.full(), condition="policy-violation")
    if not ended:
        raise CommandError(f"{args.jid.full()} has no session")
    for full_jid in ended:
        print(f"ended the session of {full_jid}", file=out)


async def stats(config: Config, args: argparse.Namespace, stdin: TextIO, out: TextIO) -> None:
    for name, value in (await ask_server(config, "stats")).items():
        print(f"{name} {value}", file=out)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="mimctl", description="Manage the accounts and the database of mim-twisted."
    )
    parser.add_argument(
        "--version", action="version", version=f"mim-twisted {mim_twisted.__version__}"
    )
    parser.add_argument(
        "-c",
        "--config",
        metavar="PATH",
        help="the TOML config file of the server (default: the embedded default)",
    )
    commands = parser.add_subparsers(title="commands", dest="command", required=True)

    def command(
        name: str, handler: Callable[..., Awaitable[None]], summary: str
    ) -> argparse.ArgumentParser:
        subparser = commands.add_parser(name, help=summary, description=summary)
        subparser.set_defaults(handler=handler)
        return subparser

    def password_stdin(subparser: argparse.ArgumentParser) -> None:
        subparser.add_argument(
            "--password-stdin",
            action="store_true",
            help="read the password from the first line of stdin instead of the terminal",
        )

    subparser = command("register", register, "create an account")
    subparser.add_argument("jid", metavar="JID", type=_bare_jid, help="user@domain")
    password_stdin(subparser)
    subparser = command("unregister", unregister, "delete an account and its data")
    subparser.add_argument("jid", metavar="JID", type=_bare_jid, help="user@domain")
    subparser = command("passwd", passwd, "change the password of an account")
    subparser.add_argument("jid", metavar="JID", type=_bare_jid, help="user@domain")
    password_stdin(subparser)
    subparser = command("list-users", list_users, "list the accounts of a domain")
    subparser.add_argument("domain", metavar="DOMAIN", type=_domain)
    command("check-config", check_config, "check the config file and summarise it")
    command("migrate", migrate, "bring the database schema to the newest version")
    command("status", status, "the running server: version, uptime, sessions, storage")
    subparser = command("sessions", sessions, "list the live sessions of the running server")
    subparser.add_argument("domain", metavar="DOMAIN", type=_domain, nargs="?")
    subparser = command("kick", kick, "end the sessions of a bare JID, or one full JID's")
    subparser.add_argument("jid", metavar="JID", type=_account_jid, help="user@domain[/resource]")
    command("stats", stats, "the running server's counters")
    return parser


async def run(
    config: Config, args: argparse.Namespace, stdin: TextIO, stdout: TextIO, stderr: TextIO
) -> int:
    """Run the command parsed into ``args``; the exit status."""
    try:
        await args.handler(config, args, stdin, stdout)
    except (CommandError, *EXPECTED_ERRORS) as error:
        message = _one_line(error)
        if isinstance(error, DATABASE_ERRORS):  # the driver's message does not say which
            message = f"{config.storage.backend} database: {message}"
        print(f"mimctl: {message}", file=stderr)
        return 1
    return 0


def _run_on_reactor(command: Callable[[], Coroutine[Any, Any, int]]) -> int:
    """Run ``command`` on the global reactor, which this process runs for it alone.

    Unlike ``task.react`` this returns the result, and it leaves SIGINT to Python, so that
    Ctrl-C at the password prompt (a blocking getpass) stops mimctl at once.
    """
    from twisted.internet import reactor

    outcome: list[int | Failure] = []

    def start() -> None:
        done = Deferred.fromCoroutine(command())
        done.addBoth(outcome.append)
        done.addBoth(lambda _: reactor.stop())

    reactor.callWhenRunning(start)
    reactor.run(installSignalHandlers=False)
    [result] = outcome
    if isinstance(result, Failure):
        result.raiseException()
    return result


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        config = load_config(args.config)
    except ConfigError as error:
        print(f"mimctl: {error}", file=sys.stderr)
        return 1
    try:
        return _run_on_reactor(lambda: run(config, args, sys.stdin, sys.stdout, sys.stderr))
    except KeyboardInterrupt:
        return 130
