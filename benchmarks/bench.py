#!/usr/bin/env python3
"""Run the load scenarios against a fresh server and print a summary table.

    .venv/bin/python benchmarks/bench.py [--storage sqlite|postgresql|mysql|both ...] [--runs 3]

For each storage backend: a temporary directory with a config (a free loopback port, its own
data_dir, and for PostgreSQL a temporary database on 127.0.0.1:5432 as user root, for MySQL one
on 127.0.0.1:3306 as user root), the accounts
created straight through the storage API, the server started with
`twistd -n --pidfile= mim -c <config>`, then the scenarios of benchmarks/load.py, each repeated
--runs times (the medians are reported), then the server stopped and everything removed.
`--server prosody` runs the same scenarios against Prosody from Debian's package instead
(see benchmarks/README.md). Every step has a deadline.

Run it with the project's virtualenv Python: the accounts are created through mim_twisted.
"""

import argparse
import contextlib
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
LOAD = HERE / "load.py"
sys.path.insert(0, str(HERE))
import load  # noqa: E402  (benchmarks/ is not a package)

DOMAIN = "localhost"
PASSWORD = "load-password"
PREFIX = "load"
PG_ADMIN_DSN = "host=127.0.0.1 port=5432 user=root dbname=postgres"
MYSQL_ADMIN = {"host": "127.0.0.1", "port": 3306, "user": "root", "password": ""}
# The database server processes whose CPU is reported, per storage backend.
DB_PROCESSES = {"postgresql": ["postgres"], "mysql": ["mariadbd", "mysqld"]}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for_port(port: int, process: subprocess.Popen, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"the server exited with status {process.returncode}")
        with socket.socket() as s:
            s.settimeout(0.5)
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.2)
    raise RuntimeError(f"nothing listens on 127.0.0.1:{port} after {timeout} s")


def stop(process: subprocess.Popen, timeout: float = 20.0) -> None:
    if process.poll() is not None:
        return
    process.send_signal(signal.SIGTERM)
    try:
        process.wait(timeout)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait(10)


# -- accounts --------------------------------------------------------------------------------


def create_accounts_command(argv: list[str]) -> int:
    """`bench.py create-accounts CONFIG COUNT`: accounts load1..loadCOUNT, one password.

    All accounts share one set of SCRAM credentials (one salt): deriving them costs PBKDF2
    twice per account, and the server's work at login does not depend on the salt.
    """
    from twisted.internet import defer, task

    from mim_twisted import tap
    from mim_twisted.auth.scram import derive_all
    from mim_twisted.config import load_config
    from mim_twisted.storage.interfaces import AccountExists

    config_path, count = argv[0], int(argv[1])

    async def create(reactor) -> None:
        config = load_config(config_path)
        database = await tap.open_storage(config)
        credentials = derive_all(PASSWORD)
        semaphore = defer.DeferredSemaphore(16)

        async def one(index: int) -> None:
            with contextlib.suppress(AccountExists):
                await database.accounts.create_account(DOMAIN, f"{PREFIX}{index}", credentials)

        def limited(index: int) -> defer.Deferred:
            return semaphore.run(lambda: defer.ensureDeferred(one(index)))

        try:
            await defer.gatherResults([limited(i) for i in range(1, count + 1)], consumeErrors=True)
        finally:
            await database.close()

    task.react(lambda reactor: defer.ensureDeferred(create(reactor)))
    return 0


# -- servers ---------------------------------------------------------------------------------


def rabbitmq_pid() -> int:
    """The local RabbitMQ's Erlang VM (other Erlang VMs, such as ejabberd's, may run too)."""
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        with contextlib.suppress(OSError):
            with open(f"/proc/{entry}/comm") as f:
                if f.read().strip() != "beam.smp":
                    continue
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                if b"rabbit" in f.read():
                    return int(entry)
    raise SystemExit("--event-pusher: no RabbitMQ process found (is rabbitmq-server running?)")


def publisher_pid(server_pid: int) -> int | None:
    """The server's event publisher process (its child running mim_twisted.events.publisher)."""
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        with contextlib.suppress(OSError):
            with open(f"/proc/{entry}/stat") as f:
                parent = int(f.read().rsplit(")", 1)[1].split()[1])
            if parent != server_pid:
                continue
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                if b"mim_twisted.events.publisher" in f.read():
                    return int(entry)
    return None


class BrokerSink:
    """Exchanges of their own on the local RabbitMQ for a server with the event pusher on, and
    a queue bound to them that keeps the newest 10,000 events (no consumer: its CPU would count
    against the run), so that the broker routes and stores every event as it would for a
    consumer."""

    def __init__(self) -> None:
        suffix = secrets.token_hex(4)
        self.exchanges = [f"{name}-bench-{suffix}" for name in ("presence", "chat_msg", "gc_msg")]
        self.queue = f"events-bench-{suffix}"

    def _channel(self):
        import pika

        connection = pika.BlockingConnection(pika.ConnectionParameters("127.0.0.1", 5672))
        return connection, connection.channel()

    def prepare(self) -> str:
        connection, channel = self._channel()
        arguments = {"x-max-length": 10000, "x-overflow": "drop-head"}
        channel.queue_declare(self.queue, arguments=arguments)
        for exchange in self.exchanges:
            channel.exchange_declare(exchange, exchange_type="topic")
            channel.queue_bind(self.queue, exchange, routing_key="#")
        connection.close()
        presence, chat, groupchat = self.exchanges
        return (
            "[event_pusher.rabbit]\nenabled = true\n"
            f'presence_exchange = {{ name = "{presence}" }}\n'
            f'chat_msg_exchange = {{ name = "{chat}" }}\n'
            f'groupchat_msg_exchange = {{ name = "{groupchat}" }}\n'
        )

    def cleanup(self) -> None:
        connection, channel = self._channel()
        channel.queue_delete(self.queue)
        for exchange in self.exchanges:
            channel.exchange_delete(exchange)
        connection.close()


class CounterSampler:
    """Samples the event pusher's counters every 0.25 s while a load run goes on."""

    def __init__(self, server: "MimServer") -> None:
        self.server = server
        self.samples: list[tuple[float, dict[str, int]]] = []
        self.done = threading.Event()
        self.thread = threading.Thread(target=self._sample, daemon=True)
        self.thread.start()

    def _sample(self) -> None:
        while not self.done.wait(0.25):
            with contextlib.suppress(OSError, ValueError, KeyError):
                self.samples.append((time.monotonic(), self.server.counters()))

    def figures(self) -> dict:
        """Events/s confirmed by the broker from the first to the last change of the count,
        and what was dropped or still held at the end."""
        self.done.set()
        self.thread.join()
        self.samples.append((time.monotonic(), self.server.counters()))
        confirmed = [(t, c.get("event_pusher_confirmed", 0)) for t, c in self.samples]
        changes = [i for i in range(1, len(confirmed)) if confirmed[i][1] != confirmed[i - 1][1]]
        rate = None
        if len(changes) >= 2:
            first, last = confirmed[changes[0] - 1], confirmed[changes[-1]]
            rate = round((last[1] - first[1]) / (last[0] - first[0]), 1)
        end = self.samples[-1][1]
        start = self.samples[0][1] if len(self.samples) > 1 else {}
        return {
            "pusher_events_per_s": rate,
            "pusher_peak_buffered": max(c.get("event_pusher_buffered", 0) for _, c in self.samples),
            "pusher_dropped": end.get("event_pusher_dropped", 0)
            - start.get("event_pusher_dropped", 0),
        }


class MimServer:
    name = "mim-twisted"

    def __init__(
        self,
        storage: str,
        workdir: Path,
        args: argparse.Namespace,
        pusher: bool = False,
        workers: int = 1,
    ) -> None:
        self.storage = storage
        self.workdir = workdir
        self.args = args
        self.port = free_port()
        self.process: subprocess.Popen | None = None
        self.database: str | None = None
        self.workers = workers
        self.label = f"mim-twisted/{storage}" + ("+pusher" if pusher else "")
        if workers > 1:
            self.label += f" x{workers} workers"
        self.db_processes = list(DB_PROCESSES.get(storage, []))
        # With the event pusher on or several workers (cluster nodes talking over the broker),
        # RabbitMQ's CPU is counted with the database's, not as another process's (which would
        # discard the run).
        self.pusher = BrokerSink() if pusher else None
        if pusher or workers > 1:
            self.db_processes.append(str(rabbitmq_pid()))

    def prepare(self, accounts: int) -> None:
        storage = f'backend = "{self.storage}"\nauto_migrate = true\n'
        if self.storage == "postgresql":
            self.database = f"mim_bench_{secrets.token_hex(4)}"
            _pg_admin(f'CREATE DATABASE "{self.database}"')
            dsn = f"host=127.0.0.1 port=5432 user=root dbname={self.database}"
            storage += f'[storage.postgresql]\ndsn = "{dsn}"\npool_size = {self.args.pg_pool}\n'
        elif self.storage == "mysql":
            self.database = f"mim_bench_{secrets.token_hex(4)}"
            _mysql_admin(f"CREATE DATABASE `{self.database}` CHARACTER SET utf8mb4")
            storage += "[storage.mysql]\n" + "".join(
                f"{key} = {json.dumps(value)}\n" for key, value in MYSQL_ADMIN.items()
            )
            storage += f'database = "{self.database}"\npool_size = {self.args.mysql_pool}\n'
        else:
            storage += '[storage.sqlite]\npath = "data/mim.sqlite3"\n'
        # limits.max_unbound_per_address (default 100) caps the logins in progress from one
        # address, and the load generator is one address.
        limits = ""
        if self.args.concurrency > 100:
            limits = f"[limits]\nmax_unbound_per_address = {2 * self.args.concurrency}\n"
        pusher = self.pusher.prepare() if self.pusher is not None else ""
        cluster = ""
        if self.workers > 1:
            cluster = (
                f'[cluster]\nenabled = true\nname = "bench-{secrets.token_hex(4)}"\n'
                f'node = "bench"\n'
                f"workers = {self.workers}\n"
            )
        config = self.workdir / "mim.toml"
        config.write_text(
            f'[server]\ndomains = ["{DOMAIN}"]\ndata_dir = "data"\n'
            f'[[listeners]]\naddress = "127.0.0.1"\nport = {self.port}\n'
            f"[storage]\n{storage}"
            f"[pubsub]\nworkers = {self.args.pubsub_workers}\n"
            f"{limits}{pusher}{cluster}"
            f"{self.args.extra_config}\n"
        )
        self.config = config
        started = time.monotonic()
        command = [sys.executable, str(Path(__file__).resolve()), "create-accounts"]
        subprocess.run([*command, str(config), str(accounts)], check=True, timeout=600)
        print(f"# {accounts} accounts created in {time.monotonic() - started:.1f} s", flush=True)

    def start(self) -> None:
        twistd = Path(sys.executable).with_name("twistd")
        self.log = open(self.workdir / "server.log", "wb")
        self.process = subprocess.Popen(
            [str(twistd), "-n", "--pidfile=", "mim", "-c", str(self.config)],
            cwd=self.workdir,
            stdout=self.log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        wait_for_port(self.port, self.process, 60)
        # The supervisor listens at once; the workers accept once they have started.
        deadline = time.monotonic() + 60
        while not all(path.exists() for path in self.admin_sockets()):
            if self.process.poll() is not None or time.monotonic() > deadline:
                raise SystemExit(f"the workers did not start: see {self.workdir}/server.log")
            time.sleep(0.2)

    @property
    def pid(self) -> int:
        return self.process.pid

    @property
    def pids(self) -> list[int]:
        """The server's processes: twistd, then its workers (by worker index)."""
        if self.workers == 1:
            return [self.pid]
        children = []
        for entry in os.listdir("/proc"):
            if entry.isdigit():
                with contextlib.suppress(OSError):
                    with open(f"/proc/{entry}/stat") as f:
                        if int(f.read().rsplit(")", 1)[1].split()[1]) == self.pid:
                            children.append(int(entry))
        return [self.pid, *sorted(children)]

    def admin_sockets(self) -> list[Path]:
        data = self.workdir / "data"
        if self.workers == 1:
            return [data / "admin.sock"]
        return [data / f"admin.sock.{index}" for index in range(1, self.workers + 1)]

    def stop(self) -> None:
        if self.process is not None:
            stop(self.process)
            self.log.close()

    def counters(self) -> dict[str, int]:
        """The server's counters (`mimctl stats`), straight from its admin sockets (added up
        over the workers)."""
        total: dict[str, int] = {}
        for path in self.admin_sockets():
            with socket.socket(socket.AF_UNIX) as admin:
                admin.settimeout(5)
                admin.connect(str(path))
                admin.sendall(b'{"command": "stats"}\n')
                answer = b""
                while not answer.endswith(b"\n"):
                    chunk = admin.recv(65536)
                    if not chunk:
                        break
                    answer += chunk
            for name, value in json.loads(answer)["result"].items():
                total[name] = total.get(name, 0) + value
        return total

    def cleanup(self) -> None:
        if self.pusher is not None:
            with contextlib.suppress(Exception):
                self.pusher.cleanup()
        if self.database and self.storage == "postgresql":
            with contextlib.suppress(Exception):
                _pg_admin(f'DROP DATABASE IF EXISTS "{self.database}" WITH (FORCE)')
        elif self.database:
            with contextlib.suppress(Exception):
                _mysql_admin(f"DROP DATABASE IF EXISTS `{self.database}`")


def _pg_admin(statement: str) -> None:
    import psycopg2

    connection = psycopg2.connect(PG_ADMIN_DSN)
    try:
        connection.autocommit = True
        with connection.cursor() as cursor:
            cursor.execute(statement)
    finally:
        connection.close()


def _mysql_admin(statement: str) -> None:
    import pymysql

    connection = pymysql.connect(**MYSQL_ADMIN, autocommit=True)
    try:
        with connection.cursor() as cursor:
            cursor.execute(statement)
    finally:
        connection.close()


class ProsodyServer:
    """Prosody from Debian's package, configured under the work directory (loopback only).

    Node creation on Prosody's pubsub component is for admins only, so the publisher account
    (load1) is made an admin. Prosody refuses to run as root without `run_as_root`.
    """

    name = "prosody"

    def __init__(self, storage: str, workdir: Path, args: argparse.Namespace) -> None:
        if storage not in ("sqlite", "internal"):
            raise SystemExit("prosody: --storage must be sqlite or internal")
        self.storage = storage
        self.workdir = workdir
        self.args = args
        self.port = free_port()
        self.process: subprocess.Popen | None = None
        self.label = f"prosody/{storage}"
        self.db_processes: list[str] = []

    def prepare(self, accounts: int) -> None:
        self.accounts = accounts
        data = self.workdir / "data"
        data.mkdir()
        key, cert = self.workdir / "localhost.key", self.workdir / "localhost.crt"
        subprocess.run(
            ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2",
             "-subj", "/CN=localhost", "-keyout", str(key), "-out", str(cert)],
            check=True, capture_output=True, timeout=60,
        )  # fmt: skip
        if self.storage == "sqlite":
            storage = 'storage = "sql"\nsql = { driver = "SQLite3", database = "prosody.sqlite" }\n'
        else:
            storage = 'storage = "internal"\n'
        self.config = self.workdir / "prosody.cfg.lua"
        self.config.write_text(
            f'pidfile = "{self.workdir}/prosody.pid"\n'
            f'data_path = "{data}"\n'
            "daemonize = false\n"
            "run_as_root = true\n"
            f'log = {{ info = "{self.workdir}/prosody.log" }}\n'
            f"c2s_ports = {{ {self.port} }}\n"
            'c2s_interfaces = { "127.0.0.1" }\n'
            'interfaces = { "127.0.0.1" }\n'
            "s2s_ports = { }\ns2s_direct_tls_ports = { }\nc2s_direct_tls_ports = { }\n"
            "component_ports = { }\nhttp_ports = { }\nhttps_ports = { }\n"
            "c2s_require_encryption = true\nallow_registration = false\n"
            'authentication = "internal_hashed"\n'
            f"{storage}"
            f'admins = {{ "{PREFIX}1@{DOMAIN}" }}\n'
            'modules_enabled = { "roster", "saslauth", "tls", "disco", "ping", "presence",'
            ' "posix", "admin_shell" }\n'
            f'ssl = {{ key = "{key}", certificate = "{cert}" }}\n'
            f'VirtualHost "{DOMAIN}"\n'
            f'Component "pubsub.{DOMAIN}" "pubsub"\n'
        )

    def start(self) -> None:
        self.log = open(self.workdir / "server.log", "wb")
        self.process = subprocess.Popen(
            ["prosody", "--config", str(self.config), "-F"],
            cwd=self.workdir,
            stdout=self.log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        wait_for_port(self.port, self.process, 60)
        self._create_accounts()

    def _create_accounts(self) -> None:
        """One account through Prosody's admin shell, then its stored SCRAM credentials copied
        to the others (as for mim-twisted, one salt for all: `prosodyctl register` per account
        takes a process and a PBKDF2 each)."""
        started = time.monotonic()
        subprocess.run(
            ["prosodyctl", "--config", str(self.config), "shell"],
            input=f'user:create("{PREFIX}1@{DOMAIN}", "{PASSWORD}")\n',
            text=True, check=True, capture_output=True, timeout=60,
        )  # fmt: skip
        users = [f"{PREFIX}{i}" for i in range(2, self.accounts + 1)]
        if self.storage == "sqlite":
            import sqlite3

            with contextlib.closing(
                sqlite3.connect(self.workdir / "data" / "prosody.sqlite")
            ) as db:
                rows = db.execute(
                    "SELECT host, store, key, type, value FROM prosody"
                    " WHERE host = ? AND user = ? AND store = 'accounts'",
                    (DOMAIN, f"{PREFIX}1"),
                ).fetchall()
                db.executemany(
                    "INSERT INTO prosody (host, user, store, key, type, value)"
                    " VALUES (?, ?, ?, ?, ?, ?)",
                    [(h, u, st, k, t, v) for u in users for (h, st, k, t, v) in rows],
                )
                db.commit()
        else:
            accounts = self.workdir / "data" / DOMAIN / "accounts"
            template = (accounts / f"{PREFIX}1.dat").read_bytes()
            for user in users:
                (accounts / f"{user}.dat").write_bytes(template)
        elapsed = time.monotonic() - started
        print(f"# {self.accounts} accounts created in {elapsed:.1f} s", flush=True)

    @property
    def pid(self) -> int:
        return self.process.pid

    def stop(self) -> None:
        if self.process is not None:
            stop(self.process)
            self.log.close()

    def cleanup(self) -> None:
        pass


# -- running ---------------------------------------------------------------------------------


def scenarios(args: argparse.Namespace) -> list[tuple[str, str, list[str]]]:
    """(label, scenario, load.py arguments) for every scenario asked for."""
    out = []
    for name in args.scenarios:
        if name == "login":
            argv = ["--clients", str(args.login_clients), "--concurrency", str(args.concurrency)]
            out.append(("login", name, argv))
        elif name == "messages":
            argv = ["--clients", str(args.message_clients), "--duration", str(args.duration)]
            out.append(("messages", name, argv))
        elif name == "pep":
            for size in args.pep_sizes:
                users, contacts = size.split("x")
                argv = ["--clients", users, "--contacts", contacts]
                argv += ["--duration", str(args.duration)]
                out.append((f"pep {size}", name, argv))
        else:
            publishers = f" p={args.publishers}" if args.publishers > 1 else ""
            for window in args.pubsub_windows:
                argv = ["--clients", str(args.subscribers), "--items", str(args.items)]
                argv += ["--window", str(window), "--publishers", str(args.publishers)]
                out.append((f"pubsub-fanout w={window}{publishers}", name, argv))
    return out


def _machine_busy() -> float:
    """Seconds of CPU the whole machine has spent busy: user, nice, system and steal time."""
    with open("/proc/stat") as f:
        fields = [int(x) for x in f.readline().split()[1:]]
    return (fields[0] + fields[1] + fields[2] + fields[7]) / os.sysconf("SC_CLK_TCK")


def wait_for_quiet(args: argparse.Namespace) -> None:
    """Wait (at most --quiet-wait s) until the machine is idle for 3 s in a row, e.g. until
    a test suite someone else runs on the same machine is over: the figures assume that the
    client and the server have the cores to themselves."""
    deadline = time.monotonic() + args.quiet_wait
    said = False
    while True:
        before = _machine_busy()
        time.sleep(3)
        busy = (_machine_busy() - before) / 3
        if busy < args.quiet_threshold / 100:
            return
        if time.monotonic() > deadline:
            print(f"# the machine is still busy ({busy:.0%} of a core): measuring anyway")
            return
        if not said:
            print(f"# waiting for the machine to be idle ({busy:.0%} of a core busy)", flush=True)
            said = True


def run_load(server, scenario: str, argv: list[str], args: argparse.Namespace) -> dict:
    """--runs runs of one scenario, each its own load.py process after the machine is idle;
    a run during which other processes took more than --max-other % of a core is discarded
    and repeated (at most 2*--runs extra times). The medians, min and max over the runs."""
    command = [
        sys.executable, str(LOAD), scenario, *argv,
        "--host", "127.0.0.1", "--port", str(server.port), "--domain", DOMAIN,
        "--user-prefix", PREFIX, "--password", PASSWORD, "--mechanism", args.mechanism,
    ]  # fmt: skip
    for pid in getattr(server, "pids", [server.pid]):
        command += ["--server-pid", str(pid)]
    for name in server.db_processes:
        command += ["--db-process", name]
    publisher = publisher_pid(server.pid) if getattr(server, "pusher", None) else None
    if publisher is not None:
        # The event pusher's publisher process: its CPU is the server's too, reported apart.
        command += ["--publisher-pid", str(publisher)]
    print("$ load.py", " ".join(command[2:]), flush=True)
    results: list[dict] = []
    discarded = 0
    while len(results) < args.runs and discarded <= 2 * args.runs:
        wait_for_quiet(args)
        sampler = CounterSampler(server) if getattr(server, "pusher", None) else None
        try:
            done = subprocess.run(
                command, capture_output=True, text=True, timeout=args.scenario_timeout
            )
        except subprocess.TimeoutExpired:
            return {"error": f"no result in {args.scenario_timeout} s"}
        lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
        figures = json.loads(lines[-1]) if lines else {"error": "no output"}
        if sampler is not None:
            figures.update(sampler.figures())
        if done.returncode != 0 or "error" in figures:
            print(done.stderr[-3000:], file=sys.stderr, flush=True)
            print("  ", lines[-1] if lines else "no output", flush=True)
            return {"error": figures.get("error", f"exit status {done.returncode}")}
        other = figures.get("other_cpu_pct")
        if other is not None and other > args.max_other:
            discarded += 1
            print(f"   (discarded: other processes took {other} % of a core)", flush=True)
            continue
        figures["run"] = len(results) + 1
        results.append(figures)
        print("  ", json.dumps(figures), flush=True)
    if not results:
        return {"error": "the machine was never quiet enough"}
    summary = load.summarise(results)
    summary["discarded"] = discarded
    print("  ", json.dumps(summary), flush=True)
    return {**summary["median"], "runs": len(results), "discarded": discarded}


def bench_one(server_class, storage: str, args: argparse.Namespace, **options: bool) -> dict:
    workdir = Path(tempfile.mkdtemp(prefix="mim-bench-"))
    server = server_class(storage, workdir, args, **options)
    print(f"## {server.label}: {workdir}, port {server.port}", flush=True)
    results = {}
    try:
        pep_users = [int(size.split("x")[0]) for size in args.pep_sizes]
        server.prepare(
            max(
                args.login_clients,
                args.message_clients,
                args.subscribers + args.publishers,
                *pep_users,
            )
        )
        server.start()
        for label, scenario, argv in scenarios(args):
            results[label] = run_load(server, scenario, argv, args)
    finally:
        server.stop()
        server.cleanup()
        if args.keep:
            print(f"# kept {workdir}", flush=True)
        else:
            shutil.rmtree(workdir, ignore_errors=True)
    return results


def _fmt(value: object) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:,.0f}" if value >= 100 else f"{value:.1f}"
    return str(value)


FIGURES = {  # scenario -> (rate figure, latency figure, unit)
    "login": ("logins_per_s", "latency_ms", "logins/s"),
    "messages": ("messages_per_s", "latency_ms", "msg/s"),
    "pubsub-fanout": ("notifications_per_s", "publish_to_last_ms", "notif/s"),
    "pep": ("notifications_per_s", "publish_to_notification_ms", "notif/s"),
}


def table(all_results: dict[str, dict]) -> str:
    header = (
        "target", "scenario", "rate", "p50 ms", "p95 ms", "p99 ms", "server CPU",
        "server CPU/op", "db CPU", "client CPU", "other CPU",
    )  # fmt: skip
    rows = [header]
    for target, results in all_results.items():
        for label, figures in results.items():
            rate_key, latency_key, unit = FIGURES[label.split()[0]]
            if "error" in figures:
                rows.append((target, label, f"error: {figures['error']}", *[""] * 8))
                continue
            latency = figures.get(latency_key, {})
            rows.append((
                target, label, f"{_fmt(figures.get(rate_key))} {unit}",
                _fmt(latency.get("p50")), _fmt(latency.get("p95")), _fmt(latency.get("p99")),
                f"{_fmt(figures.get('server_cpu_pct'))} %",
                _cpu_per_op(figures.get("server_cpu_pct"), figures.get(rate_key)),
                f"{_fmt(figures.get('db_cpu_pct'))} %" if "db_cpu_pct" in figures else "-",
                f"{_fmt(figures.get('client_cpu_pct'))} %",
                f"{_fmt(figures.get('other_cpu_pct'))} %",
            ))  # fmt: skip
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    lines = [
        "| " + " | ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)) + " |" for r in rows
    ]
    lines.insert(1, "|" + "|".join("-" * (w + 2) for w in widths) + "|")
    return "\n".join(lines)


def _cpu_per_op(cpu_pct: float | None, rate: float | None) -> str:
    """Server CPU microseconds per operation (message, notification, login)."""
    if not cpu_pct or not rate:
        return "-"
    return f"{cpu_pct * 10_000 / rate:.1f} µs"


def workers_summary(all_results: dict[str, dict]) -> list[str]:
    """How the CPU was shared between the processes of each server with workers."""
    lines = []
    for target, results in all_results.items():
        for label, figures in results.items():
            each = figures.get("server_cpu_pct_each")
            if each:
                shares = ", ".join(
                    f"{'twistd' if place == '0' else f'worker {place}'} {value:.1f} %"
                    for place, value in sorted(each.items(), key=lambda kv: int(kv[0]))
                )
                lines.append(f"{target}, {label}: server CPU per process: {shares}")
    return lines


def pusher_summary(all_results: dict[str, dict]) -> list[str]:
    """The event pusher's figures, and the chat rate with it against without it."""
    lines = []
    for target, results in all_results.items():
        figures = results.get("messages", {})
        if "pusher_events_per_s" not in figures:
            continue
        rate = figures.get("messages_per_s")
        line = (
            f"{target}: {_fmt(figures['pusher_events_per_s'])} events/s confirmed by RabbitMQ"
            f" for {_fmt(rate)} msg/s (2 events a message), peak buffered"
            f" {_fmt(figures.get('pusher_peak_buffered'))}, dropped"
            f" {_fmt(figures.get('pusher_dropped'))}"
        )
        without = all_results.get(target.removesuffix("+pusher"), {}).get("messages", {})
        if rate and without.get("messages_per_s"):
            change = 100 * (rate / without["messages_per_s"] - 1)
            line += f"; chat rate {change:+.1f} % against the pusher off"
            off, on = cpu_per_message(without), cpu_per_message(figures)
            line += f"; server CPU per message: off {off}, on {on}"
        lines.append(line)
    return lines


def cpu_per_message(figures: dict) -> str:
    """The server's CPU per delivered message: its XMPP process, and its publisher process."""
    rate = figures.get("messages_per_s")
    if not rate or figures.get("server_cpu_pct") is None:
        return "-"
    text = f"{figures['server_cpu_pct'] * 1e4 / rate:.1f} µs"
    if figures.get("publisher_cpu_pct") is not None:
        text += f" + publisher {figures['publisher_cpu_pct'] * 1e4 / rate:.1f} µs"
    return text


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add = parser.add_argument
    add("--server", choices=["mim", "prosody"], default="mim")
    add("--storage", nargs="+", default=["sqlite"], help="mim: one or more of sqlite, "
        "postgresql, mysql, or both (sqlite and postgresql), run one after the other; prosody: "
        "sqlite or internal")  # fmt: skip
    add("--scenarios", nargs="+", choices=list(FIGURES), help="default: all; with --workers: "
        "messages and pubsub-fanout")  # fmt: skip
    add("--runs", type=int, default=3, help="runs per scenario; the medians are reported")
    add("--mechanism", default=None, help="SASL mechanism (default SCRAM-SHA-256 for mim, "
        "SCRAM-SHA-1 for prosody, which offers no other SCRAM)")  # fmt: skip
    add("--login-clients", type=int, default=1000)
    add("--concurrency", type=int, default=50, help="logins in progress at once")
    add("--message-clients", type=int, default=100)
    add("--duration", type=float, default=10.0, help="messages: seconds measured")
    add("--subscribers", type=int, default=1000)
    add("--items", type=int, default=100)
    add("--publishers", type=int, default=1, help="pubsub-fanout: publishers of the node, "
        "each publishing --items with --pubsub-windows in flight")  # fmt: skip
    add("--pubsub-windows", type=int, nargs="+", default=[1, 4], help="items in flight")
    add("--pep-sizes", nargs="+", default=["50x10", "1000x20"], help="pep: USERSxCONTACTS, "
        "users in a ring with that many mutual contacts each")  # fmt: skip
    add("--pubsub-workers", type=int, default=64, help="mim: [pubsub] workers")
    add("--pg-pool", type=int, default=8, help="mim: [storage.postgresql] pool_size")
    add("--mysql-pool", type=int, default=4, help="mim: [storage.mysql] pool_size")
    add("--extra-config", default="", help="mim: TOML appended to the config")
    add("--event-pusher", choices=["off", "on", "both"], default="off", help="mim: the event "
        "pusher to the local RabbitMQ (both: a server without it, then one with it)")  # fmt: skip
    add("--workers", type=int, nargs="+", help="mim: cluster mode on PostgreSQL and RabbitMQ: "
        "one server per count, 1 being the single process (cluster off), N>1 twistd mim with "
        "[cluster] workers = N, in the same sitting")  # fmt: skip
    add("--quick", action="store_true", help="small and short: a smoke test")
    add("--keep", action="store_true", help="keep the temporary directories")
    add("--scenario-timeout", type=float, default=1800.0)
    add("--quiet-threshold", type=float, default=15.0, help="%% of a core counted as idle")
    add("--quiet-wait", type=float, default=900.0, help="seconds to wait for an idle machine")
    add("--max-other", type=float, default=20.0, help="%% of a core other processes may take "
        "during a run before it is discarded and repeated")  # fmt: skip
    add("--output", help="write all medians as JSON to this file")
    args = parser.parse_args(argv)
    if args.scenarios is None:
        args.scenarios = ["messages", "pubsub-fanout"] if args.workers else list(FIGURES)
    if args.workers and (args.server != "mim" or args.storage not in (["sqlite"], ["postgresql"])):
        parser.error("--workers runs mim-twisted on PostgreSQL (--storage postgresql)")
    if args.workers:
        args.storage = ["postgresql"]
    if args.mechanism is None:
        args.mechanism = "SCRAM-SHA-1" if args.server == "prosody" else "SCRAM-SHA-256"
    if args.quick:
        args.runs, args.login_clients, args.message_clients = 1, 50, 10
        args.duration, args.subscribers, args.items = 3.0, 20, 10
        args.pep_sizes = ["20x4"]
    return args


def _terminated(signum: int, frame: object) -> None:
    raise SystemExit(f"stopped by signal {signum}")  # so that the servers are stopped too


def main(argv: list[str]) -> int:
    if argv[:1] == ["create-accounts"]:
        return create_accounts_command(argv[1:])
    signal.signal(signal.SIGTERM, _terminated)
    args = parse_args(argv)
    if args.server == "mim":
        server_class = MimServer
        storages = [
            name
            for storage in args.storage
            for name in (["sqlite", "postgresql"] if storage == "both" else [storage])
        ]
    else:
        server_class = ProsodyServer
        storages = args.storage
    all_results = {}
    pusher = {"off": [False], "on": [True], "both": [False, True]}[args.event_pusher]
    for count in args.workers or ():
        target = "mim-twisted/postgresql" + (f" x{count} workers" if count > 1 else "")
        all_results[target] = bench_one(server_class, "postgresql", args, workers=count)
    for storage in storages if not args.workers else ():
        if server_class is not MimServer:
            all_results[f"{server_class.name}/{storage}"] = bench_one(server_class, storage, args)
            continue
        for on in pusher:
            target = f"{server_class.name}/{storage}" + ("+pusher" if on else "")
            all_results[target] = bench_one(server_class, storage, args, pusher=on)
    print()
    print(
        f"Medians of {args.runs} run(s), SASL {args.mechanism}; the load generator and the server"
        f" share one machine ({os.cpu_count()} cores)."
    )
    print(table(all_results))
    for line in workers_summary(all_results) + pusher_summary(all_results):
        print(line)
    if args.output:
        Path(args.output).write_text(json.dumps(all_results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
